"""Acceptance 3: schemathesis fuzzes the live API against ``/api/openapi.json`` and finds
no 5xx, no undocumented status code or content type, and no response that violates its
schema.

The daemon runs as ``refloop run`` in a subprocess on free loopback ports (schemathesis'
requests are synchronous); the admin user and its API token come from ``refloop users
add --token`` and one referral arrives over MLLP first, so the referral, message and
audit operations have rows to return. Examples are bounded so the run takes well under a
minute.
"""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
import yaml
from helpers import free_port
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode, checks
from ui_rig import PASSWORD, ref_i12, ui_config

from engine.hl7v2.client import MllpClient
from engine.web.api import ROUTES

REPORT = importlib.util.find_spec("engine.tracking.report") is not None
EXAMPLES = 40  # per operation and mode: about 1,400 requests, well under a minute
CLI = (sys.executable, "-m", "engine.cli")
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
]


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"refloop run exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError("refloop run did not become ready")


async def _send(port: int) -> None:
    client = await MllpClient.connect("127.0.0.1", port, timeout=5)
    try:
        for i in range(2):
            result = await client.send(ref_i12(f"REF-FUZZ-{i}", f"fz-{i}"))
            assert result.code == "AA", result
    finally:
        await client.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("fuzz")
    mllp, http = free_port(), free_port()
    routes = tmp / "routes.yaml"
    routes.write_text(
        yaml.safe_dump(ui_config(mllp_port=mllp, http_port=http), sort_keys=False),
        encoding="utf-8",
    )
    state = tmp / "state"
    common = ("--routes", str(routes), "--state", str(state))
    added = subprocess.run(
        [*CLI, "users", "add", "fuzzer", "--role", "admin", "--password-stdin", "--token", *common],
        input=f"{PASSWORD}\n".encode(),
        capture_output=True,
        timeout=60,
        check=True,
    )
    token = added.stdout.decode().strip().rsplit(" ", 1)[-1]
    assert token.startswith("rl_")
    log = (tmp / "daemon.log").open("wb")
    proc = subprocess.Popen([*CLI, "run", *common], stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{http}"
        _wait_ready(f"{base}/readyz", proc)
        asyncio.run(_send(mllp))
        yield {"base": base, "headers": {"Authorization": f"Bearer {token}"}}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_api_matches_its_openapi_description(live: dict[str, Any], mode: str) -> None:
    """Every operation, positive then negative examples: each answer must be documented,
    match its schema, and never be a 5xx. (schemathesis' own pytest plugin does not run
    under pytest 9 yet, so the operations are driven through hypothesis directly.)"""
    api = schemathesis.openapi.from_url(f"{live['base']}/api/openapi.json", headers=live["headers"])
    generation = GenerationMode.POSITIVE if mode == "positive" else GenerationMode.NEGATIVE
    failures: list[str] = []
    operations = 0
    labels: list[str] = []
    for result in api.get_all_operations():
        operation = result.ok()
        operations += 1
        labels.append(operation.label)
        if operation.definition.raw.get("operationId") == "closureReport" and not REPORT:
            continue  # engine.tracking.report missing: the endpoint answers 503 until it lands

        @given(case=operation.as_strategy(generation_mode=generation))
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def exercise(case: Any) -> None:
            case.call_and_validate(base_url=live["base"], headers=live["headers"], checks=CHECKS)

        try:
            exercise()
        except Exception as exc:  # collect every operation's failure, then report all
            failures.append(f"{operation.label}: {exc}")
    assert not failures, "\n\n".join(failures)
    # schemathesis leaves out the description's own URL (GET /api/openapi.json)
    assert operations == len(ROUTES) - 1, labels


def test_the_description_needs_a_token(live: dict[str, Any]) -> None:
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{live['base']}/api/openapi.json", timeout=5)
    assert err.value.code == 401
    err.value.close()
