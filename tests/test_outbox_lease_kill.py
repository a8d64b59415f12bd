"""kill -9 the node (the ``refloop`` executable and its processing worker) while outbox
rows are ``sending``, restart it: the rows its dead claims held go out again only once
their leases have expired, and nothing is sent twice except the sends the kill cut
(counted). kill -9 of the daemon alone: its worker finishes and records those sends.

The receiver is a webhook endpoint on loopback that answers the first round of sends and
holds the second round open; when the whole second round has arrived it kills the daemon,
so those rows were sent (the receiver has them) but their results were never recorded.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import urllib.request
from pathlib import Path

import pytest
from aiohttp import web
from helpers import Daemon, query, run, shipped_routes

from channels.webhook import IDEMPOTENCY_HEADER
from engine.store import open_database
from engine.store import referrals as referral_store

ROWS = 12
CONCURRENCY = 4  # sends per round (the channel's ``concurrency``)
LEASE = 8.0  # store.lease_seconds: longer than a restart takes on a slow machine


def _seed(db_path: Path) -> None:
    db = open_database(db_path)
    now = time.time()
    with db.transaction() as conn:
        for i in range(1, ROWS + 1):
            referral_store.enqueue_outbox(
                conn, None, "hook", "coordinator-task", "{}", f"k{i:02d}", now, now=now
            )
    db.close()


def _metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") and 'channel="hook"' in line
    )


@pytest.mark.parametrize("target", ["node", "daemon"])
def test_kill_9_while_sending_then_restart(daemon: Daemon, tmp_path: Path, target: str) -> None:
    """``node``: the daemon and its processing worker die together (a power cut, an OOM
    kill of the unit): the cut sends go again after their leases, each exactly twice.
    ``daemon``: the daemon alone dies; its worker, which made the sends, sees the socket
    close, finishes the sends in flight, records them and stops: nothing goes twice."""
    secret = tmp_path / "hook.secret"
    secret.write_text("webhook-secret-for-tests-only")
    daemon.state_dir.mkdir(parents=True)
    _seed(daemon.db)
    arrivals: list[tuple[str, float]] = []  # (idempotency key, when), in arrival order
    orphans: list[int] = []  # the killed daemon's worker
    hold = asyncio.Event()
    release = asyncio.Event()
    killed = asyncio.Event()

    async def receiver(request: web.Request) -> web.Response:
        key = request.headers[IDEMPOTENCY_HEADER]
        arrivals.append((key, time.time()))
        if hold.is_set() and len(arrivals) > CONCURRENCY:
            if len(arrivals) == 2 * CONCURRENCY:
                # the whole second round is in flight: the node dies, its processing
                # worker (which sends) with it, as in a power cut or an OOM kill of the
                # unit. (The daemon alone killed, its worker finishes and records these
                # sends before it stops: tests/test_worker_process.py.)
                orphans.append(daemon.worker_pid())
                daemon.signal(signal.SIGKILL)
                if target == "node" and orphans[0]:
                    os.kill(orphans[0], signal.SIGKILL)
                killed.set()
            await release.wait()  # never answered: the daemon is gone
        return web.json_response({"id": f"rx-{len(arrivals)}"})

    async def body() -> tuple[dict[str, float], dict[str, float], float]:
        app = web.Application()
        app.router.add_post("/hook", receiver)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
        try:
            daemon.routes = shipped_routes(
                tmp_path / "routes.yaml",
                store={"lease_seconds": LEASE},
                channels={
                    "hook": {
                        "type": "webhook",
                        "url": url,
                        "secret": f"${{file:{secret}}}",
                        "concurrency": CONCURRENCY,
                    }
                },
            )
            hold.set()
            # the worker's first sends reach the receiver, which kills the daemon, maybe
            # before /readyz has said the worker is up: do not wait for that
            await asyncio.to_thread(daemon.start, worker=False)
            async with asyncio.timeout(30):
                await killed.wait()
            await asyncio.to_thread(daemon.wait)
            held = (
                "SELECT idempotency_key, lease_until, claimed_by FROM outbox "
                "WHERE status = 'sending'"
            )
            before = query(daemon.db, held)
            leases = {str(k): float(u) for k, u, _ in before}
            release.set()  # let the held requests end (their client is dead)
            hold.clear()
            await asyncio.to_thread(daemon.start)
            started = time.time()
            # right after the restart the dead node's leases still run: its rows wait
            # (unless the restart itself took longer than the lease)
            after = query(daemon.db, held)
            async with asyncio.timeout(LEASE + 30):
                while query(daemon.db, "SELECT count(*) FROM outbox WHERE status != 'sent'")[0][0]:
                    await asyncio.sleep(0.1)  # waiting for the daemon to finish the outbox
            expired = await asyncio.to_thread(
                _metric, daemon.http, "refloop_outbox_lease_expired_total"
            )
            sent = {
                str(k): float(s)
                for k, s in query(daemon.db, "SELECT idempotency_key, sent_at FROM outbox")
            }
            if target == "node" and started < min(leases.values()):
                assert set(before) <= set(after)
            return leases, sent, expired
        finally:
            release.set()
            daemon.kill()
            await runner.cleanup()

    leases, sent, expired = run(body(), timeout=120)
    cut = set(leases)
    assert len(cut) == CONCURRENCY  # the second round: sent, not recorded when killed
    keys = [k for k, _ in arrivals]
    assert sorted(set(keys)) == [f"k{i:02d}" for i in range(1, ROWS + 1)]
    assert len(sent) == ROWS
    if target == "daemon":
        deadline = time.monotonic() + 30
        while Path(f"/proc/{orphans[0]}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)  # the orphan stops once its sends are recorded
        assert orphans[0] and not Path(f"/proc/{orphans[0]}").exists()
        assert len(keys) == ROWS and expired == 0  # each sent once: the orphan recorded it
        return
    # nothing sent twice except the sends the kill cut, each exactly twice
    assert {k: keys.count(k) for k in keys if keys.count(k) > 1} == dict.fromkeys(cut, 2)
    assert expired == CONCURRENCY  # and each counted
    # each went again only after its lease (the dead daemon's claim) had expired
    for key in cut:
        again = [at for k, at in arrivals if k == key][1]
        assert again >= leases[key], (key, again, leases[key])
