"""The HTTP server against DNS rebinding and cross-site requests (issue 14, item 8),
through ``refloop run`` (the shipped routes.yaml: no admin token) and a live engine on
loopback, with raw HTTP requests: a Host that is not ours gets 421, a cross-site POST
gets 403 even where no admin token is set, and raw messages, /metrics and /confirm carry
``nosniff`` and ``no-store``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from helpers import Daemon, run
from ui_rig import ui_engine

from engine.app import Engine
from engine.config import loads
from engine.errors import ConfigError

# ---------------------------------------------------------------------------
# Host and origin checks against the daemon (the shipped routes.yaml: no admin token)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, httpx.Client]]:
    """One ``refloop run`` for the module (every request below is refused or idempotent)."""
    tmp = tmp_path_factory.mktemp("live")
    daemon = Daemon(state_dir=tmp / "state", log_path=tmp / "daemon.log")
    daemon.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{daemon.http}", timeout=10) as http:
            yield daemon, http
    finally:
        daemon.kill()


@pytest.mark.parametrize("path", ["/metrics", "/ui/login", "/api/referrals", "/"])
def test_a_host_that_is_not_ours_is_misdirected(
    live: tuple[Daemon, httpx.Client], path: str
) -> None:
    daemon, http = live
    rebound = http.get(path, headers={"Host": f"attacker.example:{daemon.http}"})
    assert rebound.status_code == 421
    assert "refloop_" not in rebound.text
    for host in (f"127.0.0.1:{daemon.http}", f"localhost:{daemon.http}", "localhost"):
        ok = http.get(path, headers={"Host": host})
        assert ok.status_code in (200, 302, 401), (host, ok.status_code)


def test_metrics_are_not_sniffed_or_stored(live: tuple[Daemon, httpx.Client]) -> None:
    _, http = live
    r = http.get("/metrics")
    assert r.status_code == 200
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert r.headers["Cache-Control"] == "no-store"


def test_probes_answer_any_host(live: tuple[Daemon, httpx.Client]) -> None:
    _, http = live
    for path in ("/healthz", "/readyz"):
        assert http.get(path, headers={"Host": "10.1.2.3:8575"}).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://attacker.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site", "Origin": "http://localhost:3000"},
    ],
    ids=["origin", "null-origin", "fetch-cross-site", "fetch-same-site"],
)
def test_cross_site_posts_are_refused_without_an_admin_token(
    live: tuple[Daemon, httpx.Client], headers: dict[str, str]
) -> None:
    daemon, http = live
    refused = http.post("/admin/reload", headers=headers)
    assert refused.status_code == 403, refused.text
    assert "reload: " not in daemon.log_tail(200)  # the handler never ran
    login = http.post("/ui/login", headers=headers, data={"name": "x", "password": "y"})
    assert login.status_code == 403


def test_same_origin_and_scripted_posts_still_reload(live: tuple[Daemon, httpx.Client]) -> None:
    daemon, http = live
    own = f"http://127.0.0.1:{daemon.http}"
    same_origin = (
        {},  # a script
        {"Origin": own},  # a browser without fetch metadata
        {"Origin": own, "Sec-Fetch-Site": "same-origin"},
        {"Origin": "null", "Sec-Fetch-Site": "same-origin"},  # our form, no-referrer policy
    )
    for headers in same_origin:
        r = http.post("/admin/reload", headers=headers)
        assert r.status_code == 200 and r.json() == {"status": "reloaded"}


# ---------------------------------------------------------------------------
# Headers on raw messages


def _message(code: str, control: str, note: bytes) -> bytes:
    return (
        (
            f"MSH|^~\\&|EHR|CLINIC|REFLOOP|CLINIC|20260101090000||{code}|{control}|P|2.5.1\r"
            "EVN||20260101090000\r"
        ).encode()
        + b"NTE|1||"
        + note
        + b"\r"
    )


@pytest.mark.store
def test_raw_message_responses_are_not_sniffed_or_stored(tmp_path: Path) -> None:
    async def main() -> None:
        async with ui_engine(tmp_path) as rig, httpx.AsyncClient(timeout=10) as http:
            html = b"<html><script>alert(1)</script>"
            await rig.send(_message("ADT^A08", "H1", html))
            r = await http.get(f"{rig.base}/api/messages/1/raw", headers=rig.bearer("ana"))
            assert r.status_code == 200 and "<script>" in r.text
            assert r.headers["X-Content-Type-Options"] == "nosniff"
            assert r.headers["Cache-Control"] == "no-store"
            assert not r.headers["Content-Type"].startswith("text/html")

    run(main(), timeout=60)


@pytest.mark.store
def test_configured_allowed_hosts_replace_the_bind_address(tmp_path: Path) -> None:
    doc = {
        "version": 1,
        "store": {"file": "refloop.db"},
        "http": {"host": "127.0.0.1", "port": 0, "allowed_hosts": ["refloop.lan", "[fd00::5]"]},
    }
    config = loads(yaml.safe_dump(doc), file="hosts.yaml", env={})

    async def main() -> None:
        engine = Engine(config, tmp_path / "state", drain_seconds=2.0)
        await engine.start()
        try:
            base = f"http://127.0.0.1:{engine.ports()['http']}"
            async with httpx.AsyncClient(timeout=10) as http:
                for host, status in (
                    ("refloop.lan:8575", 200),
                    ("[fd00::5]:8575", 200),
                    ("localhost", 200),  # loopback names are always ours
                    ("refloop.example.org", 421),
                ):
                    r = await http.get(f"{base}/metrics", headers={"Host": host})
                    assert r.status_code == status, host
        finally:
            await engine.stop()

    run(main(), timeout=60)


def test_allowed_hosts_are_host_names(tmp_path: Path) -> None:
    text = "version: 1\nhttp:\n  allowed_hosts: [https://refloop.lan/]\n"
    with pytest.raises(ConfigError) as exc:
        loads(text, file="hosts.yaml", env={})
    assert "hosts.yaml:3" in str(exc.value) and "allowed_hosts" in str(exc.value)
