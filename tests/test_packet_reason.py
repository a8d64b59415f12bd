"""Issue 13.6: the packet's "Reason for referral" is the reason recorded on the referral.

A REF^I12 carries both RF1-10 (referral reason, table 0336: ``P^Provider Ordered``) and
OBR-31 (reason for study: the clinical reason). The shipped route records OBR-31; the
packet the daemon faxes (to a loopback Phaxio) must show the same text.
"""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

from helpers import WAIT, Daemon, peer, refloop, run, shipped_routes
from pypdf import PdfReader
from test_fax import FakePhaxio, serve

CLINICAL = "Exertional chest pain with abnormal stress ECG"

REF = (
    "MSH|^~\\&|EHR|NORTHSIDE|REFLOOP|HUB|20260105090000||REF^I12^REF_I12|PK-1|P|2.5.1\r"
    "RF1|P^Pending^HL70283|R^Routine^HL70280|Med||O|PK-100^NORTH_EHR|20260105|||"
    "P^Provider Ordered^HL70336\r"
    "PRD|RP^Referring^HL70286|Home^Harriet^^^^MD|||||1234567802^NPI\r"
    "PRD|RT^Referred to^HL70286|Smith^Ann^^^^MD|||^WPN^FX^^^555^0100777||1234567893^NPI\r"
    "PID|1||MRN1^^^NORTHSIDE^MR||Doe^Jane||19700101|F\r"
    "OBR|1|PK-100^NORTH_EHR||REFCARD^Cardiology referral^L" + "|" * 27 + f"^{CLINICAL}\r"
).encode()


def test_packet_shows_the_recorded_reason(daemon: Daemon, tmp_path: Path) -> None:
    phaxio = FakePhaxio()

    secrets = {}
    for name, value in (("key", "key"), ("secret", "secret"), ("token", "fax-callback-token")):
        (tmp_path / name).write_text(value)
        secrets[name] = f"${{file:{tmp_path / name}}}"

    async def body() -> str:
        async with serve(phaxio.app) as base:
            daemon.routes = shipped_routes(
                tmp_path / "routes.yaml",
                http={
                    "host": "127.0.0.1",
                    "port": "${REFLOOP_HTTP_PORT:-8575}",
                    "public_url": "https://refloop.example",
                },
                channels={
                    "fax": {
                        "type": "fax",
                        "api_url": f"{base}/v2",
                        "api_key": secrets["key"],
                        "api_secret": secrets["secret"],
                        "callback_token": secrets["token"],
                    }
                },
            )
            await asyncio.to_thread(daemon.start)
            async with peer(daemon.mllp) as p:
                code = (await p.ask(REF, timeout=20.0)).code
            async with asyncio.timeout(4 * WAIT):
                while not phaxio.posts:
                    await asyncio.sleep(0.02)  # waiting for the fax to arrive
            return code

    assert run(body()) == "AA"
    post = phaxio.posts[0]
    assert post["to"] == "+15550100777"  # E.164 of the NANP number in PRD-5
    text = "".join(page.extract_text() for page in PdfReader(io.BytesIO(post["pdf"])).pages)
    flat = " ".join(text.split())
    assert CLINICAL in flat
    assert "Provider Ordered" not in flat

    shown = refloop(
        "referrals",
        "list",
        "--json",
        "--state",
        str(daemon.state_dir),
        "--routes",
        str(daemon.routes),
    )
    assert shown.returncode == 0, shown.stderr.decode()
    (rid,) = [r["id"] for r in json.loads(shown.stdout)]
    detail = refloop(
        "referrals", "show", str(rid), "--json", "--state", str(daemon.state_dir),
        "--routes", str(daemon.routes),
    )  # fmt: skip
    assert json.loads(detail.stdout)["details"]["reason"] == CLINICAL
