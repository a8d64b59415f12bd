"""Hot reload: SIGHUP (and POST /admin/reload) switch to the edited routes.yaml; a broken
edit keeps the running routes and the daemon up."""

from __future__ import annotations

import asyncio
import os
import queue
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from helpers import cli_args, query
from prometheus_client import CollectorRegistry

from engine import config
from engine.app import Engine
from engine.cli.main import main
from engine.config import HttpConfig
from engine.hl7v2.client import MllpClient
from engine.metrics import Metrics
from engine.web.server import HttpServer

HEAD = """\
version: 1
store: {file: refloop.db}
http: {host: 127.0.0.1, port: 0}
sources:
  ehr: {type: mllp, host: 127.0.0.1, port: 0}
"""


def routes_text(route: str) -> str:
    return HEAD + textwrap.dedent(
        f"""\
        routes:
          - name: {route}
            when: {{type: ORM^O01}}
            extract: {{placer_number: ORC.2.1}}
            then: [{{track: referral-created}}]
        """
    )


BROKEN = HEAD + "routes:\n  - name: broken\n    when: {type: ORM^O01}\n    then: [{track: nope}]\n"


def order(n: int) -> bytes:
    return (
        f"MSH|^~\\&|EHR|CLINIC|REFLOOP|CLINIC|20250303101500||ORM^O01|CTL{n}|P|2.5.1\r"
        f"PID|1||MRN{n}^^^CLINIC\rORC|NW|REF-{n}^CLINIC\r"
    ).encode()


async def send(port: int, raw: bytes) -> str:
    client = await MllpClient.connect("127.0.0.1", port, timeout=5)
    try:
        return (await client.send(raw)).code
    finally:
        await client.close()


def route_of(db: Path, control_id: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = query(db, "SELECT status, route FROM messages WHERE control_id = ?", (control_id,))
        row = rows[0] if rows else None
        if row and row[0] != "received":
            return str(row[1])
        time.sleep(0.02)
    raise AssertionError(f"{control_id} not processed within {timeout}s")


class Daemon:
    """``refloop run`` as a subprocess; stderr lines are collected by a thread."""

    def __init__(self, routes: Path, state: Path):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "engine.cli",
                *cli_args("run", "--routes", str(routes), "--state", str(state)),
            ],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env=env,
            cwd=Path(__file__).resolve().parent.parent,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line)

    def wait_for(self, pattern: str, timeout: float = 15.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no log line matching {pattern!r}")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            m = re.search(pattern, line)
            if m:
                return m

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.reader.join(timeout=5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.mark.slow
def test_sighup_reloads_and_a_broken_edit_keeps_the_old_routes(tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(routes_text("first"))
    state = tmp_path / "state"
    daemon = Daemon(routes, state)
    try:
        port = int(daemon.wait_for(r"ready: .*ehr=(\d+)")[1])
        db = state / "refloop.db"
        assert asyncio.run(send(port, order(1))) == "AA"
        assert route_of(db, "CTL1") == "first"

        routes.write_text(routes_text("second"))
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_for(r"reload: .* loaded")
        assert asyncio.run(send(port, order(2))) == "AA"
        assert route_of(db, "CTL2") == "second"

        routes.write_text(BROKEN)
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_for(r"reload: .* is invalid; keeping the running routes")
        daemon.wait_for(r"routes\.yaml:9 routes\[0\]\.then\[0\]\.track: unknown event kind")
        assert daemon.proc.poll() is None
        assert asyncio.run(send(port, order(3))) == "AA"
        assert route_of(db, "CTL3") == "second"
    finally:
        daemon.stop()
    assert daemon.proc.returncode == 0


@pytest.mark.store
def test_admin_reload_endpoint_and_cli(tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(routes_text("first"))

    async def go() -> None:
        engine = Engine(config.load(routes), tmp_path / "state", registry=CollectorRegistry())
        await engine.start()
        try:
            url = f"http://127.0.0.1:{engine.ports()['http']}/admin/reload"
            runner = CliRunner()
            routes.write_text(routes_text("second"))
            ok = await asyncio.to_thread(runner.invoke, main, ["routes", "reload", "--url", url])
            assert ok.exit_code == 0, ok.output
            assert "reloaded" in ok.output
            assert await send(engine.ports()["ehr"], order(1)) == "AA"
            routes.write_text(BROKEN)
            bad = await asyncio.to_thread(runner.invoke, main, ["routes", "reload", "--url", url])
            assert bad.exit_code == 2
            assert "routes.yaml:9 routes[0].then[0].track: unknown event kind" in bad.output
            assert await send(engine.ports()["ehr"], order(2)) == "AA"
            assert engine.processor is not None
            for _ in range(500):
                if engine.processor.cursor >= 2:
                    break
                await asyncio.sleep(0.01)
        finally:
            await asyncio.wait_for(engine.stop(), 10)

    asyncio.run(go())
    db = tmp_path / "state" / "refloop.db"
    assert route_of(db, "CTL1") == "second"
    assert route_of(db, "CTL2") == "second"


@pytest.mark.parametrize(
    ("remote", "token", "header", "allowed"),
    [
        ("127.0.0.1", "", "", True),
        ("::1", "", "", True),
        ("10.0.0.5", "", "", False),
        ("192.168.1.9", "s3cret", "Bearer s3cret", False),
        ("127.0.0.1", "s3cret", "", False),
        ("127.0.0.1", "s3cret", "Bearer s3cret", True),
    ],
)
def test_admin_is_loopback_only(remote: str, token: str, header: str, allowed: bool) -> None:
    server = HttpServer(
        HttpConfig(admin_token=token), Metrics(CollectorRegistry()), lambda: True, reload=list
    )
    request = SimpleNamespace(remote=remote, headers={"Authorization": header} if header else {})
    assert server._admin_allowed(request) is allowed  # type: ignore[arg-type]
