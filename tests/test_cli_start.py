"""``refloop --version`` and ``refloop --help`` start without the store, the command
groups or any channel SDK (issue 16): engine.cli.main loads a command group when one of
its commands runs. What is imported is read from ``sys.modules`` of the real process;
how long it takes is bench/cli.py's business, not a test's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
from helpers import refloop

from engine.cli.common import MainGroup
from engine.cli.main import LAZY_GROUPS, main

ROOT = Path(__file__).resolve().parent.parent

# Run the CLI as ``python -m engine.cli`` does, then print what got imported.
PROBE = """
import json, runpy, sys
sys.argv = ["refloop", *sys.argv[1:]]
try:
    runpy.run_module("engine.cli", run_name="__main__", alter_sys=True)
except SystemExit:
    pass
finally:
    sys.stderr.write("\\nMODULES " + json.dumps(sorted(sys.modules)) + "\\n")
"""

# the channel SDKs and heavy layers a version or help line has no use for
NOT_NEEDED = (
    "twilio",
    "fhir",  # fhir.resources
    "cryptography",
    "aiohttp",
    "aiosmtpd",
    "aiosmtplib",
    "httpx",
    "jinja2",
    "prometheus_client",
    "sqlite3",
    "sqlite_utils",
    "yaml",
    "channels",
    "engine.store",
    "engine.routing",
    "engine.tracking",
    "engine.delivery",
    "engine.web",
    "engine.app",
)


def _imported(*args: str) -> tuple[str, list[str]]:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *args], cwd=ROOT, capture_output=True, text=True, check=False
    )
    line = result.stderr.rpartition("MODULES ")[2]
    return result.stdout, json.loads(line)


@pytest.mark.parametrize("args", [("--version",), ("--help",)])
def test_version_and_help_import_no_sdk(args: tuple[str, ...]) -> None:
    out, modules = _imported(*args)
    assert out.startswith(("refloop, version", "Usage: refloop")), out
    loaded = [m for m in modules if any(m == n or m.startswith(f"{n}.") for n in NOT_NEEDED)]
    assert loaded == []


def test_a_command_still_loads_what_it_needs() -> None:
    """The probe sees imports: a command that opens the store does import it."""
    _, modules = _imported("referrals", "list", "--state", "/nonexistent/state")
    assert "engine.cli.tracker" in modules and "engine.store.db" in modules


def test_help_lists_each_lazy_group_as_the_group_itself_says() -> None:
    """The summary shown before a group is loaded is its own help's first paragraph, so
    ``refloop --help`` reads the same either way."""
    assert isinstance(main, MainGroup)
    ctx = click.Context(main)
    loaded = main.all_commands(ctx)
    for name, lazy in LAZY_GROUPS.items():
        help_text = loaded[name].help or ""
        assert help_text.split("\n\n")[0].strip() == lazy.summary, name


def test_a_lazy_group_runs() -> None:
    result = refloop("timers", "--help")
    assert result.returncode == 0, result.stderr.decode()
    assert "Pending escalation timers." in result.stdout.decode()
