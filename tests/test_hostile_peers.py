"""Hostile and broken peers (issue 14): every frame is answered, and no peer can stall or
starve the others. Each test drives the live listener over real sockets on 127.0.0.1
with a fresh SQLite file, and waits on events or rows, never on time passing."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    HOST,
    WAIT,
    Peer,
    Reply,
    batch_acks,
    hl7,
    mllp_port,
    peer,
    query,
    run,
    running_engine,
)

from engine.app import Engine
from engine.clock import VirtualClock
from engine.hl7v2.mllp import frame

pytestmark = pytest.mark.store  # every test here uses the store

BARE_MSH = b"MSH\rPID|1||12345^^^MRN||DOE^JANE\r"


def counter(engine: Engine, name: str, **labels: str) -> float:
    value = engine.metrics.registry.get_sample_value(name, {"source": "ehr", **labels})
    return value or 0.0


async def until(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    """Wait (bounded) for the server to reach a state, checking on every loop turn."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0)


def server_side(engine: Engine, p: Peer) -> Any:
    local = "{}:{}".format(*p.writer.get_extra_info("sockname"))
    (conn,) = [c for c in engine.servers[0].connections if c.peer == local]
    return conn


def deaf_side(engine: Engine, p: Peer) -> Any:
    """The server's side of a peer that never reads, its kernel send buffer made as small
    as the peer's receive window: the ACKs then back up into the transport after a few
    hundred, not after the megabytes Linux autotunes a loopback send buffer to (tens of
    thousands of durable commits first: 15 s on PostgreSQL, past the wait under CI load)."""
    conn = server_side(engine, p)
    conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return conn


def batch(messages: list[bytes], ref: str = "BATCH-9") -> bytes:
    return (
        f"BHS|^~\\&|SENDER|FAC|||20260101||||{ref}\r".encode()
        + b"".join(messages)
        + f"BTS|{len(messages)}\r".encode()
    )


# ---------------------------------------------------------------------------
# 14.1: a frame that breaks the reader is answered; its neighbours are too


def test_bare_msh_frame_is_rejected_and_its_neighbours_are_acked(tmp_path: Path) -> None:
    async def go() -> list[Reply]:
        async with running_engine(tmp_path) as engine, peer(mllp_port(engine)) as p:
            # one read: a good frame, the bare MSH, another good frame
            await p.write(frame(hl7("GOOD-1")) + frame(BARE_MSH) + frame(hl7("GOOD-2")))
            replies = []
            for _ in range(3):
                raw = await p.recv()
                assert raw is not None, "connection closed instead of an ACK"
                replies.append(Reply.parse(raw))
            replies.append(await p.ask(hl7("AFTER")))  # and the connection goes on
            return replies

    replies = run(go())
    assert [(r.code, r.control_id) for r in replies] == [
        ("AA", "GOOD-1"),
        ("AR", ""),
        ("AA", "GOOD-2"),
        ("AA", "AFTER"),
    ]
    assert replies[1].field("ERR", 2) == "MSH^1^1"
    stored = query(
        tmp_path / "refloop.db",
        "SELECT raw, status, ack_code, error FROM messages JOIN message_raw ON message_id = id",
    )
    assert [(raw, code) for raw, _, code, _ in stored] == [
        (hl7("GOOD-1"), "AA"),
        (BARE_MSH, "AR"),
        (hl7("GOOD-2"), "AA"),
        (hl7("AFTER"), "AA"),
    ]
    assert [status == "rejected" for _, status, _, _ in stored] == [False, True, False, False]
    assert stored[1][3]  # a reason


def test_framing_error_still_answers_the_frames_read_before_it(tmp_path: Path) -> None:
    async def go() -> tuple[list[Reply], bool]:
        async with (
            running_engine(tmp_path, max_frame_bytes=1024) as engine,
            peer(mllp_port(engine)) as p,
        ):
            await p.write(frame(hl7("BEFORE-1")) + b"\x0bMSH|" + b"y" * 2000)
            raw = await p.recv()
            got = [Reply.parse(raw)] if raw is not None else []
            return got, await p.closed_by_server()

    replies, closed = run(go())
    assert [(r.code, r.control_id) for r in replies] == [("AA", "BEFORE-1")]
    assert closed
    assert query(tmp_path / "refloop.db", "SELECT control_id FROM messages") == [("BEFORE-1",)]


# ---------------------------------------------------------------------------
# 14.2: batch bombs


def test_batch_over_max_batch_messages_is_rejected_stored_and_answered(tmp_path: Path) -> None:
    messages = [hl7(f"BB-{i}") for i in range(6)]

    async def go() -> tuple[Reply, Reply]:
        async with (
            running_engine(tmp_path, max_batch_messages=5) as engine,
            peer(mllp_port(engine)) as p,
        ):
            nak = await p.ask(batch(messages))
            return nak, await p.ask(hl7("NEXT"))

    nak, after = run(go())
    assert (nak.code, nak.control_id) == ("AR", "BATCH-9")  # MSA-2: the batch's BHS-11
    assert "max_batch_messages" in nak.field("MSA", 3)
    assert after.code == "AA"
    ((raw, status, code, error, ref), _next) = query(
        tmp_path / "refloop.db",
        "SELECT raw, status, ack_code, error, batch_ref "
        "FROM messages JOIN message_raw ON message_id = id",
    )
    assert (raw, status, code, ref) == (batch(messages), "rejected", "AR", "BATCH-9")
    assert "6 messages" in error


def test_large_batch_does_not_freeze_other_connections(tmp_path: Path) -> None:
    n = 10_000
    messages = [hl7(f"LB-{i}") for i in range(n)]

    async def go() -> tuple[int, int]:
        async with running_engine(tmp_path, synchronous="normal", max_batch_messages=n) as engine:
            port = mllp_port(engine)
            async with peer(port) as big, peer(port) as probe:
                await big.send(batch(messages))
                conn = None

                def batch_read() -> bool:
                    nonlocal conn
                    conn = conn or server_side(engine, big)
                    return not conn.framer.in_frame and conn.framer.pending == 0

                await until(lambda: len(engine.servers[0].connections) == 2)
                await until(batch_read)
                # the whole batch frame is read: the probe is sent only now
                probe_ack = asyncio.create_task(probe.ask(hl7("PROBE"), timeout=30))
                batch_reply = asyncio.create_task(big.recv(timeout=60))
                done, _ = await asyncio.wait(
                    {probe_ack, batch_reply}, return_when=asyncio.FIRST_COMPLETED
                )
                assert probe_ack in done, "the probe waited for the whole batch"
                reply = await batch_reply
                assert reply is not None
                _, acks = batch_acks(reply)
                assert len(acks) == n and {a.code for a in acks} == {"AA"}
                assert (await probe_ack).code == "AA"
        (probe_id,) = query(
            tmp_path / "refloop.db", "SELECT id FROM messages WHERE control_id = 'PROBE'"
        )[0]
        (last_batch_id,) = query(
            tmp_path / "refloop.db", "SELECT max(id) FROM messages WHERE batch_ref != ''"
        )[0]
        return probe_id, last_batch_id

    probe_id, last_batch_id = run(go(), timeout=120)
    # stored while the batch was still being read, not after it
    assert probe_id < last_batch_id


# ---------------------------------------------------------------------------
# 14.3: a peer that never reads its ACKs


def test_peer_that_never_reads_acks_is_paused_then_closed(tmp_path: Path) -> None:
    clock = VirtualClock()
    message = hl7("UNREAD-1", body=("NTE|1||" + "n" * 50,))

    async def go() -> None:
        async with running_engine(
            tmp_path, clock=clock, synchronous="normal", write_timeout=30
        ) as engine:
            port = mllp_port(engine)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # tiny window
            sock.connect((HOST, port))
            sock.setblocking(False)
            reader, writer = await asyncio.open_connection(sock=sock, limit=1024)
            deaf = Peer(reader, writer)

            async def flood() -> None:
                chunk = frame(message) * 500
                try:
                    while True:
                        await deaf.write(chunk)  # blocks once the server stops reading
                except OSError:
                    pass

            flooding = asyncio.create_task(flood())
            try:
                await until(lambda: len(engine.servers[0].connections) == 1)
                conn = deaf_side(engine, deaf)
                await until(lambda: conn.write_paused_at > 0, timeout=30)
                # the server stopped reading from it: its unsent ACKs stay bounded
                assert "writing" in conn.pauses
                assert conn.transport.get_write_buffer_size() < 1 << 20
                async with peer(port) as probe:  # everyone else is served
                    assert (await probe.ask(hl7("PROBE"))).code == "AA"
                    clock.advance(31)  # past write_timeout with the ACKs still unread
                    await until(lambda: conn not in engine.servers[0].connections)
                    assert counter(engine, "refloop_frame_errors_total", kind="unread") == 1
                    assert (await probe.ask(hl7("PROBE-2"))).code == "AA"
            finally:
                flooding.cancel()
                await asyncio.gather(flooding, return_exceptions=True)
                await deaf.close()

    run(go(), timeout=120)


def test_a_closing_connection_whose_peer_never_reads_frees_its_slot(tmp_path: Path) -> None:
    """A deaf peer's connection that closes (idle timeout) while its ACKs sit unsent in
    the transport is dropped after write_timeout, not kept forever: a graceful close
    waits for the buffer to drain, and the sweeper used to skip closed connections, so
    the slot stayed taken (fails before: the connection never left the server's set)."""
    clock = VirtualClock()
    message = hl7("UNREAD-2", body=("NTE|1||" + "n" * 50,))

    async def go() -> None:
        async with running_engine(
            tmp_path, clock=clock, synchronous="normal", write_timeout=30, idle_timeout=5
        ) as engine:
            port = mllp_port(engine)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # tiny window
            sock.connect((HOST, port))
            sock.setblocking(False)
            reader, writer = await asyncio.open_connection(sock=sock, limit=1024)
            deaf = Peer(reader, writer)

            async def flood() -> None:
                chunk = frame(message) * 500
                try:
                    while True:
                        await deaf.write(chunk)
                except OSError:
                    pass

            flooding = asyncio.create_task(flood())
            try:
                await until(lambda: len(engine.servers[0].connections) == 1)
                conn = deaf_side(engine, deaf)
                await until(lambda: conn.write_paused_at > 0, timeout=30)
                await until(lambda: not conn.replies and conn.worker is None, timeout=30)
                clock.advance(6)  # past idle_timeout: the sweeper closes it gracefully
                await until(lambda: conn.closed)
                assert conn.transport.get_write_buffer_size() > 0  # ACKs still owed
                clock.advance(31)  # past write_timeout after the close
                await until(lambda: conn not in engine.servers[0].connections)
            finally:
                flooding.cancel()
                await asyncio.gather(flooding, return_exceptions=True)
                await deaf.close()

    run(go(), timeout=120)


# ---------------------------------------------------------------------------
# 14.4: slowloris with stray bytes


def test_stray_bytes_do_not_keep_a_connection_alive(tmp_path: Path) -> None:
    clock = VirtualClock()

    async def go() -> None:
        async with (
            running_engine(tmp_path, clock=clock, idle_timeout=30) as engine,
            peer(mllp_port(engine)) as loris,
        ):
            await until(lambda: len(engine.servers[0].connections) == 1)
            conn = server_side(engine, loris)
            for _ in range(4):  # a newline every 10 s: bytes, but never a frame
                if conn not in engine.servers[0].connections:
                    break
                clock.advance(10)
                seen = conn.framer.stray
                await loris.write(b"\n")
                await until(lambda seen=seen: conn.framer.stray > seen or conn.closed)
            assert await loris.closed_by_server()
            assert counter(engine, "refloop_frame_errors_total", kind="idle") == 1

    run(go())


def test_stray_bytes_past_the_limit_close_the_connection(tmp_path: Path) -> None:
    async def go() -> None:
        async with running_engine(tmp_path, max_stray_bytes=64) as engine:
            async with peer(mllp_port(engine)) as p:
                assert (await p.ask(hl7("S-1"))).code == "AA"
                await p.write(b"\r\n" * 20)  # 40 bytes: tolerated keep-alives
                assert (await p.ask(hl7("S-2"))).code == "AA"  # a frame resets the count
                await p.write(b"\r\n" * 40)  # 80 bytes in a row
                assert await p.closed_by_server()
            assert counter(engine, "refloop_frame_errors_total", kind="stray") == 1

    run(go())


def test_a_lone_start_block_starts_the_frame_timeout(tmp_path: Path) -> None:
    clock = VirtualClock()

    async def go() -> None:
        async with (
            running_engine(tmp_path, clock=clock, idle_timeout=300, frame_timeout=10) as engine,
            peer(mllp_port(engine)) as loris,
        ):
            await until(lambda: len(engine.servers[0].connections) == 1)
            conn = server_side(engine, loris)
            await loris.write(b"\x0b")
            await until(lambda: conn.framer.in_frame)
            clock.advance(11)
            assert await loris.closed_by_server()
            assert counter(engine, "refloop_frame_errors_total", kind="timeout") == 1

    run(go())
