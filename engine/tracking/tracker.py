"""The referral tracker: apply a normalised event to its referral, run the state machine
(:mod:`engine.tracking.states`) and write everything the event causes in the caller's
transaction: the referral row, its timeline entry, the audit row, timer changes and
outbox rows (transactional outbox).

Which referral an event belongs to is the correlation rule (engine.tracking.correlate);
an event that matches nothing (or more than one referral) is parked there, never dropped.
A contact update that names no referral goes to the patient's open referrals; with none
it is counted and dropped (it cannot belong to a referral). When a referral is created or
learns a filler number, parked events that now match it are applied in the same
transaction (``auto-link``); an operator links the rest (engine.tracking.actions, the
operator actions mixed into :class:`Tracker`). Read views are in engine.tracking.views.

Replays: an event already in a referral's timeline from the same message (same kind and
fingerprint) changes nothing at all: no row, no audit entry, no effect.

The tracker never reads the time itself (``clock``), never commits inside :meth:`apply`,
and never logs or audits PHI: names, reasons, notes and patient identifiers stay in the
referral's own rows.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from prometheus_client import REGISTRY, CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily

from engine.canonical import canonical_json, event_fingerprint
from engine.clock import Clock, isoformat
from engine.config import Config
from engine.errors import StoreError
from engine.metrics import StoreCollector
from engine.model import (
    WRITE_BACK_TEMPLATE,
    ContactUpdated,
    Event,
    PatientsMerged,
    PriorAuthDecided,
    ReferralCreated,
    ReferralUpdated,
    ReportReceived,
    write_back_channel,
)
from engine.store import audit as audit_store
from engine.store import referrals as store
from engine.store.db import Database
from engine.store.referrals import Conn
from engine.store.timers import nudges_sent
from engine.tracking import specialists, states
from engine.tracking.actions import AUTH_OUTCOMES, OperatorActions
from engine.tracking.correlate import (
    DEFAULT_WINDOW_DAYS,
    EVENT_CLASSES,
    correlate,
    event_from_dict,
    park,
)
from engine.tracking.escalation import (
    DAY,
    NOT_BOOKED_TEMPLATES,
    Policy,
    TimerGroup,
    TimerSpec,
)
from engine.tracking.priority import NUDGE_TEMPLATES, task_priority, task_priority_of
from engine.tracking.result import ApplyResult, Outcome, Source

log = logging.getLogger(__name__)

# Bounded metric label values: the event kinds we know, anything else is "other".
KNOWN_KINDS: Final = frozenset(EVENT_CLASSES) | frozenset(states.INTERNAL_KINDS)
# Outbox templates per effect; the recipient side picks the channel.
_TEMPLATES: Final[dict[str, tuple[str, str]]] = {
    "send-packet": ("specialist", "specialist-packet"),
    "notify-referrer-closed": ("referring", "referrer-closed"),
    "notify-referrer-declined": ("referring", "referrer-declined"),
    "notify-referrer-auth-denied": ("referring", "referrer-auth-denied"),
}
# The coordinator's words for packet_route's codes (specialists.PacketRoute.why).
_NO_WAY_REASONS: Final = {
    "no-address": "the specialist office has no Direct address or fax number on file",
    "no-certificate": "no Direct certificate and no fax number for the specialist office",
    "direct-failed-no-fax": "the Direct packet failed and the office has no fax number",
    "no-channel": "the specialist office has a Direct address or fax number, but no direct "
    "or fax channel is configured to send the packet",
}
# Event fields shown in the timeline (codes and ids; no free text).
_TIMELINE_FIELDS: Final = (
    "appointment_id",
    "start",
    "report_id",
    "status",
    "outcome",
    "auth_number",
    "priority",
)


# ---------------------------------------------------------------------------
# Escalation policy: which timers an effect starts


class EscalationPolicy(Protocol):
    def timers(
        self, group: TimerGroup, specialty_category: str = "", priority: str = ""
    ) -> tuple[TimerSpec, ...]:
        """The timers that ``schedule-escalations`` (referral), ``schedule-patient-timers``
        (patient) or ``schedule-report-timers`` (report) start, for a referral of this
        specialty category and priority."""
        ...

    def patient_kinds(self) -> frozenset[str]:
        """The timer kinds ``cancel-patient-timers`` deletes."""
        ...

    def appointment_timers(
        self, visit: float, now: float, specialty_category: str = "", priority: str = ""
    ) -> tuple[TimerSpec, ...]:
        """The timers ``schedule-appointment-timers`` starts for a visit at ``visit``."""
        ...

    def appointment_kinds(self) -> frozenset[str]:
        """The timer kinds a new appointment date replaces and losing the booking deletes."""
        ...

    @property
    def notify(self) -> str:
        """The channel for notices to the referring provider ("" = the timeline only)."""
        ...

    @property
    def packet_task(self) -> bool:
        """A coordinator task when the packet cannot be sent at all (else a timeline note)."""
        ...

    @property
    def served(self) -> frozenset[str] | None:
        """The channel names something serves (None: all): the packet goes only there."""
        ...


def fingerprint(event: Event | states.InternalEvent) -> str:
    """sha256 of the whole event's canonical JSON (kind included):
    :func:`engine.canonical.event_fingerprint`, the digest the decisions table keeps too."""
    return event_fingerprint(event)


# ---------------------------------------------------------------------------
# Metrics


class _StoreGauges(StoreCollector):
    """Gauges read from the store at scrape time, so they never drift from it."""

    def __init__(self, db: Database):
        self.db = db

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "refloop_referrals", "Referrals by overall status.", labels=["status"]
        )
        yield GaugeMetricFamily("refloop_parked_messages", "Events parked, waiting for a link.")

    def read(self) -> Iterator[GaugeMetricFamily]:
        try:
            counts = store.count_by_status(self.db.conn)
            parked = store.count_parked(self.db.conn)
        except Exception:  # a scrape must not fail because the database is busy or closed
            log.warning("metrics: cannot read referral counts")
            return
        g = GaugeMetricFamily(
            "refloop_referrals", "Referrals by overall status.", labels=["status"]
        )
        for status in states.OVERALL_STATUSES:
            g.add_metric([status], counts.get(status, 0))
        yield g
        yield GaugeMetricFamily(
            "refloop_parked_messages", "Events parked, waiting for a link.", value=parked
        )


class TrackerMetrics:
    """``refloop_referral_transitions_total{kind}`` (events that moved a referral), plus,
    when ``db`` is given, the gauges ``refloop_referrals{status}`` and
    ``refloop_parked_messages`` read from the store at scrape time.

    The counter counts when the tracker applies an event; if the caller's transaction
    then rolls back, the count stays (counters are not transactional)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY, db: Database | None = None):
        self.transitions = Counter(
            "refloop_referral_transitions_total",
            "Events that changed a referral, by event kind.",
            ["kind"],
            registry=registry,
        )
        self.notices = Counter(
            "refloop_referrer_notices_total",
            "Notices to the referring provider, by how they went: sent (on the notify "
            "channel) or timeline (recorded only: no notify channel configured).",
            ["result"],
            registry=registry,
        )
        self.unrelated_events = Counter(
            "refloop_unrelated_events_total",
            "Events dropped because they cannot belong to a referral (a contact update "
            "for a patient with no open referral), by event kind.",
            ["kind"],
            registry=registry,
        )
        if db is not None:
            registry.register(_StoreGauges(db))

    def transition(self, kind: str) -> None:
        self.transitions.labels(kind if kind in KNOWN_KINDS else "other").inc()

    def unrelated(self, kind: str) -> None:
        self.unrelated_events.labels(kind if kind in KNOWN_KINDS else "other").inc()


# ---------------------------------------------------------------------------
# The tracker


class Tracker(OperatorActions):
    """Applies events to referrals. One per database.

    ``apply`` and ``apply_internal`` run inside the caller's transaction; the operator
    actions (``close``, ``link``, ``decide_auth``: engine.tracking.actions) open their own.
    """

    def __init__(
        self,
        db: Database,
        clock: Clock,
        *,
        window_days: float = DEFAULT_WINDOW_DAYS,
        policy: EscalationPolicy | None = None,
        metrics: TrackerMetrics | None = None,
        write_back: Iterable[str] = (),
    ):
        self.db = db
        self.clock = clock
        self.window = window_days * DAY
        self.policy: EscalationPolicy = policy or Policy()
        self.metrics = metrics
        # FHIR sources whose Task is completed when a referral of theirs closes with a
        # report (engine.ingest.fhir.WriteBackChannel sends the outbox row).
        self.write_back = frozenset(write_back)
        self.enqueued = 0  # outbox rows written since take_enqueued() last asked

    def take_enqueued(self) -> int:
        """How many outbox rows were written since the last call (the engine wakes the
        dispatcher after a processing commit that wrote some)."""
        n, self.enqueued = self.enqueued, 0
        return n

    # -- events from messages ----------------------------------------------------

    def apply(
        self, event: Event, conn: Conn, *, patient: Mapping[str, str] | None = None
    ) -> ApplyResult:
        """Correlate ``event`` (``message_id`` = its inbox row) and apply it. Call inside
        the processing transaction; nothing here commits. ``patient``: the message's
        patient columns (``referral_search.patient_columns``), written with a referral
        the event creates (the caller writes them for the others)."""
        now = self.clock.now()
        if isinstance(event, PatientsMerged):
            return self._merge(conn, event, now)
        if isinstance(event, ReferralCreated):
            if not event.ids.placer_number:
                return self._park(conn, event, "no-placer-number", now)
            rid = self._repeated(conn, event)
            if rid is None:
                return self._create(conn, event, now, patient or {})
            return self._apply_to(conn, rid, event, "message", "message", now, "key")
        if isinstance(event, ContactUpdated) and not (
            event.ids.placer_number or event.ids.filler_numbers
        ):
            return self._contact(conn, event, now)
        match = correlate(conn, event, self.window)
        if match.referral_id is None:
            return self._park(conn, event, match.why, now)
        return self._apply_to(conn, match.referral_id, event, "message", "message", now, match.how)

    def _repeated(self, conn: Conn, event: ReferralCreated) -> int | None:
        """The referral a new-referral event repeats (same practice and placer number:
        ``key``; it may teach the placer number's authority), if there is one."""
        ids = event.ids
        rid = store.find_by_key(conn, ids.sending_facility, ids.placer_number)
        if rid is not None and ids.placer_authority:
            store.learn_placer_authority(conn, rid, ids.placer_authority)
        return rid

    def _create(
        self, conn: Conn, event: ReferralCreated, now: float, patient: Mapping[str, str]
    ) -> ApplyResult:
        """Open the referral ``event`` creates. The row is written once, as the event
        leaves it (state, statuses, details, the message's patient), instead of inserted
        blank, read back and updated: the row before the event is known without reading
        it (:data:`store.BLANK_DETAILS`), and so is the event's transition."""
        ids, initial = event.ids, states.INITIAL
        status, patient_status, specialist_status, close_reason = _statuses(initial)
        before = store.ReferralRow(
            id=0,
            sending_facility=ids.sending_facility,
            placer_number=ids.placer_number,
            state=states.to_dict(initial),
            status=status,
            patient_status=patient_status,
            specialist_status=specialist_status,
            close_reason=close_reason,
            details=dict(store.BLANK_DETAILS),  # a copy: the row is the caller's
            versions={},
            opened_at=event.occurred_at,
            updated_at=now,
            closed_at=None,
        )
        transition = _transition(initial, event)
        details, versions = _merge_details(before, event, event.message_id or 0)
        after = transition.state if transition.changed else initial
        rid = store.insert_referral(
            conn,
            sending_facility=ids.sending_facility,
            placer_number=ids.placer_number,
            state=states.to_dict(after),
            statuses=_statuses(after),
            opened_at=event.occurred_at,
            now=now,
            placer_authority=ids.placer_authority,
            details=details,
            versions=versions,
            closed_at=now if after.status == "closed" else None,
            patient=patient,
        )
        created = _Created(dataclasses.replace(before, id=rid), transition, details)
        return self._apply_to(
            conn, rid, event, "message", "message", now, "created", created=created
        )

    def apply_internal(
        self,
        referral_id: int,
        event: states.InternalEvent,
        conn: Conn,
        *,
        actor: str = "system",
        message_id: int | None = None,
    ) -> ApplyResult:
        """Apply an event refloop itself emits (a timer, a channel callback) to a known
        referral, inside the caller's transaction. With ``message_id`` (the inbound
        webhook's row) a repeat of the same event is a no-op."""
        return self._apply_to(
            conn,
            referral_id,
            event,
            "internal",
            actor,
            self.clock.now(),
            "internal",
            message_id=message_id,
        )

    # -- applying ------------------------------------------------------------------

    def _apply_to(
        self,
        conn: Conn,
        rid: int,
        event: Event | states.InternalEvent,
        source: Source,
        actor: str,
        now: float,
        how: str,
        *,
        message_id: int | None = None,
        parked_id: int | None = None,
        relink: bool = True,
        created: _Created | None = None,
    ) -> ApplyResult:
        """Apply ``event`` to referral ``rid``: the state machine's transition, the keys
        and details it teaches, the row update, the effects, then the timeline entry and
        the audit row; finally the parked events the referral now claims (``relink``).
        ``created``: the event just created the referral (``_create`` wrote its row)."""
        # locked as it is read (PostgreSQL): this is a read-modify-write
        row = created.row if created is not None else store.get_referral_locked(conn, rid)
        if row is None:
            raise StoreError(f"no referral with id {rid}")
        if isinstance(event, Event) and source != "operator":
            message_id = event.message_id or None
        step = _Step(conn, row, event, source, actor, now, how, message_id, parked_id)
        digest = fingerprint(event)
        # a referral this event just created has no timeline yet: nothing to look up
        if how != "created" and store.event_recorded(conn, rid, message_id, event.kind, digest):
            return ApplyResult("duplicate", (rid,), status=row.status, how=how)
        old = states.from_dict(row.state)
        transition = created.transition if created is not None else _transition(old, event)
        new_fillers = self._record_keys(step)
        if created is not None:
            details = {**row.details, **created.details}
        else:
            details = self._update_row(step, transition, bool(new_fillers))
        done, auth_changed = self._carry_out(step, old, transition, details)
        changed = transition.changed or auth_changed
        statuses = _statuses(transition.state)
        self._record(step, digest, changed, statuses, done)
        linked: tuple[int, ...] = ()
        if relink and (how == "created" or new_fillers):
            # the keys are in hand: the row as read plus the fillers just recorded
            keys = (row.placer_number, (*row.filler_numbers, *new_fillers))
            linked = self._relink(conn, rid, now, keys)
        return ApplyResult(
            "applied" if changed else "unchanged",
            (rid,),
            status=statuses[0] if not linked else _current_status(conn, rid),
            effects=tuple(done),
            how=how,
            linked=linked,
        )

    def _record_keys(self, step: _Step) -> list[str]:
        """The keys a message event teaches its referral: filler numbers, patient ids
        (their surviving ids after a merge), a prior-auth item when the referral needs
        one. Returns the filler numbers that are new (they may claim parked events)."""
        event, rid = step.event, step.row.id
        if not isinstance(event, Event):
            return []
        new_fillers = store.add_fillers(step.conn, rid, event.ids.filler_numbers)
        store.add_patient_ids(
            step.conn, rid, (store.surviving_id(step.conn, p) for p in event.ids.patient_ids)
        )
        if isinstance(event, ReferralCreated) and event.prior_auth_required:
            store.ensure_prior_auth(
                step.conn, rid, hold_packet=event.prior_auth_hold_packet, now=step.now
            )
        return new_fillers

    def _update_row(
        self, step: _Step, transition: states.Transition, new_keys: bool
    ) -> dict[str, Any]:
        """Write the referral row: the new state and statuses (when the state moved), the
        details the event states (latest event time wins per column), an earlier opening
        time, the closing time. Returns the referral's details after the event."""
        row, event, now = step.row, step.event, step.now
        new = transition.state
        details, versions = _merge_details(row, event, step.message_id or 0)
        opened_at = None
        if isinstance(event, ReferralCreated) and event.occurred_at < row.opened_at:
            opened_at = event.occurred_at
        closed_at = now if new.status == "closed" and row.closed_at is None else None
        touched = transition.changed or bool(details) or new_keys or opened_at is not None
        store.update_referral(
            step.conn,
            row.id,
            state=states.to_dict(new) if transition.changed else None,
            statuses=_statuses(new) if transition.changed else None,
            details=details,
            versions=versions if details else None,
            opened_at=opened_at,
            updated_at=now if touched else None,
            closed_at=closed_at,
        )
        return {**row.details, **details}

    def _carry_out(
        self,
        step: _Step,
        old: states.ReferralState,
        transition: states.Transition,
        details: Mapping[str, Any],
    ) -> tuple[list[str], bool]:
        """The effects, in the order the state machine gave them; then the prior-auth
        fork of a prior-auth outcome; then the FHIR write-back of a loop closed by a
        report. Returns (what was done, whether the prior-auth item moved)."""
        conn, row, event, now = step.conn, step.row, step.event, step.now
        new = transition.state
        fresh = step.how == "created" and not (
            isinstance(event, ReferralCreated) and event.prior_auth_required
        )
        hand = _InHand(
            opened_at=min(row.opened_at, event.occurred_at)
            if isinstance(event, ReferralCreated)
            else row.opened_at,
            fresh=fresh,
        )
        done = self._effects(conn, row.id, transition.effects, details, new, now, hand)
        auth_changed = False
        if isinstance(event, PriorAuthDecided):
            auth_changed, more = self._prior_auth(
                conn, row.id, event, step.actor, step.message_id, new, details, now
            )
            done.extend(more)
        if (
            row.sending_facility in self.write_back
            and new.close_reason == "report-received"
            and old.close_reason != "report-received"
        ):
            report = event.report_id if isinstance(event, ReportReceived) else ""
            self._write_back(conn, row, report, now)
            done.append("fhir-write-back")
        return done, auth_changed

    def _record(
        self,
        step: _Step,
        digest: str,
        changed: bool,
        statuses: tuple[str, str, str, str],
        done: list[str],
    ) -> None:
        """The event's timeline entry (codes and ids only) and its audit row (no PHI),
        then the transition metric."""
        event, rid, kind = step.event, step.row.id, step.event.kind
        detail: dict[str, Any] = {
            k: getattr(event, k)
            for k in _TIMELINE_FIELDS
            if getattr(event, k, "") not in ("", None)
        }
        if isinstance(event, states.InternalEvent) and event.reason:
            detail["reason"] = event.reason
        parked = {"parked_id": step.parked_id} if step.parked_id is not None else {}
        store.insert_event(
            step.conn,
            referral_id=rid,
            kind=kind,
            message_id=step.message_id,
            fingerprint=digest,
            source=step.source,
            actor=step.actor,
            occurred_at=event.occurred_at,
            recorded_at=step.now,
            changed=changed,
            statuses=statuses[:3],
            effects=done,
            detail={**detail, **parked},
        )
        audit_store.append(
            step.conn,
            at=isoformat(step.now),
            actor=step.actor,
            action=kind,
            referral_id=rid,
            message_id=step.message_id,
            detail={
                "source": step.source,
                "how": step.how,
                "changed": changed,
                "from": step.row.status,
                "to": statuses[0],
                "patient_status": statuses[1],
                "specialist_status": statuses[2],
                "close_reason": statuses[3],
                "effects": done,
                **parked,
            },
        )
        if changed and self.metrics is not None:
            self.metrics.transition(kind)
        if changed:
            log.debug("referral %d: %s -> %s (%s)", rid, kind, statuses[0], ",".join(done))

    def _effects(
        self,
        conn: Conn,
        rid: int,
        effects: Iterable[str],
        details: Mapping[str, Any],
        state: states.ReferralState,
        now: float,
        hand: _InHand | None = None,
    ) -> list[str]:
        """Carry out the state machine's effects; returns what was done (for the
        timeline and the audit row). The timers the effects start are written together,
        in their order, before anything that reads or deletes timers and at the end.
        ``hand``: what is known of the referral without reading it again (a referral
        this event created has no outbox rows and no prior-auth item yet)."""
        done: list[str] = []
        timers = _TimerBatch(conn, rid, now)
        for effect in effects:
            if effect == "schedule-escalations":
                timers.add(self._timer_specs("referral", details))
            elif effect == "schedule-patient-timers":
                timers.add(self._timer_specs("patient", details))
            elif effect == "schedule-report-timers":
                timers.flush()
                if not self._report_requested(conn, rid):
                    timers.add(self._timer_specs("report", details))
            elif effect == "schedule-appointment-timers":
                timers.flush()
                self._schedule_visit(conn, rid, details, state, now)
            elif effect == "cancel-appointment-timers":
                timers.flush()
                store.cancel_timers(conn, rid, self.policy.appointment_kinds())
            elif effect == "cancel-patient-timers":
                timers.flush()
                store.cancel_timers(conn, rid, self.policy.patient_kinds())
                store.cancel_pending(conn, rid, NOT_BOOKED_TEMPLATES, now=now)
            elif effect == "cancel-all-timers":
                timers.flush()
                store.cancel_timers(conn, rid)
            elif effect == "stop-outbound":
                store.cancel_outbox(conn, rid, now=now)
                auth = store.get_prior_auth(conn, rid)
                if auth is not None and auth.packet_held:
                    store.update_prior_auth(conn, rid, now=now, packet_held=False)
            elif effect == "send-packet":
                auth = None if hand is not None and hand.fresh else store.get_prior_auth(conn, rid)
                if auth is not None and auth.hold_packet and auth.status != "approved":
                    store.update_prior_auth(conn, rid, now=now, packet_held=True)
                    done.append("hold-packet")
                    continue
                self._enqueue(conn, rid, effect, details, state, now, hand)
            elif effect in _TEMPLATES:
                if self._enqueue(conn, rid, effect, details, state, now, hand) == "note":
                    done.append(f"{effect}:timeline")
                    continue
            else:
                raise ValueError(f"unknown effect {effect!r}")
            done.append(effect)
        timers.flush()
        return done

    def _report_requested(self, conn: Conn, rid: int) -> bool:
        """A report request already went out or its chase is further along: a visit
        reported as seen does not restart it."""
        if store.count_outbox(conn, rid, f"{rid}:report-request:"):
            return True
        return any(
            t.kind == "report-task" or (t.kind == "report-request" and t.attempt > 1)
            for t in store.timers_for(conn, rid)
        )

    def _schedule_visit(
        self,
        conn: Conn,
        rid: int,
        details: Mapping[str, Any],
        state: states.ReferralState,
        now: float,
    ) -> None:
        """The booked branch for the appointment in force: the old date's timers go, the
        new date's come (a booking without a date assumes ``UNDATED_VISIT``)."""
        from engine.clock import parse_iso
        from engine.tracking.escalation import UNDATED_VISIT

        store.cancel_timers(conn, rid, self.policy.appointment_kinds())
        try:
            visit = parse_iso(states.visit_start(state))
        except ValueError:
            visit = now + UNDATED_VISIT
        specs = self.policy.appointment_timers(
            visit,
            now,
            str(details.get("specialty_category") or ""),
            str(details.get("priority") or ""),
        )
        self._schedule_specs(conn, rid, specs, now)

    def _timer_specs(self, group: TimerGroup, details: Mapping[str, Any]) -> Iterable[TimerSpec]:
        """The timers a ``schedule-*`` effect starts for a referral with these details
        (the referral's details after the event: ``_update_row`` returned them)."""
        return self.policy.timers(
            group, str(details.get("specialty_category") or ""), str(details.get("priority") or "")
        )

    def _schedule_specs(self, conn: Conn, rid: int, specs: Iterable[TimerSpec], now: float) -> None:
        batch = _TimerBatch(conn, rid, now)
        batch.add(specs)
        batch.flush()

    def _enqueue(
        self,
        conn: Conn,
        rid: int,
        effect: str,
        details: Mapping[str, Any],
        state: states.ReferralState,
        now: float,
        hand: _InHand | None = None,
    ) -> str:
        """Queue the effect's outbox row; returns its channel, or ``note`` when it was
        only written on the timeline (a notice with no notification channel, a packet
        with no way to send it when the practice asked for no task)."""
        template = _TEMPLATES[effect][1]
        payload: dict[str, Any] = {
            "referral_id": rid,
            "effect": effect,
            "close_reason": state.close_reason,
        }
        if effect == "send-packet":
            # Direct only with an address and a certificate, else fax, else a coordinator
            # task (engine.tracking.specialists.packet_route); the referral teaches the directory
            specialists.learn_from_referral(conn, details, now)
            route = specialists.packet_route(conn, details, served=self.policy.served)
            channel: str = route.channel
            if route.address:
                payload["to"] = route.address
            if channel == "task":
                if not self.policy.packet_task:
                    self.note(conn, rid, "packet-not-sent", {"reason": route.why}, now)
                    return "note"
                template = specialists.NO_WAY_TEMPLATE
                payload.update(
                    kind=effect,
                    task=template,
                    why=route.why,
                    reason=_NO_WAY_REASONS.get(route.why, route.why),
                    priority_score=_priority(conn, rid, now)
                    if hand is None
                    else task_priority_of(
                        hand.opened_at,
                        details,
                        () if hand.fresh else nudges_sent(conn, rid, NUDGE_TEMPLATES),
                        now,
                    ),
                    attempts=[],
                )
        else:
            # a notice to the referring provider is a notification, never a coordinator
            # task: the ``escalation.notify`` channel, else a timeline entry and a metric
            payload["kind"] = "notification"
            channel = self.policy.notify
            if not channel:  # the close event's effects name it (``...:timeline``)
                if self.metrics is not None:
                    self.metrics.notices.labels("timeline").inc()
                return "note"
            if self.metrics is not None:
                self.metrics.notices.labels("sent").inc()
        if hand is not None and hand.fresh:  # none before this event's
            n = hand.queued[effect] = hand.queued.get(effect, 0) + 1
        else:
            n = store.count_outbox(conn, rid, f"{rid}:{effect}:") + 1
        self.enqueued += 1
        store.enqueue_outbox(
            conn,
            rid,
            channel,
            template,
            canonical_json(payload),
            f"{rid}:{effect}:{n}",
            now,
            now=now,
        )
        return channel

    def note(self, conn: Conn, rid: int, kind: str, detail: Mapping[str, Any], now: float) -> None:
        """A recorded-only timeline entry (``changed`` false): something refloop decided
        not to send, kept where the coordinator and the simulator see it."""
        row = store.get_referral(conn, rid)
        if row is not None:
            store.insert_note(conn, row, kind, detail, now)

    def _write_back(self, conn: Conn, row: store.ReferralRow, report: str, now: float) -> None:
        """Enqueue the FHIR Task write-back of a loop closed by a report, for a referral
        that came from FHIR source ``row.sending_facility`` (its ServiceRequest is kept as
        a filler number)."""
        service_request = next(
            (f for f in row.filler_numbers if f.startswith("ServiceRequest/")), ""
        )
        if not service_request:
            log.warning("referral %d: no ServiceRequest to write back to", row.id)
            return
        patients = [p for p in row.patient_ids if p.startswith("Patient/")]
        payload = {
            "referral_id": row.id,
            "service_request": service_request,
            "report": report if "/" in report else "",
            "closed_at": now,
            "patient": patients[0] if patients else "",
            # ServiceRequest.requester: the Communication's recipient (docs/fhir.md)
            "requester": str(row.details.get("referring_reference") or ""),
        }
        n = store.count_outbox(conn, row.id, f"{row.id}:fhir-write-back:") + 1
        self.enqueued += 1
        store.enqueue_outbox(
            conn,
            row.id,
            write_back_channel(row.sending_facility),
            WRITE_BACK_TEMPLATE,
            canonical_json(payload),
            f"{row.id}:fhir-write-back:{n}",
            now,
            now=now,
        )

    def _prior_auth(
        self,
        conn: Conn,
        rid: int,
        event: PriorAuthDecided,
        actor: str,
        message_id: int | None,
        state: states.ReferralState,
        details: Mapping[str, Any],
        now: float,
    ) -> tuple[bool, list[str]]:
        """The prior-auth fork: the latest outcome by event time wins; an approval
        releases a held packet, a denial tells the referrer. Returns (changed, done)."""
        if event.outcome not in AUTH_OUTCOMES:
            return False, []
        store.ensure_prior_auth(conn, rid, hold_packet=False, now=now)
        item = store.get_prior_auth(conn, rid)
        assert item is not None
        version = (event.occurred_at, message_id or 0)
        if item.decided_version is not None and version <= item.decided_version:
            return False, []
        store.update_prior_auth(
            conn,
            rid,
            now=now,
            status=event.outcome,
            auth_number=event.auth_number or None,
            decided_version=version,
            decided_by=actor,
        )
        done: list[str] = []
        if event.outcome == item.status or state.status == "closed":
            return event.outcome != item.status, done
        if event.outcome == "approved" and item.packet_held:
            store.update_prior_auth(conn, rid, now=now, packet_held=False)
            self._enqueue(conn, rid, "send-packet", details, state, now)
            done.append("send-packet")
        elif event.outcome == "denied":
            self._enqueue(conn, rid, "notify-referrer-auth-denied", details, state, now)
            done.append("notify-referrer-auth-denied")
        return True, done

    def _relink(
        self, conn: Conn, rid: int, now: float, keys: tuple[str, Iterable[str]]
    ) -> tuple[int, ...]:
        """Apply parked events that now correlate with referral ``rid`` (it was just
        created or learnt a filler number: ``keys`` are its placer number and filler
        numbers), oldest first, until none is left."""
        linked: list[int] = []
        placer_number, filler_numbers = keys
        while True:
            progress = False
            for parked in store.parked_candidates(conn, placer_number, filler_numbers):
                event = event_from_dict(parked.event)
                if isinstance(event, ReferralCreated | PatientsMerged):
                    continue
                match = correlate(conn, event, self.window)
                if match.referral_id != rid:
                    continue
                self._apply_to(
                    conn,
                    rid,
                    event,
                    "link",
                    "auto-link",
                    now,
                    match.how,
                    parked_id=parked.id,
                    relink=False,
                )
                store.mark_linked(conn, parked.id, rid, "auto-link", now)
                linked.append(parked.id)
                progress = True
            if not progress:
                return tuple(linked)
            row = store.get_referral(conn, rid)  # the linked events may have taught keys
            assert row is not None
            placer_number, filler_numbers = row.placer_number, row.filler_numbers

    def _park(self, conn: Conn, event: Event, why: str, now: float) -> ApplyResult:
        pid, new = park(conn, event, why, now)
        return ApplyResult("parked" if new else "duplicate", parked_id=pid, how="parked")

    def _contact(self, conn: Conn, event: ContactUpdated, now: float) -> ApplyResult:
        """A contact update that names no referral (ADT^A04/A08/A31): applied to each open
        referral of the patient. With none it cannot belong to a referral: counted
        (``refloop_unrelated_events_total``) and dropped, never parked; parked means a
        referral message that needs a human, and an ADT feed is mostly other patients."""
        pids = event.ids.patient_ids
        rids = store.find_open_by_patient(
            conn, {*pids, *(store.surviving_id(conn, p) for p in pids)}
        )
        if not rids:
            if self.metrics is not None:
                self.metrics.unrelated(event.kind)
            log.debug("message %s: %s for no open referral", event.message_id or "-", event.kind)
            return ApplyResult("dropped", how="patient")
        results = [
            self._apply_to(conn, rid, event, "message", "message", now, "patient") for rid in rids
        ]
        outcomes = {r.outcome for r in results}
        outcome: Outcome = "applied" if "applied" in outcomes else "unchanged"
        if outcomes == {"duplicate"}:
            outcome = "duplicate"
        return ApplyResult(outcome, tuple(rids), how="patient")

    def _merge(self, conn: Conn, event: PatientsMerged, now: float) -> ApplyResult:
        """ADT^A40: move referrals from the retired patient id to the surviving one.
        A merge for a patient with no referral is recorded (so a later referral with the
        retired id is moved too) but not parked: it is not about a referral."""
        retired, surviving = event.retired_id, event.surviving_id
        if not retired or not surviving or retired == surviving:
            return ApplyResult("unchanged", how="merge")
        moved = store.record_merge(conn, retired, surviving, event.message_id or None, now)
        for rid in moved:
            self._apply_to(conn, rid, event, "message", "message", now, "merge")
        return ApplyResult("merged", tuple(moved), how="merge")


# ---------------------------------------------------------------------------
# Helpers


@dataclass(frozen=True, slots=True)
class _Step:
    """One event being applied to one referral: what every part of ``_apply_to`` reads."""

    conn: Conn
    row: store.ReferralRow  # the referral as it was before the event
    event: Event | states.InternalEvent
    source: Source
    actor: str
    now: float
    how: str
    message_id: int | None
    parked_id: int | None


@dataclass(frozen=True, slots=True)
class _Created:
    """A referral ``_create`` has just written as its creating event leaves it: the row
    as it was before the event (in hand, not read back), the event's transition and the
    details the row was written with."""

    row: store.ReferralRow
    transition: states.Transition
    details: dict[str, Any]


@dataclass(slots=True)
class _InHand:
    """The referral as an event's effects see it, without reading it again: its opening
    time after the event (its details are the effects' ``details``); ``fresh``: the event
    created it in this transaction (and no prior-auth item), so it has no outbox rows and
    no patient contacts yet, and ``queued`` counts the outbox rows its effects queue."""

    opened_at: float
    fresh: bool
    queued: dict[str, int] = field(default_factory=dict)


class _TimerBatch:
    """Timers to schedule for one referral, written in order as one statement."""

    def __init__(self, conn: Conn, rid: int, now: float):
        self.conn, self.rid, self.now = conn, rid, now
        self.rows: list[tuple[int, str, float, int, str]] = []

    def add(self, specs: Iterable[TimerSpec]) -> None:
        rid, now = self.rid, self.now
        self.rows.extend(
            (rid, s.kind, now + s.delay, s.attempt, f"{rid}:{s.kind}:{s.attempt}") for s in specs
        )

    def flush(self) -> None:
        rows, self.rows = self.rows, []
        store.schedule_timers(self.conn, rows, now=self.now)


def _transition(
    old: states.ReferralState, event: Event | states.InternalEvent
) -> states.Transition:
    """The state machine's answer; a prior-auth outcome does not move the referral's
    state (it moves its prior-auth item: ``Tracker._prior_auth``)."""
    if isinstance(event, PriorAuthDecided):
        return states.Transition(old, False, ())
    return states.apply(old, event)


def _statuses(state: states.ReferralState) -> tuple[str, str, str, str]:
    return (state.status, state.patient_status, state.specialist_status, state.close_reason)


def _current_status(conn: Conn, rid: int) -> str:
    row = store.get_referral(conn, rid)
    return row.status if row else ""


def _stated_details(event: Event | states.InternalEvent) -> dict[str, Any]:
    """The detail columns this event states (blank means "not stated")."""
    out: dict[str, Any] = {}
    if isinstance(event, ReferralCreated | ReferralUpdated):
        for name in ("specialty", "specialty_category", "reason", "priority", "needed_by"):
            value = getattr(event, name)
            if value:
                out[name] = value
        if "specialty" not in out and event.ids.specialty:
            out["specialty"] = event.ids.specialty
        for party, provider in (("referring", event.referring), ("specialist", event.specialist)):
            for name in (
                "name",
                "npi",
                "organisation",
                "direct_address",
                "fax",
                "phone",
                "reference",
            ):
                value = getattr(provider, name)
                if value:
                    out[f"{party}_{name}"] = value
    contact = event.contact if isinstance(event, ReferralCreated | ContactUpdated) else None
    if contact is not None:
        for column, value in (
            ("patient_phone", contact.phone),
            ("language", contact.language),
            ("time_zone", contact.time_zone),
        ):
            if value:
                out[column] = value
        if contact.sms_consent is not None:
            out["sms_consent"] = int(contact.sms_consent)
        if contact.portal is not None:
            out["portal"] = int(contact.portal)
    return out


def _merge_details(
    row: store.ReferralRow, event: Event | states.InternalEvent, message_id: int
) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """Per column, the value stated by the latest event (event time, then message id,
    then the value itself) wins, so details end the same whatever the arrival order."""
    changes: dict[str, Any] = {}
    versions = {k: list(v) for k, v in row.versions.items()}
    for column, value in _stated_details(event).items():
        version = [event.occurred_at, message_id, str(value)]
        held = versions.get(column)
        if held is not None and version <= held:
            continue
        versions[column] = version
        changes[column] = value
    return changes, versions


def build_tracker(
    config: Config,
    db: Database,
    clock: Clock,
    *,
    policy: EscalationPolicy,
    registry: CollectorRegistry = REGISTRY,
) -> Tracker:
    """The tracker for ``config``, as the daemon runs it (engine.app) and as ``refloop
    replay`` applies through it: one construction, so a replayed event has exactly the
    effects it would have had on first processing. ``policy`` is the compiled routes'
    escalation policy; ``registry`` receives the tracker's metrics."""
    return Tracker(
        db,
        clock,
        policy=policy,
        metrics=TrackerMetrics(registry, db),
        write_back=[s.name for s in config.fhir_sources if s.write_back.task],
    )


def _priority(conn: Conn, rid: int, now: float) -> int:
    """The task's documented priority score (engine.tracking.priority)."""
    row = store.get_referral(conn, rid)
    return 0 if row is None else task_priority(conn, row, now)
