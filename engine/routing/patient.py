"""The patient a stored message is about (MRN, name, birth date), for the referral row
the search box finds: PID for HL7 v2, a Patient resource (itself, contained or in a
Bundle) for FHIR (engine.hl7v2.patient). The handler writes it on every referral a
message's track events reached (engine.store.referral_search.set_patient)."""

from __future__ import annotations

from engine.errors import MessageRejected
from engine.hl7v2.message import Message
from engine.hl7v2.patient import Demographics, from_fhir, from_hl7
from engine.model import StoredMessage
from engine.routing.fhirpath import FhirResource, is_fhir


def read_hl7(row: StoredMessage) -> Message | None:
    """``row``'s bytes read as an HL7 v2 message; None for a FHIR resource or bytes that
    cannot be read (decide_stored says why). Processing reads a message once, for its
    decision and its patient (the second read was 4 % of processing a new referral)."""
    if is_fhir(row.raw, row.message_type):
        return None
    try:
        return Message(row.raw)
    except MessageRejected:
        return None


def demographics(row: StoredMessage, message: Message | None = None) -> Demographics:
    """What ``row`` says of its patient (``message``: its bytes, read already); empty
    when it says nothing or cannot be read."""
    if message is not None:
        return from_hl7(message)
    try:
        if is_fhir(row.raw, row.message_type):
            return from_fhir(FhirResource.from_bytes(row.raw).data)
        return from_hl7(Message(row.raw))
    except MessageRejected:
        return Demographics()
