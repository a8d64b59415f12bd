"""Every command opens the database routes.yaml names, through one opener: a routes.yaml
that does not load is a one-line error and exit 1 (never a silent, new ``refloop.db``);
``refloop simulate --keep DIR`` leaves a folder the other commands open as documented."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from helpers import query, refloop, routed

GOOD = """\
version: 1
store: {file: clinic.db}
http: {host: 127.0.0.1, port: 0}
sources:
  ehr: {type: mllp, host: 127.0.0.1, port: 0}
"""

# line 3 names a key routes.yaml does not have: the file does not load
BROKEN = """\
version: 1
store: {file: clinic.db}
stor: {file: other.db}
"""

# every command that opens the database, with what it needs besides --state/--routes
OPENERS = [
    pytest.param(["messages", "list"], id="messages-list"),
    pytest.param(["messages", "show", "1"], id="messages-show"),
    pytest.param(["referrals", "list"], id="referrals-list"),
    pytest.param(["referrals", "close", "1", "--reason", "other"], id="referrals-close"),
    pytest.param(["parked", "list"], id="parked-list"),
    pytest.param(["audit", "verify"], id="audit-verify"),
    pytest.param(["outbox", "list"], id="outbox-list"),
    pytest.param(["outbox", "cancel", "1"], id="outbox-cancel"),
    pytest.param(["timers", "list"], id="timers-list"),
    pytest.param(["specialists", "list"], id="specialists-list"),
    pytest.param(["users", "list"], id="users-list"),
    pytest.param(["users", "add", "alice", "--role", "admin", "--password-stdin"], id="users-add"),
    # without --password-stdin: the routes.yaml error comes before the password prompt
    pytest.param(["users", "add", "alice", "--role", "admin"], id="users-add-prompt"),
    pytest.param(["tasks", "list"], id="tasks-list"),
    pytest.param(["tasks", "done", "1", "--note", "called"], id="tasks-done"),
    pytest.param(["users", "token", "alice"], id="users-token"),
    pytest.param(["report", "closure", "--from", "2026-01-01", "--to", "2026-01-31"], id="report"),
    pytest.param(["replay"], id="replay"),
    pytest.param(["replay", "--dry-run"], id="replay-dry-run"),
]


@pytest.mark.parametrize("command", OPENERS)
def test_a_routes_yaml_that_does_not_load_is_one_line_and_exit_1(
    tmp_path: Path, command: list[str]
) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(BROKEN)
    state = tmp_path / "state"
    args = ("--state", str(state), "--routes", str(routes))
    result = refloop(*command, *args, stdin=b"correct horse battery\n")
    err = result.stderr.decode()
    assert result.returncode == 1, err
    assert len(err.splitlines()) == 1, err
    assert f"{routes}:3 stor" in err
    assert "Traceback" not in err
    assert not state.exists()  # no database made up under another name


def test_users_add_writes_the_database_routes_yaml_names(tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(GOOD)
    state = tmp_path / "state"
    args = ("--state", str(state), "--routes", str(routes))
    added = refloop(
        "users",
        "add",
        "alice",
        "--role",
        "admin",
        "--password-stdin",
        *args,
        stdin=b"correct horse battery\n",
    )
    assert added.returncode == 0, added.stderr
    if not routed(state / "clinic.db"):  # on PostgreSQL the file stands for a schema
        assert sorted(p.name for p in state.iterdir() if p.suffix == ".db") == ["clinic.db"]
    assert query(state / "clinic.db", "SELECT name, role FROM users") == [("alice", "admin")]
    listed = refloop("users", "list", "--json", *args)
    assert [u["name"] for u in json.loads(listed.stdout)] == ["alice"]


SCENARIO = textwrap.dedent(
    """\
    name: kept
    seed: 1
    start: 2026-03-02T08:00:00-05:00
    days: 1
    follow_up: 3
    referrals:
      - {placer: KEEP-1, at: 1h, sms_consent: false,
         specialist: {confirms: null, report: null}}
      - {placer: KEEP-2, at: 2h, sms_consent: false,
         specialist: {confirms: null, report: null}}
    """
)


def test_simulate_keep_leaves_a_folder_the_commands_open(tmp_path: Path) -> None:
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text(SCENARIO)
    kept = tmp_path / "kept"
    ran = refloop("simulate", str(scenario), "--keep", str(kept), "--summary", timeout=120)
    assert ran.returncode == 0, ran.stderr
    # docs/cli.md: refloop referrals list --state DIR --routes DIR/routes.yaml
    listed = refloop(
        "referrals", "list", "--json", "--state", str(kept), "--routes", str(kept / "routes.yaml")
    )
    assert listed.returncode == 0, listed.stderr
    assert sorted(r["placer_number"] for r in json.loads(listed.stdout)) == ["KEEP-1", "KEEP-2"]
    checked = refloop("routes", "check", str(kept / "routes.yaml"))
    assert checked.returncode == 0, checked.stderr


@pytest.mark.parametrize("dry", [[], ["--dry-run"]], ids=["replay", "dry-run"])
def test_replay_into_a_missing_database_makes_none(tmp_path: Path, dry: list[str]) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(GOOD)
    state = tmp_path / "state"
    result = refloop("replay", *dry, "--state", str(state), "--routes", str(routes))
    err = result.stderr.decode()
    assert result.returncode == 1, err
    url = routed(state / "clinic.db")  # PostgreSQL (REFLOOP_TEST_STORE): an empty schema
    if url:
        assert err == f"Error: no database at {url} (no refloop schema there)\n"
        tables = (
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = current_schema()"
        )
        assert query(state / "clinic.db", tables) == [(0,)]
    else:
        assert err == f"Error: no database at {state / 'clinic.db'}\n"
        assert not (state / "clinic.db").exists()
