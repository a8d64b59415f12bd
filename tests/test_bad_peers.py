"""Bad peers cost only their own connection: idle sockets, a slowloris writer, too many
connections, a peer outside the allowlist. A normal client keeps getting prompt ACKs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from helpers import WAIT, Peer, hl7, mllp_port, peer, run, running_engine

from engine.app import Engine
from engine.clock import VirtualClock
from engine.mllp import frame

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


def test_max_connections_refuses_extras(tmp_path: Path) -> None:
    async def go() -> None:
        async with running_engine(tmp_path, max_connections=3) as engine:
            port = mllp_port(engine)
            server = engine.servers[0]
            admitted = [await Peer.connect(port) for _ in range(3)]
            try:
                for i, p in enumerate(admitted):
                    assert (await p.ask(hl7(f"IN-{i}"))).code == "AA"
                async with peer(port) as extra:
                    assert await extra.closed_by_server()
                assert counter(engine, "refloop_connections_refused_total", reason="limit") == 1
                # the admitted ones are unaffected; a freed slot admits a new peer
                assert (await admitted[0].ask(hl7("IN-AGAIN"))).code == "AA"
                await admitted.pop().close()
                await until(lambda: len(server.connections) == 2)
                async with peer(port) as next_one:
                    assert (await next_one.ask(hl7("NEXT"))).code == "AA"
            finally:
                await asyncio.gather(*(p.close() for p in admitted))

    run(go())


def test_peer_outside_allowlist_is_refused(tmp_path: Path) -> None:
    async def go() -> None:
        async with running_engine(tmp_path, allow_peers=["10.0.0.0/8"]) as engine:
            async with peer(mllp_port(engine)) as p:
                assert await p.closed_by_server()
            assert counter(engine, "refloop_connections_refused_total", reason="allowlist") == 1

    run(go())
