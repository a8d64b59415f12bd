"""Processing in its own OS process (issue 18, docs/architecture.md "Processes"): the real
``refloop run`` daemon with ``processing.workers: 1`` (the default) starts a worker
process (``python -m engine.worker``), restarts it when it dies, stops it in order on
SIGTERM, and hears from it when a message is processed (``ack_when: on-processed``)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import HOST, REFLOOP_RUN, Daemon, Reply, hl7, peer, query, shipped_routes

from engine.store.db import open_database

REPO = Path(__file__).resolve().parents[1]


def ref(n: int, placer: str | None = None) -> bytes:
    """A REF^I12 referral with its own placer number (each one a new referral)."""
    placer = placer or f"PL{n:05d}"
    return hl7(
        f"W{n:05d}",
        msg_type="REF^I12",
        body=(
            f"RF1|P^Pending|R^Routine||||{placer}^CLINIC",
            f"PID|1||MRN{70000 + n}^^^CLINIC^MR||DOE^JANE||19800101|F",
            "PRD|RT|SPECIALIST^SAM||||||1245319599^NPI",
        ),
    )


def worker_pid(d: Daemon) -> int:
    return d.worker_pid()


def get(d: Daemon, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{d.http}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        body = exc.read().decode()
        exc.close()
        return exc.code, body


def metric(d: Daemon, name: str) -> float | None:
    _, body = get(d, "/metrics")
    for line in body.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def rows(store_url: str, sql: str) -> list[tuple[Any, ...]]:
    """``sql`` on the store under test (a SQLite file, or PostgreSQL with
    REFLOOP_TEST_STORE), on a read-only connection of its own."""
    db = open_database(store_url, readonly=True)
    try:
        return [tuple(r) for r in db.conn.execute(sql).fetchall()]
    finally:
        db.close()


def wait_for(check: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


async def send_all(port: int, messages: list[bytes]) -> list[str]:
    codes = []
    async with peer(port) as p:
        for m in messages:
            reply = await p.ask(m, timeout=30)
            codes.append(reply.field("MSA", 1))
    return codes


@pytest.fixture
def daemon(tmp_path: Path, store_url: str) -> Iterator[Daemon]:
    """The daemon on the store under test (SQLite, or PostgreSQL with REFLOOP_TEST_STORE)."""
    d = Daemon(
        state_dir=tmp_path / "state",
        log_path=tmp_path / "daemon.log",
        routes=shipped_routes(tmp_path / "routes.yaml", ack_when="on-commit"),
        store=store_url,
    )
    try:
        yield d
    finally:
        pid = worker_pid(d) if d.proc is not None and d.proc.poll() is None else 0
        d.kill()
        if pid:  # the worker stops by itself once the daemon's socket closes
            wait_for(lambda: not Path(f"/proc/{pid}").exists(), timeout=20)


def test_worker_killed_by_the_os_is_restarted_and_the_backlog_drains(
    daemon: Daemon, store_url: str
) -> None:
    daemon.start(timeout=60)
    first = wait_for(lambda: worker_pid(daemon))
    wait_for(lambda: metric(daemon, "refloop_worker_up") == 1.0)
    os.kill(first, signal.SIGKILL)
    # ACKs do not wait for processing: the backlog builds while the worker is down
    codes = asyncio.run(send_all(daemon.mllp, [ref(n) for n in range(30)]))
    assert codes == ["AA"] * 30
    second = wait_for(lambda: (p := worker_pid(daemon)) and p != first and p)
    assert second != first
    routed = "SELECT count(*) FROM messages WHERE status = 'routed'"
    wait_for(lambda: rows(store_url, routed) == [(30,)], timeout=60)
    assert rows(store_url, "SELECT count(*) FROM referrals") == [(30,)]
    wait_for(lambda: get(daemon, "/readyz")[0] == 200)
    assert metric(daemon, "refloop_worker_restarts_total") == 1.0
    assert metric(daemon, "refloop_worker_up") == 1.0
    # the new worker's counts reach the one /metrics
    assert metric(daemon, 'refloop_messages_processed_total{status="routed"}') == 30.0


def test_readyz_reports_the_worker_and_stays_ready_while_it_restarts(daemon: Daemon) -> None:
    daemon.start(timeout=60)
    wait_for(lambda: json.loads(get(daemon, "/readyz")[1]) == {"status": "ready", "worker": "up"})
    pid = wait_for(lambda: worker_pid(daemon))
    daemon.proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
    try:
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    finally:
        daemon.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
    # the daemon notices the socket closing at once; the restart waits the backoff; ACKs
    # (on-commit) go on meanwhile, so the daemon stays ready and says the worker is down
    status, body = wait_for(lambda: (r := get(daemon, "/readyz")) and "down" in r[1] and r)
    assert status == 200 and json.loads(body) == {"status": "ready", "worker": "down"}
    assert asyncio.run(send_all(daemon.mllp, [ref(1)])) == ["AA"]
    wait_for(lambda: json.loads(get(daemon, "/readyz")[1])["worker"] == "up")


def test_a_poison_message_is_marked_error_and_the_worker_keeps_going(
    tmp_path: Path,
) -> None:
    data = yaml.safe_load((REPO / "routes.yaml").read_text(encoding="utf-8"))
    data["sources"]["ehr"]["ack_when"] = "on-processed"
    # a route whose expression raises (int() of a name) for the ADT^A01 below
    data["routes"].insert(
        0,
        {
            "name": "poison",
            "when": {"type": "ADT^A01"},
            "extract": {
                "placer_number": "PID.3.1",
                "needed_by": "{{ (field('PID.5.1') | int(default=none)) + 1 }}",
            },
            "then": [{"track": "referral-created"}],
        },
    )
    routes = tmp_path / "routes.yaml"
    routes.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    d = Daemon(state_dir=tmp_path / "state", log_path=tmp_path / "daemon.log", routes=routes)
    try:
        d.start(timeout=60)
        pid = wait_for(lambda: worker_pid(d))
        poison = hl7("POISON1", msg_type="ADT^A01")
        codes = asyncio.run(send_all(d.mllp, [ref(1), poison, ref(2)]))
        # on-processed: the poison message is answered AE, its neighbours AA
        assert codes == ["AA", "AE", "AA"]
        statuses = query(d.db, "SELECT control_id, status FROM messages ORDER BY id")
        assert statuses == [("W00001", "routed"), ("POISON1", "error"), ("W00002", "routed")]
        assert worker_pid(d) == pid  # the same worker went on
        assert metric(d, "refloop_worker_restarts_total") == 0.0
    finally:
        d.kill()


def test_on_processed_ack_crosses_the_process_boundary(tmp_path: Path, store_url: str) -> None:
    d = Daemon(
        state_dir=tmp_path / "state",
        log_path=tmp_path / "daemon.log",
        routes=shipped_routes(tmp_path / "routes.yaml", ack_when="on-processed"),
        store=store_url,
    )
    try:
        d.start(timeout=60)
        assert wait_for(lambda: worker_pid(d))
        codes = asyncio.run(send_all(d.mllp, [ref(n) for n in range(5)]))
        assert codes == ["AA"] * 5
        # each ACK came after its row was processed by the worker
        assert rows(store_url, "SELECT count(*) FROM messages WHERE status = 'routed'") == [(5,)]
        assert rows(store_url, "SELECT count(*) FROM referrals") == [(5,)]
    finally:
        d.kill()


def test_sigterm_stops_the_daemon_and_its_worker_and_exits_0(daemon: Daemon) -> None:
    daemon.start(timeout=60)
    pid = wait_for(lambda: worker_pid(daemon))
    codes = asyncio.run(send_all(daemon.mllp, [ref(n) for n in range(10)]))
    assert codes == ["AA"] * 10
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(timeout=30) == 0
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
    log = daemon.log_path.read_text()
    assert "killing it" not in log  # stopped in order, not at the bound


def test_enhanced_mode_application_ack_comes_from_the_worker(tmp_path: Path) -> None:
    """HL7 v2.5.1 §2.9.3: MSH-15 AL, MSH-16 AL: the commit ACK (CA) at once, the
    application ACK (AA) once processed, here by the worker process."""
    routes = shipped_routes(tmp_path / "routes.yaml", ack_when="on-commit", sources={})
    data = yaml.safe_load(routes.read_text(encoding="utf-8"))
    data["sources"]["ehr"]["ack_mode"] = "enhanced"
    routes.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    d = Daemon(state_dir=tmp_path / "state", log_path=tmp_path / "daemon.log", routes=routes)

    async def go() -> list[tuple[str, str]]:
        async with peer(d.mllp) as p:
            message = ref(7).replace(b"|P|2.5.1", b"|P|2.5.1|||AL|AL", 1)
            await p.send(message)
            got = []
            for _ in range(2):
                raw = await p.recv(timeout=30)
                assert raw is not None
                reply = Reply.parse(raw)
                got.append((reply.code, reply.control_id))
            return got

    try:
        d.start(timeout=60)
        assert wait_for(lambda: worker_pid(d))
        assert asyncio.run(go()) == [("CA", "W00007"), ("AA", "W00007")]
        assert query(d.db, "SELECT status FROM messages") == [("routed",)]
    finally:
        d.kill()


def test_processing_workers_is_0_or_1() -> None:
    from engine.config import loads
    from engine.errors import ConfigError

    assert loads("version: 1\n").processing.workers == 1  # the default: a worker process
    assert loads("version: 1\nprocessing: {workers: 0}\n").processing.workers == 0
    with pytest.raises(ConfigError) as exc:
        loads("version: 1\nprocessing: {workers: 2}\n")
    assert "processing.workers" in str(exc.value)


def test_the_worker_figures_merge_into_the_one_exposition(tmp_path: Path) -> None:
    """Counters add up (and keep what an exited worker counted), a gauge takes the larger
    value (``refloop_store_listening`` the smaller), families only the worker has are
    appended; by hand: 2 + 3 = 5 routed, then a
    new worker's 4 on top of the first one's 3: 2 + 3 + 4 = 9."""
    from prometheus_client import CollectorRegistry, generate_latest

    from engine.clock import WallClock
    from engine.ingest.processor import no_routes
    from engine.metrics import Metrics
    from engine.store import Inbox
    from engine.supervisor import RemoteProcessor, snapshot

    def worker_figures(routed: float, lag_like: float) -> list[Any]:
        m = Metrics(CollectorRegistry())
        m.processed.labels("routed").inc(routed)
        m.inbox_rows.set(lag_like)
        m.store_listening.set(0)  # the worker's LISTEN connection is lost
        return snapshot(list(m.registry.collect()))

    async def go() -> tuple[str, str]:
        db = open_database(tmp_path / "refloop.db")
        metrics = Metrics(CollectorRegistry())
        metrics.processed.labels("routed").inc(2)
        metrics.inbox_rows.set(10)
        metrics.store_listening.set(1)
        remote = RemoteProcessor(db, Inbox(db), no_routes, WallClock(), metrics, ["true"])
        remote._snapshot = worker_figures(3, 4)
        first = generate_latest(_Registry(metrics)).decode()
        remote._down()  # that worker exited: its counts stay
        remote._snapshot = worker_figures(4, 12)
        second = generate_latest(_Registry(metrics)).decode()
        db.close()
        return first, second

    class _Registry:
        def __init__(self, metrics: Any) -> None:
            self.metrics = metrics

        def collect(self) -> Any:
            return self.metrics.merge(list(self.metrics.registry.collect()))

    first, second = asyncio.run(go())
    assert 'refloop_messages_processed_total{status="routed"} 5.0' in first
    assert "refloop_inbox_rows 10.0" in first  # max(10, 4)
    assert "refloop_store_listening 0.0" in first  # min(1, 0): one process lost it
    assert 'refloop_messages_processed_total{status="routed"} 9.0' in second
    assert "refloop_inbox_rows 12.0" in second  # max(10, 12)
    assert first.count("# TYPE refloop_messages_processed_total counter") == 1


def test_the_worker_runs_the_daemons_code_whatever_directory_it_starts_in(
    daemon: Daemon, tmp_path: Path, store_url: str
) -> None:
    """`refloop run` started in a directory that holds another ``engine`` package (a
    checkout of another version, as bench/ingest.py --refloop does): the worker imports
    the daemon's installation, not the directory's (fails before: ``python -m
    engine.worker`` put the working directory first on sys.path, and the worker ran the
    directory's code; here it exits at import and never comes up)."""
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "engine").mkdir(parents=True)
    (elsewhere / "engine" / "__init__.py").write_text(
        "raise SystemExit('the engine package of the working directory')\n"
    )
    daemon.cwd, daemon.run = elsewhere, REFLOOP_RUN
    daemon.start(timeout=60)  # and waits for the worker
    assert asyncio.run(send_all(daemon.mllp, [ref(1)])) == ["AA"]
    wait_for(lambda: rows(store_url, "SELECT count(*) FROM referrals") == [(1,)])
    assert "working directory" not in daemon.log_tail()
