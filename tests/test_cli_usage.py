"""Usage errors (unknown option or command, missing argument, bad value) are one line on
stderr and exit 1 in every command group, as docs/cli.md says; ``--help`` still works."""

from __future__ import annotations

import pytest
from helpers import refloop

USAGE_ERRORS = [
    pytest.param(["--bogus"], "--bogus", id="root-unknown-option"),
    pytest.param(["nosuch"], "nosuch", id="unknown-command"),
    pytest.param(["messages", "nosuch"], "nosuch", id="unknown-subcommand"),
    pytest.param(["replay", "--bogus"], "--bogus", id="replay-unknown-option"),
    pytest.param(["messages", "show"], "MESSAGE_ID", id="missing-argument"),
    pytest.param(["messages", "list", "--limit", "many"], "--limit", id="not-an-integer"),
    pytest.param(["messages", "list", "--since", "soon"], "soon", id="not-a-time"),
    pytest.param(["referrals", "list", "--status", "nope"], "--status", id="bad-choice"),
    pytest.param(["users", "add", "bob"], "--role", id="missing-required-option"),
    pytest.param(["outbox", "retry"], "", id="outbox-missing"),
    pytest.param(["timers", "list", "--due-before", "x"], "x", id="timers-bad-time"),
    pytest.param(
        ["report", "closure", "--from", "2026-02-30", "--to", "2026-03-01"],
        "--from",
        id="report-bad-date",
    ),
    pytest.param(["specialists", "import"], "CSV_FILE", id="specialists-missing"),
    pytest.param(["send"], "FILES", id="send-missing-files"),
    pytest.param(["simulate", "/no/such/scenario.yaml"], "SCENARIO", id="simulate-no-file"),
    pytest.param(["routes", "test"], "FILE", id="routes-test-missing-file"),
    pytest.param(["routes", "test", "/no/such.hl7"], "FILE", id="routes-test-no-file"),
    pytest.param(["sources", "status", "--timeout", "soon"], "--timeout", id="sources-bad-value"),
    pytest.param(["messages", "show", "1", "--raw", "--json"], "--raw", id="show-raw-and-json"),
]


@pytest.mark.parametrize(("args", "named"), USAGE_ERRORS)
def test_a_usage_error_is_one_line_and_exit_1(args: list[str], named: str) -> None:
    result = refloop(*args)
    err = result.stderr.decode()
    assert result.returncode == 1, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("Error: refloop"), err  # the command path, then the problem
    assert named in err
    assert result.stdout == b""


def test_help_is_not_an_error() -> None:
    result = refloop("replay", "--help")
    assert result.returncode == 0
    assert b"--dry-run" in result.stdout
