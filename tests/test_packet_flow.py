"""Acceptance 5, in process: two REF^I12 referrals arrive over MLLP at a running Engine
on a virtual clock. The Direct-capable specialist's packet is signed, encrypted and
submitted to a real aiosmtpd HISP on loopback (STARTTLS); the specialist's HISP answers
with signed and encrypted MDNs and a reply carrying the consult note, delivered to the
engine's own Direct listener. The fax-only specialist's packet goes to a loopback
Phaxio; the office confirms with the link printed in the faxed PDF, and the report comes
back as an ORU over MLLP. Both referrals reach ``specialist-confirmed``, then ``closed``
(report-received)."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import email
import email.policy
import io
from pathlib import Path
from typing import Any

import aiosmtplib
import httpx
import pytest
import yaml
from aiosmtpd.smtp import SMTP, Envelope, Session
from direct_pki import (
    OUR_ADDRESS,
    SPECIALIST,
    Pki,
    make_direct_pki,
    smtp_server,
    tls_server_context,
)
from prometheus_client import CollectorRegistry
from pypdf import PdfReader
from test_fax import FakePhaxio, serve

from channels.direct import smime
from channels.fax.phaxio import phaxio_signature
from engine.app import Engine
from engine.clock import VirtualClock
from engine.config import loads
from engine.hl7v2.client import MllpClient
from engine.store import referrals as rstore
from engine.tracking.specialists import import_csv

pytestmark = pytest.mark.store  # every test here uses the store

ROOT = Path(__file__).resolve().parent.parent
T0 = dt.datetime.now(dt.UTC).timestamp()  # certificates are checked at the clock's time
PUBLIC = "https://refloop.example"
FAX_TOKEN = "fax-callback-token"
CONFIRM_KEY = "k" * 40
NPI_DIRECT, NPI_FAX = "1234567893", "9876543205"
FAX_NUMBER = "+15555550100"
CONSULT = b"%PDF-1.4\nconsult note for REF-A\n%%EOF\n"


class Hisp:
    """Our HISP's submission port: keeps every message it accepts."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.original_content, bytes)
        self.messages.append(envelope.original_content)
        return "250 2.0.0 queued"


def ref_i12(placer: str, npi: str, control: str) -> bytes:
    segments = [
        f"MSH|^~\\&|EHR|CLINIC|REFLOOP|CLINIC|20260101090000||REF^I12^REF_I12|{control}|P|2.5.1",
        f"RF1|A^Accepted^HL70283|R^Routine^HL70280|Med||O|{placer}^CLINIC|20260101|||^Chest pain",
        "PRD|RP^Referring^HL70286|Home^Harriet^^^^MD|||||1234567802^NPI",
        f"PRD|RT^Referred to^HL70286|Smith^Ann^^^^MD|||||{npi}^NPI",
        "PID|1||MRN1^^^CLINIC^MR||Doe^Jane||19700101|F",
        f"OBR|1|{placer}^CLINIC||REFCARD^Cardiology referral^L",
    ]
    return "\r".join(segments).encode() + b"\r"


def oru(placer: str) -> bytes:
    segments = [
        "MSH|^~\\&|SPEC|SPECFAC|REFLOOP|CLINIC|20260120090000||ORU^R01|oru-1|P|2.5.1",
        "PID|1||MRN1^^^CLINIC^MR||Doe^Jane",
        f"OBR|1|{placer}^CLINIC|CONSULT-9^SPEC|11488-4^Consult note^LN" + "|" * 21 + "F",
    ]
    return "\r".join(segments).encode() + b"\r"


def signed_mail(pki: Pki, content: str, message_id: str, extra: str = "") -> bytes:
    """What the specialist's HISP sends us: signed by the specialist, encrypted to us."""
    body = smime.protect(
        smime.canonicalize(content.encode()), pki.specialist.identity, [pki.ours.cert]
    )
    head = (
        f"From: {SPECIALIST}\r\nTo: {OUR_ADDRESS}\r\nSubject: Re: Referral\r\n"
        f"Message-ID: {message_id}\r\n{extra}"
    )
    return head.encode() + body


def mdn(pki: Pki, original: str, disposition: str) -> bytes:
    content = (
        'Content-Type: multipart/report; report-type=disposition-notification; boundary="b"\r\n'
        f"\r\n--b\r\nContent-Type: text/plain\r\n\r\nYour message was {disposition}.\r\n"
        "--b\r\nContent-Type: message/disposition-notification\r\n\r\n"
        f"Reporting-UA: hisp.specialist.test; test\r\nFinal-Recipient: rfc822;{SPECIALIST}\r\n"
        f"Original-Message-ID: {original}\r\n"
        f"Disposition: automatic-action/MDN-sent-automatically;{disposition}\r\n"
        + ("X-DIRECT-FINAL-DESTINATION-DELIVERY: \r\n" if disposition == "dispatched" else "")
        + "\r\n--b--\r\n"
    )
    return signed_mail(pki, content, f"<mdn-{disposition}@direct.specialist.test>")


def reply(pki: Pki, original: str) -> bytes:
    pdf64 = base64.encodebytes(CONSULT).decode()
    content = (
        'Content-Type: multipart/mixed; boundary="r"\r\n\r\n'
        "--r\r\nContent-Type: text/plain\r\n\r\nConsult note attached.\r\n"
        "--r\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n"
        'Content-Disposition: attachment; filename="consult.pdf"\r\n\r\n' + pdf64 + "\r\n"
        "--r--\r\n"
    )
    return signed_mail(
        pki, content, "<reply-1@direct.specialist.test>", f"In-Reply-To: {original}\r\n"
    )


def config(tmp: Path, pki: Pki, hisp_port: int, phaxio: str) -> Any:
    data = yaml.safe_load((ROOT / "routes.yaml").read_text(encoding="utf-8"))
    data["sources"]["ehr"]["port"] = 0
    data["http"] = {
        "host": "127.0.0.1",
        "port": 0,
        "public_url": PUBLIC,
        "confirm_key": "${env:CONFIRM_KEY}",
    }
    f = {name: f"${{file:{path}}}" for name, path in (
        ("anchor", pki.anchor.cert_path),
        ("cert", pki.ours.cert_path),
        ("key", pki.ours.key_path),
    )}  # fmt: skip
    data["channels"] = {
        "direct": {
            "type": "direct",
            "address": OUR_ADDRESS,
            "hisp_host": "127.0.0.1",
            "hisp_port": hisp_port,
            "hisp_ca": f["anchor"],
            "cert": f["cert"],
            "key": f["key"],
            "trust_anchors": f["anchor"],
            "attach_original": True,
            "inbound": {"host": "127.0.0.1", "port": 0, "require_tls": False},
        },
        "fax": {
            "type": "fax",
            "api_url": f"{phaxio}/v2",
            "api_key": "${env:FAX_KEY}",
            "api_secret": "${env:FAX_SECRET}",
            "callback_token": "${env:FAX_TOKEN}",
        },
    }
    env = {
        "CONFIRM_KEY": CONFIRM_KEY,
        "FAX_KEY": "key",
        "FAX_SECRET": "secret",
        "FAX_TOKEN": FAX_TOKEN,
    }
    return loads(yaml.safe_dump(data, sort_keys=False), file=str(tmp / "routes.yaml"), env=env)


def pdf_link(pdf: bytes) -> str:
    for page in PdfReader(io.BytesIO(pdf)).pages:
        for annot in page.get("/Annots") or []:
            uri = annot.get_object().get("/A", {}).get("/URI")
            if uri:
                return str(uri)
    raise AssertionError("no link in the packet")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_direct_pki(tmp_path_factory.mktemp("packet-pki"))


def test_direct_and_fax_referrals_close_the_loop(tmp_path: Path, pki: Pki) -> None:
    hisp, phaxio = Hisp(), FakePhaxio()

    async def main() -> None:
        tls = tls_server_context(pki.tmp, pki.anchor)
        async with (
            smtp_server(hisp, tls_context=tls, require_starttls=True) as hisp_port,
            serve(phaxio.app) as phaxio_url,
        ):
            cfg = config(tmp_path, pki, hisp_port, phaxio_url)
            clock = VirtualClock(T0)
            engine = Engine(
                cfg,
                tmp_path / "state",
                clock=clock,
                registry=CollectorRegistry(),
                background=False,
                drain_seconds=2.0,
            )
            await engine.start()
            try:
                await scenario(engine, clock, hisp, phaxio, pki, tmp_path)
            finally:
                await engine.stop()

    asyncio.run(asyncio.wait_for(main(), 60))


async def scenario(
    engine: Engine, clock: VirtualClock, hisp: Hisp, phaxio: FakePhaxio, pki: Pki, tmp: Path
) -> None:
    db = engine.db
    assert db is not None and engine.processor is not None and engine.dispatcher is not None
    csv = tmp / "specialists.csv"
    csv.write_text(
        "npi,name,specialty,direct_address,fax,certificate\n"
        f"{NPI_DIRECT},Dr Ann Smith,cardiology,{SPECIALIST},,{pki.specialist.cert_path}\n"
        f"{NPI_FAX},Dr Fax Only,cardiology,,{FAX_NUMBER},\n"
    )
    import_csv(db, csv, clock)
    ports = engine.ports()
    mllp = await MllpClient.connect("127.0.0.1", ports["ehr"], timeout=10)
    try:
        await flows(engine, clock, hisp, phaxio, pki, mllp)
    finally:
        await mllp.close()


async def flows(
    engine: Engine, clock: VirtualClock, hisp: Hisp, phaxio: FakePhaxio, pki: Pki, mllp: Any
) -> None:
    db = engine.db
    assert db is not None and engine.processor is not None and engine.dispatcher is not None
    ports = engine.ports()

    async def deliver(raw: bytes) -> None:
        assert (await mllp.send(raw)).code == "AA"
        engine.processor.process_available()  # type: ignore[union-attr]

    def referral(placer: str) -> rstore.ReferralRow:
        rid = rstore.find_by_key(db.conn, "CLINIC", placer)
        assert rid is not None, placer
        row = rstore.get_referral(db.conn, rid)
        assert row is not None
        return row

    def rows(placer: str) -> list[tuple[str, str, str]]:
        return [
            (o.channel, o.template, o.status)
            for o in rstore.outbox_for(db.conn, referral(placer).id)
            if o.channel in ("direct", "fax", "task")
        ]

    await deliver(ref_i12("REF-A", NPI_DIRECT, "c1"))
    await deliver(ref_i12("REF-B", NPI_FAX, "c2"))
    assert rows("REF-A") == [("direct", "specialist-packet", "pending")]
    assert rows("REF-B") == [("fax", "specialist-packet", "pending")]

    # -- Direct: packet out through our HISP ---------------------------------------------
    assert await engine.dispatcher.run_once("direct") == 1
    assert rows("REF-A") == [("direct", "specialist-packet", "sent")]
    (raw,) = hisp.messages
    packet_id = str(email.message_from_bytes(raw)["Message-ID"])
    opened = smime.unprotect(
        raw,
        identities=[pki.specialist.identity],
        trust_anchors=[pki.anchor.cert],
        sender=OUR_ADDRESS,
        now=dt.datetime.fromtimestamp(clock.now(), dt.UTC),
    )
    content = email.message_from_bytes(opened.content, policy=email.policy.default)
    files = {
        p.get_filename(): p.get_payload(decode=True) for p in content.walk() if p.get_filename()
    }
    assert set(files) == {"referral.pdf", "original.hl7"}
    assert files["original.hl7"] == ref_i12("REF-A", NPI_DIRECT, "c1")
    text = "".join(p.extract_text() for p in PdfReader(io.BytesIO(files["referral.pdf"])).pages)
    assert "REF-A" in text and "Chest pain" in text
    assert referral("REF-A").specialist_status == "packet-sent"

    # -- Direct: the specialist's HISP answers (signed, encrypted) to our listener ----------
    async def to_listener(mail: bytes) -> None:
        await aiosmtplib.send(
            mail,
            sender=SPECIALIST,
            recipients=[OUR_ADDRESS],
            hostname="127.0.0.1",
            port=ports["direct:direct"],
            start_tls=False,
            timeout=10,
        )

    await to_listener(mdn(pki, packet_id, "processed"))
    assert referral("REF-A").specialist_status == "delivered"
    clock.advance(3600)
    await to_listener(mdn(pki, packet_id, "dispatched"))
    a = referral("REF-A")
    assert (a.status, a.specialist_status) == ("specialist-confirmed", "confirmed")
    assert "direct-mdn-timeout" not in [t.kind for t in rstore.timers_for(db.conn, a.id)]
    clock.advance(5 * 86400)
    await to_listener(reply(pki, packet_id))
    a = referral("REF-A")
    assert (a.status, a.close_reason) == ("closed", "report-received")
    kinds = [e.kind for e in rstore.timeline(db.conn, a.id)]
    assert kinds == [
        "referral-created",
        "packet-sent",
        "packet-delivered",
        "specialist-confirmed",
        "report-received",
    ]

    # -- Fax: packet out through Phaxio, delivered, confirmed by link, report by ORU ----------
    assert await engine.dispatcher.run_once("fax") == 1
    (post,) = phaxio.posts
    assert post["to"] == FAX_NUMBER and post["callback_url"] == f"{PUBLIC}/hooks/fax/phaxio"
    link = pdf_link(post["pdf"])
    assert link.startswith(f"{PUBLIC}/confirm/")
    assert referral("REF-B").specialist_status == "packet-sent"
    fields = {
        "success": "true",
        "is_test": "false",
        "direction": "sent",
        "fax": '{"id": 1000, "status": "success", "num_pages": 1}',
    }
    sig = phaxio_signature(f"{PUBLIC}/hooks/fax/phaxio", fields, {}, FAX_TOKEN)
    base = f"http://127.0.0.1:{ports['http']}"
    async with httpx.AsyncClient() as http:
        answer = await http.post(
            f"{base}/hooks/fax/phaxio", data=fields, headers={"X-Phaxio-Signature": sig}
        )
        assert answer.status_code == 200
        b = referral("REF-B")
        assert (b.status, b.specialist_status) == ("open", "delivered")  # not confirmed
        confirmed = await http.post(base + link.removeprefix(PUBLIC))
        assert confirmed.status_code == 200
    b = referral("REF-B")
    assert (b.status, b.specialist_status) == ("specialist-confirmed", "confirmed")
    await deliver(oru("REF-B"))
    b = referral("REF-B")
    assert (b.status, b.close_reason) == ("closed", "report-received")
