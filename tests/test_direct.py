"""Direct outbound, checked by an independent peer: refloop submits the packet to a real
aiosmtpd server on loopback (STARTTLS + AUTH); ``openssl cms`` decrypts and verifies what
arrived with certificates this test made. One flipped byte must fail verification."""

from __future__ import annotations

import email
import email.policy
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from direct_pki import (
    OUR_ADDRESS,
    SPECIALIST,
    Pki,
    make_direct_pki,
    smtp_server,
    tls_client_context,
    tls_server_context,
)
from helpers import run

from channels.direct import smime
from channels.direct.send import DISPOSITION_OPTIONS, DirectChannel, HispSettings, new_message_id
from engine.errors import ChannelError
from engine.model import Attachment, OutboundMessage

OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(OPENSSL is None, reason="openssl command-line tool needed")

PDF = b"%PDF-1.4\n" + bytes(range(256)) * 4 + b"\n%%EOF\n"
HL7 = b"MSH|^~\\&|EHR|CLINIC|REFLOOP|CLINIC|20260101||REF^I12|c1|P|2.5.1\rRF1||R\r"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_direct_pki(tmp_path_factory.mktemp("direct-pki"))


class Capture:
    """aiosmtpd handler that keeps what it was given, or refuses as told."""

    def __init__(self, rcpt_reply: str = "250 OK") -> None:
        self.rcpt_reply = rcpt_reply
        self.messages: list[bytes] = []
        self.rcpts: list[str] = []

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.rcpt_reply.startswith("250"):
            envelope.rcpt_tos.append(address)
        return self.rcpt_reply

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.original_content, bytes)
        self.messages.append(envelope.original_content)
        self.rcpts.extend(envelope.rcpt_tos)
        return "250 2.0.0 queued"


def authenticator(
    server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and auth_data == (b"refloop", b"s3cret")
    return AuthResult(success=ok, handled=False)


@asynccontextmanager
async def hisp(pki: Pki, handler: Capture, *, tls: bool = True) -> Any:
    kwargs: dict[str, Any] = {}
    if tls:
        kwargs.update(
            authenticator=authenticator,
            auth_required=True,
            tls_context=tls_server_context(pki.tmp, pki.anchor),
            require_starttls=True,
        )
    async with smtp_server(handler, **kwargs) as port:
        yield port


def channel(pki: Pki, port: int, *, password: str = "s3cret") -> DirectChannel:
    settings = HispSettings(
        host="127.0.0.1",
        port=port,
        username="refloop",
        password=password,
        tls_context=tls_client_context(pki.anchor),
        timeout=10,
    )
    return DirectChannel(
        hisp=settings,
        identity=pki.ours.identity,
        address=OUR_ADDRESS,
        certificate_for=lambda addr: pki.specialist.cert if addr == SPECIALIST else None,
    )


STORED_ID = "<refloop.0123456789abcdef0123456789abcdef@direct.clinic.test>"


def test_new_message_ids_are_random_and_carry_no_key() -> None:
    ids = {new_message_id("direct.clinic.test") for _ in range(64)}
    assert len(ids) == 64
    for mid in ids:  # 128 bits of hex between a fixed prefix and our domain
        assert re.fullmatch(r"<refloop\.[0-9a-f]{32}@direct\.clinic\.test>", mid), mid


def item(outbox_id: int = 7, recipient: str = SPECIALIST) -> OutboundMessage:
    return OutboundMessage(
        outbox_id=outbox_id,
        idempotency_key=f"outbox-{outbox_id}",
        channel="direct",
        recipient=recipient,
        message_id=STORED_ID,
        body="Referral packet attached. Please confirm receipt.",
        attachments=(
            Attachment("referral.pdf", "application/pdf", PDF),
            Attachment("original.hl7", "application/hl7-v2", HL7),
        ),
    )


def openssl(*args: str) -> subprocess.CompletedProcess[bytes]:
    assert OPENSSL is not None
    return subprocess.run([OPENSSL, *args], capture_output=True, timeout=30, check=False)


@pytest.fixture(scope="module")
def delivered(pki: Pki) -> Iterator[tuple[bytes, str]]:
    """One packet sent through the loopback HISP: (raw message, returned Message-ID)."""
    handler = Capture()

    async def go() -> str:
        async with hisp(pki, handler) as port:
            receipt = await channel(pki, port).send(item())
        return receipt.provider_message_id

    message_id = run(go())
    assert handler.rcpts == [SPECIALIST]
    yield handler.messages[0], message_id


def test_headers_ask_for_delivery_notification(delivered: tuple[bytes, str]) -> None:
    raw, message_id = delivered
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert message_id == STORED_ID  # the one stored with the row, not derived from it
    assert msg["Message-ID"] == message_id
    assert msg["From"] == OUR_ADDRESS and msg["To"] == SPECIALIST
    assert msg["Disposition-Notification-To"] == OUR_ADDRESS
    assert msg["Disposition-Notification-Options"] == DISPOSITION_OPTIONS
    assert msg.get_content_type() == "application/pkcs7-mime"
    assert msg.get_param("smime-type") == "enveloped-data"
    assert b"Referral packet attached" not in raw and b"%PDF" not in raw  # encrypted


def test_openssl_decrypts_and_verifies(
    pki: Pki, delivered: tuple[bytes, str], tmp_path: Path
) -> None:
    raw, _ = delivered
    (tmp_path / "msg.eml").write_bytes(raw)
    dec = openssl(
        "cms", "-decrypt", "-in", str(tmp_path / "msg.eml"),
        "-recip", str(pki.specialist.cert_path), "-inkey", str(pki.specialist.key_path),
        "-out", str(tmp_path / "signed.eml"),
    )  # fmt: skip
    assert dec.returncode == 0, dec.stderr
    # openssl reports the content cipher: Direct wants AES-CBC (256 here).
    info = openssl("cms", "-cmsout", "-print", "-in", str(tmp_path / "msg.eml"), "-inform", "SMIME")
    assert b"aes-256-cbc" in info.stdout.lower()
    ver = openssl(
        "cms", "-verify", "-in", str(tmp_path / "signed.eml"),
        "-CAfile", str(pki.anchor.cert_path), "-purpose", "smimesign",
        "-out", str(tmp_path / "content.eml"),
    )  # fmt: skip
    assert ver.returncode == 0, ver.stderr
    assert b"Verification successful" in ver.stderr
    signed = email.message_from_bytes((tmp_path / "signed.eml").read_bytes())
    assert signed.get_content_type() == "multipart/signed"
    assert signed.get_param("micalg") == "sha-256"
    content = email.message_from_bytes(
        (tmp_path / "content.eml").read_bytes(), policy=email.policy.default
    )
    parts = {
        p.get_filename(): p.get_payload(decode=True) for p in content.walk() if p.get_filename()
    }
    assert parts == {"referral.pdf": PDF, "original.hl7": HL7}  # byte-exact


@pytest.mark.parametrize(
    "target", [b"Content-Type: text/plain", b"Referral packet"], ids=["header", "body"]
)
def test_one_flipped_byte_fails_verification(
    pki: Pki, delivered: tuple[bytes, str], tmp_path: Path, target: bytes
) -> None:
    raw, _ = delivered
    (tmp_path / "msg.eml").write_bytes(raw)
    openssl(
        "cms", "-decrypt", "-in", str(tmp_path / "msg.eml"),
        "-recip", str(pki.specialist.cert_path), "-inkey", str(pki.specialist.key_path),
        "-out", str(tmp_path / "signed.eml"),
    )  # fmt: skip
    signed = bytearray((tmp_path / "signed.eml").read_bytes())
    i = signed.find(target)
    assert i > 0
    signed[i + 3] ^= 0x01
    (tmp_path / "tampered.eml").write_bytes(bytes(signed))
    ver = openssl(
        "cms", "-verify", "-in", str(tmp_path / "tampered.eml"),
        "-CAfile", str(pki.anchor.cert_path), "-purpose", "smimesign", "-out", "/dev/null",
    )  # fmt: skip
    assert ver.returncode != 0
    assert b"Verification successful" not in ver.stderr
    # and our own verifier agrees
    with pytest.raises(smime.SmimeError) as err:
        smime.verify(bytes(signed), trust_anchors=[pki.anchor.cert], sender=OUR_ADDRESS, now=_now())
    assert err.value.reason == "bad-signature"


def test_our_verifier_accepts_what_openssl_accepts(pki: Pki, delivered: tuple[bytes, str]) -> None:
    raw, _ = delivered
    v = smime.unprotect(
        raw,
        identities=[pki.specialist.identity],
        trust_anchors=[pki.anchor.cert],
        sender=OUR_ADDRESS,
        now=_now(),
    )
    assert v.signer == pki.ours.cert


def test_same_outbox_row_same_message_id(pki: Pki) -> None:
    handler = Capture()

    async def go() -> list[str]:
        async with hisp(pki, handler) as port:
            ch = channel(pki, port)
            return [(await ch.send(item(9))).provider_message_id for _ in range(2)]

    first, second = run(go())
    assert first == second
    assert len(handler.messages) == 2


@pytest.mark.parametrize(
    ("rcpt_reply", "retryable"),
    [
        ("550 5.1.1 no such user", False),
        ("451 4.3.0 try later", True),
        ("554 5.7.1 untrusted", False),
    ],
    ids=["550", "451", "554"],
)
def test_smtp_replies_map_to_channel_errors(pki: Pki, rcpt_reply: str, retryable: bool) -> None:
    async def go() -> None:
        async with hisp(pki, Capture(rcpt_reply)) as port:
            await channel(pki, port).send(item())

    with pytest.raises(ChannelError) as err:
        run(go())
    assert err.value.retryable is retryable
    assert rcpt_reply[:3] in str(err.value)
    assert SPECIALIST not in str(err.value)


def test_bad_credentials_are_not_retryable(pki: Pki) -> None:
    async def go() -> None:
        async with hisp(pki, Capture()) as port:
            await channel(pki, port, password="wrong").send(item())

    with pytest.raises(ChannelError) as err:
        run(go())
    assert not err.value.retryable
    assert "535" in str(err.value)


def test_no_starttls_is_refused(pki: Pki) -> None:
    async def go() -> None:
        async with hisp(pki, Capture(), tls=False) as port:
            await channel(pki, port).send(item())

    with pytest.raises(ChannelError) as err:
        run(go())
    assert not err.value.retryable


def test_unreachable_hisp_is_retryable(pki: Pki) -> None:
    async def go() -> None:
        async with hisp(pki, Capture()) as port:
            pass  # closed again: nothing listens on the port now
        await channel(pki, port).send(item())

    with pytest.raises(ChannelError) as err:
        run(go())
    assert err.value.retryable


def test_unknown_recipient_certificate_is_not_retryable(pki: Pki) -> None:
    ch = channel(pki, 1)
    with pytest.raises(ChannelError) as err:
        run(ch.send(item(recipient="nobody@direct.elsewhere.test")))
    assert not err.value.retryable


def _now() -> Any:
    import datetime as dt

    return dt.datetime.now(dt.UTC)
