"""``refloop run --store URL`` (issue 17): the daemon, the real executable, receives
HL7 v2 over MLLP into the store under test (a PostgreSQL schema with REFLOOP_TEST_STORE,
else a SQLite file named by ``--store``), and what it committed is read back there and
with the CLI through routes.yaml's ``store.url``."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import psycopg
import pytest
from helpers import Daemon, peer, refloop, run, shipped_routes
from test_referral_keys import orm_nw, ref_i12, siu_s12

from engine.store import audit
from engine.store.db import open_database

TEST_STORE = os.environ.get("REFLOOP_TEST_STORE", "")


async def _send(port: int, messages: list[bytes]) -> list[str]:
    async with peer(port) as p:
        return [(await p.ask(m, timeout=20.0)).code for m in messages]


def test_run_with_store_ingests_over_mllp(daemon: Daemon, store_url: str, tmp_path: Path) -> None:
    daemon.routes = shipped_routes(tmp_path / "routes.yaml")
    daemon.store = store_url
    daemon.start()
    first = ref_i12("K1", "10482")
    codes = run(
        _send(
            daemon.mllp,
            [
                first,
                first,  # an identical resend: ACKed again, stored once
                orm_nw("K2", "SOUTHGATE", "20001", mrn="MRN9"),
                siu_s12("K3", "HUB", "20001^SOUTH_EHR", "APT1", "MRN9"),
            ],
        )
    )
    assert codes == ["AA", "AA", "AA", "AA"], daemon.log_tail()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0, daemon.log_tail()
    assert not (daemon.state_dir / "refloop.db").exists() or store_url.endswith("refloop.db")

    db = open_database(store_url, readonly=True)
    try:
        rows = db.conn.execute(
            "SELECT control_id, status, duplicates FROM messages ORDER BY id"
        ).fetchall()
        assert [tuple(r) for r in rows] == [
            ("K1", "routed", 1),
            ("K2", "routed", 0),
            ("K3", "routed", 0),
        ]
        referrals = db.conn.execute(
            "SELECT sending_facility, placer_number, status FROM referrals ORDER BY id"
        ).fetchall()
        assert [tuple(r[:2]) for r in referrals] == [("NORTHSIDE", "10482"), ("SOUTHGATE", "20001")]
        assert referrals[1][2] == "patient-booked"
        verified = audit.verify(db.conn)
        assert verified.ok and verified.rows > 0
    finally:
        db.close()


def test_routes_yaml_store_url_serves_the_cli(
    daemon: Daemon, store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``store.url: ${env:REFLOOP_STORE_URL}`` in routes.yaml: the daemon and the CLI
    (``refloop referrals list``) both find the same store."""
    monkeypatch.setenv("REFLOOP_STORE_URL", store_url)
    routes = shipped_routes(
        tmp_path / "routes.yaml",
        store={"url": "${env:REFLOOP_STORE_URL}", "pool": {"min": 1, "max": 3}},
    )
    daemon.routes = routes
    daemon.start()
    assert run(_send(daemon.mllp, [ref_i12("Y1", "777")])) == ["AA"]
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0, daemon.log_tail()
    listed = refloop(
        "referrals", "list", "--json", "--routes", str(routes), "--state", str(tmp_path / "none")
    )
    assert listed.returncode == 0, listed.stderr.decode()
    assert [r["placer_number"] for r in json.loads(listed.stdout)] == ["777"]


@pytest.mark.empty_store
def test_every_command_takes_store_as_run_does(
    daemon: Daemon, store_url: str, tmp_path: Path
) -> None:
    """``--store URL`` on the CLI's commands (docs/scale-out.md's black-box run:
    ``refloop referrals list --json --store …``): the daemon started with ``--store``
    and the commands given the same URL read one store, whatever ``--state`` says."""
    routes = shipped_routes(tmp_path / "routes.yaml")
    daemon.routes = routes
    daemon.store = store_url
    daemon.start()
    assert run(_send(daemon.mllp, [ref_i12("S1", "4401"), ref_i12("S2", "4402")])) == [
        "AA",
        "AA",
    ]
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0, daemon.log_tail()
    elsewhere = ["--routes", str(routes), "--state", str(tmp_path / "elsewhere")]
    listed = refloop("referrals", "list", "--json", "--store", store_url, *elsewhere)
    assert listed.returncode == 0, listed.stderr.decode()
    assert sorted(r["placer_number"] for r in json.loads(listed.stdout)) == ["4401", "4402"]
    messages = refloop("messages", "list", "--json", "--store", store_url, *elsewhere)
    assert messages.returncode == 0, messages.stderr.decode()
    assert sorted(m["control_id"] for m in json.loads(messages.stdout)) == ["S1", "S2"]
    verified = refloop("audit", "verify", "--store", store_url, *elsewhere)
    assert verified.returncode == 0, verified.stderr.decode()
    # without --store the same command reads --state, which holds nothing
    missing = refloop("referrals", "list", "--json", *elsewhere)
    assert missing.returncode == 1 and "no database" in missing.stderr.decode()


@pytest.mark.parametrize("command", [["run"], ["referrals", "list"], ["audit", "verify"]])
def test_store_with_a_password_is_refused_by_every_command(
    command: list[str], tmp_path: Path
) -> None:
    result = refloop(
        *command, "--state", str(tmp_path), "--store", "postgresql://refloop:hunter2@db/x"
    )
    err = result.stderr.decode()
    assert result.returncode == 1, err
    assert err.count("\n") == 1 and "pgpass" in err and "hunter2" not in err


def test_store_with_a_password_on_the_command_line_is_refused(tmp_path: Path) -> None:
    result = refloop(
        "run", "--state", str(tmp_path), "--store", "postgresql://refloop:hunter2@db/refloop"
    )
    err = result.stderr.decode()
    assert result.returncode == 1
    assert err.count("\n") == 1 and "pgpass" in err and "hunter2" not in err


@pytest.mark.skipif(not TEST_STORE, reason="PostgreSQL only (REFLOOP_TEST_STORE)")
def test_daemon_survives_its_database_connections_being_dropped(
    daemon: Daemon, store_url: str, tmp_path: Path
) -> None:
    """The server ends every connection of the daemon (as a restart or failover does):
    a message in flight is answered with an error ACK or AA, never lost; its resend and
    the next ones are stored once and processed on new connections."""
    daemon.routes = shipped_routes(tmp_path / "routes.yaml")
    daemon.store = store_url
    daemon.start()
    assert run(_send(daemon.mllp, [ref_i12("D1", "501")])) == ["AA"]
    app = store_url.rsplit("application_name=", 1)[1]
    with psycopg.connect(TEST_STORE, autocommit=True) as admin:
        ended = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = %s",
            (app,),
        ).fetchone()
    assert ended is not None and ended[0] >= 2  # the loop's and the inbox writer's
    second = ref_i12("D2", "502")
    codes = run(_send(daemon.mllp, [second]))
    if codes != ["AA"]:  # the write on a dropped connection: an error ACK, the sender resends
        assert codes in (["AE"], ["AR"]), codes
        codes = run(_send(daemon.mllp, [second]))
    assert codes == ["AA"], daemon.log_tail()
    assert run(_send(daemon.mllp, [ref_i12("D3", "503")])) == ["AA"], daemon.log_tail()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0, daemon.log_tail()
    db = open_database(store_url, readonly=True)
    try:
        rows = db.conn.execute("SELECT control_id, status FROM messages ORDER BY id").fetchall()
        assert [tuple(r) for r in rows] == [("D1", "routed"), ("D2", "routed"), ("D3", "routed")]
        assert audit.verify(db.conn).ok
    finally:
        db.close()
