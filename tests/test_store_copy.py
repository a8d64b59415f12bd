"""``refloop store copy`` (issue 17): a simulated practice's SQLite file goes into a
PostgreSQL schema with the real executable; every table's rows, the audit chain and the
closure report are the same there. A copy into a non-empty target, and a source whose
audit chain was tampered with, keep nothing. PostgreSQL only (REFLOOP_TEST_STORE)."""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import REPO, drop_pg_schema, make_pg_schema, refloop

from engine.sim.simulate import load_scenario, simulate
from engine.store import audit
from engine.store.db import open_database
from engine.tracking.report import closure_report, report_to_dict

TEST_STORE = os.environ.get("REFLOOP_TEST_STORE", "")
pytestmark = [
    pytest.mark.store,
    pytest.mark.skipif(not TEST_STORE, reason="PostgreSQL only (REFLOOP_TEST_STORE)"),
]


@pytest.fixture(scope="module")
def practice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small simulated practice: referrals, events, timers, outbox, tasks, audit."""
    state = tmp_path_factory.mktemp("practice")
    simulate(load_scenario(REPO / "docs/scenarios/practice-800.yaml", scale=0.02), state)
    (db,) = state.glob("*.db")
    return db


@pytest.fixture
def target() -> Iterator[str]:
    url, schema = make_pg_schema(TEST_STORE)
    try:
        yield url
    finally:
        drop_pg_schema(TEST_STORE, schema)


def counts(path: Path) -> dict[str, int]:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        names = [
            r[0]
            for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            if not r[0].startswith("sqlite_")
        ]
        return {n: conn.execute(f"SELECT count(*) FROM {n}").fetchone()[0] for n in names}


def test_copy_moves_every_row_and_verifies(practice: Path, target: str) -> None:
    result = refloop("store", "copy", "--from", str(practice), "--to", target, "--json")
    assert result.returncode == 0, result.stderr.decode()
    copied = json.loads(result.stdout)
    expected = counts(practice)
    assert copied["tables"] == expected
    assert expected["referrals"] > 0 and expected["audit"] > 0 and expected["outbox"] > 0
    assert copied["audit_rows"] == expected["audit"]

    src = open_database(practice, readonly=True)
    dst = open_database(target, readonly=True)
    try:
        assert audit.verify(dst.conn).ok
        lo, hi = dt.date(2000, 1, 1), dt.date(2099, 12, 31)  # every referral
        now = float(src.conn.execute("SELECT max(updated_at) FROM referrals").fetchone()[0])
        for by in (None, "specialty", "month"):
            there = report_to_dict(closure_report(dst.conn, lo, hi, by=by, now=now))
            here = report_to_dict(closure_report(src.conn, lo, hi, by=by, now=now))
            assert there == here
        # ids continue after the copied ones
        with dst.transaction() as conn:
            new = conn.execute(
                "INSERT INTO meta (key, value) VALUES ('copy-test', 'x') RETURNING key"
            ).fetchone()
            assert new[0] == "copy-test"
            top = conn.execute("SELECT max(id) FROM referrals").fetchone()[0]
            rid = conn.execute(
                "INSERT INTO referrals (placer_number, state, status, patient_status, "
                "specialist_status, opened_at, updated_at) VALUES ('X', '{}', 'open', '', '', "
                "1, 1) RETURNING id"
            ).fetchone()[0]
            assert rid == top + 1
    finally:
        src.close()
        dst.close()

    again = refloop("store", "copy", "--from", str(practice), "--to", target)
    assert again.returncode == 1
    err = again.stderr.decode()
    assert err.count("\n") == 1 and "already holds rows" in err


def test_a_tampered_chain_is_not_copied(practice: Path, target: str, tmp_path: Path) -> None:
    """The planted fault: one audit row edited in the source; the copy refuses and the
    target keeps no row."""
    bad = tmp_path / "tampered.db"
    bad.write_bytes(practice.read_bytes())
    with sqlite3.connect(bad) as conn:
        conn.execute("DROP TRIGGER audit_no_update")
        conn.execute("UPDATE audit SET actor = 'someone-else' WHERE id = 2")
    result = refloop("store", "copy", "--from", str(bad), "--to", target)
    assert result.returncode == 1
    err = result.stderr.decode()
    assert "audit chain does not verify" in err and "row 2" in err
    dst = open_database(target, readonly=True)
    try:
        assert dst.conn.execute("SELECT count(*) FROM referrals").fetchone()[0] == 0
        assert dst.conn.execute("SELECT count(*) FROM audit").fetchone()[0] == 0
    finally:
        dst.close()


def test_usage_errors(tmp_path: Path) -> None:
    pw = refloop("store", "copy", "--from", "x.db", "--to", "postgresql://u:pw123@h/db")
    assert pw.returncode == 1 and "pgpass" in pw.stderr.decode()
    assert "pw123" not in pw.stderr.decode()
    wrong = refloop("store", "copy", "--from", "x.db", "--to", str(tmp_path / "y.db"))
    assert wrong.returncode == 1 and "postgresql://" in wrong.stderr.decode()


def test_granted_role_runs_but_cannot_change_the_audit_log(target: str) -> None:
    """``refloop store grant``: the daemon's role reads and writes, appends to the audit
    log, and is refused UPDATE / DELETE there even once the append-only trigger is gone
    (the planted fault: an owner dropped it)."""
    import uuid

    import psycopg

    role = f"rl_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(TEST_STORE, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN")
    try:
        owner = open_database(target)  # migrates, as the owner
        owner.close()
        done = refloop("store", "grant", "--to", target, "--role", role)
        assert done.returncode == 0, done.stderr.decode()
        owner = open_database(target)
        with owner.transaction() as conn:
            conn.execute("DROP TRIGGER audit_no_update ON audit")
            conn.execute("DROP TRIGGER audit_no_delete ON audit")
        owner.close()

        as_role = target.replace("postgres@", f"{role}@", 1)
        db = open_database(as_role)  # at the current version: no DDL needed
        try:
            with db.transaction() as conn:
                audit.append(
                    conn,
                    at="2026-01-01T00:00:00.000000Z",
                    actor="system",
                    action="test",
                    referral_id=None,
                    message_id=None,
                    detail={},
                )
                conn.execute("INSERT INTO meta (key, value) VALUES ('k', 'v')")
            for sql in ("UPDATE audit SET actor = 'x'", "DELETE FROM audit", "TRUNCATE audit"):
                with (
                    pytest.raises(psycopg.errors.InsufficientPrivilege),
                    db.transaction() as conn,
                ):
                    conn.execute(sql)
            assert audit.verify(db.conn).ok
        finally:
            db.close()
        bad = refloop("store", "grant", "--to", target, "--role", "no_such_role_x")
        assert bad.returncode == 1 and "CREATE ROLE" in bad.stderr.decode()
    finally:
        with psycopg.connect(TEST_STORE, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (role,),
            )
            schema = target.split("search_path%3D", 1)[1].split("&", 1)[0]
            admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            admin.execute(f"DROP ROLE {role}")
