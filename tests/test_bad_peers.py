"""Bad peers cost only their own connection: idle sockets, a slowloris writer, too many
connections, a peer outside the allowlist. A normal client keeps getting prompt ACKs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from helpers import WAIT, Peer, Reply, hl7, mllp_port, peer, run, running_engine

from engine.app import Engine
from engine.clock import VirtualClock
from engine.hl7v2.mllp import frame

IDLE = 200


def counter(engine: Engine, name: str, **labels: str) -> float:
    value = engine.metrics.registry.get_sample_value(name, {"source": "ehr", **labels})
    return value or 0.0


async def until(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    """Wait (bounded) for the server to reach a state."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


async def slowloris(port: int, message: bytes, pace: float) -> tuple[int, bytes | None]:
    """Send one frame a byte every ``pace`` seconds; return (bytes sent before the server
    hung up, the reply if it ever answered)."""
    data = frame(message)
    p = await Peer.connect(port)
    sent = 0
    try:
        for i in range(len(data)):
            try:
                await p.write(data[i : i + 1])
            except OSError:
                break
            sent += 1
            if p.reader.at_eof() or p.reader.exception() is not None:
                break
            await asyncio.sleep(pace)  # the protocol under test is time itself
        return sent, await p.recv(timeout=WAIT)
    finally:
        await p.close()


def test_idle_sockets_and_slowloris_do_not_delay_a_normal_client(tmp_path: Path) -> None:
    message = hl7("SLOW-1")

    async def go() -> None:
        async with running_engine(
            tmp_path,
            synchronous="normal",  # measure the listener, not the disk's fsync
            idle_timeout=3,
            frame_timeout=1,
            max_connections=IDLE + 10,
            max_connections_per_peer=IDLE + 10,  # every peer here is 127.0.0.1
        ) as engine:
            port = mllp_port(engine)
            server = engine.servers[0]
            idle = await asyncio.gather(*(Peer.connect(port) for _ in range(IDLE)))
            try:
                loris = asyncio.create_task(slowloris(port, message, pace=0.05))
                await until(lambda: len(server.connections) == IDLE + 1)
                async with peer(port) as normal:
                    for i in range(20):  # each ACK within a second, or the test fails
                        reply = await normal.ask(hl7(f"NORMAL-{i}"), timeout=1.0)
                        assert (reply.code, reply.control_id) == ("AA", f"NORMAL-{i}")
                    # the bad peers were all still there while it was served
                    assert len(server.connections) == IDLE + 2

                    sent, reply = await asyncio.wait_for(loris, 10)
                    assert reply is None, "the slowloris frame was closed, never answered"
                    assert sent < len(frame(message))
                    assert counter(engine, "refloop_frame_errors_total", kind="timeout") == 1

                    closed = await asyncio.gather(*(p.closed_by_server(10) for p in idle))
                    assert all(closed)
                    assert counter(engine, "refloop_frame_errors_total", kind="idle") >= IDLE
                async with peer(port) as later:
                    assert (await later.ask(hl7("LATER"))).code == "AA"
            finally:
                await asyncio.gather(*(p.close() for p in idle))

    run(go())


def test_frame_and_idle_timeouts_follow_the_clock(tmp_path: Path) -> None:
    clock = VirtualClock()

    async def go() -> None:
        async with running_engine(
            tmp_path, clock=clock, idle_timeout=30, frame_timeout=10
        ) as engine:
            server = engine.servers[0]
            port = mllp_port(engine)
            async with peer(port) as idle, peer(port) as loris:
                await until(lambda: len(server.connections) == 2)
                local = "{}:{}".format(*loris.writer.get_extra_info("sockname"))
                (conn,) = [c for c in server.connections if c.peer == local]
                await loris.write(b"\x0bMSH|")
                await until(lambda: conn.framer.pending == 4)
                clock.advance(6)
                await loris.write(b"^~\\&|")  # still trickling: not idle, but the frame is old
                await until(lambda: conn.framer.pending == 9)
                clock.advance(5)  # the frame started 11 s ago
                assert await loris.closed_by_server()
                assert len(server.connections) == 1  # the idle one (11 s < 30 s) stays
                clock.advance(20)
                assert await idle.closed_by_server()
                assert counter(engine, "refloop_frame_errors_total", kind="timeout") == 1
                assert counter(engine, "refloop_frame_errors_total", kind="idle") == 1

    run(go())


def test_full_slots_evict_the_oldest_idle_connection_else_refuse(tmp_path: Path) -> None:
    async def go() -> None:
        async with running_engine(tmp_path, max_connections=3) as engine:
            port = mllp_port(engine)
            server = engine.servers[0]
            admitted = [await Peer.connect(port) for _ in range(3)]
            try:
                for i, p in enumerate(admitted):
                    assert (await p.ask(hl7(f"IN-{i}"))).code == "AA"
                # all idle: the newcomer evicts the one idle the longest (IN-0's)
                newcomer = await Peer.connect(port)
                admitted.append(newcomer)
                assert (await newcomer.ask(hl7("NEW"))).code == "AA"
                assert await admitted[0].closed_by_server()
                assert counter(engine, "refloop_frame_errors_total", kind="evicted") == 1
                # the other three are each in the middle of a frame: nobody is idle
                for p in admitted[1:]:
                    await p.write(b"\x0bMSH|")
                await until(lambda: all(c.framer.in_frame for c in server.connections))
                async with peer(port) as extra:
                    assert await extra.closed_by_server()
                assert counter(engine, "refloop_connections_refused_total", reason="limit") == 1
                # the busy ones are unaffected: they finish their frames and are answered
                for i, p in enumerate(admitted[1:]):
                    await p.write(b"^~\\&|A|B|C|D|2026||ADT^A01|FIN-%d|P|2.5.1\r\x1c\r" % i)
                    reply = await p.recv()
                    assert reply is not None and Reply.parse(reply).control_id == f"FIN-{i}"
            finally:
                await asyncio.gather(*(p.close() for p in admitted))

    run(go())


def test_per_peer_limit_evicts_that_peers_idle_connection_else_refuses(tmp_path: Path) -> None:
    async def go() -> None:
        async with running_engine(tmp_path, max_connections_per_peer=2) as engine:
            port = mllp_port(engine)
            first, second = await Peer.connect(port), await Peer.connect(port)
            try:
                assert (await first.ask(hl7("P-1"))).code == "AA"
                await second.write(b"\x0bMSH|")  # busy: mid-frame
                # a third from the same address: its own idle connection (first) goes
                async with peer(port) as third:
                    assert (await third.ask(hl7("P-3"))).code == "AA"
                    assert await first.closed_by_server()
                    await third.write(b"\x0bMSH|")  # now both are busy
                    async with peer(port) as fourth:
                        assert await fourth.closed_by_server()
                assert counter(engine, "refloop_connections_refused_total", reason="per-peer") == 1
            finally:
                await first.close()
                await second.close()

    run(go())


def test_peer_outside_allowlist_is_refused(tmp_path: Path) -> None:
    async def go() -> None:
        async with running_engine(tmp_path, allow_peers=["10.0.0.0/8"]) as engine:
            async with peer(mllp_port(engine)) as p:
                assert await p.closed_by_server()
            assert counter(engine, "refloop_connections_refused_total", reason="allowlist") == 1

    run(go())
