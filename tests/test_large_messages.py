"""Large messages (issue 14.5): a 15 MB message must not stall the other connections.

The bytes live in their own table (``message_raw``), so marking a message processed does
not rewrite them; the inbox commits on its own thread; the processor reads a large
message's bytes off the event loop. Tests drive the live listener over real sockets on
127.0.0.1 with a fresh SQLite file and observe order and storage, never elapsed time."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from pathlib import Path

import pytest
from helpers import Peer, Reply, hl7, mllp_port, query, run, running_engine

from engine.model import Inbound
from engine.store import open_database
from engine.store.inbox import Inbox
from engine.store.migrations import MIGRATIONS, _m_message_raw

ROW = "OBX|{}|TX|||" + "x" * 1000
BIG = 15_000  # segments of ~1 kB: a 15 MB message


def big_message(control_id: str, segments: int = BIG) -> bytes:
    # enhanced mode (HL7 v2.5.1 §2.9.3): CA once committed, AA once processed
    return hl7(
        control_id, msh15="AL", msh16="AL", body=tuple(ROW.format(i) for i in range(segments))
    )


@pytest.mark.store
def test_probe_is_acked_while_a_15mb_message_is_processed(tmp_path: Path) -> None:
    """A probe connection pings (one message, wait for its ACK, repeat) while another
    connection sends a 15 MB message. Between the big message's commit ACK (CA) and its
    application ACK (AA, after processing) the probe keeps getting ACKs: processing does
    not hold the loop for the whole message. Before the fix the processing step (reading
    the row and rewriting it whole for the status update) ran in one go on the loop, so
    no probe ACK fell between CA and AA."""

    async def go() -> list[str]:
        events: list[str] = []
        async with running_engine(tmp_path, ack_mode="enhanced", synchronous="normal") as engine:
            port = mllp_port(engine)
            probe = await Peer.connect(port)
            big = await Peer.connect(port)
            done = asyncio.Event()

            async def ping() -> None:
                i = 0
                while not done.is_set():
                    reply = await probe.ask(hl7(f"PROBE-{i}"))
                    assert (reply.code, reply.control_id) == ("AA", f"PROBE-{i}")
                    events.append("probe")
                    i += 1

            async def send_big() -> None:
                await probe_started.wait()
                await big.send(big_message("BIG-1"))
                for expected in ("CA", "AA"):
                    raw = await big.recv(timeout=30)
                    assert raw is not None
                    reply = Reply.parse(raw)
                    assert (reply.code, reply.control_id) == (expected, "BIG-1")
                    events.append(expected)
                done.set()

            probe_started = asyncio.Event()
            pinger = asyncio.create_task(ping())
            while not events:
                await asyncio.sleep(0)
            probe_started.set()
            await asyncio.gather(send_big(), pinger)
            await probe.close()
            await big.close()
        return events

    events = run(go())
    between = events[events.index("CA") + 1 : events.index("AA")]
    assert len(between) >= 2, events[events.index("CA") - 3 :]
    # and the bytes were stored exactly
    ((size,),) = query(
        tmp_path / "refloop.db",
        "SELECT length(raw) FROM messages JOIN message_raw ON message_id = id "
        "WHERE control_id = 'BIG-1'",
    )
    assert size == len(big_message("BIG-1"))


def _inbound(control_id: str, raw: bytes) -> Inbound:
    return Inbound(
        source="ehr",
        peer="127.0.0.1:1",
        raw=raw,
        received_at=1_700_000_000.0,
        msh=None,
        text_encoding="utf-8",
        sender="TESTAPP",
        control_id=control_id,
        message_type="ADT^A01",
    )


@pytest.mark.store
@pytest.mark.sqlite_file("the WAL's size after the update")
def test_marking_a_large_message_does_not_rewrite_its_bytes(tmp_path: Path) -> None:
    """SQLite writes a whole record on UPDATE: with the bytes in the messages row,
    marking a 4 MiB message processed wrote 4 MiB more to the WAL. With the bytes in
    message_raw the status update writes a few pages (fails before: WAL grew ~4 MiB)."""
    db = open_database(tmp_path / "r.db")
    inbox = Inbox(db)
    raw = big_message("BIG-2", segments=4096)
    with db.transaction() as conn:
        (result,) = inbox.add_in(conn, [_inbound("BIG-2", raw)], "AA")
    db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    wal = Path(f"{db.path}-wal")
    assert wal.stat().st_size == 0
    with db.transaction():
        inbox.mark(result.id, "routed", route="r", now=1_700_000_001.0)
    assert wal.stat().st_size < 64 * 1024  # a few 4 KiB pages, not the message
    stored = inbox.get(result.id)
    assert stored is not None and (stored.raw, stored.status) == (raw, "routed")
    db.close()


@pytest.mark.store
@pytest.mark.sqlite_file("the file's columns (PRAGMA table_info) and integrity_check")
def test_migration_moves_existing_bytes_to_message_raw(tmp_path: Path) -> None:
    """A database created before the move keeps every message's exact bytes."""
    before = MIGRATIONS[: MIGRATIONS.index(_m_message_raw)]
    path = tmp_path / "old.db"
    old = open_database(path, migrations=before)
    messages = {f"M-{i}": hl7(f"M-{i}") for i in range(2500)}  # more than one batch
    with old.transaction() as conn:
        for cid, raw in messages.items():
            conn.execute(
                "INSERT INTO messages (received_at, source, control_id, raw, sha256, status) "
                "VALUES (1.0, 'ehr', ?, ?, x'00', 'routed')",
                (cid, raw),
            )
    old.close()
    db = open_database(path)
    columns = {r[1] for r in db.conn.execute("PRAGMA table_info(messages)")}
    assert "raw" not in columns
    stored = {m.control_id: m.raw for m in Inbox(db).list(limit=0)}
    assert stored == messages
    db.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


@pytest.mark.store
def test_small_frames_of_other_connections_commit_before_a_queued_large_one(
    tmp_path: Path,
) -> None:
    """Queued in one writer round: A (connection 1), a 1 MiB frame B and then C
    (connection 2), D (connection 3). A and D are committed first, together; B alone;
    then C, after B (a connection's frames keep their order). The inbox ids show the
    commit order. Fails before: ids followed arrival order, B committed with the rest."""

    def inbound(control_id: str, peer: str, raw: bytes) -> Inbound:
        return dataclasses.replace(_inbound(control_id, raw), peer=peer)

    async def go() -> dict[str, int]:
        db = open_database(tmp_path / "r.db")
        inbox = Inbox(db)
        queued = {
            "A": inbound("A", "127.0.0.1:1", hl7("A")),
            "B": inbound("B", "127.0.0.1:2", big_message("B", segments=1100)),
            "C": inbound("C", "127.0.0.1:2", hl7("C")),
            "D": inbound("D", "127.0.0.1:3", hl7("D")),
        }
        futures = {cid: inbox.add(m, "AA") for cid, m in queued.items()}
        inbox.close()
        await inbox.run_writer()
        ids = {cid: (await fut).id for cid, fut in futures.items()}
        assert inbox.commits == 3
        db.close()
        return ids

    ids = run(go())
    assert sorted(ids, key=ids.__getitem__) == ["A", "D", "B", "C"]
