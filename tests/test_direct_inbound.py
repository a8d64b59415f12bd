"""Direct inbound: MDNs, DSNs and replies built by this test with ``openssl cms`` (signed
with the specialist HISP's key, encrypted to ours) are delivered over SMTP to refloop's
listener on loopback; each is classified as specified, and unsigned, forged or mismatched
mail is quarantined."""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
import subprocess
from collections.abc import Callable

import aiosmtplib
import pytest
from direct_pki import (
    OUR_ADDRESS,
    SPECIALIST,
    Issued,
    Pki,
    make_direct_pki,
    tls_client_context,
    tls_server_context,
)
from helpers import run

from channels.direct import smime
from channels.direct.inbound import (
    DirectHandler,
    DirectListener,
    ListenerSettings,
    attachment_kind,
    classify,
)
from engine.model import DirectInbound, DsnResult, MdnResult, Quarantined, ReplyWithAttachments

OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(OPENSSL is None, reason="openssl command-line tool needed")

PACKET_ID = "<refloop.0123456789abcdef0123456789abcdef@direct.clinic.test>"
PDF = b"%PDF-1.4\n" + bytes(range(256)) * 3 + b"\n%%EOF\n"
ORU = b"MSH|^~\\&|SPEC|SPECFAC|REFLOOP|CLINIC|20260102||ORU^R01|r1|P|2.5.1\rOBR|1|226839\r"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_direct_pki(tmp_path_factory.mktemp("direct-in-pki"))


def openssl(*args: str, data: bytes) -> bytes:
    assert OPENSSL is not None
    done = subprocess.run([OPENSSL, *args], input=data, capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


def mdn_body(disposition: str, *, final: bool = False) -> bytes:
    fields = (
        "Reporting-UA: hisp.specialist.test; test-hisp\r\n"
        f"Original-Recipient: rfc822;{SPECIALIST}\r\n"
        f"Final-Recipient: rfc822;{SPECIALIST}\r\n"
        f"Original-Message-ID: {PACKET_ID}\r\n"
        f"Disposition: automatic-action/MDN-sent-automatically;{disposition}\r\n"
        + ("X-DIRECT-FINAL-DESTINATION-DELIVERY: \r\n" if final else "")
    )
    return (
        'Content-Type: multipart/report; report-type=disposition-notification; boundary="mdn"\r\n'
        "\r\n--mdn\r\nContent-Type: text/plain\r\n\r\nYour message was " + disposition + ".\r\n"
        "--mdn\r\nContent-Type: message/disposition-notification\r\n\r\n" + fields + "\r\n"
        "--mdn--\r\n"
    ).encode()


def dsn_body() -> bytes:
    return (
        'Content-Type: multipart/report; report-type=delivery-status; boundary="dsn"\r\n'
        "\r\n--dsn\r\nContent-Type: text/plain\r\n\r\nNo dispatched MDN in time.\r\n"
        "--dsn\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; hisp.clinic.test\r\n\r\n"
        f"Final-Recipient: rfc822; {SPECIALIST}\r\nAction: failed\r\nStatus: 5.4.72\r\n\r\n"
        "--dsn\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"From: {OUR_ADDRESS}\r\nTo: {SPECIALIST}\r\nMessage-ID: {PACKET_ID}\r\n\r\n"
        "--dsn--\r\n"
    ).encode()


def reply_body() -> bytes:
    import base64

    pdf64 = base64.encodebytes(PDF).decode()
    oru64 = base64.encodebytes(ORU).decode()
    return (
        'Content-Type: multipart/mixed; boundary="r"\r\n\r\n'
        "--r\r\nContent-Type: text/plain\r\n\r\nConsult note attached.\r\n"
        "--r\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n"
        'Content-Disposition: attachment; filename="consult.pdf"\r\n\r\n' + pdf64 + "\r\n"
        "--r\r\nContent-Type: application/hl7-v2\r\nContent-Transfer-Encoding: base64\r\n"
        'Content-Disposition: attachment; filename="result.hl7"\r\n\r\n' + oru64 + "\r\n"
        "--r--\r\n"
    ).encode()


def envelope(
    pki: Pki,
    body: bytes,
    *,
    signer: Issued | None,
    sender: str = SPECIALIST,
    encrypt: bool = True,
    extra: str = "",
    opaque: bool = False,
) -> bytes:
    """Sign (openssl cms -sign) and encrypt (openssl cms -encrypt -aes256) like a HISP."""
    data = body
    if signer is not None:
        data = openssl(
            "cms", "-sign", "-signer", str(signer.cert_path), "-inkey", str(signer.key_path),
            "-md", "sha256", *(["-nodetach"] if opaque else []), data=data,
        )  # fmt: skip
    if encrypt:
        data = openssl("cms", "-encrypt", "-aes256", str(pki.ours.cert_path), data=data)
    head = (
        f"From: {sender}\r\nTo: {OUR_ADDRESS}\r\nSubject: Notification\r\n"
        f"Message-ID: <m-{abs(hash(body)) % 10**9}@direct.specialist.test>\r\n{extra}"
    )
    return head.encode() + data


class Sink:
    def __init__(self, fail: bool = False) -> None:
        self.results: list[DirectInbound] = []
        self.fail = fail

    async def __call__(self, result: DirectInbound) -> None:
        if self.fail:
            raise RuntimeError("store unavailable")
        self.results.append(result)


async def deliver(pki: Pki, messages: list[bytes], sink: Sink, rcpt: str = OUR_ADDRESS) -> None:
    handler = DirectHandler(
        addresses=[OUR_ADDRESS],
        identities=[pki.ours.identity],
        trust_anchors=[pki.anchor.cert],
        on_result=sink,
    )
    listener = DirectListener(
        ListenerSettings(
            host="127.0.0.1", port=0, tls_context=tls_server_context(pki.tmp, pki.anchor)
        ),
        handler,
    )
    await listener.start()
    try:
        for raw in messages:
            await aiosmtplib.send(
                raw,
                sender=SPECIALIST,
                recipients=[rcpt],
                hostname="127.0.0.1",
                port=listener.port,
                start_tls=True,
                tls_context=tls_client_context(pki.anchor),
                timeout=10,
            )
    finally:
        await listener.stop()


def one(pki: Pki, raw: bytes) -> DirectInbound:
    sink = Sink()
    run(deliver(pki, [raw], sink))
    assert len(sink.results) == 1
    return sink.results[0]


@pytest.mark.parametrize(
    ("disposition", "final", "expected"),
    [
        ("processed", False, "processed"),
        ("dispatched", True, "dispatched"),
        ("failed", False, "failed"),
        ("processed/error", False, "failed"),
        ("displayed", False, "other"),
    ],
    ids=["processed", "dispatched", "failed", "processed-error", "displayed"],
)
def test_signed_mdns_are_classified(pki: Pki, disposition: str, final: bool, expected: str) -> None:
    result = one(pki, envelope(pki, mdn_body(disposition, final=final), signer=pki.specialist))
    assert isinstance(result, MdnResult)
    assert result.original_message_id == PACKET_ID
    assert result.disposition == expected
    assert result.sender == SPECIALIST
    assert result.final_recipient == SPECIALIST
    assert result.final_delivery is final


def test_opaque_signed_mdn_is_accepted(pki: Pki) -> None:
    raw = envelope(pki, mdn_body("dispatched"), signer=pki.specialist, opaque=True)
    result = one(pki, raw)
    assert isinstance(result, MdnResult) and result.disposition == "dispatched"


QuarantineCase = Callable[[Pki], bytes]
QUARANTINE: list[tuple[str, QuarantineCase, str]] = [
    ("unsigned", lambda p: envelope(p, mdn_body("dispatched"), signer=None), "unsigned"),
    (
        "not-encrypted",
        lambda p: envelope(p, mdn_body("dispatched"), signer=p.specialist, encrypt=False),
        "not-encrypted",
    ),
    (
        "forged-untrusted-ca",
        lambda p: envelope(p, mdn_body("dispatched"), signer=p.forger),
        "untrusted-signer",
    ),
    (
        "from-mismatch",
        lambda p: envelope(
            p, mdn_body("dispatched"), signer=p.specialist, sender="other@direct.specialist.test"
        ),
        "signer-mismatch",
    ),
    (
        # RFC 5322 §3.6.2: a Direct message has one author; the signer's address first in
        # a list must not vouch for the others
        "two-from-mailboxes",
        lambda p: envelope(
            p,
            mdn_body("dispatched"),
            signer=p.specialist,
            sender=f"{SPECIALIST}, other@direct.otherclinic.test",
        ),
        "no-sender",
    ),
    (
        "plaintext",
        lambda p: f"From: {SPECIALIST}\r\nTo: {OUR_ADDRESS}\r\n\r\nhello\r\n".encode(),
        "not-encrypted",
    ),
]


@pytest.mark.parametrize(
    ("case", "reason"), [(c[1], c[2]) for c in QUARANTINE], ids=[c[0] for c in QUARANTINE]
)
def test_untrustworthy_mail_is_quarantined(pki: Pki, case: QuarantineCase, reason: str) -> None:
    raw = case(pki)
    result = one(pki, raw)
    assert isinstance(result, Quarantined)
    assert result.reason == reason
    assert result.raw.replace(b"\r\n", b"\n") == raw.replace(b"\r\n", b"\n")


def test_tampered_ciphertext_is_quarantined(pki: Pki) -> None:
    raw = bytearray(envelope(pki, mdn_body("dispatched"), signer=pki.specialist))
    i = raw.find(b"\n\n") + 200  # inside the base64 body of the enveloped data
    raw[i] = ord("A") if raw[i] != ord("A") else ord("B")
    result = one(pki, bytes(raw))
    assert isinstance(result, Quarantined)
    # Which check catches it depends on the run's random keys: usually the CBC padding
    # (malformed) or the signature; now and then the garbled block still unpads and the
    # plaintext is no signed message at all (unsigned). Quarantined is what matters.
    assert result.reason in ("not-for-us", "malformed", "bad-signature", "unsigned")


def test_encrypted_to_someone_else_is_quarantined(pki: Pki) -> None:
    signed = openssl(
        "cms", "-sign", "-signer", str(pki.specialist.cert_path),
        "-inkey", str(pki.specialist.key_path), "-md", "sha256", data=mdn_body("processed"),
    )  # fmt: skip
    data = openssl("cms", "-encrypt", "-aes256", str(pki.specialist.cert_path), data=signed)
    raw = f"From: {SPECIALIST}\r\nTo: {OUR_ADDRESS}\r\n".encode() + data
    result = one(pki, raw)
    assert isinstance(result, Quarantined) and result.reason == "not-for-us"


def test_dsn_failed(pki: Pki) -> None:
    result = one(pki, envelope(pki, dsn_body(), signer=pki.specialist))
    assert isinstance(result, DsnResult)
    assert result.original_message_id == PACKET_ID
    assert result.failed
    assert [(r.final_recipient, r.action, r.status) for r in result.recipients] == [
        (SPECIALIST, "failed", "5.4.72")
    ]


def test_reply_with_attachments_keeps_bytes_and_reference(pki: Pki) -> None:
    raw = envelope(
        pki,
        reply_body(),
        signer=pki.specialist,
        extra=f"In-Reply-To: {PACKET_ID}\r\nReferences: <older@x.test> {PACKET_ID}\r\n",
    )
    result = one(pki, raw)
    assert isinstance(result, ReplyWithAttachments)
    assert result.reference == PACKET_ID
    assert result.references == (PACKET_ID, "<older@x.test>")
    assert [(a.content_type, a.filename, a.data) for a in result.attachments] == [
        ("application/pdf", "consult.pdf", PDF),
        ("application/hl7-v2", "result.hl7", ORU),
    ]
    assert [attachment_kind(a) for a in result.attachments] == ["pdf", "hl7v2"]


def test_our_own_protect_round_trips_through_classify(pki: Pki) -> None:
    """What refloop sends, the specialist's side of refloop could read (and vice versa)."""
    entity = smime.protect(mdn_body("dispatched"), pki.specialist.identity, [pki.ours.cert])
    raw = f"From: {SPECIALIST}\r\nTo: {OUR_ADDRESS}\r\n".encode() + entity
    result = classify(
        raw,
        identities=[pki.ours.identity],
        trust_anchors=[pki.anchor.cert],
        now=dt.datetime.now(dt.UTC),
    )
    assert isinstance(result, MdnResult) and result.disposition == "dispatched"


def test_expired_signer_is_quarantined(pki: Pki) -> None:
    raw = envelope(pki, mdn_body("dispatched"), signer=pki.specialist)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=400)
    result = classify(
        raw, identities=[pki.ours.identity], trust_anchors=[pki.anchor.cert], now=later
    )
    assert isinstance(result, Quarantined) and result.reason == "untrusted-signer"


def test_unknown_recipient_is_refused_at_rcpt(pki: Pki) -> None:
    sink = Sink()
    raw = envelope(pki, mdn_body("processed"), signer=pki.specialist)
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as err:
        run(deliver(pki, [raw], sink, rcpt="someone@direct.clinic.test"))
    assert err.value.recipients[0].code == 550
    assert sink.results == []


def test_callback_failure_answers_451_so_the_hisp_retries(pki: Pki) -> None:
    raw = envelope(pki, mdn_body("processed"), signer=pki.specialist)
    with pytest.raises(aiosmtplib.SMTPDataError) as err:
        run(deliver(pki, [raw], Sink(fail=True)))
    assert err.value.code == 451


def test_garbage_never_raises(pki: Pki) -> None:
    for raw in (
        b"",
        b"\x00\xff" * 50,
        b"From: a@b.c\r\nContent-Type: application/pkcs7-mime\r\n\r\n!!",
    ):
        result = classify(
            raw,
            identities=[pki.ours.identity],
            trust_anchors=[pki.anchor.cert],
            now=dt.datetime.now(dt.UTC),
        )
        assert isinstance(result, Quarantined)


def test_listener_survives_a_bad_session(pki: Pki) -> None:
    """A peer that sends junk and hangs up does not stop the next delivery."""
    sink = Sink()

    async def go() -> None:
        handler = DirectHandler(
            addresses=[OUR_ADDRESS],
            identities=[pki.ours.identity],
            trust_anchors=[pki.anchor.cert],
            on_result=sink,
        )
        listener = DirectListener(ListenerSettings(host="127.0.0.1", port=0), handler)
        await listener.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
            await reader.readline()
            writer.write(b"\x00garbage\r\nDATA\r\n")
            await writer.drain()
            writer.close()
            await writer.wait_closed()
            raw = envelope(pki, mdn_body("processed"), signer=pki.specialist)
            await aiosmtplib.send(
                raw, sender=SPECIALIST, recipients=[OUR_ADDRESS], hostname="127.0.0.1",
                port=listener.port, start_tls=False, timeout=10,
            )  # fmt: skip
        finally:
            await listener.stop()

    run(go())
    assert len(sink.results) == 1 and isinstance(sink.results[0], MdnResult)


class FakeImap:
    """Just enough IMAP4rev1 (RFC 3501) for imaplib: LOGIN, SELECT, UID SEARCH/FETCH/STORE."""

    def __init__(self, messages: dict[int, bytes]) -> None:
        self.messages = messages
        self.seen: set[int] = set()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"* OK [CAPABILITY IMAP4rev1] fake ready\r\n")
        while line := await reader.readline():
            tag, _, rest = line.decode().rstrip("\r\n").partition(" ")
            cmd = rest.upper()
            out = b""
            if cmd.startswith("CAPABILITY"):
                out = b"* CAPABILITY IMAP4rev1\r\n"
            elif cmd.startswith("SELECT"):
                out = f"* {len(self.messages)} EXISTS\r\n".encode()
            elif cmd.startswith("UID SEARCH"):
                uids = " ".join(str(u) for u in self.messages if u not in self.seen)
                out = f"* SEARCH {uids}\r\n".encode()
            elif cmd.startswith("UID FETCH"):
                uid = int(rest.split()[2])
                body = self.messages[uid]
                out = f"* 1 FETCH (UID {uid} BODY[] {{{len(body)}}}\r\n".encode() + body + b")\r\n"
            elif cmd.startswith("UID STORE"):
                self.seen.add(int(rest.split()[2]))
            elif cmd.startswith("LOGOUT"):
                out = b"* BYE\r\n"
            writer.write(out + f"{tag} OK done\r\n".encode())
            await writer.drain()
            if cmd.startswith("LOGOUT"):
                break
        writer.close()
        await writer.wait_closed()


def test_imap_poller_hands_on_then_marks_seen(pki: Pki) -> None:
    from channels.direct.inbound import ImapPoller, ImapSettings

    fake = FakeImap(
        {
            7: envelope(pki, mdn_body("dispatched", final=True), signer=pki.specialist),
            8: envelope(pki, mdn_body("dispatched"), signer=pki.forger),
        }
    )
    sink = Sink()

    async def go() -> tuple[int, int]:
        server = await asyncio.start_server(fake.serve, "127.0.0.1", 0)
        port = int(server.sockets[0].getsockname()[1])
        handler = DirectHandler(
            addresses=[OUR_ADDRESS],
            identities=[pki.ours.identity],
            trust_anchors=[pki.anchor.cert],
            on_result=sink,
        )
        settings = ImapSettings(
            host="127.0.0.1", port=port, username="u", password="p", use_tls=False
        )
        poller = ImapPoller(settings, handler)
        try:
            return await poller.poll_once(), await poller.poll_once()
        finally:
            server.close()
            await server.wait_closed()

    assert run(go()) == (2, 0)  # the second poll finds nothing unseen
    assert fake.seen == {7, 8}
    assert isinstance(sink.results[0], MdnResult) and sink.results[0].disposition == "dispatched"
    assert isinstance(sink.results[1], Quarantined)
    assert sink.results[1].reason == "untrusted-signer"


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"\xef\xbb\xbfMSH|^~\\&|A|B", "hl7v2"),
        (b"%PDF-1.7\n", "pdf"),
        (b'<?xml version="1.0"?><ClinicalDocument xmlns="urn:hl7-org:v3">', "cda"),
        (b"<html>", "other"),
    ],
    ids=["hl7", "pdf", "cda", "other"],
)
def test_attachment_kind(data: bytes, kind: str) -> None:
    from engine.model import Attachment

    assert attachment_kind(Attachment("f", "application/octet-stream", data)) == kind
