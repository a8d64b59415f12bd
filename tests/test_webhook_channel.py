"""Signed JSON webhook channel against a real aiohttp server on 127.0.0.1 port 0:
success, 429 with Retry-After, 5xx, 4xx, timeout, refused connection; the receiver
verifies the signature over the raw body."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from aiohttp import web

from channels.base import Channel, parse_retry_after
from channels.webhook import (
    IDEMPOTENCY_HEADER,
    SIGNATURE_HEADER,
    WebhookChannel,
    WebhookConfig,
    envelope,
    sign,
    verify_signature,
)
from engine.errors import ChannelError
from engine.model import Attachment, OutboundMessage

SECRET = "webhook-secret-for-tests-only"
NOW = 1_760_000_000.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def serve(handler: Handler) -> AsyncIterator[str]:
    """An aiohttp server on 127.0.0.1 port 0 answering every POST with ``handler``."""
    app = web.Application()
    app.router.add_post("/hook", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    finally:
        await runner.cleanup()


def item(**kw: Any) -> OutboundMessage:
    base: dict[str, Any] = {
        "outbox_id": 7,
        "idempotency_key": "ob-7",
        "channel": "coordinator",
        "recipient": "worklist:referrals",
        "kind": "coordinator-task",
        "subject": "Call to book",
        "body": "Patient asked to book by phone.",
        "referral_id": "R-1",
        "priority": "urgent",
        "priority_score": 0.87,
    }
    base.update(kw)
    return OutboundMessage(**base)


def channel(url: str, http: httpx.AsyncClient, timeout: float = 5.0) -> WebhookChannel:
    return WebhookChannel(
        "coordinator",
        WebhookConfig(url=url, secret=SECRET, timeout=timeout),
        http=http,
        clock=lambda: NOW,
    )


def test_is_a_channel() -> None:
    cfg = WebhookConfig(url="https://x.example.org/h", secret=SECRET)
    assert isinstance(WebhookChannel("c", cfg), Channel)


def test_success_is_signed_and_verifiable() -> None:
    received: list[tuple[bytes, dict[str, str]]] = []

    async def handler(request: web.Request) -> web.Response:
        received.append((await request.read(), dict(request.headers)))
        return web.json_response({"id": "task-99"}, status=201)

    async def main() -> None:
        async with serve(handler) as url, httpx.AsyncClient() as http:
            attach = Attachment("note.txt", "text/plain", b"hello")
            receipt = await channel(url, http).send(item(attachments=(attach,)))
        assert receipt.provider_message_id == "task-99"
        assert receipt.provider_status == "201"
        assert (receipt.outbox_id, receipt.idempotency_key) == (7, "ob-7")
        body, headers = received[0]
        assert headers[IDEMPOTENCY_HEADER] == "ob-7"
        assert headers["Content-Type"] == "application/json"
        signature = headers[SIGNATURE_HEADER]
        assert signature.startswith(f"t={int(NOW)},v1=")
        assert verify_signature(SECRET, body, signature, now=NOW + 10)
        doc = json.loads(body)
        assert doc["id"] == "ob-7" and doc["kind"] == "coordinator-task"
        assert doc["priority_score"] == 0.87 and doc["priority"] == "urgent"
        assert base64.b64decode(doc["attachments"][0]["data"]) == b"hello"
        assert doc["payload"] is None

    asyncio.run(main())


def test_json_payload_travels_as_an_object() -> None:
    doc = envelope(item(payload='{"task": {"type": "call", "n": 2}}'))
    assert doc["payload"] == {"task": {"type": "call", "n": 2}}
    with pytest.raises(ChannelError) as info:
        envelope(item(payload="{not json"))
    assert info.value.retryable is False


def test_retries_carry_the_same_idempotency_key() -> None:
    keys: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        keys.append(request.headers[IDEMPOTENCY_HEADER])
        return web.Response(status=204)

    async def main() -> None:
        async with serve(handler) as url, httpx.AsyncClient() as http:
            ch = channel(url, http)
            await ch.send(item())
            await ch.send(item())

    asyncio.run(main())
    assert keys == ["ob-7", "ob-7"]


FAILURES: list[tuple[str, int, dict[str, str], bool, float | None]] = [
    ("429-retry-after-seconds", 429, {"Retry-After": "30"}, True, 30.0),
    ("429-retry-after-date", 429, {"Retry-After": "Thu, 09 Oct 2025 08:55:00 GMT"}, True, 100.0),
    ("429-no-header", 429, {}, True, None),
    ("500", 500, {}, True, None),
    ("502", 502, {}, True, None),
    ("503-retry-after", 503, {"Retry-After": "5"}, True, 5.0),
    ("408", 408, {}, True, None),
    ("400", 400, {}, False, None),
    ("401", 401, {}, False, None),
    ("404", 404, {}, False, None),
    ("409", 409, {}, False, None),
    ("422-ignores-retry-after", 422, {"Retry-After": "5"}, False, None),
]


@pytest.mark.parametrize(
    ("status", "headers", "retryable", "retry_after"),
    [f[1:] for f in FAILURES],
    ids=[f[0] for f in FAILURES],
)
def test_failures_map_to_channel_errors(
    status: int, headers: dict[str, str], retryable: bool, retry_after: float | None
) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=status, headers=headers, text="Patient Jane Doe not found")

    async def main() -> None:
        async with serve(handler) as url, httpx.AsyncClient() as http:
            ch = WebhookChannel(
                "coordinator",
                WebhookConfig(url=url, secret=SECRET),
                http=http,
                clock=lambda: 1_760_000_000.0,  # 100 s before the HTTP-date above
            )
            with pytest.raises(ChannelError) as info:
                await ch.send(item())
        assert info.value.retryable is retryable
        assert info.value.retry_after == retry_after
        assert str(status) in str(info.value)
        assert "Jane" not in str(info.value)  # the receiver's text never reaches the error

    asyncio.run(main())


def test_timeout_is_retryable() -> None:
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response()

    async def main() -> None:
        async with serve(handler) as url, httpx.AsyncClient() as http:
            with pytest.raises(ChannelError) as info:
                await channel(url, http, timeout=0.2).send(item())
            release.set()
        assert info.value.retryable is True and "outcome unknown" in str(info.value)

    asyncio.run(main())


def test_refused_connection_is_retryable() -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response()

    async def main() -> None:
        async with serve(handler) as url:
            pass
        async with httpx.AsyncClient() as http:
            with pytest.raises(ChannelError) as info:
                await channel(url, http).send(item())
        assert info.value.retryable is True and "cannot connect" in str(info.value)

    asyncio.run(main())


BODY = b'{"id":"ob-7"}'
GOOD = sign(SECRET, BODY, int(NOW))
SIGNATURES: list[tuple[str, str, bytes, str | None, float, bool]] = [
    ("valid", SECRET, BODY, GOOD, NOW, True),
    ("valid-within-tolerance", SECRET, BODY, GOOD, NOW + 299, True),
    ("too-old", SECRET, BODY, GOOD, NOW + 301, False),
    ("from-the-future", SECRET, BODY, GOOD, NOW - 301, False),
    ("tampered-body", SECRET, b'{"id":"ob-8"}', GOOD, NOW, False),
    (
        "tampered-timestamp",
        SECRET,
        BODY,
        GOOD.replace(f"t={int(NOW)}", f"t={int(NOW) + 1}"),
        NOW,
        False,
    ),
    ("wrong-secret", "another-secret-value", BODY, GOOD, NOW, False),
    ("missing", SECRET, BODY, None, NOW, False),
    ("empty", SECRET, BODY, "", NOW, False),
    ("no-v1", SECRET, BODY, f"t={int(NOW)}", NOW, False),
    ("no-t", SECRET, BODY, GOOD.split(",")[1], NOW, False),
    ("garbage", SECRET, BODY, "t=abc,v1=zz", NOW, False),
    ("rotation-second-v1", SECRET, BODY, GOOD + ",v1=" + "0" * 64, NOW, True),
]


@pytest.mark.parametrize(
    ("secret", "body", "header", "now", "ok"),
    [s[1:] for s in SIGNATURES],
    ids=[s[0] for s in SIGNATURES],
)
def test_verify_signature(
    secret: str, body: bytes, header: str | None, now: float, ok: bool
) -> None:
    assert verify_signature(secret, body, header, now=now) is ok


@pytest.mark.parametrize(
    ("cfg", "keys"),
    [
        (WebhookConfig("https://portal.example.org/hook", SECRET), []),
        (WebhookConfig("http://127.0.0.1:9/hook", SECRET), []),
        (WebhookConfig("http://portal.example.org/hook", SECRET), ["url"]),
        (WebhookConfig("ftp://x/hook", SECRET), ["url"]),
        (WebhookConfig("https://portal.example.org/hook", "short"), ["secret"]),
    ],
    ids=["https", "loopback-http", "plain-http", "ftp", "short-secret"],
)
def test_config_problems(cfg: WebhookConfig, keys: list[str]) -> None:
    assert [k for k, _ in cfg.problems()] == keys
    assert SECRET not in repr(cfg)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("12", 12.0),
        ("999999", 3600.0),
        ("Thu, 09 Oct 2025 08:55:00 GMT", 100.0),
        ("Thu, 09 Oct 2025 08:36:40 GMT", 0.0),
        ("soon", None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, now=1_760_000_000.0) == expected
