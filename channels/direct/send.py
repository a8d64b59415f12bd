"""Direct secure messaging, outbound: the referral packet as a signed and encrypted
S/MIME message, submitted to our HISP over SMTP with STARTTLS and AUTH.

Message shape (Direct Applicability Statement v1.3; Implementation Guide for Delivery
Notification in Direct v1.0 §3): the outer RFC 5322 headers travel in the clear and carry
no PHI (the subject is neutral); the body is ``application/pkcs7-mime`` enveloped data
holding a ``multipart/signed`` entity holding ``multipart/mixed`` (a short text part, the
packet PDF, passed-through documents, optionally the original HL7 message). We ask for
``processed`` and ``dispatched`` MDNs with ``Disposition-Notification-To`` and
``Disposition-Notification-Options: X-DIRECT-FINAL-DESTINATION-DELIVERY=optional,true``.

Message-ID: random (:func:`new_message_id`, 128 bits from :mod:`secrets`), assigned by
the dispatcher when it first claims the outbox row and stored with it
(``OutboundMessage.message_id``), so a retry after an ambiguous failure resubmits the
same Message-ID and every MDN maps back to the same row through the store. Nobody can
compute it from a referral id; it is not what authorises an MDN or a reply either (the
signer's address must be the packet's recipient: ``engine.delivery.direct_inbound``).

SMTP client: aiosmtplib (maintained asyncio client; smtplib would block the event loop).
SMTP replies map to :class:`~engine.errors.ChannelError`: 4xx and transport trouble are
retryable, 5xx (and a server without STARTTLS, or a TLS certificate that does not verify)
are not. Reasons carry the reply code only, never the server's text (which can echo an
address).
"""

from __future__ import annotations

import email.policy
import email.utils
import logging
import secrets
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Final

import aiosmtplib
from cryptography import x509

from channels.direct import smime
from engine.errors import ChannelError
from engine.model import Attachment, OutboundMessage, SendReceipt

log = logging.getLogger(__name__)

CHANNEL: Final = "direct"
# Delivery Notification IG §3.1: ask for the dispatched MDN as well as processed.
DISPOSITION_OPTIONS: Final = "X-DIRECT-FINAL-DESTINATION-DELIVERY=optional,true"
DEFAULT_SUBJECT: Final = "Referral"
HL7_V2_TYPE: Final = "application/hl7-v2"  # ER7 HL7 v2 (IANA application/hl7v2+er7 is rare)


@dataclass(frozen=True, slots=True)
class HispSettings:
    """How to reach our HISP's submission port. ``tls_context`` None means the system
    trust store with hostname checks; STARTTLS is required unless ``starttls`` is False
    (only for loopback test servers: Direct forbids plaintext submission)."""

    host: str
    port: int = 587
    username: str = ""
    password: str = ""
    starttls: bool = True
    tls_context: ssl.SSLContext | None = None
    timeout: float = 60.0


# At least 128 bits of randomness: unguessable, and unique without coordination.
MESSAGE_ID_BYTES: Final = 16
# RFC 2606 §2: the id-right when the channel has no address to take a domain from.
FALLBACK_DOMAIN: Final = "refloop.invalid"


def new_message_id(domain: str) -> str:
    """A fresh RFC 5322 §3.6.4 Message-ID, ``<refloop.<32 hex>@domain>``: random, no PHI."""
    return f"<refloop.{secrets.token_hex(MESSAGE_ID_BYTES)}@{domain or FALLBACK_DOMAIN}>"


def build_content(body_text: str, attachments: Sequence[Attachment]) -> bytes:
    """The MIME entity that gets signed: text/plain, then each attachment base64-encoded
    (so bytes come out exactly as they went in), canonical CRLF."""
    msg = EmailMessage(policy=email.policy.SMTP)
    msg.set_content(body_text)
    for att in attachments:
        maintype, _, subtype = att.content_type.partition("/")
        msg.add_attachment(
            att.data,
            maintype=maintype or "application",
            subtype=subtype or "octet-stream",
            filename=att.filename,
        )
    return smime.canonicalize(msg.as_bytes())


def build_message(
    *,
    sender: str,
    recipient: str,
    recipient_cert: x509.Certificate,
    identity: smime.Identity,
    message_id: str,
    body_text: str,
    attachments: Sequence[Attachment],
    subject: str = DEFAULT_SUBJECT,
    date: float | None = None,
) -> bytes:
    """The complete Direct message as it goes over SMTP (CRLF line ends)."""
    # No folding: some HISPs read Disposition-Notification-Options from one line only.
    head = EmailMessage(policy=email.policy.SMTP.clone(max_line_length=998))
    head["From"] = sender
    head["To"] = recipient
    head["Subject"] = subject
    head["Date"] = email.utils.formatdate(date if date is not None else time.time())
    head["Message-ID"] = message_id
    head["MIME-Version"] = "1.0"
    head["Disposition-Notification-To"] = sender
    head["Disposition-Notification-Options"] = DISPOSITION_OPTIONS
    headers = head.as_bytes().rstrip(b"\r\n") + b"\r\n"
    body = smime.protect(build_content(body_text, attachments), identity, [recipient_cert])
    return headers + body


def error_for_smtp(exc: Exception) -> ChannelError:
    """The :class:`ChannelError` for an aiosmtplib (or socket/TLS) failure."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused) and exc.recipients:
        exc = exc.recipients[0]
    if isinstance(exc, aiosmtplib.SMTPNotSupported) or type(exc) is aiosmtplib.SMTPException:
        # aiosmtplib raises the base class when a required extension (STARTTLS, AUTH) is
        # missing: a configuration or downgrade problem that retrying will not fix.
        return ChannelError(f"{CHANNEL}: HISP does not offer STARTTLS or AUTH", retryable=False)
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        code = exc.code
        kind = type(exc).__name__
        return ChannelError(f"{CHANNEL}: HISP replied {code} ({kind})", retryable=400 <= code < 500)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return ChannelError(f"{CHANNEL}: HISP TLS certificate did not verify", retryable=False)
    if isinstance(exc, aiosmtplib.SMTPTimeoutError | TimeoutError):
        return ChannelError(f"{CHANNEL}: HISP timed out; outcome unknown", retryable=True)
    return ChannelError(f"{CHANNEL}: HISP unreachable ({type(exc).__name__})", retryable=True)


async def submit(hisp: HispSettings, *, sender: str, recipient: str, data: bytes) -> None:
    """Submit one message; returns once the HISP accepted it (250 to DATA). Raises
    :class:`ChannelError` on any failure."""
    try:
        await aiosmtplib.send(
            data,
            sender=sender,
            recipients=[recipient],
            hostname=hisp.host,
            port=hisp.port,
            username=hisp.username or None,
            password=hisp.password or None,
            start_tls=hisp.starttls,
            tls_context=hisp.tls_context,
            timeout=hisp.timeout,
        )
    except (aiosmtplib.SMTPException, OSError) as exc:
        raise error_for_smtp(exc) from exc


class DirectChannel:
    """The Direct channel for the dispatcher (``channels.base.Channel``).

    ``item.recipient`` is the specialist's Direct address; ``certificate_for`` returns its
    encryption certificate from the directory the engine keeps (None: unknown, which is
    not retryable: the fax fallback takes over). ``item.body`` is the short text part and
    ``item.attachments`` the packet PDF and pass-through documents.
    """

    def __init__(
        self,
        *,
        hisp: HispSettings,
        identity: smime.Identity,
        address: str,
        certificate_for: Callable[[str], x509.Certificate | None],
        clock: Callable[[], float] = time.time,
    ):
        self.hisp = hisp
        self.identity = identity
        self.address = address
        self.domain = address.rpartition("@")[2]
        self.certificate_for = certificate_for
        self.clock = clock

    async def send(self, item: OutboundMessage) -> SendReceipt:
        cert = self.certificate_for(item.recipient)
        if cert is None:
            raise ChannelError(f"{CHANNEL}: no certificate for the recipient", retryable=False)
        # the dispatcher stores one with the row; a caller without one gets a fresh one
        message_id = item.message_id or new_message_id(self.domain)
        data = build_message(
            sender=self.address,
            recipient=item.recipient,
            recipient_cert=cert,
            identity=self.identity,
            message_id=message_id,
            body_text=item.body,
            attachments=item.attachments,
            subject=item.subject or DEFAULT_SUBJECT,
            date=self.clock(),
        )
        await submit(self.hisp, sender=self.address, recipient=item.recipient, data=data)
        log.info("outbox %d: direct message submitted", item.outbox_id)
        return SendReceipt(
            outbox_id=item.outbox_id,
            idempotency_key=item.idempotency_key,
            channel=CHANNEL,
            provider_message_id=message_id,
            provider_status="accepted",
        )
