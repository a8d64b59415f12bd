"""Two real ``refloop run`` daemons on one SQLite file (WAL), on different ports: one
holds the singletons lease; when it dies or hangs the other takes over, and a hung holder
that wakes up finds its lease gone and stops the leased work (docs/scale-out.md)."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import Daemon, query, refloop

LEASE = 3  # store.lease_seconds: rounds every second

ROUTES = f"""\
version: 1
store:
  file: refloop.db
  lease_seconds: {LEASE}
http:
  host: 127.0.0.1
  port: ${{REFLOOP_HTTP_PORT:-1}}
sources:
  ehr:
    type: mllp
    host: 127.0.0.1
    port: ${{REFLOOP_MLLP_PORT:-1}}
"""


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Daemon, Daemon]]:
    routes = tmp_path / "routes.yaml"
    routes.write_text(ROUTES)
    state = tmp_path / "state"
    a = Daemon(state_dir=state, log_path=tmp_path / "a.log", routes=routes)
    b = Daemon(state_dir=state, log_path=tmp_path / "b.log", routes=routes)
    try:
        yield a, b
    finally:
        for d in (a, b):
            if d.proc is not None and d.proc.poll() is None:
                d.proc.send_signal(signal.SIGCONT)
            d.kill()


def node(d: Daemon) -> str:
    assert d.proc is not None
    return f"{os.uname().nodename}:{d.proc.pid}"


def holder(d: Daemon) -> tuple[str, int]:
    rows = query(d.db, "SELECT holder, token FROM leases WHERE name = 'singletons'")
    return (rows[0][0], rows[0][1]) if rows else ("", 0)


def wait_for(cond: object, timeout: float) -> float:
    """Seconds until ``cond()`` is true (polling every 50 ms); fails past ``timeout``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():  # type: ignore[operator]
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def held(d: Daemon) -> float:
    """The node's own view: refloop_cluster_lease_held{lease="singletons"} on /metrics."""
    url = f"http://127.0.0.1:{d.http}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if line.startswith('refloop_cluster_lease_held{lease="singletons"}'):
            return float(line.split()[-1])
    raise AssertionError("refloop_cluster_lease_held missing")


def status(d: Daemon) -> dict[str, object]:
    out = refloop(
        "cluster", "status", "--json", "--routes", str(d.routes), "--state", str(d.state_dir)
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_kill_9_holder_other_takes_over(pair: tuple[Daemon, Daemon]) -> None:
    a, b = pair
    a.start()
    assert holder(a) == (node(a), 1)
    b.start()
    assert holder(b) == (node(a), 1)  # b waits: the lease is a's
    time.sleep(LEASE / 3 * 2)
    assert holder(b) == (node(a), 1)
    assert (held(a), held(b)) == (1.0, 0.0)
    names = {n["node_id"]: n for n in status(b)["nodes"]}  # type: ignore[attr-defined]
    assert names[node(a)]["state"] == names[node(b)]["state"] == "alive"
    assert names[node(a)]["config"] == names[node(b)]["config"] != ""
    assert status(b)["config_drift"] is False
    dead = node(a)
    assert a.proc is not None
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait(10)
    # same host, process gone: b takes over at its next round, before the lease ends
    wait_for(lambda: holder(b) == (node(b), 2), LEASE + 2)
    assert "holds the singletons lease (token 2)" in b.log_path.read_text()
    assert held(b) == 1.0
    wait_for(
        lambda: {n["node_id"]: n for n in status(b)["nodes"]}[dead]["state"] == "stale", LEASE * 3
    )  # type: ignore[attr-defined,index]


def test_hung_holder_loses_after_expiry_and_fences_itself(pair: tuple[Daemon, Daemon]) -> None:
    a, b = pair
    a.start()
    b.start()
    assert holder(b) == (node(a), 1)
    assert a.proc is not None
    a.proc.send_signal(signal.SIGSTOP)  # hung, not dead: b must wait for the lease to end
    stopped_at = time.monotonic()
    wait_for(lambda: holder(b) == (node(b), 2), LEASE * 3)
    assert time.monotonic() - stopped_at >= LEASE - 1.0  # not before a's last renewal ran out
    a.proc.send_signal(signal.SIGCONT)
    wait_for(lambda: "lost the singletons lease" in a.log_path.read_text(), LEASE * 3)
    assert (held(a), held(b)) == (0.0, 1.0)
    time.sleep(LEASE)
    assert holder(b) == (node(b), 2)  # a did not take it back
    assert (held(a), held(b)) == (0.0, 1.0)
    # a clean stop of the holder releases at once: a takes over without waiting
    assert b.proc is not None
    b.signal(signal.SIGTERM)
    assert b.wait() == 0
    released = time.monotonic()
    wait_for(lambda: holder(a) == (node(a), 3), LEASE + 2)
    assert time.monotonic() - released < LEASE
    assert held(a) == 1.0


def test_second_daemon_with_the_same_node_id_is_refused(tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(
        ROUTES.replace("  file: refloop.db\n", "  file: refloop.db\n  node_id: same\n")
    )
    state = tmp_path / "state"
    a = Daemon(state_dir=state, log_path=tmp_path / "a.log", routes=routes)
    try:
        a.start()
        out = refloop("run", "--routes", str(routes), "--state", str(state), timeout=60)
        assert out.returncode == 1
        err = out.stderr.decode().strip().splitlines()[-1]
        assert err.startswith("Error: store.node_id 'same' is in use by a running node")
        # the refused daemon touched nothing: a still holds the lease, its row is alive
        assert holder(a) == ("same", 1)
        assert query(a.db, "SELECT stopped FROM nodes WHERE node_id = 'same'") == [(None,)]
        assert held(a) == 1.0
    finally:
        a.kill()
