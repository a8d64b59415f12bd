"""The referral state machine: pure and synchronous, with no I/O and no clock reads.

A referral has two branches that move on their own: the patient's (contact, booking,
visit) and the specialist's (packet, acceptance, report). It can also be closed. Every
stored field is a register that only moves one way: the higher rank wins, sets only grow,
and an appointment keeps its latest event by the message's own event time. So the
order-independent events in docs/referral-states.md end in the same state whatever order
they arrive in, and applying any event twice does nothing. The patient status, specialist
status, close reason and overall status are computed from those registers and never stored.

The caller (the tracker) records every event, whatever :func:`apply` returns. It carries
out the returned ``effects`` in the order given, in the same transaction as the new state.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Final, Literal, TypeVar, get_args

from engine.model import (
    CLOSING_REPORT_STATUSES as CLOSING_REPORT_STATUSES,
)
from engine.model import (
    OVERALL_STATUSES as OVERALL_STATUSES,
)
from engine.model import (
    AppointmentBooked,
    AppointmentCancelled,
    AppointmentRescheduled,
    Event,
    NoShow,
    ReportReceived,
    SpecialistDeclined,
    to_plain,
)
from engine.model import (
    OverallStatus as OverallStatus,
)

# Each Literal lists its values in rank order: the order of get_args() is the ranking.
PatientStatus = Literal[
    "not-contacted", "nudged", "booking-requested", "booked", "rescheduled", "no-show", "seen"
]
SpecialistStatus = Literal[
    "not-sent", "packet-sent", "delivered", "confirmed", "declined", "report-received"
]
Contact = Literal["not-contacted", "nudged", "booking-requested"]
SpecialistStep = Literal["not-sent", "packet-sent", "delivered", "confirmed", "declined"]
# Strongest first. A report closes the loop (MIPS 374 / CMS50 numerator), so it beats any
# other reason. The referrer's cancel beats the remaining reasons.
CloseReason = Literal[
    "report-received",
    "cancelled",
    "specialist-declined",
    "patient-declined",
    "no-response",
    "other",
]
# When two events for one appointment have the same event time, the later value here wins.
AppointmentEvent = Literal["booked", "rescheduled", "no-show", "cancelled"]
InternalKind = Literal[
    "patient-nudged",
    "booking-requested",
    "packet-sent",
    "packet-delivered",
    "specialist-confirmed",
    "escalated",
    "closed-by-operator",
    "no-response-close",
    "patient-declined",
    "seen",
]
Effect = Literal[
    "send-packet",
    "schedule-escalations",
    "schedule-patient-timers",
    "cancel-patient-timers",
    "schedule-report-timers",
    "schedule-appointment-timers",
    "cancel-appointment-timers",
    "cancel-all-timers",
    "stop-outbound",
    "notify-referrer-closed",
    "notify-referrer-declined",
]

PATIENT_STATUSES: Final[tuple[PatientStatus, ...]] = get_args(PatientStatus)
SPECIALIST_STATUSES: Final[tuple[SpecialistStatus, ...]] = get_args(SpecialistStatus)
CONTACT_RANK: Final[tuple[Contact, ...]] = get_args(Contact)
SPECIALIST_RANK: Final[tuple[SpecialistStep, ...]] = get_args(SpecialistStep)
CLOSE_PRECEDENCE: Final[tuple[CloseReason, ...]] = get_args(CloseReason)
CLOSE_REASONS: Final = frozenset(CLOSE_PRECEDENCE)
APPOINTMENT_EVENTS: Final[tuple[AppointmentEvent, ...]] = get_args(AppointmentEvent)
INTERNAL_KINDS: Final[tuple[InternalKind, ...]] = get_args(InternalKind)
EFFECTS: Final[tuple[Effect, ...]] = get_args(Effect)

# Patient statuses that mean an appointment is arranged or has already happened.
BOOKED: Final[frozenset[PatientStatus]] = frozenset({"booked", "rescheduled", "seen"})
_CONTACT_STEPS: Final[dict[str, Contact]] = {
    "patient-nudged": "nudged",
    "booking-requested": "booking-requested",
}
_SPECIALIST_STEPS: Final[dict[str, SpecialistStep]] = {
    "packet-sent": "packet-sent",
    "packet-delivered": "delivered",
    "specialist-accepted": "confirmed",
    "specialist-confirmed": "confirmed",
}
_CLOSES: Final[dict[str, CloseReason]] = {
    "referral-cancelled": "cancelled",
    "patient-declined": "patient-declined",
    "no-response-close": "no-response",
}
_APPOINTMENT_KINDS: Final[dict[str, AppointmentEvent]] = {
    "appointment-booked": "booked",
    "appointment-rescheduled": "rescheduled",
    "no-show": "no-show",
    "appointment-cancelled": "cancelled",
}
# The state machine ignores these kinds. The caller keeps their details (providers, contact).
_NO_OPS: Final = frozenset({"referral-updated", "contact-updated", "patients-merged"})
_NOTIFY: Final[dict[CloseReason, tuple[Effect, ...]]] = {
    "cancelled": (),  # the referrer cancelled it, so the referrer already knows
    "specialist-declined": ("notify-referrer-declined",),
}

_T = TypeVar("_T", bound=str)


def _higher(rank: tuple[_T, ...], a: _T, b: _T) -> _T:
    return a if rank.index(a) >= rank.index(b) else b


@dataclass(frozen=True, slots=True)
class InternalEvent:
    """An event that refloop itself emits (a timer, a channel callback or an operator).
    Messages from outside arrive as ``engine.model`` events instead.

    ``reason`` and ``note`` are used only by ``closed-by-operator``, which needs a reason
    from :data:`CLOSE_REASONS`. A bad kind or reason raises ``ValueError``, because that is
    a caller bug, not peer input.
    """

    kind: InternalKind
    occurred_at: float = 0.0
    reason: CloseReason | Literal[""] = ""
    note: str = ""

    def __post_init__(self) -> None:
        if self.kind not in INTERNAL_KINDS:
            raise ValueError(f"unknown internal event kind {self.kind!r}")
        if (self.kind == "closed-by-operator") != (self.reason in CLOSE_REASONS):
            raise ValueError(f"{self.kind}: reason {self.reason!r} not allowed")


@dataclass(frozen=True, slots=True)
class Appointment:
    """The event in force for one appointment (SCH-2 / FHIR Appointment.id)."""

    appointment_id: str
    event: AppointmentEvent
    at: float  # the event's own time (Event.occurred_at), not when we received it
    start: str = ""  # ISO start of the appointment ("" after a no-show or cancel)

    def key(self) -> tuple[float, int, str]:
        """Latest wins: event time, then APPOINTMENT_EVENTS order, then start."""
        return (self.at, APPOINTMENT_EVENTS.index(self.event), self.start)


@dataclass(frozen=True, slots=True)
class ReferralState:
    """One referral's state. Every field moves only one way (see the module docstring).

    The derived properties ``status``, ``patient_status``, ``specialist_status`` and
    ``close_reason`` are what people see. The store may keep them as columns for queries,
    but must rebuild the state from the stored fields (:func:`to_dict` / :func:`from_dict`).
    """

    created: bool = False  # the referral-created event has been applied
    contact: Contact = "not-contacted"  # furthest pre-booking contact step
    appointments: tuple[Appointment, ...] = ()  # one per appointment id, sorted by id
    seen: bool = False  # the visit happened
    specialist: SpecialistStep = "not-sent"  # furthest step; "declined" is sticky
    decline_reason: str = ""
    declined_at: float = 0.0
    closed_as: CloseReason | Literal[""] = ""  # strongest close besides report / decline
    close_note: str = ""  # the operator's note, kept if a stronger reason follows
    report_ids: tuple[str, ...] = ()  # final or corrected reports counted, sorted, unique
    escalated: bool = False  # an escalation fired and the patient has not booked since

    @property
    def patient_status(self) -> PatientStatus:
        if self.seen:
            return "seen"
        live = [a for a in self.appointments if a.event in ("booked", "rescheduled")]
        if live:
            return (
                "rescheduled" if max(live, key=Appointment.key).event == "rescheduled" else "booked"
            )
        if any(a.event == "no-show" for a in self.appointments):
            return "no-show"
        return self.contact

    @property
    def specialist_status(self) -> SpecialistStatus:
        return "report-received" if self.report_ids else self.specialist

    @property
    def close_reason(self) -> CloseReason | Literal[""]:
        reasons = {self.closed_as}
        if self.report_ids:
            reasons.add("report-received")
        if self.specialist == "declined":
            reasons.add("specialist-declined")
        return next((r for r in CLOSE_PRECEDENCE if r in reasons), "")

    @property
    def status(self) -> OverallStatus:
        return overall_status(self)


INITIAL: Final = ReferralState()


@dataclass(frozen=True, slots=True)
class Transition:
    """What one event did: ``state`` is the old state itself when ``changed`` is false.
    ``effects`` is empty unless ``changed`` is true, so a repeated event repeats no work."""

    state: ReferralState
    changed: bool
    effects: tuple[Effect, ...]


def overall_status(state: ReferralState) -> OverallStatus:
    """The first match wins: closed, escalated, specialist-confirmed, patient-booked, open."""
    if state.close_reason:
        return "closed"
    if state.escalated:
        return "escalated"
    if state.specialist_status == "confirmed":
        return "specialist-confirmed"
    if state.patient_status in BOOKED:
        return "patient-booked"
    return "open"


def apply(state: ReferralState, event: Event | InternalEvent) -> Transition:
    """Apply one message event (``engine.model``) or internal event to ``state``.

    This never raises on well-formed events. Only an unknown ``kind`` raises ``ValueError``.
    """
    new = _advance(state, event)
    # An escalation is about a patient with no appointment; a booking makes it moot.
    if new.escalated and _booked(new) and not _booked(state):
        new = replace(new, escalated=False)
    if new == state:
        return Transition(state, False, ())
    return Transition(new, True, _effects(state, new))


def _advance(s: ReferralState, e: Event | InternalEvent) -> ReferralState:
    kind = e.kind
    if isinstance(e, AppointmentBooked | AppointmentRescheduled | AppointmentCancelled | NoShow):
        start = e.start if isinstance(e, AppointmentBooked | AppointmentRescheduled) else ""
        record = Appointment(e.appointment_id, _APPOINTMENT_KINDS[kind], e.occurred_at, start)
        return replace(s, appointments=_record(s.appointments, record))
    if isinstance(e, SpecialistDeclined):
        s = replace(s, specialist="declined")
        # The reason is latest-wins by event time, but a stated reason beats a blank one.
        held = (bool(s.decline_reason), s.declined_at, s.decline_reason)
        if (bool(e.reason), e.occurred_at, e.reason) > held:
            s = replace(s, decline_reason=e.reason, declined_at=e.occurred_at)
        return s
    if isinstance(e, ReportReceived):
        # A corrected report with a known id updates the document the caller keeps. It is
        # never counted twice. A corrected report seen first implies a final exists.
        if e.status not in CLOSING_REPORT_STATUSES or e.report_id in s.report_ids:
            return s
        return replace(s, report_ids=tuple(sorted({*s.report_ids, e.report_id})))
    if isinstance(e, InternalEvent) and e.reason:  # closed-by-operator
        return _close(s, e.reason, e.note)
    if kind == "escalated":
        return s if s.close_reason else replace(s, escalated=True)
    if kind in _CONTACT_STEPS:
        return replace(s, contact=_higher(CONTACT_RANK, s.contact, _CONTACT_STEPS[kind]))
    if kind in _SPECIALIST_STEPS:
        step = _SPECIALIST_STEPS[kind]
        return replace(s, specialist=_higher(SPECIALIST_RANK, s.specialist, step))
    if kind in _CLOSES:
        return _close(s, _CLOSES[kind], "")
    if kind == "referral-created":
        return replace(s, created=True)
    if kind == "seen":
        return replace(s, seen=True)
    if kind in _NO_OPS:
        return s
    raise ValueError(f"unknown event kind {kind!r}")


def _close(s: ReferralState, reason: CloseReason, note: str) -> ReferralState:
    if s.closed_as and CLOSE_PRECEDENCE.index(s.closed_as) <= CLOSE_PRECEDENCE.index(reason):
        return s
    return replace(s, closed_as=reason, close_note=note or s.close_note)


def _record(appts: tuple[Appointment, ...], new: Appointment) -> tuple[Appointment, ...]:
    for old in appts:
        if old.appointment_id == new.appointment_id and old.key() >= new.key():
            return appts
    kept = [a for a in appts if a.appointment_id != new.appointment_id]
    return tuple(sorted([*kept, new], key=lambda a: a.appointment_id))


def _booked(s: ReferralState) -> bool:
    return s.patient_status in BOOKED


def _effects(old: ReferralState, new: ReferralState) -> tuple[Effect, ...]:
    if not new.created:
        return ()  # nothing has been scheduled or sent for a referral not yet created
    out: list[Effect] = []
    was_closed = old.close_reason if old.created else ""
    if new.close_reason:
        if old.created and not was_closed:
            out += ["cancel-all-timers", "stop-outbound"]
        if new.close_reason != was_closed:
            out += _NOTIFY.get(new.close_reason, ("notify-referrer-closed",))
        return tuple(out)
    booked = _booked(new)
    was_booked = old.created and _booked(old)
    if not old.created:
        if new.specialist == "not-sent":
            out.append("send-packet")
        out.append("schedule-escalations")
        if not booked:
            out.append("schedule-patient-timers")
    elif booked != _booked(old):
        out.append("cancel-patient-timers" if booked else "schedule-patient-timers")
    # The booked branch follows the appointment date: a new date (or the first booking)
    # restarts it, a no-show or cancelled appointment ends it (docs/escalation.md).
    if booked and not new.seen and (not was_booked or visit_start(new) != visit_start(old)):
        out.append("schedule-appointment-timers")
    elif was_booked and not booked:
        out.append("cancel-appointment-timers")
    if new.seen and not (old.seen and old.created):
        out.append("schedule-report-timers")
    return tuple(out)


def visit_start(state: ReferralState) -> str:
    """The ISO start of the appointment in force ("" when none is booked or it has no
    date): the latest booked or rescheduled appointment by event time."""
    live = [a for a in state.appointments if a.event in ("booked", "rescheduled")]
    return max(live, key=Appointment.key).start if live else ""


def to_dict(state: ReferralState) -> dict[str, Any]:
    """The stored fields as plain JSON-able values (the derived statuses are not included):
    ``dataclasses.asdict``'s result, without its deep copies (twice per new referral)."""
    return to_plain(state)


def from_dict(data: dict[str, Any]) -> ReferralState:
    """Rebuild a state from :func:`to_dict` output. Bad values raise ``ValueError``."""
    try:
        appts = tuple(Appointment(**a) for a in data.get("appointments", ()))
        state = ReferralState(
            **{**data, "appointments": appts, "report_ids": tuple(data.get("report_ids", ()))}
        )
    except TypeError as exc:
        raise ValueError(f"not a referral state: {exc}") from exc
    for value, allowed in (
        (state.contact, CONTACT_RANK),
        (state.specialist, SPECIALIST_RANK),
        (state.closed_as, ("", *CLOSE_PRECEDENCE)),
        *((a.event, APPOINTMENT_EVENTS) for a in appts),
    ):
        if value not in allowed:
            raise ValueError(f"not a referral state: unknown value {value!r}")
    return state
