"""The audit log: append-only by trigger, hash-chained, and `refloop audit verify` names
the first bad row after an edit, a deletion or a reorder done behind its back."""

from __future__ import annotations

import itertools
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from helpers import routed, store_conn

from engine.cli.tracker import register
from engine.clock import VirtualClock
from engine.model import Identifiers, ReferralCreated, ReportReceived
from engine.store import audit as audit_store
from engine.store.db import DatabaseError, open_database
from engine.tracking.tracker import Tracker

pytestmark = pytest.mark.store

T0 = 1_767_225_600.0
ROWS = 8


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """A state dir whose database has ROWS audit rows made by the tracker."""
    state = tmp_path / "state"
    db = open_database(state / "refloop.db")
    clock = VirtualClock(T0)
    tracker = Tracker(db, clock)
    try:
        for n in range(1, ROWS + 1):
            clock.advance(60)
            with db.transaction() as conn:
                if n % 2:
                    ids = Identifiers(sending_facility="F", placer_number=f"R{n}")
                    tracker.apply(
                        ReferralCreated(ids=ids, occurred_at=clock.now(), message_id=n), conn
                    )
                else:
                    ids = Identifiers(filler_numbers=(f"unknown-{n}",))
                    tracker.apply(
                        ReportReceived(
                            ids=ids, occurred_at=clock.now(), message_id=n, report_id="x"
                        ),
                        conn,
                    )
    finally:
        db.close()
    return state


def _verify(state: Path) -> tuple[int, str]:
    @click.group()
    def main() -> None:
        """test root"""

    register(main)
    result = CliRunner().invoke(main, ["audit", "verify", "--state", str(state)])
    return result.exit_code, result.output


def _tamper(state: Path, *statements: str) -> None:
    """Edit the database directly, as someone with file access (or PostgreSQL's
    superuser) could, the append-only triggers dropped or disabled."""
    conn = store_conn(state / "refloop.db")
    try:
        if routed(state / "refloop.db"):
            conn.execute("SET session_replication_role = replica")  # no triggers fire
        else:
            conn.execute("DROP TRIGGER audit_no_update")
            conn.execute("DROP TRIGGER audit_no_delete")
        for sql in statements:
            conn.execute(sql)
    finally:
        conn.close()


def test_fresh_run_verifies(state: Path) -> None:
    code, output = _verify(state)
    assert code == 0, output
    assert f"audit log ok: {ROWS} rows" in output


def test_chain_links_every_row(state: Path) -> None:
    db = open_database(state / "refloop.db", readonly=True)
    try:
        rows = list(audit_store.rows(db.conn))
    finally:
        db.close()
    assert [r.id for r in rows] == list(range(1, ROWS + 1))
    assert rows[0].prev_hash == audit_store.GENESIS
    for before, after in itertools.pairwise(rows):
        assert after.prev_hash == before.hash
    assert {r.action for r in rows} == {"referral-created", "parked"}


@pytest.mark.parametrize(
    "sql",
    ["UPDATE audit SET actor = 'x' WHERE id = 2", "DELETE FROM audit WHERE id = 2"],
    ids=["update", "delete"],
)
def test_triggers_refuse_changes(state: Path, sql: str) -> None:
    conn = store_conn(state / "refloop.db")
    try:
        with pytest.raises(DatabaseError, match="append-only"):
            conn.execute(sql)
    finally:
        conn.close()
    assert _verify(state)[0] == 0


_SWAP = (
    "UPDATE audit SET id = -1 WHERE id = {a}",
    "UPDATE audit SET id = {a} WHERE id = {b}",
    "UPDATE audit SET id = {b} WHERE id = -1",
)

TAMPERING: list[tuple[str, tuple[str, ...], int]] = [
    ("edit-detail", ("UPDATE audit SET detail = '{}' WHERE id = 4",), 4),
    ("edit-actor", ("UPDATE audit SET actor = 'operator:mallory' WHERE id = 3",), 3),
    ("edit-time", ("UPDATE audit SET at = '2020-01-01T00:00:00.000000Z' WHERE id = 6",), 6),
    (
        "edit-and-rehash-the-row",
        (
            "UPDATE audit SET message_id = 99, "
            "hash = '0000000000000000000000000000000000000000000000000000000000000000' "
            "WHERE id = 5",
        ),
        5,
    ),
    ("delete-middle", ("DELETE FROM audit WHERE id = 3",), 4),
    ("delete-first", ("DELETE FROM audit WHERE id = 1",), 2),
    ("delete-last", (f"DELETE FROM audit WHERE id = {ROWS}",), ROWS),
    ("swap-pair", tuple(s.format(a=3, b=6) for s in _SWAP), 3),
    ("swap-neighbours", tuple(s.format(a=5, b=6) for s in _SWAP), 5),
]


@pytest.mark.parametrize(("how", "statements", "bad_row"), TAMPERING, ids=[t[0] for t in TAMPERING])
def test_verify_names_the_first_bad_row(
    state: Path, how: str, statements: tuple[str, ...], bad_row: int
) -> None:
    _tamper(state, *statements)
    code, output = _verify(state)
    assert code != 0
    assert f"audit row {bad_row}:" in output, output


def test_rehashed_edit_is_caught_by_the_next_row(state: Path) -> None:
    """Recomputing a row's own hash after editing it still breaks the link to the next."""
    db = open_database(state / "refloop.db", readonly=True)
    try:
        row = next(r for r in audit_store.rows(db.conn) if r.id == 4)
    finally:
        db.close()
    detail = {**row.detail, "to": "closed"}
    digest = audit_store.row_hash(
        row.prev_hash,
        id=row.id,
        at=row.at,
        actor=row.actor,
        action=row.action,
        referral_id=row.referral_id,
        message_id=row.message_id,
        detail=detail,
    )
    detail_sql = audit_store.canonical(detail).replace("'", "''")
    _tamper(state, f"UPDATE audit SET detail = '{detail_sql}', hash = '{digest}' WHERE id = 4")
    code, output = _verify(state)
    assert code != 0 and "audit row 5:" in output and "prev_hash" in output


def test_verify_function_reports_reason(state: Path) -> None:
    _tamper(state, "DELETE FROM audit WHERE id = 3")
    db = open_database(state / "refloop.db", readonly=True)
    try:
        result = audit_store.verify(db.conn)
    finally:
        db.close()
    assert not result.ok
    assert result.bad_row == 4
    assert "missing" in result.problem


def test_append_after_verify_keeps_the_chain(state: Path) -> None:
    db = open_database(state / "refloop.db")
    try:
        with db.transaction() as conn:
            new_id = audit_store.append(
                conn,
                at="2026-01-02T00:00:00.000000Z",
                actor="operator:test",
                action="closed-by-operator",
                referral_id=1,
                message_id=None,
                detail={"to": "closed"},
            )
        assert new_id == ROWS + 1
        assert audit_store.verify(db.conn).ok
    finally:
        db.close()
