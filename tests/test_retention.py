"""Issue 20, retention: raw message bytes (PHI) are pruned after their period, the row
and its metadata stay, the SHA-256 of the bytes stays, the audit chain still verifies
(``refloop audit verify`` on the real file), the timeline still reads, and replay, the
message view and ``--raw`` say clearly that the bytes were pruned.

Time passing is played by moving every stored time back (the daemon stopped), as if the
file had been that old: the daemon's and the CLI's clocks stay real.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import Daemon, hl7, peer, query, refloop, run, shipped_routes, store_conn
from prometheus_client import CollectorRegistry
from test_referral_keys import adt, ref_i12, siu_s12

from engine.app import Engine
from engine.clock import VirtualClock, WallClock
from engine.config import RetentionConfig, loads
from engine.errors import ConfigError, StoreError
from engine.model import Identifiers, ReferralCreated, ReportReceived
from engine.store import outbox as outbox_store
from engine.store import retention
from engine.store.db import open_database
from engine.store.referrals import enqueue_outbox
from engine.tracking.tracker import Tracker

pytestmark = pytest.mark.store  # every test here uses the store

DAY = 86400.0


def cli(state: Path, routes: Path, *args: str) -> Any:
    result = refloop(*args, "--state", str(state), "--routes", str(routes))
    return result


def cli_json(state: Path, routes: Path, *args: str) -> Any:
    result = cli(state, routes, *args, "--json")
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


def age(db: Path, days: float) -> None:
    """Move every stored time ``days`` into the past (the daemon is stopped)."""
    back = (days * DAY,)
    with contextlib.closing(store_conn(db)) as conn:
        conn.execute("UPDATE messages SET received_at = received_at - ?1", back)
        conn.execute(
            "UPDATE referrals SET opened_at = opened_at - ?1, closed_at = closed_at - ?1", back
        )
        conn.execute("UPDATE parked SET parked_at = parked_at - ?1", back)
        conn.execute("UPDATE outbox SET updated_at = updated_at - ?1", back)


async def send_all(port: int, messages: list[bytes]) -> list[str]:
    async with peer(port) as p:
        return [(await p.ask(m, timeout=20.0)).code for m in messages]


def stop(d: Daemon) -> None:
    d.signal(signal.SIGTERM)
    assert d.wait() == 0, d.log_tail()


def test_pruned_message_keeps_metadata_hash_audit_and_timeline(
    daemon: Daemon, tmp_path: Path
) -> None:
    daemon.routes = shipped_routes(
        tmp_path / "routes.yaml", retention={"closed_referral_days": 400, "unreferred_days": 30}
    )
    daemon.start()
    closed_ref = ref_i12("C-1", "P-1", mrn="M1")
    booking = siu_s12("C-2", "HUB", "P-1^NORTH_EHR", "APT-1", "M1")
    open_ref = ref_i12("O-1", "P-2", mrn="M2")
    no_referral = adt("A-1", "A08", "NOBODY", "+15550100199")
    sent = [closed_ref, booking, open_ref, no_referral]
    assert run(send_all(daemon.mllp, sent)) == ["AA"] * 4
    state, routes = daemon.state_dir, daemon.routes
    refs = {r["placer_number"]: r["id"] for r in cli_json(state, routes, "referrals", "list")}
    closed = cli(state, routes, "referrals", "close", str(refs["P-1"]), "--reason", "other")
    assert closed.returncode == 0, closed.stderr.decode()
    timeline = cli_json(state, routes, "referrals", "show", str(refs["P-1"]))["timeline"]
    stop(daemon)
    ids = {int(r[0]): r[1] for r in query(daemon.db, "SELECT id, control_id FROM messages")}
    by_control = {c: i for i, c in ids.items()}

    # 401 days later: the closed referral's two messages and the stray ADT are due; the
    # open referral's message is not, however old
    age(daemon.db, 401)
    plan = cli_json(state, routes, "prune", "--dry-run")
    assert plan["dry_run"] is True
    assert plan["kinds"]["closed-referral"] == {
        "rows": 2,
        "bytes": len(closed_ref) + len(booking),
    }
    assert plan["kinds"]["unreferred"] == {"rows": 1, "bytes": len(no_referral)}
    assert query(daemon.db, "SELECT count(*) FROM message_raw")[0][0] == 4  # nothing changed

    done = cli_json(state, routes, "prune")
    assert done["kinds"] == plan["kinds"]
    pruned = {by_control[c] for c in ("C-1", "C-2", "A-1")}
    kept = {r[0] for r in query(daemon.db, "SELECT message_id FROM message_raw")}
    assert kept == {by_control["O-1"]}
    # every row and its metadata stay, with the SHA-256 of the bytes as received
    rows = query(
        daemon.db,
        "SELECT id, control_id, message_type, status, ack_code, sha256, pruned_at, pruned_size "
        "FROM messages ORDER BY id",
    )
    assert len(rows) == 4
    for mid, control, mtype, status, ack, sha, pruned_at, size in rows:
        raw = sent[[b"|" + control.encode() + b"|" in m for m in sent].index(True)]
        assert sha == hashlib.sha256(raw).digest()
        assert ack == "AA" and status and mtype
        assert (pruned_at is not None) == (mid in pruned)
        assert size == (len(raw) if mid in pruned else None)

    verified = cli(state, routes, "audit", "verify")
    assert verified.returncode == 0, verified.stdout.decode() + verified.stderr.decode()
    audit = [
        json.loads(line)
        for line in cli(state, routes, "audit", "export", "--jsonl").stdout.splitlines()
    ]
    (row,) = [a for a in audit if a["action"] == "pruned"]
    assert row["actor"].startswith("operator:")
    assert row["detail"]["closed-referral"]["rows"] == 2
    assert cli_json(state, routes, "referrals", "show", str(refs["P-1"]))["timeline"] == timeline

    # the message view, --raw and replay say the bytes were pruned
    mid = by_control["C-1"]
    shown = cli(state, routes, "messages", "show", str(mid)).stdout.decode()
    assert "pruned" in shown and "retention" in shown
    assert hashlib.sha256(closed_ref).hexdigest() in shown
    assert "PID|" not in shown
    raw = cli(state, routes, "messages", "show", str(mid), "--raw")
    assert raw.returncode == 1 and raw.stdout == b""
    assert b"bytes were pruned" in raw.stderr and b"Traceback" not in raw.stderr
    replayed = cli(state, routes, "replay", "--id", str(mid), "--dry-run")
    assert replayed.returncode == 0, replayed.stderr.decode()
    assert "skipped (bytes pruned" in replayed.stdout.decode()
    listed = {m["id"]: m for m in cli_json(state, routes, "messages", "list")}
    assert {i for i, m in listed.items() if m["pruned_at"]} == pruned
    kept_row = cli(state, routes, "messages", "show", str(by_control["O-1"]), "--raw")
    assert kept_row.stdout == open_ref

    # a second run finds nothing more to do
    again = cli_json(state, routes, "prune")
    assert all(v["rows"] == 0 for v in again["kinds"].values())


def _engine_config(state: Path, tmp_path: Path) -> Any:
    routes = shipped_routes(tmp_path / "routes.yaml", retention={"unreferred_days": 30})
    data = yaml.safe_load(routes.read_text())
    data["http"] = {"enabled": False}
    data["sources"]["ehr"]["port"] = 0
    data["sources"]["ehr"]["host"] = "127.0.0.1"
    return loads(yaml.safe_dump(data), file=str(routes), env={})


@pytest.mark.sqlite_file("the file shrinks (auto_vacuum, WAL checkpoints)")
def test_the_daemon_prunes_in_steps_and_returns_the_space(tmp_path: Path) -> None:
    """The daemon's own pruner, on its (virtual) clock: 200 large stray messages are
    pruned 31 days on, the metrics count them, one audit row records the run, and the
    file shrinks (a new file has auto_vacuum=INCREMENTAL)."""
    state = tmp_path / "state"
    clock = VirtualClock(1_780_000_000.0)
    registry = CollectorRegistry()
    filler = "NTE|1||" + "x" * 20_000
    messages = [hl7(f"S-{n}", msg_type="ZZZ^Z01", body=(filler,)) for n in range(200)]

    async def scenario() -> tuple[int, int, retention.Tally]:
        engine = Engine(
            _engine_config(state, tmp_path),
            state,
            clock=clock,
            registry=registry,
            drain_seconds=2.0,
            prune_first_run=3600.0,
        )
        await engine.start()
        try:
            codes = await send_all(engine.ports()["ehr"], messages)
            assert set(codes) == {"AA"}
            assert engine.db is not None and engine.pruner is not None
            while engine.processor is not None and engine.processor.cursor < len(messages):
                await asyncio.sleep(0.01)
            with contextlib.closing(sqlite3.connect(engine.db_path)) as c:
                c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            before = Path(engine.db_path).stat().st_size
            clock.advance(31 * DAY)
            tally = await engine.pruner.run_once(engine.config.retention)
            with contextlib.closing(sqlite3.connect(engine.db_path)) as c:
                c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            after = Path(engine.db_path).stat().st_size
        finally:
            await engine.stop()
        return before, after, tally

    before, after, tally = run(scenario())
    assert tally.rows["unreferred"] == 200
    assert tally.bytes["unreferred"] == sum(len(m) for m in messages)
    # 200 x 20 kB went: the file is at least 3.5 MB smaller
    assert before - after > 3_500_000, (before, after)
    sample = registry.get_sample_value
    assert sample("refloop_pruned_rows_total", {"kind": "unreferred"}) == 200
    assert sample("refloop_pruned_bytes_total", {"kind": "unreferred"}) == tally.bytes["unreferred"]
    assert (sample("refloop_vacuumed_bytes_total") or 0) > 3_500_000
    assert sample("refloop_prune_last_run_timestamp_seconds") == clock.now()
    db = state / "refloop.db"
    assert query(db, "PRAGMA auto_vacuum")[0][0] == 2
    assert query(db, "SELECT count(*) FROM message_raw")[0][0] == 0
    assert query(db, "SELECT count(*) FROM messages WHERE pruned_at IS NOT NULL")[0][0] == 200
    assert query(db, "SELECT count(*) FROM audit WHERE action = 'pruned'")[0][0] == 1


# -- the rules, one by one -----------------------------------------------------------


POLICY = RetentionConfig()  # 400 / 30 / 400 / 90 / 90 / 180 days
NOW = 2_000_000_000.0


def kind(**kw: Any) -> str | None:
    row: dict[str, Any] = {
        "received_at": NOW - 500 * DAY,
        "status": "routed",
        "message_type": "REF^I12",
        "closed": None,
        "parked": False,
    }
    row.update(kw)
    return retention.message_kind(POLICY, NOW, **row)


def test_rules_per_kind() -> None:
    # a referral closed 400 days ago (to the second) is due; one second later it is not
    assert kind(closed=NOW - 400 * DAY) == "closed-referral"
    assert kind(closed=NOW - 400 * DAY + 1) is None
    assert kind(closed=retention._OPEN) is None  # one of its referrals is still open
    # no referral: 30 days after receipt
    assert kind(received_at=NOW - 30 * DAY, status="filtered") == "unreferred"
    assert kind(received_at=NOW - 29 * DAY, status="filtered") is None
    assert kind(received_at=NOW - 30 * DAY, status="rejected") == "unreferred"
    assert kind(received_at=NOW - 31 * DAY, parked=True) is None  # waits for its parked event
    assert kind(received_at=NOW - 399 * DAY, status="error") is None
    assert kind(received_at=NOW - 400 * DAY, status="error") == "error"
    assert kind(status="received") is None  # never before it is processed
    quarantined = {"message_type": retention.QUARANTINE_TYPE, "status": "rejected"}
    assert kind(received_at=NOW - 90 * DAY, **quarantined) == "quarantine"
    assert kind(received_at=NOW - 89 * DAY, **quarantined) is None
    forever = RetentionConfig(closed_referral_days=None)
    assert (
        retention.message_kind(
            forever,
            NOW,
            received_at=0.0,
            status="routed",
            message_type="X",
            closed=0.0,
            parked=False,
        )
        is None
    )


def test_outbox_payloads_and_parked_events(tmp_path: Path) -> None:
    """Sent and cancelled outbox rows lose their payload 90 days after they finished (a
    dead one keeps it for the operator); a parked event never linked is cleared and
    marked expired after 180 days, and linking it then says so."""
    path = tmp_path / "refloop.db"
    db = open_database(path)
    clock = VirtualClock(NOW - 200 * DAY)
    tracker = Tracker(db, clock)
    with db.transaction() as conn:
        ids = Identifiers(sending_facility="F", placer_number="R1")
        tracker.apply(ReferralCreated(ids=ids, occurred_at=clock.now(), message_id=None), conn)
        tracker.apply(
            ReportReceived(
                ids=Identifiers(filler_numbers=("nobody",)),
                occurred_at=clock.now(),
                message_id=None,
                report_id="x",
            ),
            conn,
        )
        rid = int(conn.execute("SELECT id FROM referrals").fetchone()[0])
        payloads = {}
        for status in ("sent", "cancelled", "dead", "pending"):
            payload = json.dumps({"to": "+15550100111", "body": f"status {status}"})
            enqueue_outbox(conn, rid, "sms", "t", payload, f"k-{status}", NOW, now=clock.now())
            oid = int(conn.execute("SELECT max(id) FROM outbox").fetchone()[0])
            conn.execute("UPDATE outbox SET status = ? WHERE id = ?", (status, oid))
            payloads[status] = len(payload)
    (parked_id, event_len) = query(path, "SELECT id, length(event) FROM parked")[0]
    tally = retention.prune_now(db, RetentionConfig(), NOW, actor="system", pause=0)
    db.close()
    assert tally.rows["outbox"] == 2 and tally.rows["parked"] == 1
    assert tally.bytes["outbox"] == payloads["sent"] + payloads["cancelled"]
    assert tally.bytes["parked"] == event_len
    rows = dict(query(path, "SELECT status, payload FROM outbox WHERE template = 't'"))
    assert rows["sent"] == "{}" and rows["cancelled"] == "{}"
    assert "status dead" in rows["dead"] and "status pending" in rows["pending"]
    assert query(path, "SELECT status, event FROM parked") == [("expired", "{}")]
    db = open_database(path)
    try:
        with pytest.raises(StoreError, match="expired under the retention policy"):
            Tracker(db, clock).link(parked_id, rid)
    finally:
        db.close()


def test_retention_errors_name_file_and_line() -> None:
    text = (
        "version: 1\n"
        "retention:\n"
        "  closed_referral_days: soon\n"
        "  unreferred_days: 0\n"
        "  parked_days: forever\n"
        "  every_minte: 5\n"
    )
    with pytest.raises(ConfigError) as exc:
        loads(text, file="r.yaml")
    assert exc.value.problems == [
        "r.yaml:3 retention.closed_referral_days: must be a number of days or forever, not 'soon'",
        "r.yaml:4 retention.unreferred_days: must be between 1 and 36500, not 0",
        "r.yaml:6 retention.every_minte: unknown key",
    ]
    cfg = loads("retention:\n  parked_days: forever\n  enabled: false\n").retention
    assert cfg.parked_days is None and not cfg.enabled and cfg.closed_referral_days == 400


@pytest.mark.sqlite_file("auto_vacuum and VACUUM of an older file")
def test_vacuum_converts_an_older_file(tmp_path: Path) -> None:
    """A file made before auto_vacuum was set keeps its free pages after pruning;
    ``refloop prune --vacuum`` switches it to INCREMENTAL and gives the space back."""
    state = tmp_path / "state"
    state.mkdir()
    db_path = state / "refloop.db"
    with contextlib.closing(sqlite3.connect(db_path)) as conn:  # an older refloop's file:
        conn.execute("CREATE TABLE older (a)")  # auto_vacuum is fixed once a table was made
        conn.execute("DROP TABLE older")
    routes = tmp_path / "routes.yaml"
    routes.write_text("version: 1\nhttp:\n  enabled: false\n")
    db = open_database(db_path)
    assert retention.auto_vacuum(db) == "none"
    with db.transaction() as conn:
        for n in range(100):
            conn.execute(
                "INSERT INTO messages (received_at, source, sha256, status) "
                "VALUES (?, 'ehr', x'00', 'filtered')",
                (time.time() - 60 * DAY,),
            )
            conn.execute(
                "INSERT INTO message_raw (message_id, raw) VALUES (?, ?)",
                (n + 1, b"y" * 50_000),
            )
    db.close()
    pruned = cli_json(state, routes, "prune")
    assert pruned["kinds"]["unreferred"]["rows"] == 100
    assert pruned["auto_vacuum"] == "none" and pruned["free_bytes"] > 4_500_000
    text = cli(state, routes, "prune").stdout.decode()
    assert "refloop prune --vacuum" in text
    vacuumed = cli_json(state, routes, "prune", "--vacuum")
    assert vacuumed["auto_vacuum"] == "incremental"
    assert vacuumed["free_bytes"] == 0
    assert vacuumed["size_before"] - vacuumed["size_after"] > 4_500_000


def _filled(path: Path, n: int, size: int, received_at: float) -> None:
    """``n`` filtered messages of ``size`` bytes each, received at ``received_at``."""
    db = open_database(path)
    with db.transaction() as conn:
        for i in range(n):
            raw = hl7(f"F-{i}", body=("NTE|1||" + "z" * size,))
            (message_id,) = conn.execute(
                "INSERT INTO messages (received_at, source, control_id, sha256, status) "
                "VALUES (?, 'ehr', ?, ?, 'filtered') RETURNING id",
                (received_at, f"F-{i}", hashlib.sha256(raw).digest()),
            ).fetchone()
            conn.execute(
                "INSERT INTO message_raw (message_id, raw) VALUES (?, ?)", (message_id, raw)
            )
    db.close()


@pytest.mark.sqlite_file("incremental_vacuum pages of the file")
def test_a_vacuum_step_returns_the_pages_it_is_asked_for(tmp_path: Path) -> None:
    """PRAGMA incremental_vacuum(N) frees one page per step of the statement: run through
    execute() it returned one page, whatever N (the first bench run shrank nothing)."""
    path = tmp_path / "refloop.db"
    _filled(path, 50, 40_000, NOW - 60 * DAY)
    db = open_database(path)
    try:
        retention.prune_now(db, RetentionConfig(), NOW, actor="system", pause=0)
        free = int(db.conn.execute("PRAGMA freelist_count").fetchone()[0])
        pages = int(db.conn.execute("PRAGMA page_count").fetchone()[0])
        assert free > 400  # 50 x 40 kB in 4 kB pages
        assert retention.vacuum_step(db, 100) == free - 100
        assert int(db.conn.execute("PRAGMA page_count").fetchone()[0]) == pages - 100
        retention.vacuum_all(db)
        assert retention.free_bytes(db) == 0
    finally:
        db.close()


def test_the_api_and_dashboard_views_of_a_pruned_message(tmp_path: Path) -> None:
    """The message's metadata still reads, with its hash and when it was pruned; asking
    for its bytes is a 410 that says why."""
    from engine.web.auth import Principal
    from engine.web.service import ApiError, Service

    path = tmp_path / "refloop.db"
    _filled(path, 2, 100, NOW - 60 * DAY)
    db = open_database(path)
    try:
        retention.prune_now(db, RetentionConfig(), NOW, actor="system", pause=0)
        service = Service(db, VirtualClock(NOW))
        raw = hl7("F-0", body=("NTE|1||" + "z" * 100,))
        meta = service.message(1)
        assert meta["pruned_at"] == NOW
        assert meta["sha256"] == hashlib.sha256(raw).hexdigest()
        assert meta["size"] == len(raw)
        with pytest.raises(ApiError) as exc:
            service.raw(Principal("pat", "analyst", "token"), 1, via="api")
        assert exc.value.status == 410 and "pruned" in exc.value.reason
        with pytest.raises(ApiError) as missing:
            service.raw(Principal("pat", "analyst", "token"), 99, via="api")
        assert missing.value.status == 404
    finally:
        db.close()


def test_sms_reply_texts_and_outbox_recipients_are_pruned(tmp_path: Path) -> None:
    """A patient's SMS reply loses its text and number ``sms_reply_days`` (default 90)
    after receipt, and a finished outbox row its recipient with its payload (``outbox``,
    90 days after it finished); what they were (keyword, referral, times, status) stays.
    ``refloop prune --dry-run`` on the real file counts them first (failed before: the
    body and the phone numbers were kept forever)."""
    state = tmp_path / "state"
    routes = shipped_routes(tmp_path / "routes.yaml")
    db = open_database(state / "refloop.db")
    now = time.time()
    reply_body, number = "YES please call me after 5pm", "+15550100111"
    with db.transaction() as conn:
        Tracker(db, WallClock()).apply(
            ReferralCreated(
                ids=Identifiers(sending_facility="F", placer_number="R1"),
                occurred_at=now,
                message_id=None,
            ),
            conn,
        )
        rid = int(conn.execute("SELECT id FROM referrals").fetchone()[0])
        payload = json.dumps({"to": number, "body": "Your referral"})
        enqueue_outbox(conn, rid, "sms", "t", payload, "k-sent", now, now=now)
        conn.execute(
            "UPDATE outbox SET status = 'sent', recipient = ? WHERE template = 't'", (number,)
        )
        for sid, text in (("SM-old", reply_body), ("SM-new", "STOP")):
            outbox_store.record_reply(
                conn,
                message_sid=sid,
                from_number=number,
                keyword="yes" if sid == "SM-old" else "stop",
                body=text,
                referral_id=rid,
                now=now,
            )
    db.close()
    with contextlib.closing(store_conn(state / "refloop.db")) as conn:
        conn.execute("UPDATE outbox SET updated_at = updated_at - ?", (91 * DAY,))
        conn.execute(
            "UPDATE sms_replies SET received_at = received_at - ? WHERE message_sid = 'SM-old'",
            (91 * DAY,),
        )

    plan = cli_json(state, routes, "prune", "--dry-run")
    assert plan["kinds"]["sms-reply"] == {"rows": 1, "bytes": len(reply_body) + len(number)}
    assert plan["kinds"]["outbox"] == {"rows": 1, "bytes": len(payload) + len(number)}
    assert query(state / "refloop.db", "SELECT count(*) FROM sms_replies WHERE body != ''") == [
        (2,)
    ]
    done = cli_json(state, routes, "prune")
    assert done["kinds"] == plan["kinds"]
    replies = query(
        state / "refloop.db",
        "SELECT message_sid, from_number, keyword, body, referral_id, pruned_at IS NOT NULL "
        "FROM sms_replies ORDER BY message_sid",
    )
    assert replies == [
        ("SM-new", number, "stop", "STOP", rid, 0),
        ("SM-old", "", "yes", "", rid, 1),
    ]
    sent = query(
        state / "refloop.db",
        "SELECT status, recipient, payload, referral_id FROM outbox WHERE template = 't'",
    )
    assert sent == [("sent", "", "{}", rid)]
    text = cli(state, routes, "prune", "--dry-run")
    assert "sms-reply" in text.stdout.decode() and "90 days after receipt" in text.stdout.decode()
