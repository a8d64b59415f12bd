"""The leased work runs on the lease holder only: two engines in this process on one
SQLite file poll one FHIR server (tests/fhir_server.py, real HTTP on loopback); only the
holder's poller runs, and after the holder's clean stop the other's starts."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from fhir_server import FhirServer
from helpers import WAIT, Reply, hl7, peer, query, run, shipped_routes

from engine.app import Engine
from engine.config import load as load_config
from engine.config import loads
from engine.store import leases

CONFIG = """
version: 1
store: {{file: refloop.db, node_id: {node}, lease_seconds: 3}}
http: {{enabled: false}}
sources:
  ehr:
    type: fhir
    base_url: {base}
    resources: [ServiceRequest]
    poll_interval: 0.2
"""


async def until(condition: Callable[[], bool], timeout: float = WAIT) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


@pytest.mark.store
def test_only_the_holder_polls_and_the_other_takes_over(tmp_path: Path) -> None:
    async def go() -> None:
        async with FhirServer() as server:
            engines = {
                node: Engine(
                    loads(CONFIG.format(node=node, base=server.base), env={}),
                    state_dir=tmp_path / "state",
                    drain_seconds=2.0,
                )
                for node in ("a", "b")
            }
            a, b = engines["a"], engines["b"]
            await a.start()
            await b.start()
            try:
                assert a.membership is not None and a.membership.leader
                assert b.membership is not None and not b.membership.leader
                await until(lambda: a.pollers["ehr"].polls >= 3)
                assert b.pollers["ehr"].polls == 0 and not b.tasks.fhir
                # retention's pruner is leased work too: one node prunes (before, each did)
                assert a.tasks.pruner is not None and b.tasks.pruner is None
                await a.stop()  # releases the lease: b takes over at its next round
                await until(lambda: b.pollers["ehr"].polls >= 1, timeout=5.0)
                assert b.tasks.pruner is not None
                assert b.membership.leader and b.membership.lease is not None
                assert b.membership.lease.token == 2
            finally:
                await a.stop()
                await b.stop()

    run(go())


@pytest.mark.store
def test_holder_that_loses_the_lease_stops_polling(tmp_path: Path) -> None:
    async def go() -> None:
        async with FhirServer() as server:
            a = Engine(
                loads(CONFIG.format(node="a", base=server.base), env={}),
                state_dir=tmp_path / "state",
                drain_seconds=2.0,
            )
            await a.start()
            try:
                assert a.membership is not None and a.membership.leader
                await until(lambda: a.pollers["ehr"].polls >= 2)
                assert a.db is not None
                # another node takes the lease as if a's had run out (a paused VM, say)
                with a.db.transaction() as conn:
                    later = a.clock.now() + 60
                    assert leases.acquire(conn, "singletons", "intruder", later, 3.0)
                await until(lambda: not a.membership.leader and not a.tasks.fhir, timeout=5.0)
                polls = a.pollers["ehr"].polls
                await asyncio.sleep(1.0)  # five poll intervals
                assert a.pollers["ehr"].polls == polls
                lost = a.metrics.registry.get_sample_value(
                    "refloop_cluster_lease_lost_total", {"lease": "singletons"}
                )
                assert lost == 1
            finally:
                await a.stop()

    run(go())


MLLP = """
version: 1
store: {{file: refloop.db, node_id: {node}, lease_seconds: 3}}
http: {{enabled: false}}
sources:
  ehr: {{type: mllp, host: 127.0.0.1, port: 0, ack_when: on-processed}}
"""


@pytest.mark.store
def test_on_processed_ack_when_another_node_processed_the_row(tmp_path: Path) -> None:
    """b stores a message and waits for its outcome; a processes it (b's processor was
    stopped, as if busy or restarting); b's ACK still comes once b's processor runs."""

    async def go() -> None:
        a, b = (
            Engine(loads(MLLP.format(node=n), env={}), tmp_path / "state", drain_seconds=2.0)
            for n in ("a", "b")
        )
        await a.start()
        await b.start()
        try:
            assert b.processor is not None and b.tasks.processor is not None
            b.processor.stop()
            await b.tasks.processor
            async with peer(b.ports()["ehr"]) as p:
                await p.send(hl7("ELSEWHERE"))
                # a was not woken by any commit of its own: its idle poll finds the row
                await until(lambda: bool(query(a.db_path, DONE)), timeout=5.0)
                b.processor._stopping = False  # b's processor runs again
                b.tasks.processor = asyncio.create_task(b.processor.run())
                raw = await p.recv(timeout=5.0)
                assert raw is not None
                reply = Reply.parse(raw)
                assert (reply.code, reply.control_id) == ("AA", "ELSEWHERE")
        finally:
            await b.stop()
            await a.stop()

    run(go())


DONE = "SELECT id FROM messages WHERE control_id = 'ELSEWHERE' AND status != 'received'"


def test_a_node_that_is_not_the_holder_leaves_the_timers_to_the_holder(tmp_path: Path) -> None:
    """b starting beside the holder a must not mark the timers loaded: a's wheel reads
    the rows written since its last look by that flag, so a timer written just before b
    started was never fired (b loaded it at start but does not run the wheel)."""
    from engine.model import Identifiers, ReferralCreated

    async def go() -> None:
        a, b = (
            Engine(
                load_config(
                    shipped_routes(
                        tmp_path / f"{n}.yaml",
                        store={"file": "refloop.db", "node_id": n, "lease_seconds": 3},
                        http={"enabled": False},
                        sources={"ehr": {"type": "mllp", "host": "127.0.0.1", "port": 0}},
                        escalation={"cadence": {"first_nudge": 1}},
                    )
                ),
                tmp_path / "state",
                drain_seconds=2.0,
            )
            for n in ("a", "b")
        )
        await a.start()
        try:
            assert a.membership is not None and a.membership.leader
            assert a.timers is not None and a.tasks.timers is not None
            a.timers.stop()  # a's wheel pauses, as between two ticks
            await a.tasks.timers
            assert a.db is not None and a.tracker is not None
            event = ReferralCreated(
                ids=Identifiers(sending_facility="CLINIC", placer_number="T1"),
                occurred_at=a.clock.now(),
            )
            with a.db.transaction() as conn:
                a.tracker.apply(event, conn)  # its timers: rows the wheel has not read
            await b.start()
            assert b.membership is not None and not b.membership.leader
            waiting = "SELECT count(*) FROM timers WHERE loaded = 0"
            assert query(a.db_path, waiting)[0][0] > 0  # b left them to the holder
            a.timers._stopping = False  # a's wheel goes on where it stopped
            a.tasks.timers = asyncio.create_task(a.timers.run())
            fired = "SELECT count(*) FROM audit WHERE action = 'timer:first-nudge'"
            await until(lambda: query(a.db_path, fired)[0][0] == 1, timeout=5.0)
        finally:
            await b.stop()
            await a.stop()

    run(go())
