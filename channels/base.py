"""The seam between the outbox dispatcher and the channel adapters.

A channel is anything with ``async def send(item) -> SendReceipt``. It either returns a
receipt (the provider accepted the message) or raises
:class:`~engine.errors.ChannelError`, whose ``retryable`` flag tells the dispatcher to
retry (after ``retry_after`` seconds when the provider said so) or dead-letter.

The mapping is the same for every HTTP provider and lives here:

| outcome                                  | retryable | why                                    |
|------------------------------------------|-----------|----------------------------------------|
| 2xx                                      | (receipt) |                                        |
| 408, 429, 5xx                            | yes       | the provider is busy or broken         |
| other 4xx                                | no        | the request itself is wrong            |
| timeout, connection refused/reset, DNS   | yes       | transport trouble, try again later     |

Reasons name the channel, the status and the provider's error code, never a recipient,
a body or a provider's free-text message (which may echo the phone number).
"""

from __future__ import annotations

import email.utils
from typing import Final, Protocol, runtime_checkable

import httpx

from engine.errors import ChannelError
from engine.model import OutboundMessage, SendReceipt

# RFC 9110 §15.5.9 (408 Request Timeout), RFC 6585 §4 (429 Too Many Requests).
RETRYABLE_4XX: Final = frozenset({408, 429})
# Cap on a provider's Retry-After so a bogus header cannot park a row for a year.
MAX_RETRY_AFTER: Final = 3600.0


@runtime_checkable
class Channel(Protocol):
    """What the dispatcher calls, once per outbox row (and again on retry).

    Contract: ``send`` is safe to call more than once for the same ``item``; it uses the
    provider's idempotency where there is one (see each channel's docs) and returns a
    :class:`SendReceipt` only when the provider accepted the message. Any failure is a
    :class:`ChannelError`; nothing else escapes. ``send`` never touches the store.
    """

    async def send(self, item: OutboundMessage) -> SendReceipt: ...


def is_retryable_status(status: int) -> bool:
    """True for HTTP statuses worth retrying: 408, 429 and every 5xx."""
    return status in RETRYABLE_4XX or status >= 500


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (RFC 9110 §10.2.3): either
    delay-seconds or an HTTP-date (relative to ``now``, epoch seconds). ``None`` when
    absent or unreadable; never negative; capped at :data:`MAX_RETRY_AFTER`."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return min(max(when.timestamp() - now, 0.0), MAX_RETRY_AFTER)


def error_for_status(
    channel: str,
    status: int,
    *,
    retry_after: str | None = None,
    now: float = 0.0,
    code: str = "",
) -> ChannelError:
    """The :class:`ChannelError` for a non-2xx HTTP ``status``. ``code`` is the provider's
    own error code (never its message text); ``retry_after`` the raw header."""
    retryable = is_retryable_status(status)
    reason = f"{channel}: provider answered HTTP {status}"
    if code:
        reason += f" (error {code})"
    return ChannelError(
        reason,
        retryable=retryable,
        retry_after=parse_retry_after(retry_after, now=now) if retryable else None,
    )


def error_for_transport(channel: str, exc: httpx.HTTPError) -> ChannelError:
    """The :class:`ChannelError` for an httpx failure that produced no response.

    Connect failures mean the request never left; a read/write timeout or a dropped
    connection means the provider may have acted on it ("outcome unknown"), which the
    reason says so the dispatcher's log can tell the two apart. Both are retryable.
    """
    if isinstance(exc, httpx.UnsupportedProtocol):
        return ChannelError(f"{channel}: unsupported URL scheme", retryable=False)
    if isinstance(exc, httpx.ConnectTimeout | httpx.ConnectError):
        return ChannelError(f"{channel}: cannot connect ({type(exc).__name__})", retryable=True)
    if isinstance(exc, httpx.TimeoutException):
        return ChannelError(
            f"{channel}: timed out ({type(exc).__name__}); outcome unknown", retryable=True
        )
    if isinstance(exc, httpx.TransportError):
        return ChannelError(
            f"{channel}: transport error ({type(exc).__name__}); outcome unknown",
            retryable=True,
        )
    # httpx.HTTPStatusError and friends: programming errors on our side, not transient.
    return ChannelError(f"{channel}: HTTP client error ({type(exc).__name__})", retryable=False)
