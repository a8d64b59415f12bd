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


@pytest.mark.sqlite_file("the inbox writer and the worker on one SQLite file's write lock")
def test_a_waiting_group_commit_cuts_the_workers_slice_after_the_message_in_hand(
    tmp_path: Path,
) -> None:
    """The daemon's inbox writer finds the write lock held by a worker slice: it writes a
    byte on the yield pipe (RemoteProcessor.step_aside, from its own thread), and the
    worker, which looks between two messages (engine.worker.yield_reader), commits after
    the message in hand instead of going on through its slice (up to 64 messages, here
    with no time budget to end it). Then the group commit gets the lock and stores its
    message; the rest is processed by the next slice. Before, the writer's request was a
    line on the socket that the worker read only after the whole slice."""
    import os
    import select
    import threading

    from engine.hl7v2.message import read_msh
    from engine.model import Inbound
    from engine.store.inbox import AddResult
    from engine.supervisor import RemoteProcessor
    from engine.worker import yield_reader

    path = tmp_path / "refloop.db"
    seen: list[int] = []
    daemon_db = open_database(path)  # migrates
    _store_rows(path, range(1, 11))
    remote = RemoteProcessor(
        daemon_db, Inbox(daemon_db), lambda m, c: Outcome("filtered", "unused"),
        VirtualClock(T0), Metrics(CollectorRegistry()), ["false"],
    )  # fmt: skip
    inbox = Inbox(daemon_db)
    inbox.on_busy = remote.step_aside
    writer = daemon_db.another(busy_ms=0)
    stored: list[AddResult] = []

    raw = b"MSH|^~\\&|EHR|NORTH|REFLOOP|HUB|20260101||ORM^O01|DURING-1|P|2.5.1\r"
    msh, codec = read_msh(raw)
    arriving = Inbound(
        source="ehr", peer="test", raw=raw, received_at=T0, msh=msh, text_encoding=codec
    )

    def group_commit() -> None:  # the inbox writer's thread: waits for the lock, spinning
        loop = asyncio.new_event_loop()  # only for the future the batch carries
        try:
            stored.extend(inbox._commit(writer, [(arriving, "AA", loop.create_future())]))
        finally:
            loop.close()

    committer = threading.Thread(target=group_commit)
    worker = _worker_processor(path, seen)
    worker.should_yield = yield_reader(remote._yield_read, worker.inbox)
    handler = worker.handler

    def handle(message: StoredMessage, conn: Conn) -> Outcome:
        if message.id == 2:  # the writer arrives while the slice holds the lock
            committer.start()
            readable, _, _ = select.select([remote._yield_read], [], [], 10.0)
            assert readable, "the waiting group commit wrote no byte on the yield pipe"
        return handler(message, conn)

    worker.handler = handle
    try:
        assert worker.process_available(WORKER_BATCH, budget=60.0) == 2
        assert seen == [1, 2]  # the slice ended after the message in hand
        committer.join(10.0)
        assert not committer.is_alive() and len(stored) == 1
        assert worker.process_available(WORKER_BATCH, budget=60.0) > 0
        assert seen == [*range(1, 11), stored[0].id]
    finally:
        worker.db.close()
        writer.close()
        daemon_db.close()
        os.close(remote._yield_read)
        os.close(remote._yield_write)
