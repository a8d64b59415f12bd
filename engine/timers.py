"""The timer service: durable escalation timers driven by one clock.

Every pending escalation is a row in ``timers`` (written by the tracker in the
transaction that made it necessary; deleted in the transaction that made it moot). The
service keeps the rows due within ``horizon`` seconds in an in-memory hashed wheel
(:mod:`engine.wheel`), refilled from the table as time moves, so a tick costs the same
with a thousand or a million pending timers. At start the wheel is rebuilt from the
table; timers that fell due while the daemon was down fire at once, in due order.

Firing is at-most-once: the row is read and deleted in the same durable transaction that
applies its consequence (an outbox row, a tracker event, an audit entry). A row that is
gone was made moot; a row whose due moved later goes back on the wheel.

What each timer does when it fires (``if still`` is checked against the referral now):

| kind                | if still                        | then                                   |
|---------------------|---------------------------------|----------------------------------------|
| first-nudge         | patient not booked, not closed  | nudge on the rotation's channel        |
| second-nudge        | patient not booked, not closed  | nudge on the next channel              |
| specialist-followup | specialist not confirmed        | "call the specialist office" task      |
| coordinator-task    | loop open (not closed)          | coordinator task with a priority score |
| outreach            | loop open (not closed)          | voice call + letter task               |
| attempt-close       | loop open (not closed)          | close no-response (or a task: human)   |
| report-chase        | report not received             | "chase the report" task                |
| direct-mdn-timeout  | specialist not confirmed        | the packet by e-fax, else a task       |

Patient nudges respect the contact rules (local window, caps, business days): a nudge
that may not go out now is moved to the next allowed moment instead.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from channels.sms import e164
from engine import direct_flow, states
from engine.clock import Clock, isoformat
from engine.escalation import DAY, PATIENT_KINDS, Policy, coordinator_priority, next_contact_time
from engine.metrics import StoreCollector
from engine.store import audit as audit_store
from engine.store import outbox as outbox_store
from engine.store import referrals as referral_store
from engine.store import timers as store
from engine.store.db import Conn, Database, DatabaseError
from engine.store.referrals import ReferralRow
from engine.tracker import Tracker
from engine.wheel import TimerWheel

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
        self.wheel = TimerWheel(start=clock.now(), tick=1.0)
        self._loaded_until = clock.now()
        self._last_id = 0
        self._stopping = False
        self._wake = asyncio.Event()

    # -- filling the wheel ----------------------------------------------------------

    def load(self) -> int:
        """Rebuild the wheel from the table (at start): every timer due within the
        horizon, including those that fell due while the daemon was down."""
        now = self.clock.now()
        conn = self.db.conn
        self.wheel = TimerWheel(start=now, tick=1.0)
        self._last_id = store.max_id(conn)
        self._loaded_until = now + self.horizon
        rows = store.due_until(conn, self._loaded_until)
        for timer_id, due in rows:
            self.wheel.schedule(timer_id, due)
        return len(rows)

    def refill(self) -> None:
        """Pick up timers created since the last look, and extend the horizon."""
        conn = self.db.conn
        now = self.clock.now()
        for timer_id, due in store.added_since(conn, self._last_id, self._loaded_until):
            self.wheel.schedule(timer_id, due)
        self._last_id = store.max_id(conn)
        until = now + self.horizon
        if until > self._loaded_until:
            for timer_id, due in store.due_until(conn, until, after=self._loaded_until):
                self.wheel.schedule(timer_id, due)
            self._loaded_until = until

    def notify(self) -> None:
        """Rows may have been added (the tracker scheduled timers)."""
        self._wake.set()

    # -- firing ----------------------------------------------------------------------

    def tick(self) -> list[Fired]:
        """Fire everything due now, in due order; returns what happened."""
        self.refill()
        now = self.clock.now()
        out: list[Fired] = []
        for _due, timer_id in self.wheel.advance(now):
            fired = self.fire(int(timer_id))  # type: ignore[call-overload]
            if fired is not None:
                out.append(fired)
        return out

    def fire(self, timer_id: int) -> Fired | None:
        """Claim the row and apply its consequence in one durable transaction."""
        now = self.clock.now()
        with self.db.transaction() as conn:
            row = store.get(conn, timer_id)
            if row is None:
                return None  # cancelled: it became moot in another transaction
            if row.due > now + 0.5:
                self.wheel.schedule(timer_id, row.due)  # moved later since it was loaded
                return None
            store.delete(conn, timer_id)
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
        closed = state.status == "closed"
        patient_done = state.patient_status in _BOOKED
        specialist_done = state.specialist_status not in _OPEN_SPECIALIST  # confirmed or later
        kind = row.kind
        if closed:
            return "moot", ""
        if kind in PATIENT_KINDS:
            if patient_done:
                return "moot", ""
            return self._nudge(conn, row, referral, now)
        if kind == "specialist-followup":
            if specialist_done:
                return "moot", ""
            return "acted", self._task(conn, row, referral, "call-specialist-office", now)
        if kind == direct_flow.MDN_TIMEOUT_KIND:
            # no dispatched MDN in time (Direct delivery notification IG): fall back
            packet = direct_flow.packet_for_timer(conn, referral.id, row.key)
            if specialist_done or packet is None:
                return "moot", ""
            done = direct_flow.fallback(conn, packet, "no-dispatched-mdn", now, actor="timer")
            return ("acted", f"fallback:{done}") if done in ("fax", "task") else ("moot", "")
        if kind == "report-chase":
            if state.specialist_status == "report-received":
                return "moot", ""
            return "acted", self._task(conn, row, referral, "chase-report", now)
        # 14, 30 and 60 days: "either branch open" — the patient has not booked, or the
        # specialist's report is not in (which would have closed the referral)
        if kind == "coordinator-task":
            self.tracker.apply_internal(
                referral.id, states.InternalEvent("escalated", occurred_at=now), conn, actor="timer"
            )
            return "acted", self._task(conn, row, referral, "coordinator-followup", now)
        if kind == "outreach":
            self._task(conn, row, referral, "outreach-letter", now)
            return "acted", self._task(conn, row, referral, "outreach-call", now, channel="voice")
        if kind == "attempt-close":
            cadence = self.policy.cadence(
                referral.details.get("specialty_category", "") or "",
                referral.details.get("priority", "") or "",
            )
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
        sent = store.nudges_sent(conn, referral.id)
        sms_allowed = (
            bool(details.get("sms_consent"))
            and bool(phone)
            and not outbox_store.is_suppressed(conn, e164(phone))
        )
        portal = details.get("portal") is not False and details.get("portal") != 0
        channel = self.policy.channel_for(len(sent), sms_allowed=sms_allowed, portal=portal)
        template = row.kind.replace("-", "_")  # first_nudge / second_nudge
        payload = {"referral_id": referral.id, "kind": row.kind, "attempt": row.attempt}
        referral_store.enqueue_outbox(
            conn,
            referral.id,
            channel,
            template,
            json.dumps(payload, sort_keys=True, separators=(",", ":")),
            f"{referral.id}:{row.kind}:{row.attempt}",
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
    ) -> str:
        details = referral.details
        failed = sum(1 for _c, status in store.nudges_sent(conn, referral.id) if status == "dead")
        needed_by = _days_until(str(details.get("needed_by") or ""), now)
        score = coordinator_priority(
            days_open=(now - referral.opened_at) / DAY,
            priority=str(details.get("priority") or ""),
            failed_contacts=failed,
            needed_by_days=needed_by,
        )
        payload = {
            "referral_id": referral.id,
            "kind": row.kind,
            "task": template,
            "priority_score": score,
        }
        referral_store.enqueue_outbox(
            conn,
            referral.id,
            channel,
            template,
            json.dumps(payload, sort_keys=True, separators=(",", ":")),
            f"{referral.id}:{template}:{row.attempt}",
            now,
            now=now,
        )
        return f"task:{template}"

    # -- the loop -------------------------------------------------------------------

    async def run(self, *, idle: float = 1.0) -> None:
        """Tick at least every ``idle`` seconds (real time) until :meth:`stop`."""
        while not self._stopping:
            try:
                self.tick()
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


def _days_until(iso_date: str, now: float) -> float | None:
    if not iso_date:
        return None
    from engine.clock import parse_iso

    try:
        return (parse_iso(iso_date[:10]) - now) / DAY
    except ValueError:
        return None
