"""A generic signed JSON webhook: portal messages, voice and coordinator tasks, and
referring-provider notifications, for systems that take a plain HTTPS POST.

Wire format (what a receiver implements)::

    POST <url>
    Content-Type: application/json
    Idempotency-Key: <outbox idempotency key>       # same on every retry: dedupe on it
    X-Refloop-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>

    {"id": "<idempotency key>", "outbox_id": 12, "channel": "coordinator",
     "kind": "coordinator-task", "referral_id": "...", "recipient": "...",
     "priority": "urgent", "priority_score": 0.87, "subject": "...", "body": "...",
     "attachments": [{"filename": "...", "content_type": "...", "data": "<base64>"}],
     "payload": {...} | null}

``v1`` = HMAC-SHA256(secret, ``"<t>." + raw body bytes``), hex. Receivers recompute it
over the raw body with :func:`verify_signature`, reject a ``t`` older than their
tolerance (replay), and answer 2xx once stored. The body may carry PHI (portal): the
URL must be https (loopback excepted, for tests). Any 2xx is success; 408/429/5xx and
transport failures are retryable, other statuses are not (channels.base).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

import httpx

from channels.base import error_for_status, error_for_transport
from engine.errors import ChannelError
from engine.model import OutboundMessage, SendReceipt

log = logging.getLogger(__name__)

SIGNATURE_HEADER: Final = "X-Refloop-Signature"
IDEMPOTENCY_HEADER: Final = "Idempotency-Key"
SIGNATURE_VERSION: Final = "v1"
DEFAULT_TOLERANCE: Final = 300.0  # seconds a receiver accepts between t= and its clock


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The ``X-Refloop-Signature`` header value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode("utf-8"), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},{SIGNATURE_VERSION}={mac.hexdigest()}"


def verify_signature(
    secret: str,
    body: bytes,
    header: str | None,
    *,
    now: float,
    tolerance: float = DEFAULT_TOLERANCE,
) -> bool:
    """True when ``header`` signs ``body`` with ``secret`` and its timestamp is within
    ``tolerance`` seconds of ``now``. Constant-time; any malformed header is False.
    Several ``v1=`` values (during a secret rotation) are accepted if any matches."""
    if not header or not secret:
        return False
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t" and value.isdigit():
            timestamp = int(value)
        elif key == SIGNATURE_VERSION and value:
            candidates.append(value)
    if timestamp is None or not candidates or abs(now - timestamp) > tolerance:
        return False
    expected = sign(secret, body, timestamp).rpartition("=")[2]
    ok = False
    for candidate in candidates:
        ok |= hmac.compare_digest(expected.encode(), candidate.encode())
    return ok


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    """One ``channels.<name>`` of ``type: webhook``; ``secret`` already resolved."""

    url: str
    secret: str = field(repr=False)
    timeout: float = 10.0

    def problems(self) -> list[tuple[str, str]]:
        """Every problem as ``(key, message)``, for ``engine.config`` to locate."""
        out: list[tuple[str, str]] = []
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            out.append(("url", "must be an http(s) URL"))
        elif parts.scheme == "http" and not _is_loopback(parts.hostname):
            out.append(("url", "must be https (the body may carry PHI)"))
        if len(self.secret) < 16:
            out.append(("secret", "must be at least 16 characters (use ${env:NAME})"))
        if self.timeout <= 0:
            out.append(("timeout", "must be positive"))
        return out


def envelope(item: OutboundMessage) -> dict[str, Any]:
    """The JSON document posted for ``item`` (see the module docstring)."""
    payload: Any = None
    if item.payload:
        try:
            payload = json.loads(item.payload)
        except ValueError:
            raise ChannelError(
                f"outbox {item.outbox_id}: payload is not valid JSON", retryable=False
            ) from None
    return {
        "id": item.idempotency_key,
        "outbox_id": item.outbox_id,
        "channel": item.channel,
        "kind": item.kind,
        "referral_id": item.referral_id,
        "recipient": item.recipient,
        "priority": item.priority,
        "priority_score": item.priority_score,
        "subject": item.subject,
        "body": item.body,
        "attachments": [
            {
                "filename": a.filename,
                "content_type": a.content_type,
                "data": base64.b64encode(a.data).decode("ascii"),
            }
            for a in item.attachments
        ],
        "payload": payload,
    }


class WebhookChannel:
    """The signed-webhook :class:`~channels.base.Channel`.

    Idempotency: every retry of an outbox row carries the same ``Idempotency-Key`` and
    ``id``; a receiver that dedupes on it sees each message once (exactly-once in
    effect). ``http`` is a shared ``httpx.AsyncClient`` (closed by its owner); one is
    made when omitted and :meth:`aclose` closes it. ``clock`` gives the ``t=`` stamp.
    """

    def __init__(
        self,
        name: str,
        cfg: WebhookConfig,
        *,
        http: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.cfg = cfg
        self._own_http = http is None
        self._http = http if http is not None else httpx.AsyncClient()
        self._clock = clock

    async def aclose(self) -> None:
        if self._own_http:
            await self._http.aclose()

    async def send(self, item: OutboundMessage) -> SendReceipt:
        """POST the signed envelope; a 2xx answer is a :class:`SendReceipt` whose
        ``provider_message_id`` is the receiver's ``id`` (JSON) if it gave one."""
        body = json.dumps(envelope(item), separators=(",", ":"), sort_keys=True).encode()
        now = self._clock()
        headers = {
            "Content-Type": "application/json",
            IDEMPOTENCY_HEADER: item.idempotency_key,
            SIGNATURE_HEADER: sign(self.cfg.secret, body, int(now)),
        }
        try:
            response = await self._http.post(
                self.cfg.url, content=body, headers=headers, timeout=self.cfg.timeout
            )
        except httpx.HTTPError as exc:
            raise error_for_transport(self.name, exc) from exc
        if not response.is_success:
            raise error_for_status(
                self.name,
                response.status_code,
                retry_after=response.headers.get("Retry-After"),
                now=now,
            )
        log.info(
            "outbox %d: %s webhook accepted HTTP %d",
            item.outbox_id,
            self.name,
            response.status_code,
        )
        return SendReceipt(
            outbox_id=item.outbox_id,
            idempotency_key=item.idempotency_key,
            channel=item.channel,
            provider_message_id=_receiver_id(response),
            provider_status=str(response.status_code),
        )


def _receiver_id(response: httpx.Response) -> str:
    if "json" not in response.headers.get("Content-Type", ""):
        return ""
    try:
        data = response.json()
    except ValueError:
        return ""
    value = data.get("id") if isinstance(data, dict) else None
    return str(value) if isinstance(value, str | int) else ""
