"""Issue 13.1, through the live engine: only the specialist a packet went to can confirm
or close its referral by Direct.

A REF^I12 arrives over MLLP at a running :class:`~engine.app.Engine` (real database file
under its state directory); the packet is signed, encrypted and submitted to a loopback
aiosmtpd HISP; the MDNs and replies come back over SMTP to the engine's own Direct
listener, signed and encrypted with certificates made at run time under one trust anchor.

* A third clinic's valid certificate, bound to its own address (Direct AS v1.3 §4), makes
  its mail authentic, not an answer to someone else's packet: its ``dispatched`` MDN and
  its PDF reply quoting the packet's Message-ID are quarantined (``sender-not-recipient``)
  and the referral does not move. The test hands the third party the real Message-ID (as
  if it had seen the packet), so the check cannot lean on the Message-ID being secret.
* A signer certificate that is not bound to the From address by subjectAltName
  (rfc822Name = the address, or dNSName = its domain) is quarantined (``signer-mismatch``).
* The specialist's own MDNs and reply still confirm and close the referral; so does an
  org-bound (dNSName) certificate of the specialist's domain.
* Packet Message-IDs are random (128 bits), stored with the outbox row before the first
  send, and kept across a retry; rows written before that column still answer to the
  Message-ID recorded as their provider id.
"""

from __future__ import annotations

import asyncio
import base64
import email
import itertools
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib
import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from cryptography import x509
from cryptography.x509.oid import NameOID
from direct_pki import (
    OUR_ADDRESS,
    SPECIALIST,
    Issued,
    issue,
    make_direct_pki,
    smtp_server,
    tls_server_context,
)
from direct_pki import Pki as DirectPki
from prometheus_client import CollectorRegistry
from test_fax import FakePhaxio, serve
from test_packet_flow import NPI_DIRECT, T0, config, ref_i12

from channels.direct import smime
from engine.app import Engine
from engine.clock import VirtualClock
from engine.hl7v2.client import MllpClient
from engine.model import Identifiers, Provider, ReferralCreated
from engine.store import migrations as db_module
from engine.store import outbox
from engine.store import referrals as rstore
from engine.store.db import open_database
from engine.tracking.specialists import import_csv
from engine.tracking.tracker import Tracker

pytestmark = pytest.mark.store  # every test here uses the store

THIRD = "intake@direct.otherclinic.test"  # another clinic, same trust anchor
NURSE = "nurse@direct.specialist.test"  # the specialist's colleague: same domain
SPECIALIST_DOMAIN = SPECIALIST.rpartition("@")[2]
CONSULT = b"%PDF-1.4\nconsult note\n%%EOF\n"
# RFC 5322 msg-id as the channel writes it: 32 hex digits = 128 random bits
_SERIAL = itertools.count(1)
PACKET_ID = re.compile(r"<refloop\.[0-9a-f]{32}@direct\.clinic\.test>")


@dataclass(frozen=True)
class Certs:
    direct: DirectPki
    third: Issued  # rfc822Name THIRD
    nurse: Issued  # rfc822Name NURSE
    org: Issued  # dNSName direct.specialist.test (org-bound)
    other_org: Issued  # dNSName direct.otherclinic.test
    legacy: Issued  # no subjectAltName; emailAddress SPECIALIST in the subject DN


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    tmp = tmp_path_factory.mktemp("answerers-pki")
    pki = make_direct_pki(tmp)
    anchor = pki.anchor
    legacy_subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "Dr Legacy"),
            x509.NameAttribute(NameOID.EMAIL_ADDRESS, SPECIALIST),
        ]
    )
    return Certs(
        direct=pki,
        third=issue(tmp, anchor, "third", THIRD),
        nurse=issue(tmp, anchor, "nurse", NURSE),
        org=issue(tmp, anchor, "org", SPECIALIST, san=[x509.DNSName(SPECIALIST_DOMAIN)]),
        other_org=issue(
            tmp, anchor, "other-org", SPECIALIST, san=[x509.DNSName("direct.otherclinic.test")]
        ),
        legacy=issue(tmp, anchor, "legacy", SPECIALIST, san=[], subject=legacy_subject),
    )


# ---------------------------------------------------------------------------
# What other HISPs send us (signed by ``signer``, From ``sender``, encrypted to us)


def mail(certs: Certs, signer: Issued, sender: str, content: str, extra: str = "") -> bytes:
    body = smime.protect(
        smime.canonicalize(content.encode()), signer.identity, [certs.direct.ours.cert]
    )
    head = (
        f"From: {sender}\r\nTo: {OUR_ADDRESS}\r\nSubject: Re: Referral\r\n"
        f"Message-ID: <answer-{next(_SERIAL)}@answer.test>\r\n{extra}"
    )
    return head.encode() + body


def mdn(certs: Certs, signer: Issued, sender: str, original: str, disposition: str) -> bytes:
    """RFC 8098 §3 / Delivery Notification IG §3: a disposition-notification report."""
    content = (
        'Content-Type: multipart/report; report-type=disposition-notification; boundary="b"\r\n'
        f"\r\n--b\r\nContent-Type: text/plain\r\n\r\nYour message was {disposition}.\r\n"
        "--b\r\nContent-Type: message/disposition-notification\r\n\r\n"
        f"Reporting-UA: hisp.test; test\r\nFinal-Recipient: rfc822;{SPECIALIST}\r\n"
        f"Original-Message-ID: {original}\r\n"
        f"Disposition: automatic-action/MDN-sent-automatically;{disposition}\r\n"
        + ("X-DIRECT-FINAL-DESTINATION-DELIVERY: \r\n" if disposition == "dispatched" else "")
        + "\r\n--b--\r\n"
    )
    return mail(certs, signer, sender, content)


def reply(certs: Certs, signer: Issued, sender: str, original: str) -> bytes:
    pdf64 = base64.encodebytes(CONSULT).decode()
    content = (
        'Content-Type: multipart/mixed; boundary="r"\r\n\r\n'
        "--r\r\nContent-Type: text/plain\r\n\r\nConsult note attached.\r\n"
        "--r\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n"
        'Content-Disposition: attachment; filename="consult.pdf"\r\n\r\n' + pdf64 + "\r\n"
        "--r--\r\n"
    )
    return mail(certs, signer, sender, content, f"In-Reply-To: {original}\r\n")


# ---------------------------------------------------------------------------
# The live engine with a referral whose packet went out by Direct


class Hisp:
    """Our HISP's submission port: the first ``refuse`` DATA commands get 451."""

    def __init__(self, refuse: int = 0) -> None:
        self.messages: list[bytes] = []
        self.refuse = refuse

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.original_content, bytes)
        self.messages.append(envelope.original_content)
        if self.refuse:
            self.refuse -= 1
            return "451 4.3.0 try again"
        return "250 2.0.0 queued"


@dataclass
class Live:
    engine: Engine
    clock: VirtualClock
    hisp: Hisp
    send: Callable[[bytes], Awaitable[None]]

    def referral(self) -> rstore.ReferralRow:
        assert self.engine.db is not None
        rid = rstore.find_by_key(self.engine.db.conn, "CLINIC", "REF-A")
        assert rid is not None
        row = rstore.get_referral(self.engine.db.conn, rid)
        assert row is not None
        return row

    def packet_row(self) -> outbox.Item:
        assert self.engine.db is not None
        (row,) = [
            r for r in rstore.outbox_for(self.engine.db.conn, self.referral().id)
            if r.channel == "direct"
        ]  # fmt: skip
        item = outbox.get(self.engine.db.conn, row.id)
        assert item is not None
        return item

    def direct_inbox(self) -> list[tuple[str, str, str]]:
        """(message type, status, error) of every stored inbound Direct message."""
        assert self.engine.inbox is not None
        rows = self.engine.inbox.list(source="direct", limit=0, newest_first=False)
        return [(r.message_type, r.status, r.error) for r in rows]

    def state(self) -> tuple[str, str, str, str]:
        r = self.referral()
        return r.status, r.specialist_status, r.close_reason, self.packet_row().provider_status


@asynccontextmanager
async def live(
    tmp: Path, certs: Certs, hisp: Hisp, *, state: Path | None = None
) -> AsyncIterator[Live]:
    pki = certs.direct
    tls = tls_server_context(pki.tmp, pki.anchor)
    async with (
        smtp_server(hisp, tls_context=tls, require_starttls=True) as hisp_port,
        serve(FakePhaxio().app) as phaxio_url,
    ):
        clock = VirtualClock(T0)
        engine = Engine(
            config(tmp, pki, hisp_port, phaxio_url),
            state or tmp / "state",
            clock=clock,
            registry=CollectorRegistry(),
            background=False,
            drain_seconds=2.0,
        )
        await engine.start()
        port = engine.ports()["direct:direct"]

        async def send(raw: bytes) -> None:
            # returns after the listener's 250, which follows the engine's commit
            await aiosmtplib.send(
                raw,
                sender="hisp@answer.test",
                recipients=[OUR_ADDRESS],
                hostname="127.0.0.1",
                port=port,
                start_tls=False,
                timeout=10,
            )

        try:
            yield Live(engine, clock, hisp, send)
        finally:
            await engine.stop()


def directory(tmp: Path, certs: Certs) -> Path:
    csv = tmp / "specialists.csv"
    csv.write_text(
        "npi,name,specialty,direct_address,fax,certificate\n"
        f"{NPI_DIRECT},Dr Ann Smith,cardiology,{SPECIALIST},,{certs.direct.specialist.cert_path}\n"
    )
    return csv


async def referral_with_packet(lv: Live, tmp: Path, certs: Certs) -> str:
    """REF-A over MLLP, its packet out through the HISP; returns the packet's Message-ID."""
    engine = lv.engine
    assert engine.db is not None and engine.processor is not None
    assert engine.dispatcher is not None
    import_csv(engine.db, directory(tmp, certs), lv.clock)
    mllp = await MllpClient.connect("127.0.0.1", engine.ports()["ehr"], timeout=10)
    try:
        assert (await mllp.send(ref_i12("REF-A", NPI_DIRECT, "c1"))).code == "AA"
    finally:
        await mllp.close()
    engine.processor.process_available()
    assert await engine.dispatcher.run_once("direct") == 1
    return str(email.message_from_bytes(lv.hisp.messages[-1])["Message-ID"])


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 60))  # type: ignore[arg-type]


SENT = ("open", "packet-sent", "", "accepted")
NOT_RECIPIENT = ("direct/quarantined", "rejected", "quarantined: sender-not-recipient")
MISMATCH = ("direct/quarantined", "rejected", "quarantined: signer-mismatch")


# ---------------------------------------------------------------------------
# (b) the From address must be the packet's recipient


def test_third_party_mdn_and_reply_are_quarantined_recipient_still_closes(
    tmp_path: Path, certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    packet_ids: list[str] = []

    async def main() -> None:
        async with live(tmp_path, certs, Hisp()) as lv:
            packet_id = await referral_with_packet(lv, tmp_path, certs)
            packet_ids.append(packet_id)
            assert lv.state() == SENT
            third = certs.third
            await lv.send(mdn(certs, third, THIRD, packet_id, "processed"))
            await lv.send(mdn(certs, third, THIRD, packet_id, "dispatched"))
            await lv.send(reply(certs, third, THIRD, packet_id))
            # a display name quoting the specialist's address does not make it theirs
            await lv.send(mdn(certs, third, f'"{SPECIALIST}" <{THIRD}>', packet_id, "dispatched"))
            assert lv.state() == SENT  # nothing moved: not delivered, confirmed or closed
            assert lv.direct_inbox() == [NOT_RECIPIENT] * 4
            kinds = [e.kind for e in rstore.timeline(lv.engine.db.conn, lv.referral().id)]  # type: ignore[union-attr]
            assert kinds == ["referral-created", "packet-sent"]

            # the specialist the packet went to: delivered, confirmed, closed
            spec = certs.direct.specialist
            await lv.send(mdn(certs, spec, SPECIALIST, packet_id, "processed"))
            assert lv.state() == ("open", "delivered", "", "processed")
            await lv.send(mdn(certs, spec, f"Dr Ann Smith <{SPECIALIST}>", packet_id, "dispatched"))
            assert lv.state() == ("specialist-confirmed", "confirmed", "", "dispatched")
            await lv.send(reply(certs, spec, SPECIALIST.upper(), packet_id))
            assert lv.state() == ("closed", "report-received", "report-received", "dispatched")
            assert lv.direct_inbox()[4:] == [("direct/pdf", "routed", "")]

    run(main())
    # the log names outbox rows and reason codes: no Message-ID, address or patient
    secret = (*packet_ids, SPECIALIST, THIRD, "Doe", "MRN1", "19700101")
    leaks = [r.getMessage() for r in caplog.records if any(x in r.getMessage() for x in secret)]
    assert caplog.records and not leaks, leaks


# ---------------------------------------------------------------------------
# (a) the signer certificate must be bound to the From address by subjectAltName

SAN_CASES = [
    ("rfc822Name-of-a-colleague", "nurse"),
    ("dNSName-of-another-domain", "other_org"),
    ("emailAddress-in-subject-only", "legacy"),
]


@pytest.mark.parametrize("signer", [c[1] for c in SAN_CASES], ids=[c[0] for c in SAN_CASES])
def test_signer_not_bound_to_from_is_quarantined(tmp_path: Path, certs: Certs, signer: str) -> None:
    cert: Issued = getattr(certs, signer)

    async def main() -> None:
        async with live(tmp_path, certs, Hisp()) as lv:
            packet_id = await referral_with_packet(lv, tmp_path, certs)
            await lv.send(mdn(certs, cert, SPECIALIST, packet_id, "dispatched"))
            await lv.send(reply(certs, cert, SPECIALIST, packet_id))
            assert lv.state() == SENT
            assert lv.direct_inbox() == [MISMATCH, MISMATCH]

    run(main())


def test_org_bound_certificate_of_the_recipients_domain_confirms(
    tmp_path: Path, certs: Certs
) -> None:
    async def main() -> None:
        async with live(tmp_path, certs, Hisp()) as lv:
            packet_id = await referral_with_packet(lv, tmp_path, certs)
            await lv.send(mdn(certs, certs.org, SPECIALIST, packet_id, "dispatched"))
            assert lv.state() == ("specialist-confirmed", "confirmed", "", "dispatched")

    run(main())


# ---------------------------------------------------------------------------
# Random Message-IDs, stored with the row


def test_packet_message_ids_are_random_and_stored_with_the_row(
    tmp_path: Path, certs: Certs
) -> None:
    """Two daemons given the same referral (same referral id, same idempotency key) send
    its packet under different Message-IDs: nothing about it can be computed."""
    ids: list[str] = []
    rows: list[outbox.Item] = []

    async def main(n: int) -> None:
        (tmp_path / str(n)).mkdir()
        async with live(tmp_path / str(n), certs, Hisp()) as lv:
            ids.append(await referral_with_packet(lv, tmp_path / str(n), certs))
            rows.append(lv.packet_row())
            assert rows[-1].idempotency_key == f"{lv.referral().id}:send-packet:1"

    run(main(1))
    run(main(2))
    assert ids[0] != ids[1]
    assert all(PACKET_ID.fullmatch(i) for i in ids), ids
    assert [r.message_id for r in rows] == ids  # stored with the row it was sent for


def test_from_display_name_holding_an_address_is_read_right(tmp_path: Path, certs: Certs) -> None:
    """RFC 5322 §3.4: the mailbox is the angle-addr, not an address in the phrase."""

    async def main() -> None:
        async with live(tmp_path, certs, Hisp()) as lv:
            packet_id = await referral_with_packet(lv, tmp_path, certs)
            sender = f'"Ann Smith ({SPECIALIST})" <{SPECIALIST}>'
            await lv.send(mdn(certs, certs.direct.specialist, sender, packet_id, "dispatched"))
            assert lv.state() == ("specialist-confirmed", "confirmed", "", "dispatched")

    run(main())


def test_a_retry_resubmits_the_stored_message_id(tmp_path: Path, certs: Certs) -> None:
    async def main() -> None:
        async with live(tmp_path, certs, Hisp(refuse=1)) as lv:
            await referral_with_packet(lv, tmp_path, certs)  # 451: retried later
            assert lv.packet_row().status == "pending"
            lv.clock.advance(3600)
            assert lv.engine.dispatcher is not None
            assert await lv.engine.dispatcher.run_once("direct") == 1
            first, second = (
                str(email.message_from_bytes(m)["Message-ID"]) for m in lv.hisp.messages
            )
            assert first == second == lv.packet_row().message_id
            await lv.send(mdn(certs, certs.direct.specialist, SPECIALIST, first, "dispatched"))
            assert lv.state()[:2] == ("specialist-confirmed", "confirmed")

    run(main())


@pytest.mark.empty_store
def test_rows_from_before_the_migration_still_answer_to_their_message_id(
    tmp_path: Path, certs: Certs
) -> None:
    """A database written before ``outbox.message_id`` existed, with a packet already
    sent under the old derived Message-ID: after the upgrade, the specialist's MDN
    still confirms it and a third party's is still quarantined."""
    state = tmp_path / "state"
    state.mkdir()
    before = db_module.MIGRATIONS[: db_module.MIGRATIONS.index(db_module._m_outbox_message_id)]
    old = open_database(state / "refloop.db", migrations=before)
    clock = VirtualClock(T0)
    import_csv(old, directory(tmp_path, certs), clock)
    with old.transaction() as conn:
        rid = (
            Tracker(old, clock)
            .apply(
                ReferralCreated(
                    ids=Identifiers(sending_facility="CLINIC", placer_number="REF-A"),
                    occurred_at=T0,
                    specialist=Provider(name="Dr Ann Smith", npi=NPI_DIRECT),
                ),
                conn,
            )
            .referral_id
        )
        legacy_id = "<refloop.5f0c4b1e9d7a3c2b8e6f4a1d0c9b8a7e@direct.clinic.test>"
        conn.execute(  # what the old dispatcher recorded for a sent packet
            "UPDATE outbox SET status = 'sent', recipient = ?, provider_id = ?, "
            "provider_status = 'accepted' WHERE referral_id = ? AND channel = 'direct'",
            (SPECIALIST, legacy_id, rid),
        )
    old.close()

    async def main() -> None:
        async with live(tmp_path, certs, Hisp(), state=state) as lv:
            assert lv.packet_row().message_id == ""
            await lv.send(mdn(certs, certs.third, THIRD, legacy_id, "dispatched"))
            assert lv.state()[0] == "open"
            await lv.send(mdn(certs, certs.direct.specialist, SPECIALIST, legacy_id, "dispatched"))
            assert lv.state() == ("specialist-confirmed", "confirmed", "", "dispatched")
            assert lv.direct_inbox() == [NOT_RECIPIENT]

    run(main())
