"""The frozen values that stages hand each other.

Inbound → (inbox row) → ParsedMessage → Decision(events, actions) → tracker → OutboxItem.
Nothing here does I/O; nothing mutates what it received.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Final, Literal, get_args

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
    # Used when ``msh`` is None (FHIR resources, engine.ingest.fhir): what stands in for
    # MSH-3 / MSH-10 / MSH-9 in the inbox row and its dedupe key.
    sender: str = ""  # e.g. the FHIR source's name
    control_id: str = ""  # e.g. "ServiceRequest/123/_history/2"
    message_type: str = ""  # e.g. "ServiceRequest"


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
    pruned_at: float | None = None  # when retention deleted the bytes (``raw`` is then b"")
    sha256: bytes = b""  # of the bytes as received (kept when they are pruned)

    @property
    def pruned(self) -> bool:
        return self.pruned_at is not None


@dataclass(frozen=True, slots=True)
class Outcome:
    """What processing made of one message (engine.ingest.processor runs the handler that
    returns it, engine.routing.handler is that handler). ``error`` is a reason, never PHI."""

    status: str  # routed | filtered | error | rejected
    error: str = ""
    route: str = ""

    @property
    def app_ack(self) -> str:
        """The application ACK code this outcome earns (HL7 table 0008)."""
        return {"error": "AE", "rejected": "AR"}.get(self.status, "AA")


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
    # EI.2 (namespace id) of the placer number as this message states it (ORC-2.2, RF1-6.2,
    # SCH-26.2, TXA-14.2): the practice that assigned it (docs/referral-states.md)
    placer_authority: str = ""


@dataclass(frozen=True, slots=True)
class Provider:
    name: str = ""
    npi: str = ""
    organisation: str = ""
    direct_address: str = ""
    fax: str = ""
    phone: str = ""
    reference: str = ""  # FHIR reference (Practitioner/…, PractitionerRole/…) when known


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
    prior_auth_required: bool = False  # AUT segment, RF1 fields or a routes.yaml rule
    prior_auth_hold_packet: bool = False  # the route holds the specialist packet until approval
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


@dataclass(frozen=True, slots=True)
class PriorAuthDecided(Event):
    """A prior-authorization outcome (payer response, RF1/AUT update, or an operator).

    The tracker keeps it in the referral's prior-auth work item; the state machine does
    not see it, so it is not (yet) in :data:`EVENT_TYPES`.
    """

    outcome: str = ""  # approved | denied | pending
    auth_number: str = ""  # AUT-4 / payer reference
    kind: str = field(default="prior-auth-decided", init=False)


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


# ---------------------------------------------------------------------------
# Referral vocabulary shared by the tracker (engine.tracking.states) and the store's
# closure-report table (engine.store.closure_report), which sits below the tracker.

OverallStatus = Literal["open", "patient-booked", "specialist-confirmed", "escalated", "closed"]
OVERALL_STATUSES: Final[tuple[OverallStatus, ...]] = get_args(OverallStatus)
# OBR-25 F/C and TXA-17 AU/LA reach us as "final"/"corrected". Any other status, such as
# "preliminary" (OBR-25 P, TXA-17 DO/IP), is an interim note and does not close the loop.
CLOSING_REPORT_STATUSES: Final = frozenset({"final", "corrected"})


# ---------------------------------------------------------------------------
# Routing decisions: what routes.yaml made of one message (engine.routing.decide).
# Pure values; the handler applies them (tracker, outbox) inside the processing
# transaction, and the decisions table records them for replay.

DecisionStatus = Literal["routed", "filtered", "error"]


@dataclass(frozen=True, slots=True)
class Track:
    """Hand a normalised event to the referral tracker."""

    route: str
    event: Event
    action: str = field(default="track", init=False)


@dataclass(frozen=True, slots=True)
class Send:
    """Send a channel template through the outbox. ``to`` is the rendered recipient (may
    be PHI, a phone number: never logged); ``values`` are the route's extracted values,
    the template's ``payload.values`` (PHI channels only; an SMS template never sees them)."""

    route: str
    channel: str
    template: str
    to: str = ""
    values: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    action: str = field(default="send", init=False)


@dataclass(frozen=True, slots=True)
class Forward:
    """Forward the message, byte for byte as received, to an MLLP channel (outbox)."""

    route: str
    channel: str
    action: str = field(default="forward", init=False)


@dataclass(frozen=True, slots=True)
class Drop:
    """The route matched and says the message needs nothing (status ``filtered``)."""

    route: str
    reason: str
    action: str = field(default="drop", init=False)


Action = Track | Send | Forward | Drop


@dataclass(frozen=True, slots=True)
class Decision:
    """What the routes decided for one message.

    ``routed``: ``routes`` matched and ``actions`` are to be applied. ``filtered``: no
    route matched, or the matching routes only drop; ``reason`` says why. ``error``: a
    matching route failed (an expression raised, no identifiers); ``reason`` names the
    route and what failed, never a value from the message.
    """

    status: DecisionStatus
    routes: tuple[str, ...] = ()
    actions: tuple[Action, ...] = ()
    reason: str = ""

    @property
    def route(self) -> str:
        """The matched route names as one text (``a,b`` when a route said ``continue``)."""
        return ",".join(self.routes)

    @property
    def events(self) -> tuple[Event, ...]:
        return tuple(a.event for a in self.actions if isinstance(a, Track))


# ---------------------------------------------------------------------------
# Outbound: what the dispatcher hands a channel (channels.base.Channel) and what it
# gets back, plus the provider callbacks the HTTP webhooks turn into values.


@dataclass(frozen=True, slots=True)
class Attachment:
    """A file carried by a PHI-bearing channel (never by SMS)."""

    filename: str
    content_type: str
    data: bytes


@dataclass(frozen=True, slots=True)
class OutboundMessage:
    """One outbox row, already rendered, handed to a channel's ``send``.

    ``idempotency_key`` is stable across retries of the same outbox row; channels pass it
    to the provider where the provider has idempotency (HTTP header, FHIR conditional
    create) and otherwise embed ``outbox_id`` so callbacks map back.
    ``recipient`` is the channel's address: an E.164 number for SMS, a FHIR reference
    (``Patient/123``, ``Practitioner/9``) for FHIR, a route name for webhooks.
    ``body``/``subject``/``attachments`` are rendered text; ``payload`` is JSON text for
    channels that send a structured document instead. ``referral_id`` is the engine's
    opaque key (never a patient identifier); ``patient_ref`` and ``based_on`` are FHIR
    references used only by PHI-bearing channels.
    """

    outbox_id: int
    idempotency_key: str
    channel: str
    recipient: str
    kind: str = ""  # e.g. "first-nudge", "coordinator-task", "voice-task", "loop-closed"
    body: str = ""
    subject: str = ""
    attachments: tuple[Attachment, ...] = ()
    payload: str = ""  # JSON text
    referral_id: str = ""
    patient_ref: str = ""  # "Patient/123" (PHI-bearing channels only)
    based_on: str = ""  # "ServiceRequest/456"
    priority: str = "routine"  # routine | urgent | asap | stat (FHIR request-priority)
    priority_score: float | None = None  # coordinator tasks: higher is more urgent
    # RFC 5322 Message-ID stored with the row (Direct: random, assigned at first claim,
    # the same on every retry); '' when the channel has none
    message_id: str = ""


@dataclass(frozen=True, slots=True)
class SendReceipt:
    """What a provider said when it accepted an :class:`OutboundMessage`.

    ``provider_status`` is the provider's own word ("queued", "accepted", "201").
    """

    outbox_id: int
    idempotency_key: str
    channel: str
    provider_message_id: str = ""
    provider_status: str = ""


@dataclass(frozen=True, slots=True)
class DeliveryUpdate:
    """A provider's delivery-status callback (e.g. Twilio's StatusCallback), verified.

    ``outbox_id`` is 0 when the callback could not be tied to an outbox row.
    """

    channel: str
    outbox_id: int
    provider_message_id: str
    status: str
    error_code: str = ""


@dataclass(frozen=True, slots=True)
class SmsReply:
    """An inbound SMS from a patient, verified and classified.

    ``keyword`` is the closed classification (stop/start/help/yes/other); ``body`` is
    the patient's free text: store it if needed, never log it.
    """

    provider_message_id: str
    from_number: str
    to_number: str
    keyword: Literal["stop", "start", "help", "yes", "other"]
    body: str = ""


# ---------------------------------------------------------------------------
# Specialist packet (engine.delivery.packet_source reads it from HL7; channels.packet renders it)
# and what the Direct listener makes of inbound mail. All of it is PHI: store, never log.


@dataclass(frozen=True, slots=True)
class Insurance:
    """One IN1 segment, as the packet shows it."""

    plan: str = ""  # IN1-2 text (or code)
    company: str = ""  # IN1-4
    group_number: str = ""  # IN1-8
    policy_number: str = ""  # IN1-36
    insured: str = ""  # IN1-16 as a display name


@dataclass(frozen=True, slots=True)
class PacketData:
    """Everything the referral packet PDF shows. Text fields are display-ready (HL7
    escapes resolved); ``attachments`` are documents passed through byte-exact (PDFs
    from OBX ED base64)."""

    referral_id: str  # placer / referral number (RF1-6, ORC-2, OBR-2)
    message_type: str  # "REF^I12", ...
    referral_date: str = ""  # ISO date
    specialty: str = ""
    service: str = ""  # OBR-4 text: what is requested
    reason: str = ""  # RF1-10 / OBR-31 / ORC-16 / DG1 text
    urgency: str = "routine"  # routine | urgent | stat
    needed_by: str = ""  # ISO date
    patient_name: str = ""
    patient_birth_date: str = ""  # ISO date
    patient_sex: str = ""
    patient_ids: tuple[str, ...] = ()
    patient_phone: str = ""
    referring: Provider = Provider()
    specialist: Provider = Provider()
    diagnoses: tuple[str, ...] = ()  # "K63.3 Ulcer of intestine"
    notes: tuple[str, ...] = ()  # NTE-3
    observations: tuple[str, ...] = ()  # OBX text: "name: value unit"
    insurance: tuple[Insurance, ...] = ()
    confirmation_line: str = ""
    confirmation_url: str = ""
    attachments: tuple[Attachment, ...] = ()


DirectDisposition = Literal["processed", "dispatched", "failed", "other"]


@dataclass(frozen=True, slots=True)
class MdnResult:
    """A signed, trusted MDN (RFC 8098) about a message we sent, signed by a certificate
    bound to ``sender`` (the engine acts on it only if ``sender`` is the packet's
    recipient: ``engine.delivery.direct_inbound``).

    ``disposition``: ``processed`` (the receiving HISP accepted it: "delivered"),
    ``dispatched`` (handed to the recipient: "confirmed"), ``failed``, or ``other``
    (displayed/deleted/denied: recorded, no state change). ``final_delivery`` is true when
    the MDN carries the X-DIRECT-FINAL-DESTINATION-DELIVERY extension field.
    """

    original_message_id: str
    disposition: DirectDisposition
    disposition_text: str  # the Disposition field's type token as sent, lower-cased
    sender: str  # verified From address (the signer's)
    message_id: str = ""  # the MDN's own Message-ID
    final_recipient: str = ""
    final_delivery: bool = False
    raw: bytes = b""  # the message as received (kept if the engine quarantines it)


@dataclass(frozen=True, slots=True)
class DsnRecipient:
    """One per-recipient block of a DSN (RFC 3464 §2.3)."""

    final_recipient: str
    action: str  # failed | delayed | delivered | relayed | expanded
    status: str  # RFC 3463 code, e.g. "5.4.72"


@dataclass(frozen=True, slots=True)
class DsnResult:
    """A signed, trusted delivery-status notification about a message we sent."""

    original_message_id: str
    sender: str
    recipients: tuple[DsnRecipient, ...]
    message_id: str = ""

    @property
    def failed(self) -> bool:
        return any(r.action == "failed" for r in self.recipients)


@dataclass(frozen=True, slots=True)
class ReplyWithAttachments:
    """A signed, trusted Direct message that is not a notification: usually a
    specialist's reply. ``references`` lists In-Reply-To then References message-ids
    (our packet's Message-ID among them when it answers a packet)."""

    sender: str
    message_id: str
    references: tuple[str, ...]
    attachments: tuple[Attachment, ...]
    subject: str = ""
    raw: bytes = b""  # the message as received (kept if the engine quarantines it)

    @property
    def reference(self) -> str:
        return self.references[0] if self.references else ""


@dataclass(frozen=True, slots=True)
class Quarantined:
    """Inbound Direct mail that failed a security check (unsigned, untrusted, forged,
    undecryptable). ``raw`` is the message as received, for a human to look at;
    ``reason`` is a short code safe to log."""

    reason: str
    raw: bytes
    claimed_sender: str = ""  # the unverified From header
    message_id: str = ""


DirectInbound = MdnResult | DsnResult | ReplyWithAttachments | Quarantined


# ---------------------------------------------------------------------------
# FHIR write-back (engine.ingest.fhir.write_back_task): what the tracker / outbox hands
# over when a referral's loop closes. FHIR references, no free text.


@dataclass(frozen=True, slots=True)
class LoopClosure:
    """A closed loop to report back to the EHR as a completed ``Task`` (and optionally a
    ``Communication`` to the referring provider)."""

    referral_id: str  # the engine's referral key (Task.identifier, idempotency)
    service_request: str  # "ServiceRequest/123": Task.focus and basedOn
    report: str  # "DiagnosticReport/9" or "DocumentReference/4": Task.output
    closed_at: float  # epoch seconds: executionPeriod.end
    task: str = ""  # "Task/77" when the EHR's Task for the referral is known
    patient: str = ""  # "Patient/5": Task.for
    requester: str = ""  # "Practitioner/3": Task.requester, Communication.recipient
    owner: str = ""  # "Organization/8": the performing organisation


# The outbox row (template) that carries a LoopClosure, on channel ``fhir:<source>``.
WRITE_BACK_TEMPLATE: Final = "fhir-task-completed"


def write_back_channel(source: str) -> str:
    """The outbox channel of FHIR source ``source``'s write-backs."""
    return f"fhir:{source}"


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}
_SCALARS: Final = frozenset({str, int, float, bool, type(None)})


def to_plain(value: Any) -> Any:
    """A dataclass value as plain dicts, tuples and scalars — what ``dataclasses.asdict``
    gives, without its deep copies (this runs for every event on the processing path)."""
    cls = type(value)
    if cls in _SCALARS:
        return value
    names = _FIELD_NAMES.get(cls)
    if names is None:
        if not hasattr(cls, "__dataclass_fields__"):
            if isinstance(value, (tuple, list)):
                return type(value)(to_plain(v) for v in value)
            return value
        names = tuple(f.name for f in fields(value))
        _FIELD_NAMES[cls] = names
    return {name: to_plain(getattr(value, name)) for name in names}
