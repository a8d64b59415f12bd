"""Direct secure messaging, inbound: MDNs, DSNs and specialist replies.

:func:`classify` is the pure core: one raw RFC 5322 message in, one frozen result out
(:data:`~engine.model.DirectInbound`): decrypt with our keys, verify the signature, the
chain to a configured trust anchor and the signer's binding to the From address (Direct
AS v1.3 §3-§4), then read the content:

* ``multipart/report; report-type=disposition-notification`` → :class:`MdnResult`
  (RFC 8098 §3: ``Original-Message-ID``, ``Disposition: automatic-action/
  MDN-sent-automatically; processed|dispatched|failed``);
* ``multipart/report; report-type=delivery-status`` → :class:`DsnResult` (RFC 3464);
* anything else → :class:`ReplyWithAttachments` (every attached part, byte-exact).

Mail that is not encrypted, not signed, signed by an untrusted or mismatched certificate,
or not decryptable by us is :class:`Quarantined` with a reason code, never acted on.

:class:`DirectHandler` is the aiosmtpd handler the HISP delivers to; it hands each result
to the callback given at construction and answers 250 only after the callback returned
(commit, then acknowledge; a callback failure is a 451 so the HISP retries).
:class:`DirectListener` runs it on the daemon's own event loop. :class:`ImapPoller` is the
alternative for HISPs that only offer a mailbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import email.parser
import email.policy
import imaplib
import ipaddress
import logging
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from email.message import Message
from typing import Any, Final, Literal

from aiosmtpd.smtp import SMTP, Envelope, Session
from cryptography import x509

from channels.direct import smime
from engine.model import (
    Attachment,
    DirectDisposition,
    DirectInbound,
    DsnRecipient,
    DsnResult,
    MdnResult,
    Quarantined,
    ReplyWithAttachments,
)

log = logging.getLogger(__name__)
_SMTP_LOG: Final = logging.getLogger("mail.log")  # aiosmtpd's logger (aiosmtpd/smtp.py)

OnResult = Callable[[DirectInbound], Awaitable[None]]
# Delivery Notification IG §3.2: the extension field a dispatched MDN carries.
FINAL_DELIVERY_FIELD: Final = "X-DIRECT-FINAL-DESTINATION-DELIVERY"
_MSGID: Final = re.compile(r"<[^<>\s]+>")
_DISPOSITION: Final = re.compile(r";\s*([A-Za-z-]+)\s*(?:/\s*([A-Za-z-]+))?")
MAX_MESSAGE_BYTES: Final = 32 * 1024 * 1024
_KEEP_RAW: Final = (MdnResult, ReplyWithAttachments)


def classify(
    raw: bytes,
    *,
    identities: Sequence[smime.Identity],
    trust_anchors: Sequence[x509.Certificate],
    now: dt.datetime,
) -> DirectInbound:
    """What one inbound Direct message is. Never raises for bad input: anything that
    fails a check is :class:`Quarantined`."""
    outer = email.message_from_bytes(raw, policy=email.policy.compat32)
    claimed = smime.bare_address(str(outer.get("From", "")))
    message_id = _first_id(str(outer.get("Message-ID", "")))

    def quarantine(reason: str) -> Quarantined:
        return Quarantined(reason=reason, raw=raw, claimed_sender=claimed, message_id=message_id)

    if not claimed:
        return quarantine("no-sender")
    try:
        verified = smime.unprotect(
            smime.canonicalize(raw),
            identities=identities,
            trust_anchors=trust_anchors,
            sender=claimed,
            now=now,
        )
    except smime.SmimeError as exc:
        return quarantine(exc.reason)
    content = email.message_from_bytes(verified.content, policy=email.policy.default)
    headers: Message = outer
    if content.get_content_type() == "message/rfc822":
        # Header protection (RFC 8551 §3.1): the signed copy of the headers wins, and its
        # From must be the same address the signature was checked against.
        wrapped = content.get_payload()
        inner = wrapped[0] if isinstance(wrapped, list) else wrapped
        if not isinstance(inner, Message):
            return quarantine("malformed")
        if smime.bare_address(str(inner.get("From", ""))) not in ("", claimed):
            return quarantine("signer-mismatch")
        headers, content = inner, inner  # type: ignore[assignment]
    try:
        result = _read_content(content, headers, claimed, message_id)
    except (ValueError, LookupError, TypeError):
        return quarantine("malformed")
    # kept so the engine can still quarantine it visibly (a sender that is not the
    # packet's recipient: engine.delivery.direct_inbound)
    return dataclasses.replace(result, raw=raw) if isinstance(result, _KEEP_RAW) else result


def _first_id(value: str) -> str:
    m = _MSGID.search(value or "")
    return m.group(0) if m else ""


def _ids(value: str) -> list[str]:
    return _MSGID.findall(value or "")


def _read_content(
    content: Message, headers: Message, sender: str, message_id: str
) -> DirectInbound:
    if content.get_content_type() == "multipart/report":
        report_type = str(content.get_param("report-type") or "").lower()
        if report_type == "disposition-notification":
            return _mdn(content, headers, sender, message_id)
        if report_type == "delivery-status":
            return _dsn(content, headers, sender, message_id)
    references = _ids(str(headers.get("In-Reply-To", ""))) + _ids(
        str(headers.get("References", ""))
    )
    return ReplyWithAttachments(
        sender=sender,
        message_id=message_id,
        references=tuple(dict.fromkeys(references)),
        attachments=tuple(_attachments(content)),
        subject=str(headers.get("Subject", "")),
    )


def _blocks(part: Message) -> list[Message]:
    """The header blocks of a message/disposition-notification or message/delivery-status
    part, however the email package parsed it."""
    payload = part.get_payload()
    if isinstance(payload, list):
        return [p for p in payload if isinstance(p, Message)]
    text = part.get_payload(decode=True)
    raw = text if isinstance(text, bytes) else str(payload).encode()
    parser = email.parser.BytesHeaderParser(policy=email.policy.compat32)
    return [
        parser.parsebytes(block + b"\n")
        for block in re.split(rb"\r?\n\r?\n", raw.strip())
        if block.strip()
    ]


def _find(report: Message, ctype: str) -> Message:
    for part in report.walk():
        if part.get_content_type() == ctype:
            return part
    raise LookupError(ctype)


def _mdn(report: Message, headers: Message, sender: str, message_id: str) -> MdnResult:
    fields: dict[str, str] = {}
    for block in _blocks(_find(report, "message/disposition-notification")):
        for key, value in block.items():
            fields.setdefault(key.lower(), str(value).strip())
    original = _first_id(fields.get("original-message-id", "")) or _first_id(
        str(headers.get("In-Reply-To", ""))
    )
    m = _DISPOSITION.search(fields.get("disposition", ""))
    if m is None:
        raise ValueError("no disposition")
    dtype, modifier = m.group(1).lower(), (m.group(2) or "").lower()
    disposition: DirectDisposition
    if dtype in ("failed", "failure") or modifier in ("error", "failed", "failure"):
        disposition = "failed"
    elif dtype in ("processed", "dispatched"):
        disposition = "processed" if dtype == "processed" else "dispatched"
    else:
        disposition = "other"
    final_recipient = fields.get("final-recipient", "").partition(";")[2].strip()
    return MdnResult(
        original_message_id=original,
        disposition=disposition,
        disposition_text=dtype,
        sender=sender,
        message_id=message_id,
        final_recipient=final_recipient.lower(),
        final_delivery=FINAL_DELIVERY_FIELD.lower() in fields,
    )


def _dsn(report: Message, headers: Message, sender: str, message_id: str) -> DsnResult:
    blocks = _blocks(_find(report, "message/delivery-status"))
    recipients = []
    per_message: dict[str, str] = {}
    for block in blocks:
        fields = {k.lower(): str(v).strip() for k, v in block.items()}
        if "action" in fields:
            recipients.append(
                DsnRecipient(
                    final_recipient=fields.get("final-recipient", "").partition(";")[2].strip(),
                    action=fields["action"].lower(),
                    status=fields.get("status", "").split()[0] if fields.get("status") else "",
                )
            )
        else:
            per_message.update(fields)
    original = ""
    for ctype in ("text/rfc822-headers", "message/rfc822"):
        try:
            part = _find(report, ctype)
        except LookupError:
            continue
        payload = part.get_payload()
        if isinstance(payload, list) and payload and isinstance(payload[0], Message):
            original = _first_id(str(payload[0].get("Message-ID", "")))
        else:
            raw = part.get_payload(decode=True)
            text = raw.decode("latin-1") if isinstance(raw, bytes) else str(payload)
            m = re.search(r"(?im)^Message-ID:\s*(<[^>]+>)", text)
            original = m.group(1) if m else ""
        if original:
            break
    original = (
        original
        or _first_id(per_message.get("x-original-message-id", ""))
        or _first_id(str(headers.get("In-Reply-To", "")))
    )
    return DsnResult(
        original_message_id=original,
        sender=sender,
        recipients=tuple(recipients),
        message_id=message_id,
    )


def _attachments(content: Message) -> list[Attachment]:
    out: list[Attachment] = []
    for part in content.walk():
        if part.is_multipart() or part.get_content_type().startswith("message/"):
            continue
        filename = part.get_filename() or ""
        is_body = part.get_content_maintype() == "text" and not filename
        if is_body and part.get_content_disposition() != "attachment":
            continue
        data = part.get_payload(decode=True)
        if not isinstance(data, bytes):
            continue
        out.append(Attachment(filename=filename, content_type=part.get_content_type(), data=data))
    return out


AttachmentKind = Literal["hl7v2", "pdf", "cda", "other"]


def attachment_kind(att: Attachment) -> AttachmentKind:
    """What an attachment holds, by content (senders label HL7 v2 as text/plain,
    application/hl7-v2, application/x-hl7 or octet-stream alike): ``hl7v2`` enters the
    pipeline as source ``direct``; ``pdf`` and ``cda`` (HL7 CDA R2 / C-CDA,
    urn:hl7-org:v3 ClinicalDocument) close the loop as a report when the reply references
    our packet."""
    head = att.data[:4096].lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"MSH") and len(head) > 8:
        return "hl7v2"
    if head.startswith(b"%PDF-"):
        return "pdf"
    if b"ClinicalDocument" in head and b"urn:hl7-org:v3" in head:
        return "cda"
    return "other"


# ---------------------------------------------------------------------------
# Servers


class DirectHandler:
    """aiosmtpd handler: accepts mail for ``addresses`` only, classifies it and awaits
    ``on_result`` before answering 250 (a failing callback answers 451: the HISP keeps
    the message and retries). ``clock`` gives epoch seconds for certificate validity."""

    def __init__(
        self,
        *,
        addresses: Iterable[str],
        identities: Sequence[smime.Identity],
        trust_anchors: Sequence[x509.Certificate],
        on_result: OnResult,
        clock: Callable[[], float] = time.time,
    ):
        self.addresses = frozenset(a.strip().lower() for a in addresses)
        self.identities = tuple(identities)
        self.trust_anchors = tuple(trust_anchors)
        self.on_result = on_result
        self.clock = clock

    def classify(self, raw: bytes) -> DirectInbound:
        now = dt.datetime.fromtimestamp(self.clock(), dt.UTC)
        return classify(raw, identities=self.identities, trust_anchors=self.trust_anchors, now=now)

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if address.strip().lower() not in self.addresses:
            return "550 5.1.1 No such mailbox here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        peer = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer)
        raw = envelope.original_content or envelope.content
        if not isinstance(raw, bytes):
            raw = str(raw or "").encode("utf-8", "surrogateescape")
        result = self.classify(raw)
        try:
            await self.on_result(result)
        except Exception:
            log.exception("%s: direct message not stored; answering 451", peer)
            return "451 4.3.0 Temporary local failure, try again later"
        reason = f" ({result.reason})" if isinstance(result, Quarantined) else ""
        log.info("%s: direct inbound %s%s", peer, type(result).__name__, reason)
        return "250 2.0.0 Message accepted"


@dataclass(frozen=True, slots=True)
class ListenerSettings:
    """Where the HISP delivers to. ``tls_context`` enables STARTTLS (required when
    ``require_tls``); ``authenticator`` (aiosmtpd's callable) enables AUTH."""

    host: str = "127.0.0.1"
    port: int = 2525
    hostname: str = "refloop"
    tls_context: ssl.SSLContext | None = None
    require_tls: bool = True
    authenticator: Any = None
    data_size_limit: int = MAX_MESSAGE_BYTES


class DirectListener:
    """The SMTP listener on the daemon's event loop (port 0 allowed: :attr:`port` tells
    the bound one after :meth:`start`)."""

    def __init__(self, settings: ListenerSettings, handler: DirectHandler):
        self.settings = settings
        self.handler = handler
        self.port = settings.port
        self._server: asyncio.Server | None = None

    def _protocol(self) -> SMTP:
        s = self.settings
        return SMTP(
            self.handler,
            hostname=s.hostname,
            data_size_limit=s.data_size_limit,
            tls_context=s.tls_context,
            require_starttls=bool(s.tls_context) and s.require_tls,
            authenticator=s.authenticator,
            auth_required=s.authenticator is not None,
            auth_require_tls=s.tls_context is not None,
        )

    async def start(self) -> None:
        # aiosmtpd logs each command line at INFO (MAIL FROM, RCPT TO: addresses) and
        # every header line of DATA at DEBUG (From, Message-ID, Subject); the log must not
        # carry them, so its logger stays at WARNING. The handler logs one line per
        # message itself (peer, result type, quarantine reason).
        if _SMTP_LOG.getEffectiveLevel() < logging.WARNING:
            _SMTP_LOG.setLevel(logging.WARNING)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol, self.settings.host, self.settings.port
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("direct: listening on %s:%d", self.settings.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine (``localhost``, 127.0.0.0/8, ``::1``): the only
    place a plaintext IMAP test server may be."""
    host = host.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# RFC 8314 §3.2: IMAP with implicit TLS.
IMAPS_PORT: Final = 993
IMAP_TIMEOUT: Final = 30.0
# RFC 3501 §9: an atom needs no quoting (a conservative subset of ATOM-CHAR).
_ATOM: Final = re.compile(r"[A-Za-z0-9._/-]+")


@dataclass(frozen=True, slots=True)
class ImapSettings:
    """A mailbox the HISP delivers Direct mail to (IMAP4rev1, RFC 3501, over implicit
    TLS, RFC 8314 §3.2), polled every ``interval`` seconds. ``ssl_context`` None means
    Python's default verifying context (system CAs, hostname checked); ``use_tls``
    False is for loopback test servers only (:meth:`problems` says so)."""

    host: str
    username: str
    password: str
    port: int = IMAPS_PORT
    mailbox: str = "INBOX"
    interval: float = 60.0
    ssl_context: ssl.SSLContext | None = None
    use_tls: bool = True

    def problems(self) -> list[tuple[str, str]]:
        """(key, message) for every setting the poller could not use."""
        out: list[tuple[str, str]] = []
        for key, value in (
            ("host", self.host),
            ("username", self.username),
            ("password", self.password),
        ):
            if not value:
                out.append((key, "is required for an IMAP mailbox"))
        if not 1 <= self.port <= 65535:
            out.append(("port", f"must be between 1 and 65535, not {self.port}"))
        if not self.mailbox or not self.mailbox.isascii():
            out.append(("mailbox", "must be a non-empty ASCII mailbox name"))
        if not self.interval > 0:
            out.append(("interval", "must be a positive number of seconds"))
        if not self.use_tls and self.host and not is_loopback(self.host):
            out.append(("tls", "may be false only for a loopback host (127.0.0.1, ::1)"))
        return out


def _quoted(mailbox: str) -> str:
    """The mailbox as an IMAP astring (imaplib sends arguments as given)."""
    if _ATOM.fullmatch(mailbox) or (len(mailbox) > 1 and mailbox[0] == mailbox[-1] == '"'):
        return mailbox
    return '"' + mailbox.replace("\\", "\\\\").replace('"', '\\"') + '"'


class _Imap4Tls(imaplib.IMAP4_SSL):
    """imaplib's IMAP4_SSL, closing the TCP socket when the TLS handshake fails (a
    certificate that does not verify); imaplib leaves it to the garbage collector."""

    def _create_socket(self, timeout: float | None) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout)
        try:
            return self.ssl_context.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise


class ImapPoller:
    """Polls a mailbox for unseen messages, one connection per poll: search the unseen
    UIDs, then for each in order fetch it (``BODY.PEEK[]``, which leaves it unseen),
    classify it, await ``on_result`` and only after that returned flag it ``\\Seen``. A
    callback failure leaves that message unseen, so the next poll reads it again (the
    engine dedupes on Message-ID), and the poll goes on with the next message; so does
    a crash between storing and flagging. Quarantined mail is a stored outcome and is
    flagged like any other (the SMTP listener answers 250 for it too). imaplib and the
    classification run in a worker thread, never in the event loop."""

    def __init__(self, settings: ImapSettings, handler: DirectHandler):
        self.settings = settings
        self.handler = handler
        self.peer = f"{settings.host}:{settings.port}"

    # -- imaplib, each call in a worker thread (one at a time per connection) --------------

    def _connect(self) -> imaplib.IMAP4:
        s = self.settings
        conn: imaplib.IMAP4
        if s.use_tls:
            context = s.ssl_context or ssl.create_default_context()
            conn = _Imap4Tls(s.host, s.port, ssl_context=context, timeout=IMAP_TIMEOUT)
        else:
            conn = imaplib.IMAP4(s.host, s.port, timeout=IMAP_TIMEOUT)
        try:
            conn.login(s.username, s.password)
            typ, _data = conn.select(_quoted(s.mailbox))
            if typ != "OK":
                raise imaplib.IMAP4.error("SELECT refused")
        except BaseException:
            self._close(conn)
            raise
        return conn

    @staticmethod
    def _unseen(conn: imaplib.IMAP4) -> list[str]:
        typ, data = conn.uid("SEARCH", "UNSEEN")
        if typ != "OK":
            raise imaplib.IMAP4.error("UID SEARCH refused")
        found = data[0] if data else None
        if not isinstance(found, bytes):
            return []
        return sorted((u.decode("ascii") for u in found.split()), key=int)

    def _fetch(self, conn: imaplib.IMAP4, uid: str) -> DirectInbound | None:
        """The message's classification, or None when it is gone (expunged since the
        search)."""
        typ, parts = conn.uid("FETCH", uid, "(BODY.PEEK[])")
        if typ != "OK":
            raise imaplib.IMAP4.error("UID FETCH refused")
        for part in parts:
            if isinstance(part, tuple) and len(part) == 2 and isinstance(part[1], bytes):
                return self.handler.classify(part[1])
        return None

    @staticmethod
    def _mark_seen(conn: imaplib.IMAP4, uid: str) -> bool:
        typ, _data = conn.uid("STORE", uid, "+FLAGS", "(\\Seen)")
        return typ == "OK"

    @staticmethod
    def _close(conn: imaplib.IMAP4) -> None:
        try:
            conn.logout()
        except (OSError, imaplib.IMAP4.error):
            pass

    # -- the event loop side ---------------------------------------------------------------

    async def poll_once(self, stop: asyncio.Event | None = None) -> int:
        """One poll on one connection; returns how many messages were stored (and
        flagged). A set ``stop`` ends the poll between messages (the rest stay unseen).
        Network and IMAP errors propagate (:meth:`run` logs them)."""
        conn = await asyncio.to_thread(self._connect)
        try:
            stored = await self._hand_on(conn, stop)
        except asyncio.CancelledError:
            # A worker may still be blocked on this connection: close the socket under
            # it instead of a LOGOUT round trip on the same connection.
            with contextlib.suppress(OSError):
                conn.shutdown()
            raise
        except Exception:
            await asyncio.to_thread(self._close, conn)
            raise
        await asyncio.to_thread(self._close, conn)
        return stored

    async def _hand_on(self, conn: imaplib.IMAP4, stop: asyncio.Event | None) -> int:
        stored = 0
        for uid in await asyncio.to_thread(self._unseen, conn):
            if stop is not None and stop.is_set():
                break
            result = await asyncio.to_thread(self._fetch, conn, uid)
            if result is None:
                continue
            try:
                await self.handler.on_result(result)
            except Exception:
                log.exception(
                    "imap %s: uid %s not stored; left unseen for the next poll", self.peer, uid
                )
                continue
            if not await asyncio.to_thread(self._mark_seen, conn, uid):
                log.warning(
                    "imap %s: uid %s stored but not flagged \\Seen; it will be read again",
                    self.peer,
                    uid,
                )
            stored += 1
            reason = f" ({result.reason})" if isinstance(result, Quarantined) else ""
            log.info(
                "imap %s: uid %s direct inbound %s%s", self.peer, uid, type(result).__name__, reason
            )
        return stored

    async def run(self, interval: float, stop: asyncio.Event) -> None:
        """Poll every ``interval`` seconds until ``stop`` is set; a failed poll is
        logged and the next one tries again (a message it did not flag is re-read)."""
        while not stop.is_set():
            try:
                await self.poll_once(stop)
            except (OSError, imaplib.IMAP4.error) as exc:
                log.warning("imap %s: poll failed (%s)", self.peer, type(exc).__name__)
            except Exception:
                log.exception("imap %s: poll failed", self.peer)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)


__all__ = [
    "DirectHandler",
    "DirectListener",
    "ImapPoller",
    "ImapSettings",
    "ListenerSettings",
    "attachment_kind",
    "classify",
    "is_loopback",
]
