"""LISTEN/NOTIFY between two real ``refloop run --store postgresql://…`` daemons (issue
17, stage 2; engine.store.notify): an on-processed ACK on node A for a message node B
processed comes back through B's notification, not through A's poll, and a LISTEN
connection ended by the server is opened again.

Both daemons poll only every ``store.poll_seconds: 600`` (ACK waiters every 120 s), and
the client waits at most 60 s for an ACK: an ACK that arrives came through a
notification. Node A connects as a role that row-level security lets read and insert
``messages`` but not update them (nor ``SELECT … FOR UPDATE`` them, which is how
processing claims a row): A stores and ACKs, and can never process a row itself, so the
node that processes A's messages is B, always, whatever the timing. PostgreSQL only."""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from helpers import Daemon, peer, run
from test_referral_keys import ref_i12

TEST_STORE = os.environ.get("REFLOOP_TEST_STORE", "")
ROLE = "refloop_notify_a"  # node A's login: no UPDATE policy on messages

pytestmark = pytest.mark.skipif(
    not TEST_STORE.startswith("postgresql://"), reason="PostgreSQL only (REFLOOP_TEST_STORE)"
)

ROUTES = """\
version: 1
store:
  poll_seconds: 600
http:
  host: 127.0.0.1
  port: ${REFLOOP_HTTP_PORT:-1}
sources:
  ehr:
    type: mllp
    host: 127.0.0.1
    port: ${REFLOOP_MLLP_PORT:-1}
    ack_when: on-processed
"""


def metric(d: Daemon, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{d.http}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.split()[-1])
    return 0.0


def wait_for(cond: object, timeout: float) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


async def _ask(port: int, message: bytes) -> str:
    async with peer(port) as p:
        return (await p.ask(message, timeout=60.0)).code


def _status(url: str, control_id: str) -> str:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT status FROM messages WHERE control_id = %s", (control_id,)
        ).fetchone()
    return str(row[0]) if row else ""


def _listeners(url: str) -> list[int]:
    """Backend pids of this store's LISTEN connections (named by the URL's application_name)."""
    schema = url.split("application_name=")[1].split("&")[0]
    with psycopg.connect(TEST_STORE, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s "
            "AND query LIKE 'LISTEN%%' ORDER BY pid",
            (schema,),
        ).fetchall()
    return [int(r[0]) for r in rows]


@pytest.fixture
def nodes(store_url: str, tmp_path: Path) -> Iterator[tuple[Daemon, Daemon, str]]:
    routes = tmp_path / "routes.yaml"
    routes.write_text(ROUTES)
    a = Daemon(state_dir=tmp_path / "a", log_path=tmp_path / "a.log", routes=routes)
    b = Daemon(state_dir=tmp_path / "b", log_path=tmp_path / "b.log", routes=routes)
    b.store = store_url
    a.store = store_url.replace("postgres@", f"{ROLE}@", 1)
    try:
        yield a, b, store_url
    finally:
        for d in (a, b):
            d.kill()


def _restrict_a(url: str) -> None:
    """Node A's role: the runtime grants, and row-level security on ``messages`` that
    lets it read and insert rows but not update or lock them (superusers, node B,
    bypass it)."""
    from engine.store.db import open_database
    from engine.store.pg import PgDatabase, grant_runtime_role

    with psycopg.connect(TEST_STORE, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (ROLE,)).fetchone() is None:
            conn.execute(f"CREATE ROLE {ROLE} LOGIN")
    db = open_database(url)
    assert isinstance(db, PgDatabase)
    try:
        grant_runtime_role(db.conn, ROLE)
        for sql in (
            "ALTER TABLE messages ENABLE ROW LEVEL SECURITY",
            f"CREATE POLICY notify_a_read ON messages FOR SELECT TO {ROLE} USING (true)",
            f"CREATE POLICY notify_a_add ON messages FOR INSERT TO {ROLE} WITH CHECK (true)",
        ):
            db.conn.execute(sql)
    finally:
        db.close()


def test_on_processed_ack_comes_by_notification_and_listen_reconnects(
    nodes: tuple[Daemon, Daemon, str],
) -> None:
    a, b, url = nodes
    _restrict_a(url)  # migrates the schema first
    a.start(timeout=60)
    # the LISTEN connection opens beside readiness (polling covers the moments before)
    wait_for(lambda: metric(a, "refloop_store_listening") == 1.0, 30)
    # A stores the message and waits for its outcome; A cannot process it
    first = ref_i12("N1", "10482")

    async def first_ack() -> str:
        import asyncio

        task = asyncio.create_task(_ask(a.mllp, first))
        await asyncio.to_thread(wait_for, lambda: _status(url, "N1") == "received", 30)
        await asyncio.sleep(1.0)  # A's processor has looked, found nothing it may claim
        assert not task.done()
        # B starts, processes the row at start, and its commit notifies A
        await asyncio.to_thread(b.start, 60)
        return await task

    assert run(first_ack()) == "AA", a.log_tail()
    assert _status(url, "N1") == "filtered"  # no routes: processed by B, the only one able
    assert metric(a, 'refloop_store_notifications_total{kind="processed"}') >= 1
    # B's processor idles (600 s poll): A's inbox commit wakes it
    wait_for(lambda: metric(b, "refloop_store_listening") == 1.0, 30)
    assert run(_ask(a.mllp, ref_i12("N2", "10483"))) == "AA", b.log_tail()
    assert metric(b, 'refloop_store_notifications_total{kind="received"}') >= 1

    # the server ends every LISTEN connection (two a node: its daemon's, for ACK
    # waiters, and its processing worker's): each process opens its own again
    before = _listeners(url)
    assert len(before) == 4
    with psycopg.connect(TEST_STORE, autocommit=True) as conn:
        for pid in before:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    wait_for(
        lambda: (
            metric(a, "refloop_store_listen_connects_total") == 4.0  # 2 processes x 2
            and metric(b, "refloop_store_listen_connects_total") == 4.0
        ),
        30,
    )
    after = _listeners(url)
    assert len(after) == 4 and not set(after) & set(before)
    assert "LISTEN connection is lost" in a.log_path.read_text()
    # and the notifications flow again: received to B, processed back to A
    assert run(_ask(a.mllp, ref_i12("N3", "10484"))) == "AA", a.log_tail()
