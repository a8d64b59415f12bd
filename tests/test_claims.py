"""Cluster-safe claim semantics on one SQLite file (issue 17, stage 0).

On a shared database an id is handed out at insert but becomes visible at commit, so a
row with a lower id can appear after a row with a higher one. These tests make that
happen with a second connection on the same file (writing with explicit ids, as the
other node's transaction would have) and check that processing and the timer wheel
still see every row: they claim by status, not by "id greater than the last one seen".
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from prometheus_client import CollectorRegistry

from engine.clock import VirtualClock
from engine.ingest.processor import Processor
from engine.metrics import Metrics
from engine.model import Identifiers, Outcome, ReferralCreated, StoredMessage
from engine.store import Inbox, open_database
from engine.store.db import Conn
from engine.timers.service import Fired, TimerService
from engine.tracking.escalation import Policy
from engine.tracking.tracker import Tracker

T0 = 1_767_225_600.0


def _other_node_commits(path: Path, message_id: int) -> None:
    """Another writer's transaction commits inbox row ``message_id`` (an explicit id: the
    one its INSERT was handed before a later row committed)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "INSERT INTO messages (id, received_at, source, control_id, sha256, status) "
            "VALUES (?, ?, 'mllp', ?, zeroblob(32), 'received')",
            (message_id, T0, f"C{message_id}"),
        )
        conn.execute(
            "INSERT INTO message_raw (message_id, raw) VALUES (?, ?)",
            (message_id, f"MSH|^~\\&|{message_id}".encode()),
        )
        conn.execute("COMMIT")
    finally:
        conn.close()


def test_processing_claims_a_row_that_commits_after_a_higher_id(tmp_path: Path) -> None:
    """Row 2 commits first and is processed; row 1 (handed out first, committed later)
    must still be processed. A high-water mark at 2 would never look at 1 again."""
    path = tmp_path / "refloop.db"
    db = open_database(path)
    seen: list[int] = []

    def handler(message: StoredMessage, conn: Conn) -> Outcome:
        seen.append(message.id)
        return Outcome("filtered", "test")

    async def main() -> None:
        inbox = Inbox(db)
        processor = Processor(db, inbox, handler, VirtualClock(T0), Metrics(CollectorRegistry()))
        _other_node_commits(path, 2)
        assert processor.process_available() == 1
        _other_node_commits(path, 1)
        processor.process_available()
        assert seen == [2, 1]
        # the outcome of a row processed out of id order is known to its waiters
        assert (await processor.watch(1)).status == "filtered"
        # a new processor (a restart, or another node taking over) finds nothing left
        again = Processor(db, inbox, handler, VirtualClock(T0), Metrics(CollectorRegistry()))
        assert again.process_available() == 0

    asyncio.run(main())
    statuses = dict(db.conn.execute("SELECT id, status FROM messages").fetchall())
    assert statuses == {1: "filtered", 2: "filtered"}
    db.close()


def _other_node_schedules(path: Path, timer_id: int, referral_id: int, due: float) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "INSERT INTO timers (id, referral_id, kind, due, attempt, key, created_at) "
            "VALUES (?, ?, 'coordinator-task', ?, 1, ?, ?)",
            (timer_id, referral_id, due, f"test:{timer_id}", T0),
        )
        conn.execute("COMMIT")
    finally:
        conn.close()


def test_timer_wheel_picks_up_a_row_that_commits_after_a_higher_id(tmp_path: Path) -> None:
    """The wheel's refill must see timer 1000's earlier sibling 999, committed after 1000
    was loaded; both fire once when due."""
    path = tmp_path / "refloop.db"
    db = open_database(path)
    clock = VirtualClock(T0)
    policy = Policy()
    tracker = Tracker(db, clock, policy=policy)
    fired: list[Fired] = []
    service = TimerService(db, tracker, policy, clock, on_fired=fired.append)
    with db.transaction() as conn:
        created = tracker.apply(
            ReferralCreated(
                ids=Identifiers(sending_facility="CLINIC", placer_number="R1", patient_ids=("P1",)),
                occurred_at=T0,
                specialty="Cardiology",
            ),
            conn,
        )
    rid = created.referral_id
    assert rid is not None
    service.load()
    _other_node_schedules(path, 1000, rid, T0 + 60)
    service.notify()
    service.tick()
    _other_node_schedules(path, 999, rid, T0 + 60)
    service.tick()
    assert 999 in service.wheel and 1000 in service.wheel
    clock.set(T0 + 61)
    service.tick()
    assert sorted(f.timer_id for f in fired if f.timer_id >= 999) == [999, 1000]
    assert service.tick() == []
    db.close()
