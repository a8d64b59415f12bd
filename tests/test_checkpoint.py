"""WAL checkpoints off the ACK path (engine.store.checkpoint): the inbox writer's group
commits never run a checkpoint (SQLite's automatic one would, inside the COMMIT the ACKs
wait for); the writer's checkpointer thread copies the WAL into the database file on its
own connection instead, so the WAL stays bounded. Real SQLite files."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from engine.hl7v2.message import read_msh
from engine.model import Inbound
from engine.store import Inbox, open_database
from engine.store.db import Database

pytestmark = pytest.mark.sqlite_file("WAL checkpoints of the SQLite file")

PAGE = 4096
# SQLite's default wal_autocheckpoint is 1000 pages: 1,500 messages of 4 KB write over
# 1,500 pages of message bytes alone, so without it off the writer's commits checkpoint
MESSAGES = 1500
BODY = "OBX|1|TX|||" + "x" * 4000


def _inbound(n: int) -> Inbound:
    raw = (
        f"MSH|^~\\&|EHR|CLINIC|REFLOOP|HUB|20260101120000||ORM^O01|C{n}|P|2.5.1\r{BODY}\r"
    ).encode()
    msh, codec = read_msh(raw)
    return Inbound("ehr", "127.0.0.1:1", raw, 1_767_268_800.0, msh, codec)


def _db_pages(path: Path) -> int:
    return path.stat().st_size // PAGE


def _wal_frames(path: Path) -> int:
    """Frames in the WAL not yet copied into the file (a passive checkpoint's view would
    copy them; read the header's count instead: the WAL file's size in frames)."""
    wal = Path(str(path) + "-wal")
    return max(0, (wal.stat().st_size - 32) // (PAGE + 24)) if wal.exists() else 0


async def _store(inbox: Inbox, count: int) -> None:
    futures = []
    for n in range(count):
        futures.append(inbox.add(_inbound(n), "AA"))
        if len(futures) == 32:  # a group commit of 32, as under load
            await asyncio.gather(*futures)
            futures = []
    await asyncio.gather(*futures)


def test_the_inbox_writers_commits_run_no_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "refloop.db"
    db = open_database(path)
    before = _db_pages(path)

    async def main() -> tuple[int, int]:
        inbox = Inbox(db)
        inbox.checkpoint_seconds = 3600.0  # the thread's periodic run never comes here
        writer = asyncio.create_task(inbox.run_writer())
        await _store(inbox, MESSAGES)
        during = _db_pages(path)
        inbox.close()
        await writer  # the checkpointer's last run, at stop
        return during, _db_pages(path)

    during, after = asyncio.run(main())
    # only a checkpoint writes the database file in WAL mode: the commits wrote the WAL only
    assert during == before
    assert _wal_frames(path) > 1000  # the commits did go past SQLite's autocheckpoint
    # stopping, the checkpointer copied them: at least the messages' bytes are in the file
    assert after - before >= MESSAGES
    row = sqlite3.connect(path).execute("SELECT count(*) FROM message_raw").fetchone()
    assert row[0] == MESSAGES
    db.close()


def test_the_checkpointer_copies_the_wal_while_the_writer_runs(tmp_path: Path) -> None:
    path = tmp_path / "refloop.db"
    db = open_database(path)
    before = _db_pages(path)

    async def main() -> int:
        inbox = Inbox(db)
        inbox.checkpoint_seconds = 0.01
        writer = asyncio.create_task(inbox.run_writer())
        await _store(inbox, MESSAGES)
        deadline = time.monotonic() + 10
        while _db_pages(path) - before < MESSAGES and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # the thread's next run (a real thread, real time)
        grown = _db_pages(path) - before
        inbox.close()
        await writer
        return grown

    assert asyncio.run(main()) >= MESSAGES  # copied before the writer stopped
    db.close()


def test_the_daemons_connection_leaves_checkpoints_to_the_thread(tmp_path: Path) -> None:
    """The pruner turns automatic checkpoints off around its step and back on after:
    back to what the connection had (0 in the daemon), not to SQLite's default."""
    from engine.store import retention
    from engine.store.checkpoint import no_autocheckpoint

    db: Database = open_database(tmp_path / "refloop.db")
    no_autocheckpoint(db.conn)
    with retention._no_autocheckpoint(db):
        pass
    assert db.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    db.close()


def test_a_commit_that_finds_the_lock_held_asks_its_holder_once(tmp_path: Path) -> None:
    """The writer's ``on_busy`` (the daemon: a byte on the yield pipe, "processing
    worker, commit after the message in hand") runs on the writer's own thread, not the
    loop (no event-loop turn between the refused BEGIN and the request), once per group
    commit that found the write lock held, and the commit goes through once the lock is
    free."""
    path = tmp_path / "refloop.db"
    db = open_database(path)
    holder = sqlite3.connect(path, isolation_level=None)

    async def main() -> tuple[int, int]:
        inbox = Inbox(db)
        asked: list[int] = []
        loop = asyncio.get_running_loop()

        def on_busy() -> None:
            asked.append(threading.get_ident())
            # the holder's slice ends (on the loop's thread, which owns the connection)
            loop.call_soon_threadsafe(loop.call_later, 0.05, holder.execute, "COMMIT")

        inbox.on_busy = on_busy
        holder.execute("BEGIN IMMEDIATE")  # the worker's slice
        writer = asyncio.create_task(inbox.run_writer())
        first = await inbox.add(_inbound(1), "AA")
        await inbox.add(_inbound(2), "AA")  # the lock is free: nobody is asked
        inbox.close()
        await writer
        assert threading.get_ident() not in asked  # not on the loop's thread
        return len(asked), first.id

    asked, first = asyncio.run(main())
    assert asked == 1 and first == 1
    holder.close()
    db.close()


def test_a_connection_opened_from_the_daemons_leaves_checkpoints_to_the_thread(
    tmp_path: Path,
) -> None:
    """``Database.another()`` (the cluster heartbeat's connection, a reader's) keeps the
    daemon's ``wal_autocheckpoint = 0``; from a connection with SQLite's default, the
    default."""
    from engine.store.checkpoint import no_autocheckpoint

    db = open_database(tmp_path / "refloop.db")
    plain = db.another()
    no_autocheckpoint(db.conn)
    daemons = db.another()
    assert plain.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000
    assert daemons.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    for d in (plain, daemons, db):
        d.close()


def test_the_wal_file_shrinks_back_after_a_burst(tmp_path: Path) -> None:
    """SQLite never shrinks the WAL file by itself: it starts it over from the beginning
    after a checkpoint. With checkpoints on the thread, one burst left the WAL file at its
    high-water mark for good (the soak harness saw it at 20 MiB after a burst, and called
    it growing). A connection without automatic checkpoints truncates it back to
    WAL_KEEP_BYTES when it starts the WAL over."""
    from engine.store.checkpoint import WAL_KEEP_BYTES, Checkpointer, no_autocheckpoint

    path = tmp_path / "refloop.db"
    db = open_database(path)
    no_autocheckpoint(db.conn)
    db.conn.execute("CREATE TABLE burst (b BLOB)")
    with db.transaction() as conn:  # about 8 MiB in the WAL
        conn.executemany("INSERT INTO burst VALUES (?)", [(b"x" * 8000,) for _ in range(1024)])
    wal = Path(str(path) + "-wal")
    assert wal.stat().st_size > 2 * WAL_KEEP_BYTES
    checkpointer = Checkpointer(str(path))
    own = sqlite3.connect(path, isolation_level=None)
    checkpointer.checkpoint(own)  # copies everything: no reader holds a snapshot
    own.close()
    with db.transaction() as conn:  # the next write starts the WAL over
        conn.execute("INSERT INTO burst VALUES (x'00')")
    assert wal.stat().st_size <= WAL_KEEP_BYTES
    db.close()
