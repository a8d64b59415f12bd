"""The worker process's processing slices (issue 18): on SQLite the worker takes the write
lock without SQLite's busy handler (``Processor.nowait``), and a new referral's effects
use what the tracker has in hand instead of reading the referral again.

Real SQLite files, the real processor; the lock is held by a second connection on the
same file, as the daemon's group commit holds it.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import pytest
from helpers import shipped_processor, store_new_referrals
from prometheus_client import CollectorRegistry

from engine.clock import VirtualClock
from engine.ingest.processor import BUSY, WORKER_BATCH, WORKER_SLICE, Processor
from engine.metrics import Metrics
from engine.model import Outcome, StoredMessage
from engine.store import Inbox, open_database
from engine.store import referrals as referral_store
from engine.store.db import Conn
from engine.tracking.priority import task_priority

T0 = 1_767_225_600.0


def _store_rows(db_path: Path, ids: range) -> None:
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        for i in ids:
            conn.execute(
                "INSERT INTO messages (id, received_at, source, control_id, sha256, status) "
                "VALUES (?, ?, 'mllp', ?, ?, 'received')",
                (i, T0, f"C{i}", bytes(32)),
            )
            conn.execute(
                "INSERT INTO message_raw (message_id, raw) VALUES (?, ?)",
                (i, f"MSH|^~\\&|{i}".encode()),
            )
        conn.execute("COMMIT")
    finally:
        conn.close()


def _worker_processor(db_path: Path, seen: list[int]) -> Processor:
    db = open_database(db_path)

    def handler(message: StoredMessage, conn: Conn) -> Outcome:
        seen.append(message.id)
        return Outcome("filtered", "test")

    processor = Processor(db, Inbox(db), handler, VirtualClock(T0), Metrics(CollectorRegistry()))
    processor.batch, processor.slice, processor.nowait = WORKER_BATCH, WORKER_SLICE, True
    return processor


@pytest.mark.sqlite_file("SQLite's write lock held by a second connection on the file")
def test_a_worker_slice_does_not_wait_in_the_busy_handler(tmp_path: Path) -> None:
    """While another connection holds the write lock, a worker slice is refused at once
    (BUSY), changes nothing, and leaves the connection's busy timeout as it was for the
    dispatcher and the timers on it; once the lock is free the slice processes every row.
    Before, the slice slept in SQLite's busy handler (up to 5 s, the event loop held)
    and then failed as a ``locked`` fault."""
    path = tmp_path / "refloop.db"
    seen: list[int] = []
    processor = _worker_processor(path, seen)
    db = processor.db
    _store_rows(path, range(1, 4))
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # the daemon's group commit, say

    async def main() -> None:
        assert processor.process_available(WORKER_BATCH, budget=WORKER_SLICE) == BUSY
        assert seen == []
        assert db.conn.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
        assert not db.conn.in_transaction
        holder.execute("COMMIT")
        assert processor.process_available(WORKER_BATCH, budget=60.0) == 3
        assert seen == [1, 2, 3]
        assert db.conn.execute("PRAGMA busy_timeout").fetchone()[0] == 5000

    try:
        asyncio.run(main())
    finally:
        holder.close()
        db.close()
    conn = sqlite3.connect(path)
    statuses = conn.execute("SELECT status FROM messages ORDER BY id").fetchall()
    conn.close()
    assert statuses == [("filtered",)] * 3


@pytest.mark.sqlite_file("SQLite's write lock held by a second connection on the file")
def test_the_worker_loop_goes_on_while_the_lock_is_held_and_then_processes(
    tmp_path: Path,
) -> None:
    """The processing task retries after a refusal without a fault (``/readyz`` stays
    ready) and without holding the event loop: another task runs meanwhile; when the
    holder commits (the daemon says so: notify), the rows are processed."""
    path = tmp_path / "refloop.db"
    seen: list[int] = []
    processor = _worker_processor(path, seen)
    _store_rows(path, range(1, 6))
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    ran_meanwhile: list[int] = []

    async def other_task() -> None:
        for i in range(3):
            await asyncio.sleep(0)
            ran_meanwhile.append(i)

    async def main() -> None:
        task = asyncio.create_task(processor.run())
        await asyncio.sleep(0.05)  # the processor tries, is refused, waits
        await other_task()
        assert ran_meanwhile == [0, 1, 2]
        assert seen == [] and processor.fault == ""
        holder.execute("COMMIT")
        processor.notify()  # the daemon's commit line
        for _ in range(2000):
            if len(seen) == 5:
                break
            await asyncio.sleep(0.005)
        processor.stop()
        await task
        assert seen == [1, 2, 3, 4, 5] and processor.fault == ""

    try:
        asyncio.run(main())
    finally:
        holder.close()
        processor.db.close()


@pytest.mark.store
def test_a_new_referrals_packet_task_scores_as_the_stored_referral_does(
    tmp_path: Path,
) -> None:
    """The packet task of a new referral takes its ``priority_score`` from what the
    tracker has in hand (the referral it just created has no patient contacts): the
    same score :func:`task_priority` gives from the stored referral afterwards."""
    db = open_database(tmp_path / "refloop.db")

    async def main() -> None:
        processor, inbox = shipped_processor(db, VirtualClock(T0))
        store_new_referrals(db, inbox, 3, T0)
        assert processor.process_available(limit=16) == 3
        rows = db.conn.execute(
            "SELECT referral_id, payload, idempotency_key FROM outbox ORDER BY id"
        ).fetchall()
        assert len(rows) == 3
        for rid, payload, key in rows:
            assert key == f"{rid}:send-packet:1"  # the first of its kind, counted in hand
            referral = referral_store.get_referral(db.conn, rid)
            assert referral is not None
            expected = task_priority(db.conn, referral, T0)
            assert json.loads(payload)["priority_score"] == expected

    try:
        asyncio.run(main())
    finally:
        db.close()
