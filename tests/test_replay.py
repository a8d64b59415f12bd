"""Replay: dry runs change nothing, a replay after a route change re-routes through the
daemon's real tracker (the referrals appear), and replaying twice applies nothing twice."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from helpers import query, refloop, routed, store_for
from prometheus_client import CollectorRegistry

from engine import config
from engine.app import Engine
from engine.cli.main import main
from engine.hl7v2.client import MllpClient
from engine.routing.replay import ReplayFilter, replay
from engine.store import open_database
from engine.store.decisions import Decisions

pytestmark = pytest.mark.store  # every test here uses the store

HEAD = """\
version: 1
store: {file: refloop.db}
http: {host: 127.0.0.1, port: 0}
sources:
  ehr: {type: mllp, host: 127.0.0.1, port: 0}
"""

V1 = HEAD + textwrap.dedent(
    """\
    routes:
      - name: orders-ignored
        when: {type: ORM^O01}
        then: [{drop: orders not tracked yet}]
      - name: booked
        when: {type: SIU^S12}
        extract:
          placer_number: SCH.26.1
          appointment_id: SCH.2.1
        then: [{track: appointment-booked}]
    """
)

V2 = HEAD + textwrap.dedent(
    """\
    routes:
      - name: orders
        when: {type: ORM^O01, ORC.1: NW}
        extract:
          placer_number: ORC.2.1
          patient_ids: "{{ ids('PID.3') }}"
        then: [{track: referral-created}]
      - name: booked
        when: {type: SIU^S12}
        extract:
          placer_number: SCH.26.1
          appointment_id: SCH.2.1
        then: [{track: appointment-booked}]
    """
)


def hl7(type_: str, n: int, *body: str) -> bytes:
    msh = f"MSH|^~\\&|EHR|CLINIC|REFLOOP|CLINIC|2025030310{n:04d}||{type_}|CTL{n}|P|2.5.1"
    return "\r".join([msh, *body]).encode() + b"\r"


MESSAGES = [
    hl7("ORM^O01", 1, "PID|1||MRN1^^^CLINIC", "ORC|NW|REF-1^CLINIC"),
    hl7("SIU^S12", 2, "SCH|P2|APPT-2" + "|" * 24 + "REF-1^CLINIC"),
    hl7("ORM^O01", 3, "PID|1||MRN3^^^CLINIC", "ORC|NW|REF-3^CLINIC"),
    hl7("ADT^A01", 4, "PID|1||MRN4^^^CLINIC"),
]


def write(path: Path, text: str) -> config.Config:
    path.write_text(text)
    return config.load(path)


async def ingest(cfg: config.Config, state: Path) -> None:
    """The messages through a real engine (and its own tracker) under ``cfg``'s routes."""
    engine = Engine(cfg, state, registry=CollectorRegistry(), drain_seconds=5)
    await engine.start()
    try:
        client = await MllpClient.connect("127.0.0.1", engine.ports()["ehr"], timeout=5)
        try:
            for raw in MESSAGES:
                result = await client.send(raw)
                assert result.code == "AA"
        finally:
            await client.close()
        assert engine.processor is not None
        for _ in range(500):
            if engine.processor.cursor >= len(MESSAGES):
                break
            await asyncio.sleep(0.01)
        assert engine.processor.cursor == len(MESSAGES)
    finally:
        await asyncio.wait_for(engine.stop(), 10)


@pytest.fixture
def processed(tmp_path: Path) -> tuple[Path, Path]:
    routes = tmp_path / "routes.yaml"
    cfg = write(routes, V1)
    asyncio.run(ingest(cfg, tmp_path / "state"))
    db_path = tmp_path / "state" / "refloop.db"
    # V1 tracks only the booking, which has no referral yet: parked, nothing created
    assert referrals(routes, db_path) == []
    parked = json.loads(cli(routes, db_path, "parked", "list", "--json").stdout)
    assert [(p["kind"], p["placer_number"]) for p in parked] == [("appointment-booked", "REF-1")]
    return routes, db_path


def cli(routes: Path, db_path: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    """``refloop ARGS --routes ROUTES --state DIR`` (the executable), which must exit 0."""
    result = refloop(*args, "--routes", str(routes), "--state", str(db_path.parent))
    assert result.returncode == 0, result.stderr.decode()
    return result


def referrals(routes: Path, db_path: Path) -> list[tuple[str, str]]:
    """(placer number, status) of every referral, as ``refloop referrals list`` shows them."""
    out = json.loads(cli(routes, db_path, "referrals", "list", "--limit", "0", "--json").stdout)
    return sorted((r["placer_number"], r["status"]) for r in out)


def tracker_rows(db_path: Path) -> list[tuple[Any, ...]]:
    """What the tracker wrote: referral events, timers and outbox rows."""
    return [
        *query(db_path, "SELECT referral_id, kind, message_id FROM referral_events ORDER BY id"),
        *query(db_path, "SELECT referral_id, kind, due FROM timers ORDER BY id"),
        *query(db_path, "SELECT id, channel, status FROM outbox ORDER BY id"),
    ]


def statuses(db_path: Path) -> list[tuple[int, str, str]]:
    return [tuple(r) for r in query(db_path, "SELECT id, status, route FROM messages ORDER BY id")]


def data_checksum(db_path: Path) -> str:
    """The database's data: every row of every table, plus the bytes of its files (on
    PostgreSQL: every row of every table of its schema)."""
    digest = hashlib.sha256()
    if routed(db_path):
        tables = query(
            db_path,
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = current_schema() ORDER BY table_name",
        )
        for (table,) in tables:
            digest.update(table.encode())
            for row in sorted(repr(r) for r in query(db_path, f'SELECT * FROM "{table}"')):
                digest.update(row.encode())
        return digest.hexdigest()
    for suffix in ("", "-wal"):
        p = Path(str(db_path) + suffix)
        if p.exists():
            digest.update(p.read_bytes())
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        for line in conn.iterdump():
            digest.update(line.encode())
    finally:
        conn.close()
    return digest.hexdigest()


def test_processing_records_decisions(processed: tuple[Path, Path]) -> None:
    _, db_path = processed
    assert statuses(db_path) == [
        (1, "filtered", "orders-ignored"),
        (2, "routed", "booked"),
        (3, "filtered", "orders-ignored"),
        (4, "filtered", ""),
    ]
    db = open_database(db_path, readonly=True)
    try:
        row = Decisions(db).get(2)
        assert row is not None
        (action,) = row.actions
        assert action["kind"] == "appointment-booked"
        assert action["keys"] == {"placer_number": "REF-1", "appointment_id": "APPT-2"}
        assert Decisions(db).count() == 4
    finally:
        db.close()


def test_dry_run_changes_nothing(processed: tuple[Path, Path]) -> None:
    routes, db_path = processed
    cfg = write(routes, V2)
    before = data_checksum(db_path)
    summary = replay(store_for(db_path), cfg, ReplayFilter(), dry_run=True, user="tester")
    assert data_checksum(db_path) == before
    assert summary.selected == 4
    assert summary.changed == 2
    assert summary.applied == 0
    by_id = {i.message_id: i for i in summary.items}
    assert by_id[1].old.route == "orders-ignored"
    assert by_id[1].new is not None and by_id[1].new.route == "orders"
    assert by_id[1].new.events == ("referral-created",)
    assert not by_id[2].changed


def test_replay_after_route_change_reroutes_once(processed: tuple[Path, Path]) -> None:
    routes, db_path = processed
    cfg = write(routes, V2)
    first = replay(store_for(db_path), cfg, ReplayFilter(), dry_run=False, user="tester")
    assert (first.changed, first.applied) == (2, 2)
    # REF-1's parked booking is linked when REF-1 is created (docs/referral-states.md)
    assert referrals(routes, db_path) == [("REF-1", "patient-booked"), ("REF-3", "open")]
    assert statuses(db_path) == [
        (1, "routed", "orders"),
        (2, "routed", "booked"),
        (3, "routed", "orders"),
        (4, "filtered", ""),
    ]
    written = tracker_rows(db_path)
    second = replay(store_for(db_path), cfg, ReplayFilter(), dry_run=False, user="tester")
    assert (second.changed, second.applied) == (0, 0)
    assert tracker_rows(db_path) == written  # nothing applied twice
    db = open_database(db_path, readonly=True)
    try:
        decisions = Decisions(db)
        assert decisions.count() == 4
        row = decisions.get(1)
        assert row is not None and row.replayed_by == "tester"
    finally:
        db.close()


def test_replay_through_the_executable_reaches_the_tracker(processed: tuple[Path, Path]) -> None:
    """The operator's repair: change routes.yaml, look (--dry-run), replay, replay again."""
    routes, db_path = processed
    write(routes, V2)
    before = data_checksum(db_path)
    dry = cli(routes, db_path, "replay", "--dry-run")
    assert "4 selected, 2 would change, 0 skipped" in dry.stderr.decode() + dry.stdout.decode()
    changed = [line.split()[0] for line in dry.stdout.decode().splitlines() if "changed" in line]
    assert changed == ["1", "3"]
    assert data_checksum(db_path) == before
    assert referrals(routes, db_path) == []

    first = cli(routes, db_path, "replay")
    assert "4 selected, 2 re-applied, 0 skipped" in first.stdout.decode()
    assert referrals(routes, db_path) == [("REF-1", "patient-booked"), ("REF-3", "open")]
    parked = json.loads(cli(routes, db_path, "parked", "list", "--json").stdout)
    assert parked == []  # the booking found its referral
    written = tracker_rows(db_path)
    assert written  # events, timers: the tracker ran

    second = cli(routes, db_path, "replay")
    assert "4 selected, 0 re-applied, 0 skipped" in second.stdout.decode()
    assert tracker_rows(db_path) == written
    assert referrals(routes, db_path) == [("REF-1", "patient-booked"), ("REF-3", "open")]


def test_replay_filters(processed: tuple[Path, Path]) -> None:
    routes, db_path = processed
    cfg = write(routes, V2)
    by_route = replay(store_for(db_path), cfg, ReplayFilter(route="booked"), dry_run=True)
    assert [i.message_id for i in by_route.items] == [2]
    by_type = replay(store_for(db_path), cfg, ReplayFilter(message_type="ORM^*"), dry_run=True)
    assert [i.message_id for i in by_type.items] == [1, 3]
    by_id = replay(store_for(db_path), cfg, ReplayFilter(ids=(3,), status="filtered"), dry_run=True)
    assert [i.message_id for i in by_id.items] == [3]


def test_replay_cli_dry_run_json(processed: tuple[Path, Path]) -> None:
    routes, db_path = processed
    write(routes, V2)
    before = data_checksum(db_path)
    result = CliRunner().invoke(
        main,
        [
            "replay",
            "--routes",
            str(routes),
            "--state",
            str(db_path.parent),
            "--type",
            "ORM^O01",
            "--dry-run",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    lines: list[dict[str, Any]] = [
        json.loads(x) for x in result.stdout.splitlines() if x.startswith("{")
    ]
    assert [(x["id"], x["old"]["route"], x["new"]["route"]) for x in lines] == [
        (1, "orders-ignored", "orders"),
        (3, "orders-ignored", "orders"),
    ]
    assert data_checksum(db_path) == before


def test_real_replay_is_audited(processed: tuple[Path, Path]) -> None:
    routes, db_path = processed
    cfg = write(routes, V2)
    replay(store_for(db_path), cfg, ReplayFilter(ids=(1,)), dry_run=False, user="tester")
    rows = query(
        db_path, "SELECT actor, action, message_id, detail FROM audit WHERE action = 'replayed'"
    )
    assert len(rows) == 1
    actor, _action, message_id, detail = rows[0]
    assert (actor, message_id) == ("operator:tester", 1)
    assert json.loads(detail)["new"] == {"status": "routed", "route": "orders"}
