"""The analyst's workbench: ``refloop routes test`` and the *Try a message* page/API
(the shipped routes.yaml, nothing stored or sent), and the per-source figures of the
Sources page, ``GET /api/sources`` and ``refloop sources status``.

Expected values come from the test messages themselves: ``ref_i12("REF-T-1", ...)``
carries RF1-6 ``REF-T-1^CLINIC``, so the ``ref-new`` route extracts placer number
``REF-T-1`` and sending facility ``CLINIC`` (MSH-4).
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from helpers import REPO, cli_args, hl7, refloop, run
from ui_rig import UiRig, csrf_of, login, ref_i12, ui_config, ui_engine

from engine.errors import MessageRejected
from engine.hl7v2.mllp import frame
from engine.routing.trial import read_samples

ROUTES = str(REPO / "routes.yaml")
ADT = hl7("adt-1", msg_type="ADT^A01")  # no route of the shipped routes.yaml wants it


# -- reading files ------------------------------------------------------------------------


def _two(sep: bytes) -> bytes:
    return ref_i12("REF-T-1", "t-1").replace(b"\r", sep) + ADT.replace(b"\r", sep)


@pytest.mark.parametrize(
    ("data", "kinds"),
    [
        pytest.param(_two(b"\n"), ["hl7v2", "hl7v2"], id="lf"),
        pytest.param(_two(b"\r"), ["hl7v2", "hl7v2"], id="cr"),
        pytest.param(_two(b"\r\n"), ["hl7v2", "hl7v2"], id="crlf"),
        pytest.param(
            b"FHS|^~\\&|EHR\rBHS|^~\\&|EHR\r" + _two(b"\r") + b"BTS|2\rFTS|1\r",
            ["hl7v2", "hl7v2"],
            id="fhs-bhs-batch",
        ),
        pytest.param(b'{"resourceType": "ServiceRequest", "id": "a"}', ["fhir"], id="resource"),
        pytest.param(
            json.dumps({"resourceType": "Bundle", "entry": [
                {"resource": {"resourceType": "Appointment", "id": "1"}},
                {"resource": {"resourceType": "Task", "id": "2"}},
            ]}).encode(),
            ["fhir", "fhir"],
            id="bundle",
        ),
        pytest.param(b'[{"resourceType": "Task"}, {"resourceType": "Task"}]', ["fhir", "fhir"],
                     id="array"),
    ],
)  # fmt: skip
def test_read_samples_cuts_files_like_the_daemon_receives_them(
    data: bytes, kinds: list[str]
) -> None:
    samples = read_samples(data)
    assert [s.kind for s in samples] == kinds
    assert [s.index for s in samples] == list(range(1, len(kinds) + 1))
    for s in samples:
        if s.kind == "hl7v2":
            assert s.raw.startswith(b"MSH|") and b"\n" not in s.raw and s.raw.endswith(b"\r")


@pytest.mark.parametrize(
    "data", [b"", b"hello\n", b'{"resourceType": ', b'{"resourceType": "Bundle"}'],
    ids=["empty", "no-msh", "broken-json", "empty-bundle"],
)  # fmt: skip
def test_read_samples_refuses_what_holds_no_message(data: bytes) -> None:
    with pytest.raises(MessageRejected):
        read_samples(data)


# -- refloop routes test ----------------------------------------------------------------


def test_routes_test_shows_route_fields_events_and_actions(tmp_path: Path) -> None:
    sample = tmp_path / "two.hl7"
    sample.write_bytes(_two(b"\n"))
    result = subprocess.run(
        [sys.executable, "-m", "engine.cli", "routes", "test", str(sample), "--routes", ROUTES,
         "--json"],
        cwd=tmp_path, capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    first, second = json.loads(result.stdout)
    assert first["status"] == "routed" and first["routes"] == ["ref-new"]
    assert (first["type"], first["control_id"], first["source"]) == ("REF^I12", "t-1", "ehr")
    values = first["extracted"]["ref-new"]
    assert values["placer_number"] == "REF-T-1" and values["sending_facility"] == "CLINIC"
    (event,) = first["events"]
    assert event["kind"] == "referral-created"
    assert event["ids"]["placer_number"] == "REF-T-1"
    assert event["occurred_at"] == "2026-01-01T09:00:00.000000Z"  # MSH-7 20260101090000, UTC
    assert first["actions"] == [{"action": "track", "route": "ref-new", "kind": "referral-created"}]
    assert second["status"] == "filtered" and second["reason"] == "no route matched ADT^A01"
    assert second["routes"] == [] and second["events"] == [] and second["actions"] == []
    assert list(tmp_path.iterdir()) == [sample]  # no state, no database: nothing stored


def test_routes_test_text_and_exit_status(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.hl7", tmp_path / "bad.hl7"
    good.write_bytes(ref_i12("REF-T-2", "t-2"))
    bad.write_bytes(b"MSH|\n")
    out = refloop("routes", "test", str(good), "--routes", ROUTES)
    assert out.returncode == 0, out.stderr
    text = out.stdout.decode()
    assert text.startswith("#1 REF^I12 t-2: routed, route ref-new\n")
    assert '    placer_number = "REF-T-2"' in text and "  action track (ref-new)" in text
    out = refloop("routes", "test", str(bad), "--routes", ROUTES)
    assert out.returncode == 1 and b"error" in out.stdout
    none = tmp_path / "none.txt"
    none.write_bytes(b"hello\n")
    out = refloop("routes", "test", str(none), "--routes", ROUTES)
    assert out.returncode == 1 and out.stdout == b""
    assert out.stderr.decode().splitlines() == [
        "Error: no HL7 v2 message (no MSH segment) and no FHIR JSON"
    ]


# -- the Try page and POST /api/routes/test ---------------------------------------------


def go(tmp_path: Path, body: Any) -> None:
    async def main() -> None:
        async with ui_engine(tmp_path) as rig:
            await body(rig)

    run(main(), timeout=90)


def _rows(rig: UiRig) -> int:
    return int(rig.db.conn.execute("SELECT count(*) FROM messages").fetchone()[0])


@pytest.mark.store
def test_try_api_decides_and_stores_nothing(tmp_path: Path) -> None:
    async def body(rig: UiRig) -> None:
        before = _rows(rig)
        text = _two(b"\n").decode()
        async with httpx.AsyncClient(base_url=rig.base) as http:
            r = await http.post("/api/routes/test", json={"message": text},
                                headers=rig.bearer("ana"))  # fmt: skip
            assert r.status_code == 200, r.text
            items = r.json()["items"]
            assert [i["status"] for i in items] == ["routed", "filtered"]
            assert items[0]["extracted"]["ref-new"]["placer_number"] == "REF-T-1"
            r = await http.post("/api/routes/test", json={"message": text},
                                headers=rig.bearer("casey"))  # fmt: skip
            assert r.status_code == 403  # a coordinator does not read messages
            r = await http.post("/api/routes/test", json={"message": "hello"},
                                headers=rig.bearer("ana"))  # fmt: skip
            assert r.status_code == 400 and "no HL7 v2 message" in r.json()["error"]
            r = await http.post("/api/routes/test", json={"message": text, "source": "nope"},
                                headers=rig.bearer("ana"))  # fmt: skip
            assert r.status_code == 400 and r.json()["error"] == "unknown source"
            huge = {"message": "MSH|" + "x" * (1024 * 1024)}  # over the HTTP body limit
            r = await http.post("/api/routes/test", json=huge, headers=rig.bearer("ana"))
            assert r.status_code == 413 and r.json() == {"error": "the body is over 1 MiB"}
        await asyncio.sleep(0.2)  # the processor would have picked up anything stored
        assert _rows(rig) == before
        assert rig.db.conn.execute("SELECT count(*) FROM referrals").fetchone()[0] == 0

    go(tmp_path, body)


@pytest.mark.store
def test_try_page_paste_upload_csrf_and_role(tmp_path: Path) -> None:
    async def body(rig: UiRig) -> None:
        async with httpx.AsyncClient(base_url=rig.base) as http:
            await login(http, rig.base, "ana")
            page = await http.get("/ui/try")
            assert page.status_code == 200 and 'name="message"' in page.text
            csrf = csrf_of(page.text)
            pasted = await http.post(
                "/ui/try", data={"csrf": csrf, "message": _two(b"\n").decode()}
            )
            assert pasted.status_code == 200
            assert 'data-testid="trial-route">ref-new<' in pasted.text
            assert "REF-T-1" in pasted.text and "no route matched ADT^A01" in pasted.text
            uploaded = await http.post(
                "/ui/try", data={"csrf": csrf, "message": ""},
                files={"file": ("m.hl7", ref_i12("REF-UP-1", "up-1"), "application/octet-stream")},
            )  # fmt: skip
            assert uploaded.status_code == 200 and "REF-UP-1" in uploaded.text
            bad = await http.post("/ui/try", data={"csrf": csrf, "message": "hello"})
            assert bad.status_code == 400 and "no HL7 v2 message" in bad.text
            forged = await http.post("/ui/try", data={"csrf": "x", "message": "MSH|"})
            assert forged.status_code == 403
        async with httpx.AsyncClient(base_url=rig.base) as http:
            await login(http, rig.base, "casey")
            assert (await http.get("/ui/try")).status_code == 403
            assert (await http.get("/ui/sources")).status_code == 403
        assert _rows(rig) == 0

    go(tmp_path, body)


# -- sources ------------------------------------------------------------------------------


@pytest.mark.store
def test_sources_figures_api_page_and_cli_agree(tmp_path: Path) -> None:
    async def body(rig: UiRig) -> None:
        await rig.send(ref_i12("REF-S-1", "s-1"), ADT)
        await rig.wait_referral("REF-S-1")
        # a peer that sends bytes outside any frame: its connection is closed, a problem
        reader, writer = await asyncio.open_connection("127.0.0.1", rig.mllp_port)
        writer.write(frame(hl7("s-2")) + b"x" * 70_000)
        await asyncio.wait_for(reader.read(), 5)  # to EOF: the listener closed it
        writer.close()
        await writer.wait_closed()
        _, held = await asyncio.open_connection("127.0.0.1", rig.mllp_port)  # stays open
        try:
            await _until(lambda: _rows(rig) == 3 and _processed(rig))
            async with httpx.AsyncClient(base_url=rig.base) as http:
                await _until_async(lambda: _open(http, rig), 1)
                api = (await http.get("/api/sources", headers=rig.bearer("ana"))).json()["items"]
                await login(http, rig.base, "ana")
                page = (await http.get("/ui/sources")).text
            cli = await _cli_status(rig, tmp_path)
        finally:
            held.close()
            await held.wait_closed()
        (ehr,) = [s for s in api if s["name"] == "ehr"]
        assert ehr["kind"] == "mllp" and ehr["connections_open"] == 1
        assert ehr["today"] == {"received": 0, "routed": 1, "filtered": 2, "error": 0,
                                "rejected": 0}  # fmt: skip
        assert ehr["today_total"] == 3
        assert ehr["last_message_at"].endswith("Z") and ehr["last_error_at"].endswith("Z")
        assert ehr["last_error"] == "too many bytes outside any frame (connection closed)"
        assert cli == api  # the same figures, from the database and /metrics
        assert 'data-source="ehr"' in page and "too many bytes outside any frame" in page

    go(tmp_path, body)


def _processed(rig: UiRig) -> bool:
    row = rig.db.conn.execute("SELECT count(*) FROM messages WHERE status = 'received'").fetchone()
    return int(row[0]) == 0


async def _open(http: httpx.AsyncClient, rig: UiRig) -> int:
    r = await http.get("/api/sources", headers=rig.bearer("ana"))
    return int(r.json()["items"][0]["connections_open"])


async def _until(check: Any, timeout: float = 5.0) -> None:
    async def poll() -> None:
        while not check():
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), timeout)


async def _until_async(get: Any, want: Any, timeout: float = 5.0) -> None:
    async def poll() -> None:
        while await get() != want:
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), timeout)


async def _cli_status(rig: UiRig, tmp_path: Path) -> Any:
    """``refloop sources status --json`` against the running engine's database and
    /metrics (run asynchronously: the engine must keep serving while it reads)."""
    routes = tmp_path / "cli-routes.yaml"
    routes.write_text(yaml.safe_dump(ui_config(), sort_keys=False), encoding="utf-8")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engine.cli",
        *cli_args("sources", "status", "--json", "--routes", str(routes),
                  "--state", str(tmp_path / "state"), "--metrics-url", f"{rig.base}/metrics"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err
    assert err == b""  # the daemon answered: no "live figures left out" note
    items = json.loads(out)
    for item in items:  # the CLI's config has port 0: only the address may differ
        item["address"] = next(s["address"] for s in await _api(rig) if s["name"] == item["name"])
    return items


async def _api(rig: UiRig) -> Any:
    async with httpx.AsyncClient(base_url=rig.base) as http:
        return (await http.get("/api/sources", headers=rig.bearer("ana"))).json()["items"]


@pytest.mark.store
def test_sources_status_without_a_daemon(tmp_path: Path) -> None:
    async def fill(rig: UiRig) -> None:
        await rig.send(ref_i12("REF-S-2", "s-2"))
        await rig.wait_referral("REF-S-2")

    go(tmp_path, fill)
    routes = tmp_path / "r.yaml"
    config = ui_config(http_port=_free_closed_port())
    routes.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    out = refloop("sources", "status", "--routes", str(routes), "--state", str(tmp_path / "state"))
    assert out.returncode == 0, out.stderr
    assert b"live figures left out" in out.stderr
    lines = out.stdout.decode().splitlines()
    assert lines[0].startswith("SOURCE") and len(lines) == 2
    cells = lines[1].split()  # ehr mllp - DATE TIME TODAY ROUTED FILTER ERROR REJECT -
    assert cells[:3] == ["ehr", "mllp", "-"]  # connections unknown without the daemon
    assert cells[5:10] == ["1", "1", "0", "0", "0"]


def _free_closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_configured_sources_lists_mllp_fhir_and_direct() -> None:
    from engine.config import loads
    from engine.ingest.status import Source, configured_sources

    doc = {
        "version": 1,
        "http": {"enabled": False},
        "sources": {
            "ehr": {"type": "mllp", "host": "127.0.0.1", "port": 0},
            "chart": {"type": "fhir", "base_url": "https://fhir.example.org/r4",
                      "resources": ["ServiceRequest"]},
        },
        "channels": {
            "direct": {"type": "direct", "address": "referrals@direct.clinic.example"},
            "fax": {"type": "fax"},
        },
    }  # fmt: skip
    cfg = loads(yaml.safe_dump(doc), file="t.yaml", env={})
    assert configured_sources(cfg, {"ehr": 2600}) == [
        Source("ehr", "mllp", "127.0.0.1:2600"),
        Source("chart", "fhir", "https://fhir.example.org/r4"),
        Source("direct", "direct", "referrals@direct.clinic.example"),
    ]


def test_last_received_and_failures_look_back_a_bounded_number_of_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engine.store import source_status as store
    from engine.store.db import open_database

    day = 1_796_428_800.0  # 2026-12-05T00:00:00Z
    db = open_database(tmp_path / "refloop.db")
    rows = [  # (received_at, source, status, error)
        (day - 2 * 86400, "lab", "rejected", "MSH-9 missing"),
        (day - 86400, "lab", "routed", ""),
        (day + 60, "ehr", "routed", ""),
        (day + 120, "ehr", "error", "route ref-new: no identifiers"),
    ]
    with db.transaction() as conn:
        for i, (at, source, status, error) in enumerate(rows):
            conn.execute(
                "INSERT INTO messages (received_at, source, peer, sending_app, "
                "sending_facility, receiving_app, receiving_facility, control_id, message_type, "
                "version, charset, sha256, status, ack_code, error, duplicates, flags, route) "
                "VALUES (?, ?, '', '', '', '', '', ?, 'ADT^A01', '2.5.1', '', ?, ?, 'AA', ?, 0, "
                "'', '')",
                (at, source, f"c{i}", f"{i:064x}", status, error),
            )
    names = ["ehr", "lab", "never"]
    assert store.counts_since(db.conn, day) == {"ehr": {"routed": 1, "error": 1}}
    assert store.last_received(db.conn, names, day) == {"ehr": day + 120, "lab": day - 86400}
    failures = store.last_failures(db.conn, names)
    assert failures["ehr"] == store.Failure(4, day + 120, "error", "route ref-new: no identifiers")
    assert failures["lab"] == store.Failure(1, day - 2 * 86400, "rejected", "MSH-9 missing")
    monkeypatch.setattr(store, "LOOKBACK_ROWS", 2)  # lab's rows are older than the newest 2
    assert store.last_received(db.conn, names, day) == {"ehr": day + 120}
    assert set(store.last_failures(db.conn, names)) == {"ehr"}
    db.close()
