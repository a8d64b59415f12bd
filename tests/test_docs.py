"""Docs stay true: every CLI command and every metric is documented, the systemd unit
verifies."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
from pathlib import Path

import click
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from engine import config
from engine.app import Engine
from engine.cli.main import main

ROOT = Path(__file__).resolve().parent.parent
main.all_commands(click.Context(main))  # the lazily loaded groups too (engine.cli.main)


def _commands(group: click.Group, prefix: str = "refloop") -> list[str]:
    out: list[str] = []
    for name, cmd in sorted(group.commands.items()):
        path = f"{prefix} {name}"
        if isinstance(cmd, click.Group):
            out.extend(_commands(cmd, path))
        else:
            out.append(path)
    return out


@pytest.mark.parametrize("command", _commands(main))
def test_every_cli_command_is_documented(command: str) -> None:
    docs = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "docs").glob("*.md"))
    assert command in docs, f"{command!r} is not described in docs/"


@pytest.mark.parametrize("command", _commands(main))
def test_every_cli_command_has_an_example(command: str) -> None:
    cmd: click.Command = main
    for part in command.split()[1:]:
        assert isinstance(cmd, click.Group)
        cmd = cmd.commands[part]
    assert "Example:" in (cmd.help or ""), f"{command} --help has no Example:"


def test_readme_shows_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "make run" in readme and "make test" in readme


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not here")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    unit = (ROOT / "systemd" / "refloop.service").read_text(encoding="utf-8")
    # the install path /opt/refloop does not exist on a build machine: point ExecStart at a
    # binary that does, so verify checks everything else
    unit = unit.replace("/opt/refloop/.venv/bin/refloop", "/bin/true")
    path = tmp_path / "refloop.service"
    path.write_text(unit, encoding="utf-8")
    result = subprocess.run(
        ["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "Type=notify" in unit and "ProtectSystem=strict" in unit


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not here")
def test_backup_timer_and_service_verify(tmp_path: Path) -> None:
    for name in ("refloop-backup.service", "refloop-backup.timer"):
        unit = (ROOT / "systemd" / name).read_text(encoding="utf-8")
        (tmp_path / name).write_text(
            unit.replace("/opt/refloop/.venv/bin/refloop", "/bin/true"), encoding="utf-8"
        )
    result = subprocess.run(
        ["systemd-analyze", "verify", *(str(tmp_path / n) for n in sorted(os.listdir(tmp_path)))],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "Unknown" not in result.stderr, result.stderr  # a misspelt key is only a warning
    service = (ROOT / "systemd" / "refloop-backup.service").read_text(encoding="utf-8")
    assert "refloop backup /var/backups/refloop/" in service


# A daemon with as much switched on as starts without the network: an MLLP and a FHIR
# source (polling a stub that answers empty bundles), HTTP with webhooks, one channel of
# each cheap type, routes (so the tracker and the timers run). Direct is left out: its
# listener needs a PKI, and it counts in the outbox and timer metrics like the others.
METRICS_CONFIG = """\
version: 1
store: {{file: refloop.db}}
http: {{host: 127.0.0.1, port: 0, public_url: "https://refloop.example.org"}}
sources:
  ehr: {{type: mllp, host: 127.0.0.1, port: 0}}
  chart:
    type: fhir
    base_url: {fhir}
    resources: [ServiceRequest]
    poll_interval: 3600
channels:
  downstream: {{type: mllp, host: 127.0.0.1, port: 9, timeout: 1}}
  worklist:
    type: webhook
    url: https://worklist.example.org/refloop
    secret: "${{env:REFLOOP_DOCS_TEST_SECRET:-0123456789abcdef0123}}"
  fax:
    type: fax
    api_key: "${{env:REFLOOP_DOCS_TEST_FAX_KEY:-x}}"
    templates: {{packet: "Referral {{{{ 1 }}}}"}}
  sms:
    type: sms
    account_sid: AC0123456789abcdef0123456789abcdef
    auth_token: "${{env:REFLOOP_DOCS_TEST_TOKEN:-0123456789abcdef}}"
    from_number: "+15005550001"
  ehr-out: {{type: fhir, base_url: {fhir}, resource: Communication}}
routes:
  - name: copy-adt
    when: {{type: "ADT^A0*"}}
    then: [{{forward: downstream}}]
"""
# A table row of docs/metrics.md: | `name` | type | labels | meaning |
DOC_ROW = re.compile(r"^\| `(refloop_\w+)` \| (\w+) \|", re.MULTILINE)


async def _registered_metrics(tmp_path: Path) -> dict[str, str]:
    """Family name → type of everything the running daemon's registry exposes."""

    async def empty_bundle(request: web.Request) -> web.Response:
        bundle = {"resourceType": "Bundle", "type": "searchset", "entry": []}
        return web.json_response(bundle, content_type="application/fhir+json")

    app = web.Application()
    app.router.add_get("/{tail:.*}", empty_bundle)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        path = tmp_path / "routes.yaml"
        path.write_text(METRICS_CONFIG.format(fhir=f"http://127.0.0.1:{port}/fhir"))
        registry = CollectorRegistry()
        engine = Engine(config.load(path), tmp_path / "state", registry=registry, drain_seconds=2.0)
        await engine.start()
        try:
            assert engine.tracker is not None and engine.timers is not None
            assert set(engine.pollers) == {"chart"}
            return {family.name: family.type for family in registry.collect()}
        finally:
            await engine.stop()
    finally:
        await runner.cleanup()


def test_every_metric_is_documented(tmp_path: Path) -> None:
    registered = asyncio.run(_registered_metrics(tmp_path))
    assert len(registered) > 20, registered  # the engine really started
    documented = dict(DOC_ROW.findall((ROOT / "docs" / "metrics.md").read_text("utf-8")))
    missing: list[str] = []
    for name, kind in sorted(registered.items()):
        # prometheus_client names a counter's family without _total; docs show either
        row = name if name in documented else f"{name}_total"
        if row not in documented:
            missing.append(name)
        else:
            assert documented[row] == kind, f"docs/metrics.md: {row} is a {kind}"
    assert not missing, f"no row in docs/metrics.md for {missing}"
