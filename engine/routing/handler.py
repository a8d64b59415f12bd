"""The processor's handler: decode the stored bytes, decide, hand ``track`` events to the
tracker, queue ``send``/``forward`` outbox rows, record the decision (for replay) and count
it, all in the processing transaction. :func:`make_handler` builds it from routes.yaml.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Mapping
from typing import Any, Protocol

from engine.canonical import canonical_json
from engine.clock import Clock, WallClock
from engine.config import Config
from engine.metrics import Metrics
from engine.model import Decision, Event, Forward, Outcome, Send, StoredMessage, Track
from engine.routing.compile import compile_config
from engine.routing.decide import decide_stored
from engine.routing.patient import demographics, read_hl7
from engine.routing.summary import already_applied, summarise
from engine.routing.table import RouteTable
from engine.store import Database, referral_search, referrals
from engine.store.db import Conn
from engine.store.decisions import DecisionRow, Decisions


class Tracker(Protocol):
    """The referral tracker as the handler sees it (engine.tracking.tracker).
    ``apply`` runs inside the processing transaction and must not commit; applying the
    same event twice must change nothing."""

    def apply(
        self, event: Event, conn: Conn, *, patient: Mapping[str, str] | None = None
    ) -> object: ...


class RouteHandler:
    """The processor's handler: decide, apply, record. ``table`` may be swapped (hot
    reload) between messages; a message is always handled by one table."""

    def __init__(
        self,
        table: RouteTable,
        db: Database,
        tracker: Tracker | None = None,
        *,
        clock: Clock | None = None,
        metrics: Metrics | None = None,
    ):
        self.table = table
        self.db = db
        self.decisions = Decisions(db)
        self.tracker = tracker
        self.clock = clock or WallClock()
        self.metrics = metrics
        self.enqueued = 0  # outbox rows queued by send/forward since take_enqueued()
        # previous decisions read for the messages of a processing slice (prefetch)
        self._previous: dict[int, DecisionRow | None] = {}
        # decisions of a processing slice, written by flush() (None: each as it comes)
        self._decided: list[tuple[int, str, str, str, list[dict[str, Any]], float]] | None = None

    def __call__(self, row: StoredMessage, conn: Conn) -> Outcome:
        return self.process(row, conn)

    def process(
        self,
        row: StoredMessage,
        conn: Conn,
        *,
        replayed_by: str = "",
        decision: Decision | None = None,
        resend: bool = False,
    ) -> Outcome:
        """Decide (unless ``decision`` is given), hand new ``track`` events to the
        tracker, record the decision. Events whose fingerprint the message's previous
        decision already applied are not applied again (replay idempotence).

        ``send``/``forward`` actions become outbox rows in the same transaction (the
        dispatcher sends them after the commit): on first processing, and on a replay
        only with ``resend``. Keys are ``route:<message id>:<action index>`` (a resend
        adds the replay time), so processing a message again never queues it twice.
        """
        started = time.perf_counter()
        table = self.table
        message = None  # the HL7 v2 bytes read once, for the decision and the patient
        if decision is None:
            message = read_hl7(row)
            decision = decide_stored(table, row, message)
        if row.id in self._previous:
            previous = self._previous.pop(row.id)
        else:
            previous = self.decisions.get(row.id, conn)
        applied = previous.fingerprints if previous is not None else frozenset()
        summary = summarise(decision)
        if decision.status == "routed":
            send = resend or not replayed_by
            referral_id: int | None = None  # of the route's last track: its sends' referral
            route = ""
            tracked: set[int] = set()  # referrals a track event of this message reached
            created: set[int] = set()  # ... and opened, with the patient's columns
            patient: dict[str, str] | None = None  # the message's patient, read once
            for index, action in enumerate(decision.actions):
                if action.route != route:
                    route, referral_id = action.route, None
                if isinstance(action, Track) and self.tracker is not None:
                    if not already_applied(action.event, applied):
                        if patient is None:
                            patient = referral_search.patient_columns(demographics(row, message))
                        result = self.tracker.apply(action.event, conn, patient=patient)
                        ids = getattr(result, "referral_ids", ())
                        referral_id = ids[0] if ids else referral_id
                        tracked.update(ids)
                        if getattr(result, "how", "") == "created":
                            created.update(ids)
                    elif send and action.event.ids.placer_number:  # a --resend replay
                        ids_ = action.event.ids
                        found = referrals.find_by_key(
                            conn, ids_.sending_facility, ids_.placer_number
                        )
                        referral_id = found if found is not None else referral_id
                elif isinstance(action, Send | Forward) and send:
                    self._enqueue(conn, row, index, action, referral_id, resend=resend)
            for rid in sorted(tracked - created):
                referral_search.write_patient(conn, rid, patient or {})
        if self._decided is not None and not replayed_by:
            self._decided.append(
                (
                    row.id,
                    decision.status,
                    decision.route,
                    decision.reason,
                    summary,
                    self.clock.now(),
                )
            )
        else:
            self.decisions.record(
                conn,
                row.id,
                status=decision.status,
                route=decision.route,
                reason=decision.reason,
                actions=summary,
                decided_at=self.clock.now(),
                replayed_by=replayed_by,
            )
        if self.metrics is not None:
            self._count(decision, time.perf_counter() - started)
        return Outcome(decision.status, decision.reason, decision.route)

    def prefetch(self, conn: Conn, ids: list[int]) -> None:
        """Read the previous decisions of the messages the processor is about to hand
        over (inside its transaction), in one statement instead of one per message;
        :meth:`forget` drops what was not used."""
        found = self.decisions.get_many(conn, ids)
        self._previous = {i: found.get(i) for i in ids}
        if self._decided is None:
            self._decided = []

    def flush(self, conn: Conn) -> None:
        """Write the decisions of the slice so far (one statement), inside its transaction."""
        if self._decided:
            self.decisions.record_many(conn, self._decided)
        self._decided = None

    def forget(self) -> None:
        """The slice is over (committed or rolled back): nothing of it is kept."""
        self._previous = {}
        self._decided = None

    def _enqueue(
        self,
        conn: Conn,
        row: StoredMessage,
        index: int,
        action: Send | Forward,
        referral_id: int | None,
        *,
        resend: bool,
    ) -> None:
        """One outbox row for a route's ``send`` or ``forward``."""
        now = self.clock.now()
        key = f"route:{row.id}:{index}" + (f":resend:{now:.6f}" if resend else "")
        payload: dict[str, Any] = {"route": action.route, "message_id": row.id}
        if isinstance(action, Send):
            template = action.template
            payload["to"] = action.to
            payload["values"] = action.values
        else:
            template = "forward"
            payload["hl7_b64"] = base64.b64encode(row.raw).decode("ascii")
        body = canonical_json(payload)
        if referrals.enqueue_outbox(
            conn, referral_id, action.channel, template, body, key, now, now=now
        ):
            self.enqueued += 1

    def take_enqueued(self) -> int:
        """Outbox rows queued since the last call (the engine wakes the dispatcher)."""
        n, self.enqueued = self.enqueued, 0
        return n

    def _count(self, decision: Decision, seconds: float) -> None:
        m = self.metrics
        assert m is not None
        if decision.status == "error":
            for name in decision.routes[-1:]:
                m.route_errors.labels(name).inc()
        elif decision.routes:
            for name in decision.routes:
                m.route_matched.labels(name).inc()
        if not decision.routes:
            m.route_filtered.inc()
        m.route_seconds.labels(decision.routes[0] if decision.routes else "none").observe(seconds)


def make_handler(
    config: Config,
    db: Database,
    tracker: Tracker | None = None,
    *,
    clock: Clock | None = None,
    metrics: Metrics | None = None,
) -> RouteHandler:
    """Compile ``config``'s routes (ConfigError on problems) into a processor handler;
    ``metrics`` learns the message types they name (its bounded ``type`` label set)."""
    table = compile_config(config)
    if metrics is not None:
        metrics.name_message_types(table.message_types)
    return RouteHandler(table, db, tracker, clock=clock, metrics=metrics)


def previous_decision(db: Database, message_id: int) -> DecisionRow | None:
    """The recorded decision of a message, or None (also on a database without the table)."""
    decisions = Decisions(db)
    if not decisions.available():
        return None
    return decisions.get(message_id)
