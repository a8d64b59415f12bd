"""Each escalation timer fires once on a cluster (issue 17, docs/scale-out.md): the timer
wheel runs on the holder of the ``singletons`` lease, and every timer transaction checks,
inside itself, that the lease still names this node with the token it was gained with
(the fencing token). A holder that stalled and lost the lease without noticing yet fires
nothing and stops; and a timer deleted by another firer while this one waited for its row
is not fired a second time."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
from test_timers import T0, Loop

from engine.store import leases, open_database
from engine.store.db import Database
from engine.timers.service import Fired
from engine.tracking.escalation import DAY

TEST_STORE = os.environ.get("REFLOOP_TEST_STORE", "")


@pytest.fixture
def db(store_url: str) -> Iterator[Database]:
    database = open_database(store_url)
    yield database
    database.close()


def _timer_audit(db: Database) -> list[str]:
    rows = db.conn.execute("SELECT action FROM audit WHERE action LIKE 'timer:%'").fetchall()
    return [str(r[0]) for r in rows]


def _wait_for_a_lock_wait(store_url: str, failure: str) -> None:
    """Until a connection of the store at ``store_url`` (PostgreSQL: named by its
    application_name) waits for a lock another transaction holds."""
    app = store_url.rsplit("application_name=", 1)[1].split("&")[0]
    with psycopg.connect(TEST_STORE, autocommit=True) as admin:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            waiting = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
                "AND wait_event_type = 'Lock'",
                (app,),
            ).fetchone()
            if waiting and waiting[0]:
                return
            time.sleep(0.02)
    raise AssertionError(failure)


def _nudges(loop: Loop, rid: int) -> list[tuple[str, str]]:
    return [o for o in loop.outbox(rid) if o[1].endswith("_nudge")]


def test_a_holder_that_lost_the_lease_fires_nothing_and_stops(db: Database) -> None:
    loop = Loop(db)
    with db.transaction() as conn:
        mine = leases.acquire(conn, "singletons", "a", T0, 30.0)
    assert mine is not None
    loop.timers.fence = lambda conn: leases.holds(conn, "singletons", "a", mine.token)
    rid = loop.create(consent=False)
    # a stalls past its lease's end; b takes the lease over (token 2)
    with db.transaction() as conn:
        theirs = leases.acquire(conn, "singletons", "b", T0 + 60, 30.0)
    assert theirs is not None and theirs.token == mine.token + 1
    assert loop.advance_to(T0 + 2 * DAY) == []  # first-nudge was due at T0 + 1 day
    assert _timer_audit(db) == [] and _nudges(loop, rid) == []
    assert loop.timers._stopping  # it stopped firing at once
    # b's wheel fires it, once
    loop.timers.fence = lambda conn: leases.holds(conn, "singletons", "b", theirs.token)
    loop.timers.resume()
    fired = loop.timers.tick()
    assert [(f.kind, f.result) for f in fired] == [("first-nudge", "acted")]
    assert _timer_audit(db) == ["timer:first-nudge"]
    assert _nudges(loop, rid) == [("portal", "first_nudge")]


@pytest.mark.skipif(not TEST_STORE, reason="PostgreSQL only: SQLite serialises writers")
def test_a_timer_deleted_by_another_firer_meanwhile_is_not_fired(
    db: Database, store_url: str
) -> None:
    """Another node's transaction fires the timer (locks the referral, deletes the row)
    while this node's fire has read the row and waits for the lock; when the other
    commits, this one finds the row gone and does nothing (it acted before the fix)."""
    loop = Loop(db)
    rid = loop.create(consent=False)
    row = db.conn.execute(
        "SELECT id FROM timers WHERE referral_id = ? AND kind = 'first-nudge'", (rid,)
    ).fetchone()
    assert row is not None
    timer_id = int(row[0])
    loop.clock.set(T0 + DAY + 1)
    other = open_database(store_url)
    out: list[Fired | None] = []
    try:
        with other.transaction() as conn:
            conn.execute("SELECT id FROM referrals WHERE id = ? FOR UPDATE", (rid,))
            conn.execute("DELETE FROM timers WHERE id = ?", (timer_id,))
            worker = threading.Thread(target=lambda: out.append(loop.timers.fire(timer_id)))
            worker.start()
            _wait_for_a_lock_wait(store_url, "the fire never waited for the row")
        worker.join(10)
    finally:
        other.close()
    assert out == [None]
    assert _timer_audit(db) == [] and _nudges(loop, rid) == []


def test_a_burst_of_due_timers_lets_the_loop_run_between_fires(db: Database) -> None:
    """``run`` fires one timer per step of the event loop: the heartbeat, the outbox and
    the listeners run between the fires of a burst (before, a tick fired all of them in
    one go, so on a cluster a long burst could hold the lease renewal back past its end)."""
    loop = Loop(db)
    for k in range(3):
        loop.create(f"R{k}", consent=False)
    loop.clock.set(T0 + DAY + 1)  # three first nudges due at once
    steps = 0
    seen: list[int] = []
    loop.timers.on_fired = lambda _f: seen.append(steps)

    async def go() -> None:
        nonlocal steps

        async def other() -> None:  # another task on the loop, as the heartbeat is
            nonlocal steps
            while True:
                steps += 1
                await asyncio.sleep(0)

        beside = asyncio.create_task(other())
        service = asyncio.create_task(loop.timers.run(idle=0.05))
        while len(seen) < 3:
            await asyncio.sleep(0.01)
        loop.timers.stop()
        await service
        beside.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beside

    asyncio.run(asyncio.wait_for(go(), 10))
    assert len(seen) == 3 and seen[0] < seen[1] < seen[2], seen


def test_the_worker_process_fires_fenced_on_the_lease_the_daemon_sent(db: Database) -> None:
    """With processing in its own process (engine.worker) the daemon holds the lease and
    the worker runs the wheel: the ``{"t": 1, "n": holder, "k": token}`` line it is sent
    fences the worker's timers on that holder and token, so a daemon that lost the lease
    while its worker kept running (the daemon stalled, the worker did not) fires nothing."""
    from types import SimpleNamespace

    from engine.supervisor import RemoteProcessor
    from engine.worker import WorkerSide

    loop = Loop(db)
    with db.transaction() as conn:
        mine = leases.acquire(conn, "singletons", "a", T0, 30.0)
    assert mine is not None
    sent: list[dict[str, object]] = []
    daemon_side = RemoteProcessor.__new__(
        RemoteProcessor
    )  # only its lease bookkeeping is used here
    daemon_side.timers, daemon_side.fence = False, None
    daemon_side._send = sent.append  # type: ignore[method-assign]
    daemon_side.set_timers(True, ("a", mine.token))
    assert sent == [{"t": 1, "n": "a", "k": mine.token}]

    engine = SimpleNamespace(timers=loop.timers, tasks=SimpleNamespace(timers=None))
    side = WorkerSide(engine, writer=None)  # type: ignore[arg-type]

    async def take(message: dict[str, object]) -> None:
        fence = (str(message["n"]), int(message["k"])) if "k" in message else None  # type: ignore[call-overload]
        await side.timers(bool(message["t"]), fence)
        await side.timers(False)  # the wheel's own task is not what this test drives

    asyncio.run(take(sent[0]))
    rid = loop.create(consent=False)
    with db.transaction() as conn:
        assert leases.acquire(conn, "singletons", "b", T0 + 60, 30.0) is not None
    assert loop.advance_to(T0 + 2 * DAY) == []
    assert _timer_audit(db) == [] and _nudges(loop, rid) == []


def test_a_timer_moved_earlier_while_the_wheel_reads_it_fires_at_the_new_time(
    db: Database, store_url: str
) -> None:
    """Another node moves a timer the wheel has not read yet to within the wheel's
    horizon, and commits while the wheel's refill waits for the row. The wheel must take
    the moved due time. Before the fix it read the row, then marked it read after the
    move committed: it kept the old due time (beyond the horizon, so not scheduled) and,
    the row marked read, the horizon's later extension skipped it: the timer never
    fired (test_cluster_kill saw 35 due timers stall on three nodes)."""
    loop = Loop(db)
    rid = loop.create(consent=False)
    row = db.conn.execute(
        "SELECT id, due FROM timers WHERE referral_id = ? AND kind = 'first-nudge'", (rid,)
    ).fetchone()
    assert row is not None and float(row[1]) == T0 + DAY  # beyond the one-hour horizon
    timer_id = int(row[0])
    other = open_database(store_url)
    done = threading.Event()
    refill = threading.Thread(target=lambda: (loop.timers.refill(), done.set()))
    try:
        with other.transaction() as conn:
            conn.execute("UPDATE timers SET due = ? WHERE id = ?", (T0 + 1800, timer_id))
            refill.start()
            if TEST_STORE:  # until the refill waits for the row this transaction moved
                _wait_for_a_lock_wait(store_url, "the refill never waited for the row")
            else:  # SQLite: the refill's read has run; its write waits for our lock
                assert not done.wait(0.5)
        refill.join(10)
    finally:
        other.close()
    assert done.is_set()
    loop.clock.set(T0 + 3600)
    fired = loop.timers.tick()
    assert [(f.kind, f.referral_id) for f in fired] == [("first-nudge", rid)]
