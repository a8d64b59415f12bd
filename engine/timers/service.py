"""The timer service: durable escalation timers driven by one clock.

Every pending escalation is a row in ``timers`` (written by the tracker in the
transaction that made it necessary; deleted in the transaction that made it moot). The
service keeps the rows due within ``horizon`` seconds in an in-memory hashed wheel
(:mod:`engine.timers.wheel`), refilled from the table as time moves, so a tick costs the same
with a thousand or a million pending timers. At start the wheel is rebuilt from the
table; timers that fell due while the daemon was down fire at once, in due order.

Firing is at-most-once: the row is read and deleted in the same durable transaction that
applies its consequence (an outbox row, a tracker event, an audit entry). A row that is
gone was made moot; a row whose due moved later goes back on the wheel.

What each timer does when it fires (``if still`` is checked against the referral now;
docs/escalation.md has the state-by-state table):

| kind                 | if still                        | then                                   |
|----------------------|---------------------------------|----------------------------------------|
| first-nudge          | patient not booked, not closed  | nudge on the rotation's channel (1)    |
| second-nudge         | patient not booked, not closed  | nudge on the next channel (1)          |
| coordinator-task     | patient not booked              | coordinator task with a priority score |
| outreach             | patient not booked              | one call + letter task (2)             |
| attempt-close        | patient not booked              | close no-response (or a task: human)   |
| specialist-followup  | specialist not confirmed        | 1: the packet again; 2: call-office task|
|                      | (2: and the patient not booked) |                                        |
| appointment-reminder | booked, SMS consent             | reminder SMS the day before (opt-in)   |
| report-request       | booked or seen, no report       | report request by Direct, else fax (3) |
| report-task          | booked or seen, no report       | "call for the report" task             |
| direct-mdn-timeout   | specialist not confirmed        | the packet by e-fax, else a task       |

Every task's payload carries ``reason`` and ``attempts`` (what was already sent
automatically) besides ``priority_score``.

(1) Only on channels something serves (``Policy.slots``): SMS and portal when configured;
``voice`` is the voice channel, else a ``call-patient`` coordinator task, so a practice
with no channels at all still has its patient contacted, by a person.
(2) The built-in task queue keeps one open task per referral (a newer one supersedes the
open one), so the 30-day outreach is ONE task ``outreach`` (call and letter); with a voice
channel the call goes there and the task is the letter ``outreach-letter``.

(3) ``report_requests`` of them (2 by default), ``report_repeat`` apart, then the task.

Patient nudges respect the contact rules (local window, caps, business days): a nudge
that may not go out now is moved to the next allowed moment instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from channels.sms.twilio import e164
from engine.canonical import canonical_json
from engine.clock import Clock, isoformat, parse_iso
from engine.delivery import direct_inbound as direct_flow
from engine.metrics import StoreCollector
from engine.store import audit as audit_store
from engine.store import outbox as outbox_store
from engine.store import referrals as referral_store
from engine.store import timers as store
from engine.store.db import Conn, Database, DatabaseError
from engine.store.referrals import ReferralRow
from engine.timers.wheel import TimerWheel
from engine.tracking import specialists, states
from engine.tracking.escalation import (
    APPOINTMENT_KINDS,
    DAY,
    NUDGE_KINDS,
    Cadence,
    Policy,
    next_contact_time,
)
from engine.tracking.priority import NUDGE_TEMPLATES, task_priority
from engine.tracking.tracker import Tracker

log = logging.getLogger(__name__)

DEFAULT_HORIZON: Final = 3600.0  # seconds of timers held in memory
LATENESS_BUCKETS: Final = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 3600, 86400)
_OPEN_SPECIALIST: Final = frozenset({"not-sent", "packet-sent", "delivered"})
_BOOKED: Final = frozenset({"booked", "rescheduled", "seen"})


class TimerMetrics:
    """refloop_timers_pending{kind} (read at scrape), refloop_timers_fired_total{kind,
    result}, refloop_timer_lateness_seconds."""

    def __init__(self, registry: CollectorRegistry = REGISTRY, db: Database | None = None):
        self.fired = Counter(
            "refloop_timers_fired_total",
            "Timers fired, by kind and what they did (acted, moot, deferred).",
            ["kind", "result"],
            registry=registry,
        )
        self.lateness = Histogram(
            "refloop_timer_lateness_seconds",
            "Fire time minus due time.",
            buckets=LATENESS_BUCKETS,
            registry=registry,
        )
        if db is not None:
            registry.register(_PendingGauge(db))


class _PendingGauge(StoreCollector):
    def __init__(self, db: Database):
        self.db = db

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "refloop_timers_pending", "Pending timers by kind.", labels=["kind"]
        )

    def read(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily("refloop_timers_pending", "Pending timers by kind.", labels=["kind"])
        try:
            for kind, n in store.pending_by_kind(self.db.conn).items():
                g.add_metric([kind], n)
        except DatabaseError:
            pass
        yield g


@dataclass(frozen=True, slots=True)
class Fired:
    """What one timer did (for the simulator and tests)."""

    timer_id: int
    referral_id: int
    kind: str
    due: float
    at: float
    result: str  # acted | moot | deferred
    action: str = ""  # e.g. "nudge:sms", "task:coordinator", "close:no-response"


class TimerService:
    """Owns the wheel. Call :meth:`load` once, then :meth:`tick` (or run :meth:`run`)."""

    def __init__(
        self,
        db: Database,
        tracker: Tracker,
        policy: Policy,
        clock: Clock,
        *,
        metrics: TimerMetrics | None = None,
        horizon: float = DEFAULT_HORIZON,
        on_fired: Callable[[Fired], None] | None = None,
    ):
        self.db = db
        self.tracker = tracker
        self.policy = policy
        self.clock = clock
        self.metrics = metrics
        self.horizon = horizon
        self.on_fired = on_fired
        # On a cluster (engine.cluster): whether this node still holds the singletons
        # lease with the token it gained it with, checked inside every transaction that
        # claims timers; False stops the service at once. None: a lone engine.
        self.fence: Callable[[Conn], bool] | None = None
        self.wheel = TimerWheel(start=clock.now(), tick=1.0)
        self._loaded_until = clock.now()
        self._stopping = False
        self._wake = asyncio.Event()

    # -- filling the wheel ----------------------------------------------------------

    def load(self) -> int:
        """Rebuild the wheel from the table (at start): every timer due within the
        horizon, including those that fell due while the daemon was down."""
        now = self.clock.now()
        conn = self.db.conn
        self.wheel = TimerWheel(start=now, tick=1.0)
        with self.db.transaction(durable=False) as tx:
            if not self._fenced(tx):
                return 0
            store.mark_all_loaded(tx)  # read just below; rows written after: the refill
        self._loaded_until = now + self.horizon
        rows = store.due_until(conn, self._loaded_until)
        for timer_id, due in rows:
            self.wheel.schedule(timer_id, due)
        return len(rows)

    def refill(self) -> None:
        """Pick up timers written or moved since the last look (``loaded = 0``: a claim by
        status, so a row committed late with a lower id is not skipped), and extend the
        horizon. Rows due beyond the horizon come in with the horizon."""
        conn = self.db.conn
        now = self.clock.now()
        if store.unloaded(conn):  # a read first: most ticks find nothing and take no lock
            # not fsync'd: after a crash the wheel is rebuilt from the table anyway
            with self.db.transaction(durable=False) as tx:
                if not self._fenced(tx):
                    return  # a stale holder must not mark rows the new holder needs
                new = store.claim_unloaded(tx)  # the due times as marked, not as first read
            for timer_id, due in new:
                if due <= self._loaded_until:
                    self.wheel.schedule(timer_id, due)
        until = now + self.horizon
        if until > self._loaded_until:
            for timer_id, due in store.due_until(conn, until, after=self._loaded_until):
                self.wheel.schedule(timer_id, due)
            self._loaded_until = until

    def _fenced(self, conn: Conn) -> bool:
        """Whether this node may claim timers in this transaction (see ``fence``); on
        False the service stops: another node holds the lease now."""
        if self.fence is None or self.fence(conn):
            return True
        if not self._stopping:
            log.error("timers: the singletons lease moved to another node; firing stops here")
        self._stopping = True
        return False

    def notify(self) -> None:
        """Rows may have been added (the tracker scheduled timers)."""
        self._wake.set()

    # -- firing ----------------------------------------------------------------------

    def tick(self) -> list[Fired]:
        """Fire everything due now, in due order; returns what happened."""
        return [fired for fired in self._fire_due() if fired is not None]

    def _fire_due(self) -> Iterator[Fired | None]:
        """Fire what is due now, one timer (one transaction) per step, so the daemon's
        loop runs between them (a burst of due timers must not hold the heartbeat and
        the outbox leases back for its whole length)."""
        self.refill()
        now = self.clock.now()
        for _due, timer_id in self.wheel.advance(now):
            if self._stopping:
                break  # the lease moved (or a stop): what is left is the new holder's
            yield self.fire(int(timer_id))  # type: ignore[call-overload]

    def fire(self, timer_id: int) -> Fired | None:
        """Claim the row and apply its consequence in one durable transaction."""
        now = self.clock.now()
        with self.db.transaction() as conn:
            if not self._fenced(conn):
                return None  # another node holds the lease: its wheel fires this one
            row = store.get(conn, timer_id)
            if row is None:
                return None  # cancelled: it became moot in another transaction
            if row.due > now + 0.5:
                self.wheel.schedule(timer_id, row.due)  # moved later since it was loaded
                return None
            # the referral first, as processing takes it (then its timers): one lock order
            referral_store.lock_referral(conn, row.referral_id)  # _act decides on its state
            if not store.delete(conn, timer_id):
                return None  # fired or cancelled by another transaction while we waited
            referral = referral_store.get_referral(conn, row.referral_id)
            result, action = ("moot", "") if referral is None else self._act(conn, row, referral)
            audit_store.append(
                conn,
                at=isoformat(now),
                actor="timer",
                action=f"timer:{row.kind}",
                referral_id=row.referral_id,
                message_id=None,
                detail={
                    "timer": row.key,
                    "result": result,
                    "action": action,
                    "due": isoformat(row.due),
                },
            )
        fired = Fired(timer_id, row.referral_id, row.kind, row.due, now, result, action)
        if self.metrics is not None:
            self.metrics.fired.labels(row.kind, result).inc()
            if result != "deferred":
                self.metrics.lateness.observe(max(0.0, now - row.due))
        if result == "deferred":
            self.refill()
        if self.on_fired is not None:
            self.on_fired(fired)
        log.debug("referral %d: timer %s %s %s", row.referral_id, row.kind, result, action)
        return fired

    def _act(
        self, conn: Conn, row: referral_store.TimerRow, referral: ReferralRow
    ) -> tuple[str, str]:
        state = states.from_dict(referral.state)
        now = self.clock.now()
        patient_booked = state.patient_status in _BOOKED
        specialist_done = state.specialist_status not in _OPEN_SPECIALIST  # confirmed or later
        kind = row.kind
        if state.status == "closed":
            return "moot", ""
        if kind in NUDGE_KINDS:
            if patient_booked:
                return "moot", ""
            return self._nudge(conn, row, referral, now)
        if kind == "specialist-followup":
            if specialist_done:
                return "moot", ""
            if row.attempt > 1 and patient_booked:
                # the patient is on the office's own schedule: the visit, then the
                # automated report requests, come next; no one calls the office now
                return "moot", "booked"
            return self._specialist(conn, row, referral, now)
        if kind == direct_flow.MDN_TIMEOUT_KIND:
            # no dispatched MDN in time (Direct delivery notification IG): fall back
            packet = direct_flow.packet_for_timer(conn, referral.id, row.key)
            if specialist_done or packet is None:
                return "moot", ""
            done = direct_flow.fallback(
                conn, packet, "no-dispatched-mdn", now, actor="timer", served=self.policy.served
            )
            return ("acted", f"fallback:{done}") if done in ("fax", "task") else ("moot", "")
        if kind in APPOINTMENT_KINDS:
            if state.specialist_status == "report-received" or not patient_booked:
                return "moot", ""
            if kind == "appointment-reminder":
                return self._reminder(conn, row, referral, state, now)
            if kind == "report-request":
                return self._report_request(conn, row, referral, now)
            asked = referral_store.count_outbox(conn, referral.id, f"{referral.id}:report-request:")
            why = _REASONS["report-task" if asked else "report-no-route"].format(
                n=self.policy.report_requests
            )
            return "acted", self._task(conn, row, referral, "call-for-report", now, reason=why)
        # 14, 30 and 60 days of the not-booked branch (from the opening or the no-show):
        # a booked patient has a next step in the future, so nothing here is due
        if patient_booked:
            return "moot", ""
        if kind == "coordinator-task":
            call = self.policy.followup_call and self._followup_call(conn, row, referral, now)
            if call:
                return "acted", call
            if self.policy.followup_letter and self.policy.letter:
                # nothing may call the patient: the mailed letter is the machine's next
                # step, and a person's call waits for the day-30 outreach
                return "acted", f"letter:{self._mail_letter(conn, row, referral, now)}"
            self.tracker.apply_internal(
                referral.id, states.InternalEvent("escalated", occurred_at=now), conn, actor="timer"
            )
            return "acted", self._task(conn, row, referral, "coordinator-followup", now)
        if kind == "outreach":
            return "acted", self._outreach(conn, row, referral, now)
        if kind == "attempt-close":
            cadence = self._cadence(referral)
            if cadence.on_close == "human":
                return "acted", self._task(conn, row, referral, "decide-close", now)
            self.tracker.apply_internal(
                referral.id,
                states.InternalEvent("no-response-close", occurred_at=now),
                conn,
                actor="timer",
            )
            return "acted", "close:no-response"
        log.warning("referral %d: unknown timer kind %s", referral.id, kind)
        return "moot", ""

    def _cadence(self, referral: ReferralRow) -> Cadence:
        return self.policy.cadence(
            str(referral.details.get("specialty_category") or ""),
            str(referral.details.get("priority") or ""),
        )

    def _next(
        self, conn: Conn, row: referral_store.TimerRow, kind: str, attempt: int, due: float
    ) -> None:
        referral_store.schedule_timer(
            conn, row.referral_id, kind, due, attempt, f"{row.referral_id}:{kind}:{attempt}",
            now=self.clock.now(),
        )  # fmt: skip

    def _outreach(
        self, conn: Conn, row: referral_store.TimerRow, referral: ReferralRow, now: float
    ) -> str:
        """Day 30, not booked: the letter and the call. The letter goes by the ``letter``
        channel when one is configured (a mailing service), else it is a task. Without a
        voice channel the call is a task too, and a letter task and a call task are one
        task ``outreach`` (two would supersede each other in the queue)."""
        voice = self.policy.slot_channel("voice")
        if self.policy.letter:
            self._mail_letter(conn, row, referral, now)
            if voice is None:
                floor = self.policy.call_task_min_score
                score = task_priority(conn, referral, now) if floor > 0 else 0
                if score < floor:  # the letter is the last contact (call_task_min_score)
                    detail = {"template": "outreach-call", "priority_score": score}
                    self.tracker.note(
                        conn,
                        referral.id,
                        "call-task-not-queued",
                        {**detail, "min_score": floor},
                        now,
                    )
                    return f"letter:{self.policy.letter}"
                return self._task(
                    conn, row, referral, "outreach-call", now, reason=_REASONS["outreach-call"]
                )
        elif voice is None:
            return self._task(conn, row, referral, "outreach", now)
        else:
            self._task(
                conn, row, referral, OUTREACH_LETTER, now, reason=_REASONS["outreach-letter"]
            )
        return self._task(
            conn,
            row,
            referral,
            "outreach-call",
            now,
            channel=voice,
            reason=_REASONS["outreach-call"],
        )

    def _mail_letter(
        self, conn: Conn, row: referral_store.TimerRow, referral: ReferralRow, now: float
    ) -> str:
        """The letter to the patient by the ``letter`` channel (a print-and-mail service);
        returns the channel."""
        payload = {
            "referral_id": referral.id,
            "kind": row.kind,
            "attempt": row.attempt,
            "subject": "Letter to the patient: please book the referral visit",
        }
        referral_store.enqueue_outbox(
            conn, referral.id, self.policy.letter, OUTREACH_LETTER, canonical_json(payload),
            referral_store.unused_key(conn, f"{referral.id}:{OUTREACH_LETTER}:{row.attempt}"),
            now, now=now,
        )  # fmt: skip
        return self.policy.letter

    def _followup_call(
        self, conn: Conn, row: referral_store.TimerRow, referral: ReferralRow, now: float
    ) -> str:
        """Day 14, not booked (``followup_call``): an automated call before any person is
        asked, where one may be placed — a voice channel, recorded consent, a number not
        suppressed (live calls added nothing to a series of automated ones: Nielson 2018,
        reference/referral-outcomes.md [25]). "" when none may: the coordinator task."""
        voice = self.policy.slot_channel("voice")
        details = referral.details
        phone = str(details.get("patient_phone") or "")
        if (
            voice is None
            or not (details.get("sms_consent") and phone)
            or outbox_store.is_suppressed(conn, e164(phone))
        ):
            return ""
        payload = {"referral_id": referral.id, "kind": row.kind, "attempt": row.attempt}
        referral_store.enqueue_outbox(
            conn, referral.id, voice, FOLLOWUP_CALL, canonical_json(payload),
            referral_store.unused_key(conn, f"{referral.id}:{FOLLOWUP_CALL}:{row.attempt}"),
            now, now=now,
        )  # fmt: skip
        return f"call:{voice}"

    def _specialist(
        self, conn: Conn, row: referral_store.TimerRow, referral: ReferralRow, now: float
    ) -> tuple[str, str]:
        """Specialist not confirmed: first the packet again (Direct, else fax), then,
        ``specialist_task`` later and still unconfirmed, the "call the office" task."""
        if row.attempt > 1:
            return "acted", self._task(
                conn, row, referral, "call-specialist-office", now, reason=_REASONS["specialist"]
            )
        self._next(conn, row, row.kind, 2, now + self._cadence(referral).offsets["specialist-task"])
        auth = referral_store.get_prior_auth(conn, referral.id)
        if auth is not None and auth.packet_held:
            return "acted", "resend:held"  # the packet waits for the prior authorization
        route = specialists.packet_route(conn, referral.details, served=self.policy.served)
        if route.channel == "task":
            return "acted", "resend:none"  # no address: the task comes at the next step
        payload = {"referral_id": referral.id, "effect": "send-packet", "to": route.address,
                   "resend": True}  # fmt: skip
        referral_store.enqueue_outbox(
            conn, referral.id, route.channel, direct_flow.PACKET_TEMPLATE, _dumps(payload),
            f"{referral.id}:packet-resend:{row.attempt}", now, now=now,
        )  # fmt: skip
        self.tracker.note(conn, referral.id, "packet-resent", {"channel": route.channel}, now)
        return "acted", f"resend:{route.channel}"

    def _report_request(
        self, conn: Conn, row: referral_store.TimerRow, referral: ReferralRow, now: float
    ) -> tuple[str, str]:
        """After the visit and no report: ask the specialist office for it by the
        packet's channel (Direct, else a fax cover sheet); after the second request the
        human task follows, each ``report_repeat`` later. No way to send it: the task."""
        route = specialists.packet_route(conn, referral.details, served=self.policy.served)
        repeat = self._cadence(referral).offsets["report-repeat"]
        last = self.policy.report_requests
        if route.channel == "task":
            # nothing to send: the human task still waits as long as the requests
            # would have (no task for a step whose time has not come)
            self._next(conn, row, "report-task", 1, now + repeat * (last + 1 - row.attempt))
            return "acted", "request:none"
        body = (
            f"Please send the consult note for referral {referral.placer_number}. "
            f"This is automated request {row.attempt} of {last}."
        )
        payload = {
            "referral_id": referral.id,
            "kind": row.kind,
            "attempt": row.attempt,
            "to": route.address,
            "subject": f"Consult note requested: referral {referral.placer_number}",
            "body": body,
        }
        referral_store.enqueue_outbox(
            conn, referral.id, route.channel, REPORT_REQUEST_TEMPLATE, _dumps(payload),
            referral_store.unused_key(conn, f"{referral.id}:report-request:{row.attempt}"),
            now, now=now,
        )  # fmt: skip
        nxt = ("report-request", row.attempt + 1) if row.attempt < last else ("report-task", 1)
        self._next(conn, row, nxt[0], nxt[1], now + repeat)
        return "acted", f"request:{route.channel}"

    def _reminder(
        self,
        conn: Conn,
        row: referral_store.TimerRow,
        referral: ReferralRow,
        state: states.ReferralState,
        now: float,
    ) -> tuple[str, str]:
        """The optional day-before reminder: SMS only (a non-PHI allow-listed template),
        inside the contact window and before the visit, else nothing."""
        details = referral.details
        phone = str(details.get("patient_phone") or "")
        sms = self.policy.slot_channel("sms")
        if (
            sms is None
            or not (details.get("sms_consent") and phone)
            or outbox_store.is_suppressed(conn, e164(phone))
        ):
            return "moot", "no-sms"
        when = next_contact_time(
            now,
            self.policy.contact,
            time_zone=str(details.get("time_zone") or ""),
            previous_contacts=store.patient_contacts(conn, referral.id, phone, now - 8 * DAY),
        )
        try:
            visit = parse_iso(states.visit_start(state))
        except ValueError:
            visit = when + DAY
        if when >= visit:
            return "moot", "too-late"
        if when > now + 1.0:
            referral_store.schedule_timer(
                conn, referral.id, row.kind, when, row.attempt, row.key, now=now
            )
            return "deferred", f"until:{isoformat(when)}"
        payload = {"referral_id": referral.id, "kind": row.kind, "attempt": row.attempt}
        referral_store.enqueue_outbox(
            conn, referral.id, sms, "appointment_reminder", _dumps(payload),
            f"{referral.id}:appointment-reminder:{states.visit_start(state)}", now, now=now,
        )  # fmt: skip
        return "acted", "reminder:sms"

    def _nudge(
        self,
        conn: Conn,
        row: referral_store.TimerRow,
        referral: ReferralRow,
        now: float,
    ) -> tuple[str, str]:
        details = referral.details
        phone = str(details.get("patient_phone") or "")
        rules = self.policy.contact
        previous = store.patient_contacts(conn, referral.id, phone, now - 8 * DAY)
        when = next_contact_time(
            now, rules, time_zone=str(details.get("time_zone") or ""), previous_contacts=previous
        )
        if when > now + 1.0:
            referral_store.schedule_timer(
                conn, referral.id, row.kind, when, row.attempt, row.key, now=now
            )
            return "deferred", f"until:{isoformat(when)}"
        sent = store.nudges_sent(conn, referral.id, NUDGE_TEMPLATES)
        sms_allowed = (
            bool(details.get("sms_consent"))
            and bool(phone)
            and not outbox_store.is_suppressed(conn, e164(phone))
        )
        portal = details.get("portal") is not False and details.get("portal") != 0
        slot = self.policy.channel_for(len(sent), sms_allowed=sms_allowed, portal=portal)
        channel = self.policy.slot_channel(slot)
        if channel is None:  # voice with no voice channel: a person calls, or (the
            # default) the person's call is the 14-day step: nothing automated can reach
            # the patient now, and most patients book on their own within days
            if not self.policy.nudge_call_task:
                self.tracker.note(conn, referral.id, "nudge-not-sent", {"slot": slot}, now)
                return "acted", "nudge:none"
            why = _REASONS["call-patient"].format(days=_days_open(referral, now))
            return "acted", self._task(conn, row, referral, CALL_PATIENT, now, reason=why)
        template = row.kind.replace("-", "_")  # first_nudge / second_nudge
        payload = {"referral_id": referral.id, "kind": row.kind, "attempt": row.attempt}
        referral_store.enqueue_outbox(
            conn,
            referral.id,
            channel,
            template,
            canonical_json(payload),
            referral_store.unused_key(conn, f"{referral.id}:{row.kind}:{row.attempt}"),
            now,
            now=now,
        )
        return "acted", f"nudge:{channel}"

    def _task(
        self,
        conn: Conn,
        row: referral_store.TimerRow,
        referral: ReferralRow,
        template: str,
        now: float,
        *,
        channel: str = "task",
        reason: str = "",
    ) -> str:
        """A coordinator task (the shared contract: ``referral_id``, ``kind``, ``task``,
        ``priority_score``, ``reason``, ``attempts``): what the machine already tried
        travels with it, so the coordinator starts where the machine stopped."""
        if channel in _TASK_CHANNELS and _task_queued_since(
            conn, referral.id, now - TASK_MERGE_WINDOW, skip_calls=template != CALL_PATIENT
        ):
            # one task per referral: a task queued moments ago already names every open
            # concern of this referral (its reason lists them), so no second one
            return f"merged:{template}"
        score = task_priority(conn, referral, now)
        payload = {
            "referral_id": referral.id,
            "kind": row.kind,
            "task": template,
            "priority_score": score,
            "reason": _reason(reason or _REASONS.get(row.kind, ""), referral),
            "attempts": attempts_made(conn, referral.id),
        }
        referral_store.enqueue_outbox(
            conn,
            referral.id,
            channel,
            template,
            canonical_json(payload),
            referral_store.unused_key(conn, f"{referral.id}:{template}:{row.attempt}"),
            now,
            now=now,
        )
        return f"task:{template}"

    # -- the loop -------------------------------------------------------------------

    async def run(self, *, idle: float = 1.0) -> None:
        """Tick at least every ``idle`` seconds (real time) until :meth:`stop`."""
        while not self._stopping:
            try:
                for _fired in self._fire_due():
                    await asyncio.sleep(0)
            except DatabaseError as exc:  # keep going: the rows are still there
                log.error("timer tick failed: %s", exc)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=idle)
            except TimeoutError:
                pass

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    def resume(self) -> int:
        """Allow :meth:`run` again after :meth:`stop` and rebuild the wheel from the table
        (another node may have loaded and moved timers meanwhile)."""
        self._stopping = False
        return self.load()


def _dumps(value: object) -> str:
    return canonical_json(value)


# What the machine sends on its own (outbox templates), as the coordinator reads it.
_AUTOMATED: Final = {
    "first_nudge": "patient nudge",
    "second_nudge": "patient nudge",
    "appointment_reminder": "appointment reminder",
    direct_flow.PACKET_TEMPLATE: "referral packet",
    "specialist-report-request": "report request",
    "outreach-call": "automated call",
    "followup-call": "automated call",
    "outreach-letter": "letter",
}
REPORT_REQUEST_TEMPLATE: Final = "specialist-report-request"
OUTREACH_LETTER: Final = "outreach-letter"  # day 30: by the letter channel, else a task
FOLLOWUP_CALL: Final = "followup-call"  # day 14: the automated call before the task
CALL_PATIENT: Final = "call-patient"  # the voice slot's task when no voice channel serves it
_REASONS: Final = {
    "call-patient": "not booked {days} days after the referral (or the missed visit), and "
    "no text or portal message can reach the patient: call the patient to book",
    "outreach-letter": "not booked 30 days after the referral (or the missed visit): "
    "send the patient a letter (the call goes by the voice channel)",
    "outreach-call": "not booked 30 days after the referral (or the missed visit): "
    "call the patient",
    "coordinator-task": "not booked 14 days after the referral (or the missed visit), "
    "after the automatic nudges",
    "outreach": "not booked 30 days after the referral (or the missed visit): "
    "call the patient and send a letter",
    "attempt-close": "not booked after 60 days: decide whether to close the referral",
    "specialist": "the specialist office has not confirmed the referral (not confirmed "
    "7 days after the packet was sent again)",
    "report-task": "no consult note after the visit and {n} automated report requests",
    "report-no-route": "no consult note after the visit (waited as long as {n} automated "
    "requests would have), and no Direct address or fax number to request it",
}


TASK_MERGE_WINDOW: Final = 3600.0  # tasks due this close together become one
_TASK_CHANNELS: Final = ("task", "coordinator")


def _task_queued_since(
    conn: Conn, referral_id: int, since: float, *, skip_calls: bool = False
) -> bool:
    """Whether a task for the referral was queued since ``since``. A ``call-patient`` task
    (a nudge step) stands only for itself: with ``skip_calls`` (a later step, such
    as the 14-day task after a restart fired every overdue timer at once) it does not
    count, so the later step is queued and supersedes it."""
    return any(
        o.channel in _TASK_CHANNELS
        and o.due >= since
        and o.status != "cancelled"
        and not (skip_calls and o.template == CALL_PATIENT)
        for o in referral_store.outbox_for(conn, referral_id)
    )


def _reason(main: str, referral: ReferralRow) -> str:
    """The task's reason, then every other open concern of the referral, so a task that
    stands for the referral (one at a time) leaves none out."""
    state = states.from_dict(referral.state)
    others = []
    if state.patient_status not in _BOOKED and "not booked" not in main:
        others.append("the patient has not booked")
    if state.specialist_status in _OPEN_SPECIALIST and "not confirmed" not in main:
        others.append("the specialist office has not confirmed the referral")
    return f"{main}; also: {', '.join(others)}" if others and main else main or ", ".join(others)


def attempts_made(conn: Conn, referral_id: int) -> list[dict[str, str]]:
    """What the machine already tried for this referral, oldest first: each automated
    send (nudges, reminders, packets, report requests) with its channel and outcome."""
    out: list[dict[str, str]] = []
    for o in referral_store.outbox_for(conn, referral_id):
        what = _AUTOMATED.get(o.template)
        if what is None or o.status == "cancelled" or o.channel in _TASK_CHANNELS:
            continue
        out.append({"at": isoformat(o.due), "what": f"{what} by {o.channel} ({o.status})"})
    return out


def _days_open(referral: ReferralRow, now: float) -> int:
    return max(0, round((now - referral.opened_at) / DAY))
