"""``refloop outbox list | retry | cancel`` on a real database in a tmp state dir."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from engine.cli.main import main
from engine.store import audit as audit_store
from engine.store import outbox
from engine.store import referrals as referral_store
from engine.store.db import Database, open_database

pytestmark = pytest.mark.store  # every test here uses the store

T0 = 1_767_225_600.0


def setup(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    """State dir with rows: pending, dead, sent."""
    state = tmp_path / "state"
    db = open_database(state / "refloop.db")
    ids: dict[str, int] = {}
    with db.transaction() as conn:
        for key, channel in (("pending", "sms"), ("dead", "fax"), ("sent", "fax")):
            referral_store.enqueue_outbox(conn, None, channel, "t", "{}", key, T0, now=T0)
            ids[key] = int(
                conn.execute("SELECT id FROM outbox WHERE idempotency_key = ?", (key,)).fetchone()[
                    0
                ]
            )
        for item in outbox.claim_due(conn, "fax", T0, 10):
            if item.id == ids["dead"]:
                outbox.mark_dead(conn, item.id, error="fax: provider answered HTTP 400", now=T0)
            else:
                outbox.mark_sent(
                    conn, item.id, recipient="+1", provider_id="9", provider_status="q", now=T0
                )
    db.close()
    return state, ids


def cli(state: Path, *args: str) -> tuple[int, str]:
    routes = state.parent / "routes.yaml"  # names no store file: the default, refloop.db
    routes.write_text("version: 1\n")
    result = CliRunner().invoke(
        main, ["outbox", *args, "--state", str(state), "--routes", str(routes)]
    )
    return result.exit_code, result.output


def status(state: Path, outbox_id: int) -> str:
    db = open_database(state / "refloop.db")
    try:
        item = outbox.get(db.conn, outbox_id)
        assert item is not None
        return item.status
    finally:
        db.close()


def audit_actions(state: Path) -> list[str]:
    db: Database = open_database(state / "refloop.db")
    try:
        return [r.action for r in audit_store.rows(db.conn)]
    finally:
        db.close()


def test_list_table_and_json_filters(tmp_path: Path) -> None:
    state, ids = setup(tmp_path)
    code, out = cli(state, "list")
    assert code == 0
    assert "dead" in out and "provider answered HTTP 400" in out and "+1" not in out
    code, out = cli(state, "list", "--json", "--status", "dead")
    rows = json.loads(out)
    assert [r["id"] for r in rows] == [ids["dead"]]
    assert "recipient" not in rows[0] and "payload" not in rows[0]
    code, out = cli(state, "list", "--json", "--channel", "fax")
    assert sorted(r["id"] for r in json.loads(out)) == sorted([ids["dead"], ids["sent"]])
    code, out = cli(state, "list", "--status", "cancelled")
    assert code == 0 and "no outbox rows" in out


def test_retry_one_dead_row(tmp_path: Path) -> None:
    state, ids = setup(tmp_path)
    code, out = cli(state, "retry", str(ids["dead"]), "--actor", "alice")
    assert code == 0, out
    assert status(state, ids["dead"]) == "pending"
    assert audit_actions(state) == ["outbox-retry"]


def test_retry_all_dead(tmp_path: Path) -> None:
    state, ids = setup(tmp_path)
    code, out = cli(state, "retry", "--dead", "--channel", "fax")
    assert code == 0 and "1 dead row(s) queued again" in out
    assert status(state, ids["dead"]) == "pending"


def test_retry_refuses_a_sent_row_and_bad_usage(tmp_path: Path) -> None:
    state, ids = setup(tmp_path)
    code, out = cli(state, "retry", str(ids["sent"]))
    assert code == 1 and "is sent" in out
    code, out = cli(state, "retry")
    assert code == 1 and "give one outbox ID or --dead" in out  # a usage error
    code, out = cli(state, "retry", "999")
    assert code == 1 and "no outbox item 999" in out


def test_cancel(tmp_path: Path) -> None:
    state, ids = setup(tmp_path)
    code, out = cli(state, "cancel", str(ids["pending"]), "--actor", "bob")
    assert code == 0 and "cancelled" in out
    assert status(state, ids["pending"]) == "cancelled"
    code, out = cli(state, "cancel", str(ids["sent"]))
    assert code == 1 and "only pending or dead cancel" in out
    assert audit_actions(state) == ["outbox-cancel"]


@pytest.mark.empty_store
def test_no_database_yet(tmp_path: Path) -> None:
    code, out = cli(tmp_path / "empty", "list")
    assert code == 1 and "no database" in out
