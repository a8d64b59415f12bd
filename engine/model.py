"""The frozen values that stages hand each other.

Inbound → (inbox row) → ParsedMessage → Decision(events, actions) → tracker → OutboxItem.
Nothing here does I/O; nothing mutates what it received.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Literal

# ---------------------------------------------------------------------------
# Ingest

InboxStatus = Literal["received", "routed", "filtered", "error", "rejected"]
INBOX_STATUSES: Final = ("received", "routed", "filtered", "error", "rejected")

AckCode = Literal["AA", "AE", "AR", "CA", "CE", "CR"]


@dataclass(frozen=True, slots=True)
class MshInfo:
    """The MSH fields the ACK path and dedupe need; read without a full parse.

    Values are decoded text, still escaped (``\\F\\`` etc. left as sent).
    """

    field_sep: str
    encoding_chars: str  # MSH-2, e.g. "^~\\&"
    sending_app: str  # MSH-3 (whole field, components kept)
    sending_facility: str  # MSH-4
    receiving_app: str  # MSH-5
    receiving_facility: str  # MSH-6
    timestamp: str  # MSH-7
    message_type: str  # MSH-9 as "TYPE^TRIGGER" (component sep normalised to ^), "" if absent
    structure: str  # MSH-9.3, "" if absent
    control_id: str  # MSH-10
    processing_id: str  # MSH-11
    version: str  # MSH-12 (first component)
    accept_ack_type: str  # MSH-15: AL / NE / ER / SU / ""
    app_ack_type: str  # MSH-16: AL / NE / ER / SU / ""
    charset: str  # MSH-18 (first repetition), "" if absent

    @property
    def component_sep(self) -> str:
        return self.encoding_chars[0] if self.encoding_chars else "^"

    @property
    def enhanced(self) -> bool:
        """Enhanced acknowledgment mode (HL7 v2.5.1 §2.9.3): MSH-15 or MSH-16 valued."""
        return bool(self.accept_ack_type or self.app_ack_type)

    @property
    def trigger(self) -> str:
        return self.message_type.partition("^")[2]


@dataclass(frozen=True, slots=True)
class Inbound:
    """One message as a source received it, before it is stored."""

    source: str
    peer: str
    raw: bytes
    received_at: float
    msh: MshInfo | None  # None when no MSH could be read
    text_encoding: str  # the Python codec that decodes ``raw`` ("utf-8", "latin-1", "ascii")
    reject: tuple[str, str, str, str] | None = None  # (ack, 0357 code, location, reason)
    batch_ref: str = ""  # BHS-11 of the batch it came in, if any


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """An inbox row as read back from the store."""

    id: int
    received_at: float
    source: str
    peer: str
    sending_app: str
    sending_facility: str
    control_id: str
    message_type: str
    version: str
    raw: bytes
    charset: str
    status: str
    ack_code: str
    error: str
    duplicates: int = 0
    flags: str = ""
    route: str = ""


# ---------------------------------------------------------------------------
# Normalised events: the contract between routes and the tracker.
# Each carries only what the tracker needs. No raw message, no free text beyond
# the clinically needed "reason" (kept in the store, never logged).


@dataclass(frozen=True, slots=True)
class Identifiers:
    """How a message names the referral it is about."""

    sending_facility: str = ""  # scope of the placer number
    placer_number: str = ""  # ORC-2 / OBR-2 / RF1-6 / SCH-26 / TXA-14 / ServiceRequest.identifier
    filler_numbers: tuple[str, ...] = ()  # ORC-3 / RF1-11 / SCH-2
    patient_ids: tuple[str, ...] = ()  # PID-3 repetitions as "id^^^authority"
    specialty: str = ""  # for the patient + specialty window match


@dataclass(frozen=True, slots=True)
class Provider:
    name: str = ""
    npi: str = ""
    organisation: str = ""
    direct_address: str = ""
    fax: str = ""
    phone: str = ""


@dataclass(frozen=True, slots=True)
class PatientContact:
    phone: str = ""
    sms_consent: bool | None = None  # None: not stated by this message
    portal: bool | None = None
    language: str = ""
    time_zone: str = ""


@dataclass(frozen=True, slots=True)
class Event:
    """Base of every normalised event. ``occurred_at`` is the message's own event time
    (epoch seconds) where it states one, else the receive time."""

    ids: Identifiers
    occurred_at: float
    message_id: int = 0  # inbox row the event came from (0 for operator actions)

    kind: str = field(default="", init=False)


@dataclass(frozen=True, slots=True)
class ReferralCreated(Event):
    referring: Provider = Provider()
    specialist: Provider = Provider()
    specialty: str = ""
    specialty_category: str = ""
    reason: str = ""
    priority: str = "routine"  # routine | urgent | stat
    needed_by: str = ""  # ISO date
    contact: PatientContact = PatientContact()
    prior_auth_required: bool = False
    kind: str = field(default="referral-created", init=False)


@dataclass(frozen=True, slots=True)
class ReferralUpdated(Event):
    referring: Provider = Provider()
    specialist: Provider = Provider()
    specialty: str = ""
    specialty_category: str = ""
    reason: str = ""
    priority: str = ""
    needed_by: str = ""
    kind: str = field(default="referral-updated", init=False)


@dataclass(frozen=True, slots=True)
class ReferralCancelled(Event):
    reason: str = ""
    kind: str = field(default="referral-cancelled", init=False)


@dataclass(frozen=True, slots=True)
class AppointmentBooked(Event):
    appointment_id: str = ""
    start: str = ""  # ISO datetime of the appointment
    kind: str = field(default="appointment-booked", init=False)


@dataclass(frozen=True, slots=True)
class AppointmentRescheduled(Event):
    appointment_id: str = ""
    start: str = ""
    kind: str = field(default="appointment-rescheduled", init=False)


@dataclass(frozen=True, slots=True)
class AppointmentCancelled(Event):
    appointment_id: str = ""
    reason: str = ""
    kind: str = field(default="appointment-cancelled", init=False)


@dataclass(frozen=True, slots=True)
class NoShow(Event):
    appointment_id: str = ""
    kind: str = field(default="no-show", init=False)


@dataclass(frozen=True, slots=True)
class SpecialistAccepted(Event):
    kind: str = field(default="specialist-accepted", init=False)


@dataclass(frozen=True, slots=True)
class SpecialistDeclined(Event):
    reason: str = ""
    kind: str = field(default="specialist-declined", init=False)


@dataclass(frozen=True, slots=True)
class ReportReceived(Event):
    report_id: str = ""
    status: str = "final"  # final | corrected | preliminary
    kind: str = field(default="report-received", init=False)


@dataclass(frozen=True, slots=True)
class ContactUpdated(Event):
    contact: PatientContact = PatientContact()
    kind: str = field(default="contact-updated", init=False)


@dataclass(frozen=True, slots=True)
class PatientsMerged(Event):
    surviving_id: str = ""
    retired_id: str = ""
    kind: str = field(default="patients-merged", init=False)


EVENT_TYPES: Final[dict[str, type[Event]]] = {
    cls.__dataclass_fields__["kind"].default: cls  # type: ignore[misc]
    for cls in (
        ReferralCreated,
        ReferralUpdated,
        ReferralCancelled,
        AppointmentBooked,
        AppointmentRescheduled,
        AppointmentCancelled,
        NoShow,
        SpecialistAccepted,
        SpecialistDeclined,
        ReportReceived,
        ContactUpdated,
        PatientsMerged,
    )
}
