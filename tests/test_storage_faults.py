"""When the inbox's commit fails (disk full, I/O error, the database locked past its
timeout) the listener never answers AA for the messages of that commit: it answers AE
(CE in enhanced mode) with an ERR that says to send again, keeps running, counts
``refloop_store_errors_total``, turns ``/readyz`` 503, and recovers by itself once writes
succeed again (docs/operations.md "Full disk and storage faults").

Two real faults: a full disk (the daemon's state on a small tmpfs, filled to the last
byte; needs root to mount, skipped otherwise) and a lock held by another connection past
the writer's busy timeout (shortened here so the test does not wait 10 s).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from helpers import HOST, Daemon, config, hl7, mounted_tmpfs, peer, query, run

import engine.store.inbox as inbox_module
from engine.app import Engine
from engine.clock import WallClock


def _get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


def _store_errors(metrics_text: str, kind: str) -> float:
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("refloop_store_errors_total{") and f'kind="{kind}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


async def _until_ready(http: int, want: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        status, _ = await asyncio.to_thread(_get, f"http://{HOST}:{http}/readyz")
        if status == want:
            return
        assert time.monotonic() < deadline, f"/readyz stayed {status}, wanted {want}"
        await asyncio.sleep(0.05)


# -- the database locked past the writer's timeout (in-process engine, real lock) -------


@pytest.mark.store
@pytest.mark.sqlite_file("another connection holds the file's write lock")
def test_a_commit_that_fails_is_answered_ae_never_aa_and_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inbox_module, "WRITER_BUSY_MS", 200)
    monkeypatch.setattr(inbox_module, "PROBE_SECONDS", 0.1)

    async def body() -> None:
        engine = Engine(
            config(http=True, ack_mode="enhanced"), tmp_path, clock=WallClock(), drain_seconds=2.0
        )
        await engine.start()
        try:
            port, http = engine.ports()["ehr"], engine.ports()["http"]
            async with peer(port) as p:
                assert (await p.ask(hl7("BEFORE-1"))).code == "AA"
                await _until_ready(http, 200)

                # another process's writer holds the lock past the writer's busy timeout
                blocker = sqlite3.connect(tmp_path / "refloop.db", isolation_level=None)
                blocker.execute("BEGIN IMMEDIATE")
                try:
                    reply = await p.ask(hl7("LOCKED-1"))
                    assert reply.code == "AE", reply.raw
                    assert reply.has("ERR")
                    assert "send again" in reply.raw.decode()
                    # enhanced mode: the commit ACK is CE (HL7 v2.5.1 §2.9.3)
                    reply = await p.ask(hl7("LOCKED-2", msh15="AL", msh16="NE"))
                    assert reply.code == "CE", reply.raw
                    status, text = await asyncio.to_thread(_get, f"http://{HOST}:{http}/readyz")
                    assert status == 503
                    assert "store" in text
                    _, metrics = await asyncio.to_thread(_get, f"http://{HOST}:{http}/metrics")
                    assert _store_errors(metrics, "locked") >= 2
                    assert 'refloop_acks_total{code="AA",source="ehr"} 1.0' in metrics
                finally:
                    blocker.execute("ROLLBACK")
                    blocker.close()

                # no message needed: the writer's probe finds the store writable again
                await _until_ready(http, 200)
                for cid in ("LOCKED-1", "AFTER-1"):
                    assert (await p.ask(hl7(cid))).code == "AA"
        finally:
            await engine.stop()
        stored = [r[0] for r in query(tmp_path / "refloop.db", "SELECT control_id FROM messages")]
        assert sorted(stored) == ["AFTER-1", "BEFORE-1", "LOCKED-1"]

    run(body())


# -- a full disk under the real daemon (tmpfs, needs root) --------------------------------


def fill(path: Path) -> None:
    """Write ``path`` until the filesystem has no byte left."""
    chunk = b"\0" * 65536
    with path.open("wb", buffering=0) as f:
        while True:
            try:
                f.write(chunk)
            except OSError:
                break
        for size in (4096, 512, 1):
            while True:
                try:
                    f.write(b"\0" * size)
                except OSError:
                    break


def _note(i: int) -> tuple[str, ...]:
    return ("PID|1||1^^^MRN||DOE^JANE", "NTE|1||" + (f"{i:06d}" * 8000))  # ~48 KB each


@pytest.mark.store
@pytest.mark.slow
@pytest.mark.sqlite_file("the state directory on a tmpfs that fills up")
def test_a_full_disk_is_answered_ae_and_the_daemon_recovers_when_space_returns(
    tmp_path: Path,
) -> None:
    with mounted_tmpfs(tmp_path / "state", "size=24m,mode=0700") as state:
        daemon = Daemon(state_dir=state, log_path=tmp_path / "daemon.log")
        try:
            daemon.start()
            run(_full_disk(daemon, state / "filler"), timeout=180)
            daemon.signal(15)
            assert daemon.wait(30) == 0, daemon.log_tail()
        finally:
            daemon.kill()
        assert query(daemon.db, "PRAGMA integrity_check") == [("ok",)]
        counts = dict(query(daemon.db, "SELECT control_id, count(*) FROM messages GROUP BY 1"))
        assert all(v == 1 for v in counts.values()), counts


async def _full_disk(daemon: Daemon, filler: Path) -> None:
    url = f"http://{HOST}:{daemon.http}"
    acked: list[str] = []
    answered_ae: list[str] = []
    async with peer(daemon.mllp) as p:
        assert (await p.ask(hl7("FULL-0"))).code == "AA"
        acked.append("FULL-0")
        await asyncio.to_thread(fill, filler)
        for i in range(1, 400):
            cid = f"FULL-{i}"
            reply = await p.ask(hl7(cid, body=_note(i)), timeout=30.0)
            assert reply.code in ("AA", "AE"), reply.raw
            (acked if reply.code == "AA" else answered_ae).append(cid)
            if len(answered_ae) >= 3:
                break
        assert answered_ae, "the disk never filled up"
        assert daemon.proc is not None and daemon.proc.poll() is None  # still running
        status, _ = await asyncio.to_thread(_get, f"{url}/readyz")
        assert status == 503
        _, metrics = await asyncio.to_thread(_get, f"{url}/metrics")
        assert _store_errors(metrics, "full") >= len(answered_ae)

        filler.unlink()  # space returns: no restart, no message needed to notice
        await _until_ready(daemon.http, 200, timeout=30.0)
        for cid in answered_ae:  # what was answered AE is sent again, and now taken
            i = int(cid.split("-")[1])
            reply = await p.ask(hl7(cid, body=_note(i)), timeout=30.0)
            assert reply.code == "AA", reply.raw
            acked.append(cid)
    # processing survived the failed commits too: it catches up with every stored row
    deadline = time.monotonic() + 30.0
    while True:
        _, metrics = await asyncio.to_thread(_get, f"{url}/metrics")
        if "\nrefloop_processing_lag_messages 0.0" in metrics:
            break
        assert time.monotonic() < deadline, "processing never caught up after the fault"
        await asyncio.sleep(0.1)
    stored = await asyncio.to_thread(
        query, daemon.db, "SELECT control_id FROM messages WHERE control_id LIKE 'FULL-%'"
    )
    assert sorted(r[0] for r in stored) == sorted(acked)


# -- processing: a failed commit is retried, the task lives on -----------------------------


def test_processing_survives_a_commit_that_fails_and_catches_up(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry

    from engine.hl7v2.message import read_msh
    from engine.ingest.processor import Processor, no_routes
    from engine.metrics import Metrics
    from engine.model import Inbound
    from engine.store import Inbox, open_database

    async def body() -> None:
        db = open_database(tmp_path / "refloop.db")
        inbox = Inbox(db)
        metrics = Metrics(CollectorRegistry())
        raw = hl7("PROC-1")
        msh, codec = read_msh(raw)
        with db.transaction() as conn:
            inbox.add_in(conn, [Inbound("ehr", "test", raw, time.time(), msh, codec)], "AA")
        db.conn.execute("PRAGMA busy_timeout = 100")  # the processor's wait for the lock
        processor = Processor(db, inbox, no_routes, WallClock(), metrics)
        blocker = sqlite3.connect(tmp_path / "refloop.db", isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # another writer holds the database
        task = asyncio.create_task(processor.run())
        try:
            labels = {"stage": "processing", "kind": "locked"}
            deadline = time.monotonic() + 10
            while not metrics.registry.get_sample_value("refloop_store_errors_total", labels):
                assert time.monotonic() < deadline, "processing never reported the fault"
                assert not task.done(), task
                await asyncio.sleep(0.05)
            assert processor.cursor == 0
            blocker.execute("ROLLBACK")  # the lock goes away: processing resumes by itself
            while processor.cursor < 1:
                assert time.monotonic() < deadline, "processing did not resume"
                assert not task.done(), task
                await asyncio.sleep(0.05)
            assert inbox.get(1).status == "filtered"  # type: ignore[union-attr]
        finally:
            blocker.close()
            processor.stop()
            await asyncio.wait_for(task, 5)
            db.close()

    run(body())


def test_a_standing_fault_is_logged_once_a_minute_with_a_count(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A full disk fails every commit (each sender's resend, every ~60 ms): the first
    failure is logged, the next ones within FAULT_LOG_SECONDS are counted, and the line
    at recovery gives the count (fails before: one ERROR line per failed commit)."""
    from engine.store import open_database

    db = open_database(tmp_path / "refloop.db")
    inbox = inbox_module.Inbox(db)
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = 13  # SQLITE_FULL, as SQLite sets it on a real full disk
    with caplog.at_level("WARNING", logger="engine.store.inbox"):
        for _ in range(50):
            inbox._failed(full, 1)
        assert inbox.fault == "full"
        errors = [r for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1
        inbox._recovered()
    assert inbox.fault == ""
    assert "49 failed commits not logged" in caplog.records[-1].getMessage()
    db.close()


# -- processing and dispatch faults turn /readyz 503 too (no message arriving) ------------


@pytest.mark.slow
def test_a_lock_that_fails_processing_turns_readyz_503_with_no_message_arriving(
    tmp_path: Path,
) -> None:
    """Another process holds the database: nothing arrives, so the inbox never fails a
    commit, but processing (it looks for rows every second) and the outbox dispatcher
    (the default routes.yaml has channels) do, after the 5 s busy timeout of the main
    connection. /readyz must say so, and go back to 200 once the lock goes (failed
    before: it stayed 200 while processing retried)."""
    daemon = Daemon(state_dir=tmp_path / "state", log_path=tmp_path / "daemon.log")
    try:
        daemon.start()
        url = f"http://{HOST}:{daemon.http}"
        blocker = sqlite3.connect(daemon.db, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            deadline = time.monotonic() + 30.0
            while True:
                # the loop waits out each busy timeout (5 s) on the main connection
                status, text = _get(f"{url}/readyz", timeout=60.0)
                if status == 503:
                    break
                assert time.monotonic() < deadline, "/readyz stayed 200 while the store was locked"
                time.sleep(0.1)
            assert "store-error: locked" in text, text
            _, metrics = _get(f"{url}/metrics", timeout=60.0)
            assert _store_errors(metrics, "locked") >= 1
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        run(_until_ready(daemon.http, 200, timeout=30.0))
        daemon.signal(15)
        assert daemon.wait(30) == 0, daemon.log_tail()
    finally:
        daemon.kill()
