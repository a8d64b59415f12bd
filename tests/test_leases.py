"""The singleton lease and node rules (engine.store.leases, engine.store.nodes), on a real
SQLite file with a hand-driven clock: times below are plain numbers of seconds."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.store import leases, nodes, open_database
from engine.store.sql import Database

LEASE = 30.0


@pytest.fixture
def db(tmp_path: Path) -> Database:
    database = open_database(tmp_path / "refloop.db")
    yield database  # type: ignore[misc]
    database.close()


def acquire(db: Database, holder: str, now: float, dead: str = "") -> leases.Lease | None:
    with db.transaction() as conn:
        return leases.acquire(conn, "singletons", holder, now, LEASE, dead=dead)


def renew(db: Database, lease: leases.Lease, now: float) -> leases.Lease | None:
    with db.transaction() as conn:
        return leases.renew(conn, lease, now, LEASE)


def test_first_acquire_then_others_wait_until_expiry(db: Database) -> None:
    a = acquire(db, "a", 1000.0)
    assert a == leases.Lease("singletons", "a", 1030.0, 1)
    assert acquire(db, "b", 1000.0) is None
    assert acquire(db, "b", 1030.0) is None  # until is inclusive: still a's
    b = acquire(db, "b", 1030.5)
    assert b == leases.Lease("singletons", "b", 1060.5, 2)  # takeover: token + 1


def test_holder_renews_and_reacquires_without_new_token(db: Database) -> None:
    a = acquire(db, "a", 0.0)
    assert a is not None
    a2 = renew(db, a, 20.0)
    assert a2 == leases.Lease("singletons", "a", 50.0, 1)
    assert acquire(db, "a", 40.0) == leases.Lease("singletons", "a", 70.0, 1)
    assert acquire(db, "b", 60.0) is None  # the renewals moved the end


def test_stale_holder_renew_fails_after_takeover(db: Database) -> None:
    a = acquire(db, "a", 0.0)
    assert a is not None
    b = acquire(db, "b", 31.0)
    assert b is not None and b.token == 2
    assert renew(db, a, 32.0) is None  # a was paused past its lease: it must stop
    assert renew(db, b, 32.0) is not None
    # a cannot take it back while b holds it, and its old token stays refused
    assert acquire(db, "a", 33.0) is None
    assert renew(db, a, 33.0) is None


def test_expired_renew_fails_even_without_takeover(db: Database) -> None:
    a = acquire(db, "a", 0.0)
    assert a is not None
    assert renew(db, a, 30.5) is None  # too late: it may have been taken meanwhile
    again = acquire(db, "a", 30.5)
    assert again is not None and again.token == 2  # a new term, a new token


def test_release_lets_the_next_node_in_at_once(db: Database) -> None:
    a = acquire(db, "a", 0.0)
    assert a is not None
    with db.transaction() as conn:
        assert leases.release(conn, a, 5.0)
    b = acquire(db, "b", 5.0)
    assert b is not None and b.token == 2
    with db.transaction() as conn:
        assert not leases.release(conn, a, 6.0)  # a stale release changes nothing
    assert renew(db, b, 6.0) is not None


def test_dead_holder_taken_before_expiry(db: Database) -> None:
    assert acquire(db, "host:100", 0.0) is not None
    assert acquire(db, "host:200", 1.0, dead="host:999") is None  # names another holder
    b = acquire(db, "host:200", 1.0, dead="host:100")
    assert b is not None and b.token == 2


def test_nodes_register_beat_stop(db: Database) -> None:
    with db.transaction() as conn:
        nodes.register(
            conn, "a", host="h", pid=1, version="0.1.0", addresses="127.0.0.1:2575", now=10.0
        )
        assert nodes.beat(conn, "a", 15.0)
        assert not nodes.beat(conn, "nobody", 15.0)
        nodes.mark_stopped(conn, "a", 20.0)
    row = nodes.get(db.conn, "a")
    assert row is not None
    assert (row["started"], row["heartbeat"], row["stopped"]) == (10.0, 20.0, 20.0)
    assert row["addresses"] == "127.0.0.1:2575"


def test_a_second_node_with_the_same_node_id_is_refused(db: Database) -> None:
    """Two running nodes sharing store.node_id would both hold its leases: refused."""
    import asyncio
    import os
    import socket

    from engine.clock import WallClock
    from engine.cluster import Membership
    from engine.errors import ConfigError

    with db.transaction() as conn:  # a live process on this host (our parent) uses "a"
        nodes.register(
            conn,
            "a",
            host=socket.gethostname(),
            pid=os.getppid(),
            version="",
            addresses="",
            now=WallClock().now(),
        )

    async def noop() -> None:
        return None

    m = Membership(
        db,
        "a",
        WallClock(),
        lease_seconds=LEASE,
        version="",
        on_gain=lambda _token: None,
        on_lose=noop,
    )
    with pytest.raises(ConfigError, match="node_id 'a' is in use by a running node"):
        m.join()
    gains: list[int] = []
    other = Membership(
        db, "b", WallClock(), lease_seconds=LEASE, version="", on_gain=gains.append, on_lose=noop
    )
    other.join()
    assert gains == [1]  # a lone node takes the lease at join
    asyncio.run(other.leave())
    lease = leases.get(db.conn, "singletons")
    assert lease is not None and lease.until < WallClock().now()  # released at leave


BASE = """
version: 1
store: {{file: refloop.db, node_id: {node}}}
http: {{enabled: false}}
sources: {{ehr: {{type: mllp, host: 127.0.0.1, port: {port}}}}}
tables:
  clinics: {{A: {clinic}}}
"""


def test_config_fingerprint_and_drift(db: Database) -> None:
    from engine.cluster import cluster_status, routes_fingerprint
    from engine.config import loads

    def fp(node: str, port: int, clinic: str) -> str:
        text = BASE.format(node=node, port=port, clinic=clinic)
        return routes_fingerprint(loads(text, env={}).sections)

    # node-local sections (store, http, sources) may differ; shared ones may not
    assert fp("a", 2575, "north") == fp("b", 2576, "north")
    assert fp("a", 2575, "north") != fp("a", 2575, "south")
    with db.transaction() as conn:
        for node, clinic in (("a", "north"), ("b", "north")):
            nodes.register(
                conn, node, host="h", pid=1, version="", addresses="", now=100.0,
                config=fp(node, 1, clinic),
            )  # fmt: skip
    assert cluster_status(db.conn, 101.0, LEASE)["config_drift"] is False
    with db.transaction() as conn:
        nodes.set_config(conn, "b", fp("b", 1, "south"))
    status = cluster_status(db.conn, 101.0, LEASE)
    assert status["config_drift"] is True
    # a stale node's old config is not drift: only alive nodes count
    assert cluster_status(db.conn, 100.0 + LEASE + 1, LEASE)["config_drift"] is False


def test_a_heartbeat_waiting_for_the_write_lock_leaves_the_event_loop_running(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """The periodic round waits for SQLite's write lock (held by the inbox writer or the
    processing worker) on a thread of its own: the loop goes on meanwhile (its ACKs). Here
    the lock is released by a loop callback, so a round that held the loop would sleep
    in SQLite's busy handler until its 5 s timeout and fail."""
    import asyncio
    import sqlite3

    from engine.clock import WallClock
    from engine.cluster import Membership

    async def noop() -> None:
        return None

    async def main() -> tuple[float, float, bool]:
        m = Membership(
            db, "a", WallClock(), lease_seconds=0.6, version="", on_gain=lambda _t: None,
            on_lose=noop,
        )  # fmt: skip
        m.join()
        first = nodes.get(db.conn, "a")
        assert first is not None
        holder = sqlite3.connect(db.path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # the writer's or the worker's transaction
        released = asyncio.Event()

        def release() -> None:
            holder.execute("COMMIT")
            released.set()

        m.start()  # the first round after 0.2 s (a third of the lease)
        asyncio.get_running_loop().call_later(0.4, release)
        await released.wait()
        while True:  # the round that waited for the lock commits once it is free
            row = nodes.get(db.conn, "a")
            assert row is not None
            if row["heartbeat"] > first["heartbeat"] or not m.leader:
                break
            await asyncio.sleep(0.01)
        holder.close()
        m.halt()
        await m.leave()
        return first["heartbeat"], row["heartbeat"], m.leader

    caplog.set_level("ERROR", logger="engine.cluster")
    asyncio.run(main())
    assert not [r for r in caplog.records if "heartbeat failed" in r.getMessage()]
