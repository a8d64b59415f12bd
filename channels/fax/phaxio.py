"""e-Fax fallback: a provider interface, one adapter (Phaxio API v2) and the status rules.

Provider: **Phaxio v2** (Sinch), documented at phaxio.com/docs:
* send: ``POST {base}/faxes`` (multipart: ``to``, ``file``, ``callback_url``,
  ``tag[NAME]``), HTTP Basic with API key and secret; answers
  ``{"success": true, "data": {"id": 123}}`` (docs/api/v2/faxes/create);
* status: ``GET {base}/faxes/{id}`` → ``data.status`` (docs/api/v2/faxes/get_fax);
* statuses: ``queued``, ``pendingbatch``, ``inprogress``, ``success``, ``failure``,
  ``partialsuccess``; recipient-level ``ringing``, ``callactive``, ``willretry``
  (docs/statuses);
* callbacks: multipart POST with ``success``, ``is_test``, ``direction`` and ``fax`` (the
  fax object as JSON), signed in ``X-Phaxio-Signature``: hex HMAC-SHA1, keyed with the
  callback token, over the callback URL as submitted + each POST field name and value
  sorted by name + each file part name and the SHA-1 hex of its contents sorted by name
  (docs/security/callbacks). Phaxio retries a callback up to 16 times: expect duplicates.

Idempotency: Phaxio has no idempotency key, so each fax carries ``tag[refloop_key]`` and
:meth:`PhaxioProvider.send` first looks for a fax with that tag (``GET /faxes?tag[...]``):
a retry after an ambiguous failure returns the existing fax instead of sending twice.

Statuses are normalised to ``queued → sending → success | failure``; :func:`newer` says
whether an update may replace what is stored (never backwards; terminal stays terminal),
and the provider's fax id is the dedupe key for callbacks.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

import httpx

from channels.base import error_for_status, error_for_transport
from engine.errors import ChannelError
from engine.model import DeliveryUpdate, OutboundMessage, SendReceipt

FaxStatus = Literal["queued", "sending", "success", "failure"]
RANK: Final[dict[FaxStatus, int]] = {"queued": 0, "sending": 1, "success": 2, "failure": 2}
PHAXIO_STATUSES: Final[dict[str, FaxStatus]] = {
    "queued": "queued",
    "pendingbatch": "queued",
    "inprogress": "sending",
    "ringing": "sending",
    "callactive": "sending",
    "willretry": "sending",
    "success": "success",
    "failure": "failure",
    "partialsuccess": "failure",  # not every recipient got it: treat as not delivered
}
PHAXIO_BASE_URL: Final = "https://api.phaxio.com/v2"
SIGNATURE_HEADER: Final = "X-Phaxio-Signature"
KEY_TAG: Final = "refloop_key"
CHANNEL: Final = "fax"


@dataclass(frozen=True, slots=True)
class FaxState:
    """What a provider says about one fax. ``error_type`` is the provider's error class
    (e.g. ``lineError``), never free text."""

    fax_id: str
    status: FaxStatus
    provider_status: str
    error_type: str = ""
    pages: int = 0
    is_test: bool = False


class FaxProvider(Protocol):
    """The seam every e-fax adapter implements.

    ``send`` returns the provider's fax id once the provider accepted the job; it is safe
    to call again with the same ``idempotency_key`` (returns the same id). Failures raise
    :class:`~engine.errors.ChannelError` (retryable or not, per channels.base).
    """

    name: str

    async def send(
        self, fax_number: str, pdf: bytes, *, callback_url: str, idempotency_key: str
    ) -> str: ...

    async def status(self, fax_id: str) -> FaxState: ...


def normalise_status(provider_status: str) -> FaxStatus | None:
    """Phaxio's status word → ours; None for a word we do not know (ignore the update)."""
    return PHAXIO_STATUSES.get(provider_status.strip().lower())


def newer(old: FaxStatus | None, new: FaxStatus) -> bool:
    """True when ``new`` may replace ``old``: it moves forward, never back, and a terminal
    status (success, failure) is never replaced, not even by the other terminal one."""
    if old is None:
        return True
    return RANK[new] > RANK[old]


class PhaxioProvider:
    """Phaxio v2 adapter. ``client`` is passed in (one pooled ``httpx.AsyncClient`` per
    daemon); ``base_url`` is configurable so tests talk to a loopback server."""

    name = "phaxio"

    def __init__(
        self,
        *,
        api_key: str,
        api_secret: str,
        client: httpx.AsyncClient,
        base_url: str = PHAXIO_BASE_URL,
        clock: Callable[[], float] = time.time,
    ):
        self._auth = httpx.BasicAuth(api_key, api_secret)
        self._client = client
        self._base = base_url.rstrip("/")
        self._clock = clock

    async def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            resp = await self._client.request(
                method, f"{self._base}{path}", auth=self._auth, **kwargs
            )
        except httpx.HTTPError as exc:
            raise error_for_transport(CHANNEL, exc) from exc
        if resp.status_code // 100 != 2:
            raise error_for_status(
                CHANNEL,
                resp.status_code,
                retry_after=resp.headers.get("Retry-After"),
                now=self._clock(),
            )
        try:
            body = resp.json()
        except ValueError as exc:
            raise ChannelError(f"{CHANNEL}: provider answered non-JSON", retryable=True) from exc
        if not isinstance(body, dict) or body.get("success") is not True:
            raise ChannelError(f"{CHANNEL}: provider reported failure", retryable=False)
        return body

    async def find(self, idempotency_key: str) -> str | None:
        """The id of a fax already sent with this key, if any."""
        body = await self._request(
            "GET", "/faxes", params={"direction": "sent", f"tag[{KEY_TAG}]": idempotency_key}
        )
        data = body.get("data")
        if isinstance(data, list) and data and isinstance(data[0], dict) and "id" in data[0]:
            return str(data[0]["id"])
        return None

    async def send(
        self, fax_number: str, pdf: bytes, *, callback_url: str, idempotency_key: str
    ) -> str:
        existing = await self.find(idempotency_key)
        if existing is not None:
            return existing
        body = await self._request(
            "POST",
            "/faxes",
            data={
                "to": fax_number,
                "callback_url": callback_url,
                f"tag[{KEY_TAG}]": idempotency_key,
            },
            files={"file": ("referral.pdf", pdf, "application/pdf")},
        )
        data = body.get("data")
        if not isinstance(data, dict) or "id" not in data:
            raise ChannelError(f"{CHANNEL}: provider answered without a fax id", retryable=True)
        return str(data["id"])

    async def status(self, fax_id: str) -> FaxState:
        body = await self._request("GET", f"/faxes/{fax_id}")
        data = body.get("data")
        if not isinstance(data, dict):
            raise ChannelError(f"{CHANNEL}: status answer without data", retryable=True)
        return fax_state(data)


def fax_state(fax: Mapping[str, Any]) -> FaxState:
    """A Phaxio fax object → :class:`FaxState`. Raises ``ValueError`` when it has no id
    or an unknown status."""
    if "id" not in fax:
        raise ValueError("fax object without id")
    provider_status = str(fax.get("status", ""))
    status = normalise_status(provider_status)
    if status is None:
        raise ValueError("unknown fax status")
    return FaxState(
        fax_id=str(fax["id"]),
        status=status,
        provider_status=provider_status,
        error_type=str(fax.get("error_type") or ""),
        pages=int(fax.get("num_pages") or 0),
        is_test=bool(fax.get("is_test")),
    )


# ---------------------------------------------------------------------------
# Callbacks (POST /hooks/fax/phaxio)


def phaxio_signature(
    url: str, fields: Mapping[str, str], files: Mapping[str, bytes], token: str
) -> str:
    """The X-Phaxio-Signature for a callback (docs/security/callbacks)."""
    text = url
    for name in sorted(fields):
        text += name + fields[name]
    for name in sorted(files):
        text += name + hashlib.sha1(files[name]).hexdigest()
    return hmac.new(token.encode(), text.encode(), hashlib.sha1).hexdigest()


def verify_phaxio_signature(
    url: str,
    fields: Mapping[str, str],
    files: Mapping[str, bytes],
    token: str,
    signature: str,
) -> bool:
    """Constant-time check of a callback's signature header."""
    if not token or not signature:
        return False
    expected = phaxio_signature(url, fields, files, token)
    return hmac.compare_digest(expected, signature.strip().lower())


def parse_phaxio_callback(fields: Mapping[str, str]) -> DeliveryUpdate:
    """A verified callback's fields → :class:`~engine.model.DeliveryUpdate` with the
    normalised status; ``provider_message_id`` is the fax id (the dedupe key) and
    ``outbox_id`` 0 (the engine maps the fax id to its row). Raises ``ValueError`` for a
    callback that is not about a sent fax or cannot be read."""
    if fields.get("direction", "sent") != "sent":
        raise ValueError("not a sent-fax callback")
    try:
        fax = json.loads(fields.get("fax", ""))
    except json.JSONDecodeError as exc:
        raise ValueError("fax field is not JSON") from exc
    if not isinstance(fax, dict):
        raise ValueError("fax field is not an object")
    state = fax_state(fax)
    return DeliveryUpdate(
        channel=CHANNEL,
        outbox_id=0,
        provider_message_id=state.fax_id,
        status=state.status,
        error_code=state.error_type,
    )


class FaxChannel:
    """The fax channel for the dispatcher (``channels.base.Channel``): ``item.recipient``
    is the fax number (E.164), the first PDF attachment is what is faxed, status callbacks
    go to ``callback_url`` (``https://<public host>/hooks/fax/<provider>``)."""

    def __init__(self, provider: FaxProvider, *, callback_url: str):
        self.provider = provider
        self.callback_url = callback_url

    async def send(self, item: OutboundMessage) -> SendReceipt:
        pdf = next((a.data for a in item.attachments if a.content_type == "application/pdf"), b"")
        if not pdf:
            raise ChannelError(f"{CHANNEL}: nothing to fax (no PDF attachment)", retryable=False)
        fax_id = await self.provider.send(
            item.recipient,
            pdf,
            callback_url=self.callback_url,
            idempotency_key=item.idempotency_key,
        )
        return SendReceipt(
            outbox_id=item.outbox_id,
            idempotency_key=item.idempotency_key,
            channel=CHANNEL,
            provider_message_id=fax_id,
            provider_status="queued",
        )
