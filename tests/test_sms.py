"""SMS channel: contract with Twilio's own OpenAPI description (prism), provider error
mapping against a loopback fake, webhook signatures, reply keywords, status ordering,
and a PHI scan of every SMS body this module sends.

Prism is installed by ``make test`` (``npm ci --prefix tests/node``); without it these
tests fail with that instruction rather than skip, so CI can never pass without the
contract check.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest
from aiohttp import web
from multidict import MultiDict

from channels.sms.templates import SmsContext, SmsTemplates
from channels.sms.twilio import (
    RecipientOptedOut,
    SmsConfig,
    TwilioSms,
    classify_reply,
    compute_twilio_signature,
    gsm7_length,
    is_delivery_failure,
    is_gsm7,
    newer_status,
    outbox_id_from_url,
    parse_inbound_sms,
    parse_status_callback,
    segments,
    signature_algorithm,
    sms_body_problems,
    status_callback_url,
    status_rank,
    twiml_message,
    verify_twilio_signature,
)
from engine.errors import ChannelError
from engine.model import OutboundMessage

ROOT = Path(__file__).resolve().parent.parent
PRISM = ROOT / "tests" / "node" / "node_modules" / ".bin" / "prism"
CORPUS = ROOT.parent / "shared" / "corpus"
TWILIO_SPEC = CORPUS / "twilio" / "twilio_api_v2010.json"
TEMPLATES = ROOT / "templates" / "sms"

ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
SERVICE_SID = "MG" + "fedcba9876543210" * 2
AUTH_TOKEN = "test-auth-token-not-a-secret"
CALLBACK = "https://refloop.example.org/hooks/twilio/status"
PRACTICE = SmsContext(
    practice_name="Riverside Family Medicine",
    practice_phone="(555) 010-0123",
    booking_link="https://book.example.org/r",
)

# Every SMS body any test in this module put on the wire (the PHI scan reads it).
SENT_BODIES: list[str] = []


# ---------------------------------------------------------------------------
# Prism: Twilio's OpenAPI description as a validating mock


@dataclass
class Prism:
    base: str
    process: subprocess.Popen[str]
    log: list[str] = field(default_factory=list)


def _drain(stream: Any, sink: list[str]) -> None:
    for line in stream:
        sink.append(line)


@pytest.fixture(scope="session")
def prism() -> Iterator[Prism]:
    """``prism mock --errors`` on Twilio's spec, on 127.0.0.1 port 0 (the port is read
    from prism's own start-up line). Started once per run: start-up takes seconds."""
    if not PRISM.exists():
        pytest.fail(
            f"prism is not installed at {PRISM.relative_to(ROOT)}: run `make test` "
            "(it runs `npm ci --prefix tests/node`); the SMS contract test needs it"
        )
    assert TWILIO_SPEC.is_file(), f"Twilio OpenAPI description missing: {TWILIO_SPEC}"
    process = subprocess.Popen(
        [str(PRISM), "mock", "-h", "127.0.0.1", "-p", "0", "--errors", str(TWILIO_SPEC)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "NO_COLOR": "1", "FORCE_COLOR": "0"},
    )
    lines: list[str] = []
    found: list[str] = []
    ready = threading.Event()

    def watch() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
            if match and not found:
                found.append(match.group(1))
                ready.set()
        ready.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    ready.wait(timeout=120)
    try:
        if not found:
            pytest.fail("prism did not start:\n" + "".join(lines[-20:]))
        yield Prism(base=found[0], process=process, log=lines)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        watcher.join(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


@dataclass
class Exchange:
    method: str
    url: str
    form: list[tuple[str, str]]
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    text: str = ""


@asynccontextmanager
async def recording_client() -> AsyncIterator[tuple[httpx.AsyncClient, list[Exchange]]]:
    """An httpx client that records every request (and its reply) and collects every
    SMS body it carries into SENT_BODIES."""
    exchanges: list[Exchange] = []

    async def on_request(request: httpx.Request) -> None:
        form = parse_qsl(request.content.decode(), keep_blank_values=True)
        exchanges.append(Exchange(request.method, str(request.url), form))
        SENT_BODIES.extend(v for k, v in form if k == "Body")

    async def on_response(response: httpx.Response) -> None:
        await response.aread()
        ex = exchanges[-1]
        ex.status, ex.headers, ex.text = response.status_code, dict(response.headers), response.text

    async with httpx.AsyncClient(
        event_hooks={"request": [on_request], "response": [on_response]}
    ) as client:
        yield client, exchanges


def item(
    body: str, *, outbox_id: int = 41, to: str = "+15005550006", kind: str = "first_nudge"
) -> OutboundMessage:
    return OutboundMessage(
        outbox_id=outbox_id,
        idempotency_key=f"ob-{outbox_id}",
        channel="sms",
        recipient=to,
        kind=kind,
        body=body,
    )


def shipped_bodies() -> list[tuple[str, str]]:
    templates = SmsTemplates(TEMPLATES)
    return [(name, templates.render(name, PRACTICE)) for name in templates.names()]


SENDERS = {
    "messaging-service": {"messaging_service_sid": SERVICE_SID},
    "from-number": {"from_number": "+15005550001"},
    "both": {"messaging_service_sid": SERVICE_SID, "from_number": "+15005550001"},
}


def run(coro: Awaitable[Any]) -> Any:
    async def main() -> Any:
        return await coro

    return asyncio.run(main())


# ---------------------------------------------------------------------------
# Contract: every SMS refloop sends passes prism's validation of Twilio's spec


@pytest.mark.parametrize("sender", sorted(SENDERS))
@pytest.mark.parametrize("template", SmsTemplates(TEMPLATES).names())
def test_every_sms_passes_twilio_request_validation(
    prism: Prism, template: str, sender: str
) -> None:
    body = SmsTemplates(TEMPLATES).render(template, PRACTICE)
    cfg = SmsConfig(
        account_sid=ACCOUNT_SID,
        auth_token=AUTH_TOKEN,
        status_callback_url=CALLBACK,
        api_base=prism.base,
        messaging_service_sid=SENDERS[sender].get("messaging_service_sid", ""),
        from_number=SENDERS[sender].get("from_number", ""),
    )

    async def main() -> None:
        async with recording_client() as (http, exchanges):
            receipt = await TwilioSms(cfg, http=http).send(item(body, kind=template))
        assert len(exchanges) == 1
        ex = exchanges[0]
        assert ex.status == 201, ex.text
        # prism reports warnings (even on success) in sl-violations
        assert "sl-violations" not in ex.headers, ex.headers["sl-violations"]
        assert ex.url == f"{prism.base}/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
        sent = dict(ex.form)
        assert sent["To"] == "+15005550006" and sent["Body"] == body
        assert sent["StatusCallback"] == f"{CALLBACK}?outbox=41"
        assert ("MessagingServiceSid" in sent) == ("messaging_service_sid" in SENDERS[sender])
        assert receipt.provider_message_id.startswith("SM")
        assert receipt.provider_status and receipt.outbox_id == 41
        assert receipt.idempotency_key == "ob-41" and receipt.channel == "sms"

    run(main())


def test_prism_reports_an_invalid_request(prism: Prism) -> None:
    """The check can fail: the same SDK-built request without ``To`` is refused with
    422 and a validation message naming the field."""
    cfg = SmsConfig(
        account_sid=ACCOUNT_SID,
        auth_token=AUTH_TOKEN,
        messaging_service_sid=SERVICE_SID,
        api_base=prism.base,
    )

    async def main() -> None:
        async with recording_client() as (http, exchanges):
            sms = TwilioSms(cfg, http=http)
            response = await sms.transport.request(
                "POST",
                f"https://api.twilio.com/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json",
                data={"Body": "x Reply STOP to opt out", "MessagingServiceSid": SERVICE_SID},
                headers={"Content-Type": "application/x-www-form-urlencoded"},
                auth=(ACCOUNT_SID, AUTH_TOKEN),
            )
        assert response.status_code == 422
        problem = json.loads(response.text)
        assert any("'To'" in v["message"] for v in problem["validation"]), problem
        assert exchanges[0].url.startswith(prism.base)

    run(main())


def test_prism_refusal_maps_to_a_non_retryable_error(prism: Prism) -> None:
    """A request prism refuses (no credentials → 401 from the spec's security scheme)
    surfaces from ``send`` as a non-retryable ChannelError."""
    cfg = SmsConfig(
        account_sid=ACCOUNT_SID,
        auth_token=AUTH_TOKEN,
        messaging_service_sid=SERVICE_SID,
        api_base=prism.base,
    )
    body = shipped_bodies()[0][1]

    async def main() -> None:
        async def strip_auth(request: httpx.Request) -> None:
            del request.headers["Authorization"]

        async with httpx.AsyncClient(event_hooks={"request": [strip_auth]}) as http:
            with pytest.raises(ChannelError) as info:
                await TwilioSms(cfg, http=http).send(item(body))
        assert info.value.retryable is False
        assert "HTTP 401" in str(info.value)

    SENT_BODIES.append(body)
    run(main())


# ---------------------------------------------------------------------------
# Provider failures against a loopback fake Twilio (real sockets, port 0)


@asynccontextmanager
async def fake_twilio(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/2010-04-01/Accounts/{sid}/Messages.json", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def _twilio_error(status: int, code: int, message: str) -> web.Response:
    payload = {"code": code, "message": message, "more_info": "", "status": status}
    return web.json_response(payload, status=status)


FAILURES: list[tuple[str, int, dict[str, str], int, bool, float | None, type[ChannelError]]] = [
    # id, status, headers, twilio code, retryable, retry_after, error type
    ("429-retry-after", 429, {"Retry-After": "7"}, 20429, True, 7.0, ChannelError),
    ("500", 500, {}, 20500, True, None, ChannelError),
    ("503", 503, {}, 20503, True, None, ChannelError),
    ("400-invalid-to", 400, {}, 21211, False, None, ChannelError),
    ("400-unsubscribed", 400, {}, 21610, False, None, RecipientOptedOut),
    ("401", 401, {}, 20003, False, None, ChannelError),
    ("404", 404, {}, 20404, False, None, ChannelError),
]


@pytest.mark.parametrize(
    ("status", "headers", "code", "retryable", "retry_after", "kind"),
    [f[1:] for f in FAILURES],
    ids=[f[0] for f in FAILURES],
)
def test_provider_failures_map_to_channel_errors(
    status: int,
    headers: dict[str, str],
    code: int,
    retryable: bool,
    retry_after: float | None,
    kind: type[ChannelError],
) -> None:
    phone = "+15005550006"

    async def handler(request: web.Request) -> web.Response:
        await request.post()
        # Twilio's texts echo the number: it must not reach the error.
        response = _twilio_error(status, code, f"The 'To' number {phone} is not valid")
        response.headers.update(headers)
        return response

    async def main() -> None:
        async with fake_twilio(handler) as base, recording_client() as (http, _):
            cfg = SmsConfig(ACCOUNT_SID, AUTH_TOKEN, from_number="+15005550001", api_base=base)
            with pytest.raises(ChannelError) as info:
                await TwilioSms(cfg, http=http, clock=lambda: 1000.0).send(
                    item(shipped_bodies()[0][1], to=phone)
                )
        error = info.value
        assert type(error) is kind
        assert error.retryable is retryable
        assert error.retry_after == retry_after
        assert phone not in str(error) and "5550006" not in repr(error)
        assert error.__cause__ is None or phone not in str(error.__cause__)
        assert str(status) in str(error) or str(code) in str(error)

    run(main())


def test_timeout_is_retryable() -> None:
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({})

    async def main() -> None:
        async with fake_twilio(handler) as base, recording_client() as (http, _):
            cfg = SmsConfig(
                ACCOUNT_SID, AUTH_TOKEN, from_number="+15005550001", api_base=base, timeout=0.2
            )
            with pytest.raises(ChannelError) as info:
                await TwilioSms(cfg, http=http).send(item(shipped_bodies()[0][1]))
            release.set()
        assert info.value.retryable is True
        assert "outcome unknown" in str(info.value)

    run(main())


def test_connection_refused_is_retryable() -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response()

    async def main() -> None:
        async with fake_twilio(handler) as base:
            pass  # the server is gone: nothing listens on that port any more
        async with recording_client() as (http, _):
            cfg = SmsConfig(ACCOUNT_SID, AUTH_TOKEN, from_number="+15005550001", api_base=base)
            with pytest.raises(ChannelError) as info:
                await TwilioSms(cfg, http=http).send(item(shipped_bodies()[0][1]))
        assert info.value.retryable is True
        assert "cannot connect" in str(info.value)

    run(main())


BAD_BODIES = [
    ("no-opt-out", "Riverside: please call us."),
    ("too-long", "Reply STOP to opt out. " + "x" * 160),
    ("not-gsm7", "Riverside 🙂 Reply STOP to opt out"),
    ("empty", ""),
]


@pytest.mark.parametrize("body", [b for _, b in BAD_BODIES], ids=[i for i, _ in BAD_BODIES])
def test_send_refuses_a_body_that_breaks_the_rules_without_calling_twilio(body: str) -> None:
    async def main() -> None:
        async with recording_client() as (http, exchanges):
            cfg = SmsConfig(ACCOUNT_SID, AUTH_TOKEN, from_number="+15005550001")
            with pytest.raises(ChannelError) as info:
                await TwilioSms(cfg, http=http).send(item(body))
        assert info.value.retryable is False
        assert exchanges == []
        assert body[:20] not in str(info.value) or not body

    run(main())


def test_send_refuses_a_recipient_that_is_not_e164() -> None:
    async def main() -> None:
        async with recording_client() as (http, exchanges):
            cfg = SmsConfig(ACCOUNT_SID, AUTH_TOKEN, from_number="+15005550001")
            with pytest.raises(ChannelError) as info:
                await TwilioSms(cfg, http=http).send(item(shipped_bodies()[0][1], to="555-0100"))
        assert info.value.retryable is False and exchanges == []
        assert "555-0100" not in str(info.value)

    run(main())


def test_api_base_override_rewrites_only_scheme_and_host() -> None:
    sms = TwilioSms(SmsConfig(ACCOUNT_SID, AUTH_TOKEN, from_number="+1", api_base="http://h:1/p"))
    assert (
        sms.transport.rebase("https://api.twilio.com/2010-04-01/A.json?x=1")
        == "http://h:1/p/2010-04-01/A.json?x=1"
    )
    plain = TwilioSms(SmsConfig(ACCOUNT_SID, AUTH_TOKEN, from_number="+1"))
    assert plain.transport.rebase("https://api.twilio.com/x") == "https://api.twilio.com/x"


@pytest.mark.parametrize(
    ("cfg", "keys"),
    [
        (SmsConfig(ACCOUNT_SID, AUTH_TOKEN, messaging_service_sid=SERVICE_SID), []),
        (SmsConfig("ACxyz", AUTH_TOKEN, from_number="+15005550001"), ["account_sid"]),
        (SmsConfig(ACCOUNT_SID, "", from_number="+15005550001"), ["auth_token"]),
        (SmsConfig(ACCOUNT_SID, AUTH_TOKEN), ["messaging_service_sid"]),
        (SmsConfig(ACCOUNT_SID, AUTH_TOKEN, from_number="555"), ["from"]),
        (
            SmsConfig(
                ACCOUNT_SID, AUTH_TOKEN, from_number="+15005550001", status_callback_url="http://x"
            ),
            ["status_callback_url"],
        ),
        (
            SmsConfig(ACCOUNT_SID, AUTH_TOKEN, from_number="+15005550001", max_chars=0),
            ["max_chars"],
        ),
    ],
    ids=["ok", "account-sid", "token", "no-sender", "from", "callback-http", "max-chars"],
)
def test_config_problems(cfg: SmsConfig, keys: list[str]) -> None:
    assert [k for k, _ in cfg.problems()] == keys
    assert AUTH_TOKEN not in repr(cfg)


# ---------------------------------------------------------------------------
# Webhook signatures (X-Twilio-Signature)

# Twilio's published validation example (auth token 12345).
DOC_URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
DOC_PARAMS = {
    "CallSid": "CA1234567890ABCDE",
    "Caller": "+14158675309",
    "Digits": "1234",
    "From": "+14158675309",
    "To": "+18005551212",
}
DOC_SIGNATURE = "RSOYDt4T1cUTdK1PDd93/VVr8B8="


def test_signature_matches_twilios_published_vector() -> None:
    assert verify_twilio_signature(DOC_URL, DOC_PARAMS, DOC_SIGNATURE, "12345")
    assert compute_twilio_signature(DOC_URL, DOC_PARAMS, "12345") == DOC_SIGNATURE


def test_signature_with_repeated_parameters_matches_twilios_vector() -> None:
    params = MultiDict(
        [
            ("Sid", "CA123"),
            ("SidAccount", "AC123"),
            ("Digits", "5678"),
            ("Digits", "1234"),
            ("Digits", "1234"),
        ]
    )
    assert verify_twilio_signature(DOC_URL, params, "IK+Dwps556ElfBT0I3Rgjkr1wJU=", "12345")


HOOK_URL = "https://refloop.example.org/hooks/twilio/status?outbox=41"
HOOK_PARAMS = {
    "MessageSid": "SM" + "a" * 32,
    "MessageStatus": "delivered",
    "AccountSid": ACCOUNT_SID,
    "To": "+15005550006",
    "From": "+15005550001",
}
HOOK_SIGNATURE = compute_twilio_signature(HOOK_URL, HOOK_PARAMS, AUTH_TOKEN)

SIGNATURE_CASES: list[tuple[str, str, dict[str, str], str | None, str, bool]] = [
    ("valid", HOOK_URL, HOOK_PARAMS, HOOK_SIGNATURE, AUTH_TOKEN, True),
    (
        "valid-with-explicit-port",
        HOOK_URL.replace(".org/", ".org:443/"),
        HOOK_PARAMS,
        HOOK_SIGNATURE,
        AUTH_TOKEN,
        True,
    ),
    (
        "tampered-body",
        HOOK_URL,
        {**HOOK_PARAMS, "MessageStatus": "failed"},
        HOOK_SIGNATURE,
        AUTH_TOKEN,
        False,
    ),
    (
        "added-param",
        HOOK_URL,
        {**HOOK_PARAMS, "ErrorCode": "30003"},
        HOOK_SIGNATURE,
        AUTH_TOKEN,
        False,
    ),
    (
        "tampered-url-query",
        HOOK_URL.replace("outbox=41", "outbox=42"),
        HOOK_PARAMS,
        HOOK_SIGNATURE,
        AUTH_TOKEN,
        False,
    ),
    (
        "tampered-url-path",
        HOOK_URL.replace("/status", "/sms"),
        HOOK_PARAMS,
        HOOK_SIGNATURE,
        AUTH_TOKEN,
        False,
    ),
    (
        "proxy-url-not-public",
        "http://127.0.0.1:8575/hooks/twilio/status?outbox=41",
        HOOK_PARAMS,
        HOOK_SIGNATURE,
        AUTH_TOKEN,
        False,
    ),
    ("missing-header", HOOK_URL, HOOK_PARAMS, None, AUTH_TOKEN, False),
    ("empty-header", HOOK_URL, HOOK_PARAMS, "", AUTH_TOKEN, False),
    ("garbage-header", HOOK_URL, HOOK_PARAMS, "not base64 王", AUTH_TOKEN, False),
    ("wrong-token", HOOK_URL, HOOK_PARAMS, HOOK_SIGNATURE, "another-token", False),
    ("empty-token", HOOK_URL, HOOK_PARAMS, HOOK_SIGNATURE, "", False),
]


@pytest.mark.parametrize(
    ("url", "params", "signature", "token", "expected"),
    [c[1:] for c in SIGNATURE_CASES],
    ids=[c[0] for c in SIGNATURE_CASES],
)
def test_signature_verification(
    url: str, params: dict[str, str], signature: str | None, token: str, expected: bool
) -> None:
    assert verify_twilio_signature(url, params, signature, token) is expected


def test_signature_accepts_pairs_and_multidicts_alike() -> None:
    pairs = list(HOOK_PARAMS.items())
    assert verify_twilio_signature(HOOK_URL, pairs, HOOK_SIGNATURE, AUTH_TOKEN)
    assert verify_twilio_signature(HOOK_URL, MultiDict(pairs), HOOK_SIGNATURE, AUTH_TOKEN)


def test_json_webhook_signature_checks_body_sha256() -> None:
    body = '{"property": "value", "boolean": true}'
    # Twilio's published body hash for that body
    digest = "0a1ff7634d9ab3b95db5c9a2dfe9416e41502b283a80c7cf19632632f96e6620"
    url = f"{DOC_URL}&bodySHA256={digest}"
    signature = compute_twilio_signature(url, {}, "12345")
    assert verify_twilio_signature(url, body, signature, "12345")
    assert not verify_twilio_signature(url, body.replace("true", "false"), signature, "12345")
    assert not verify_twilio_signature(DOC_URL, body, signature, "12345")  # no bodySHA256


def test_sha256_shared_key_signature() -> None:
    algorithm = signature_algorithm("key=webhooks_sharedkey_1,algorithm=HMAC_SHA256")
    assert algorithm == "HMAC_SHA256"
    signature = compute_twilio_signature(HOOK_URL, HOOK_PARAMS, "shared", algorithm=algorithm)
    assert verify_twilio_signature(HOOK_URL, HOOK_PARAMS, signature, "shared", algorithm=algorithm)
    assert not verify_twilio_signature(HOOK_URL, HOOK_PARAMS, signature, "shared")
    assert signature_algorithm(None) == "HMAC_SHA1"
    assert not verify_twilio_signature(
        HOOK_URL, HOOK_PARAMS, signature, "shared", algorithm="HMAC_MD5"
    )


# ---------------------------------------------------------------------------
# Replies: STOP / START / HELP / YES

KEYWORDS: list[tuple[str, str]] = [
    ("STOP", "stop"),
    ("stop", "stop"),
    ("  Stop.  ", "stop"),
    ("STOPALL", "stop"),
    ("UNSUBSCRIBE", "stop"),
    ("CANCEL", "stop"),
    ("End", "stop"),
    ("QUIT", "stop"),
    ("REVOKE", "stop"),
    ("OPTOUT", "stop"),
    ("opt out", "stop"),
    ("Opt-out", "stop"),
    ("STOP please", "stop"),
    ("please stop texting me", "stop"),
    ("Stop sending me messages!", "stop"),
    ("don't text me", "stop"),
    ("Do not contact me again", "stop"),
    ("no more texts", "stop"),
    ("remove me from this list", "stop"),
    ("unsubscribe me", "stop"),
    ("Yes but stop texting me", "stop"),
    ("START", "start"),
    ("start", "start"),
    ("UNSTOP", "start"),
    ("HELP", "help"),
    ("help!", "help"),
    ("INFO", "help"),
    ("help me", "help"),
    ("YES", "yes"),
    ("yes", "yes"),
    ("Y", "yes"),
    ("y.", "yes"),
    ("Yes please!", "yes"),
    ("yes, book it", "yes"),
    ("I need to cancel my appointment", "other"),
    ("I will attend next week", "other"),
    ("the stopwatch is broken", "other"),
    ("yesterday I called", "other"),
    ("Who is this?", "other"),
    ("", "other"),
    ("   ", "other"),
    ("🙂", "other"),
    ("NO", "other"),
]


@pytest.mark.parametrize(("body", "expected"), KEYWORDS, ids=[repr(b) for b, _ in KEYWORDS])
def test_classify_reply(body: str, expected: str) -> None:
    assert classify_reply(body) == expected


def test_inbound_sms_prefers_twilios_opt_out_type() -> None:
    reply = parse_inbound_sms(
        {"MessageSid": "SM1", "From": "+15005550006", "To": "+15005550001", "Body": "arret"}
    )
    assert reply.keyword == "other" and reply.provider_message_id == "SM1"
    reply = parse_inbound_sms({"MessageSid": "SM2", "Body": "arret", "OptOutType": "STOP"})
    assert reply.keyword == "stop"
    reply = parse_inbound_sms({"MessageSid": "SM3", "Body": "YES"})
    assert reply.keyword == "yes" and reply.body == "YES"


def test_help_reply_is_twiml_with_the_practice_phone() -> None:
    text = SmsTemplates(TEMPLATES).render("help", PRACTICE)
    twiml = twiml_message(text)
    assert twiml.startswith('<?xml version="1.0" encoding="UTF-8"?><Response><Message>')
    assert PRACTICE.practice_phone in twiml


# ---------------------------------------------------------------------------
# Delivery statuses never move backwards

STATUS_ORDER: list[tuple[str, str, bool]] = [
    ("", "queued", True),
    ("queued", "sending", True),
    ("accepted", "queued", True),
    ("scheduled", "accepted", True),
    ("sending", "sent", True),
    ("sent", "delivered", True),
    ("sent", "failed", True),
    ("sent", "undelivered", True),
    ("delivered", "read", True),
    ("queued", "delivered", True),
    ("delivered", "sent", False),
    ("delivered", "sending", False),
    ("delivered", "queued", False),
    ("failed", "sent", False),
    ("undelivered", "sending", False),
    ("sent", "sent", False),
    ("delivered", "failed", False),
    ("failed", "delivered", False),
    ("read", "delivered", False),
    ("sent", "receiving", False),
    ("sent", "bogus", False),
    ("bogus", "sent", True),
    ("SENT", "Delivered", True),
]


@pytest.mark.parametrize(
    ("old", "new", "moves"), STATUS_ORDER, ids=[f"{o or '-'}->{n}" for o, n, _ in STATUS_ORDER]
)
def test_status_never_regresses(old: str, new: str, moves: bool) -> None:
    assert newer_status(old, new) is moves


def test_out_of_order_callbacks_settle_on_the_latest_status() -> None:
    arrivals = ["sent", "delivered", "queued", "sending", "sent"]
    current = ""
    for status in arrivals:
        if newer_status(current, status):
            current = status
    assert current == "delivered"
    assert status_rank("delivered") > status_rank("sent") > status_rank("queued") >= 0
    assert status_rank("nonsense") == -1


@pytest.mark.parametrize(
    ("status", "fails"),
    [("failed", True), ("undelivered", True), ("delivered", False), ("sent", False)],
)
def test_failed_and_undelivered_advance_the_rotation(status: str, fails: bool) -> None:
    assert is_delivery_failure(status) is fails


def test_status_callback_maps_back_to_its_outbox_row() -> None:
    url = status_callback_url(CALLBACK, 41)
    assert url == f"{CALLBACK}?outbox=41"
    assert status_callback_url(f"{CALLBACK}?site=a&outbox=9", 41) == f"{CALLBACK}?site=a&outbox=41"
    assert outbox_id_from_url(url) == 41
    assert outbox_id_from_url(CALLBACK) == 0
    assert outbox_id_from_url(f"{CALLBACK}?outbox=x") == 0
    update = parse_status_callback(
        {"MessageSid": "SM9", "MessageStatus": "undelivered", "ErrorCode": "30003"}, url=url
    )
    assert (update.outbox_id, update.status, update.error_code) == (41, "undelivered", "30003")
    assert update.channel == "sms" and update.provider_message_id == "SM9"


# ---------------------------------------------------------------------------
# GSM-7 and segments

SEGMENTS: list[tuple[str, str, bool, int]] = [
    ("empty", "", True, 1),
    ("160-gsm", "a" * 160, True, 1),
    ("161-gsm", "a" * 161, True, 2),
    ("306-gsm", "a" * 306, True, 2),
    ("307-gsm", "a" * 307, True, 3),
    ("extension-counts-two", "€" * 80, True, 1),
    ("extension-overflows", "€" * 81, True, 2),
    ("escape-not-split", "a" * 152 + "€" + "a" * 10, True, 2),
    ("70-ucs2", "é" * 0 + "ж" * 70, False, 1),
    ("71-ucs2", "ж" * 71, False, 2),
    ("emoji-is-two-units", "🙂" * 35, False, 1),
    ("emoji-overflows", "🙂" * 36, False, 2),
    ("gsm-accents", "èéùìò ÄÖÑÜ äöñüà £$¥", True, 1),
]


@pytest.mark.parametrize(
    ("text", "gsm", "parts"), [s[1:] for s in SEGMENTS], ids=[s[0] for s in SEGMENTS]
)
def test_gsm7_and_segments(text: str, gsm: bool, parts: int) -> None:
    assert is_gsm7(text) is gsm
    assert segments(text) == parts


def test_gsm7_length_counts_extension_characters_twice() -> None:
    assert gsm7_length("a{b}") == 6
    assert sms_body_problems("{" * 80 + " STOP") != []  # 165 septets
    assert sms_body_problems("{" * 77 + " STOP") == []  # 159 septets


# ---------------------------------------------------------------------------
# No PHI in any SMS: scan every body sent above against the corpus's patients


def _hl7_patients() -> tuple[set[str], set[str]]:
    names: set[str] = set()
    ids: set[str] = set()
    for path in (CORPUS / "hl7").rglob("*"):
        if not path.is_file():
            continue
        text = path.read_bytes().decode("latin-1")
        msh = text.find("MSH")
        if msh < 0 or len(text) < msh + 8:
            continue
        fs, cs, rs = text[msh + 3], text[msh + 4], text[msh + 5]
        for segment in re.split(r"[\r\n]+", text):
            if not segment.startswith("PID" + fs):
                continue
            fields = segment.split(fs)
            for index in (2, 3, 4, 18, 19):  # patient ids, account number, SSN
                for rep in (fields[index] if len(fields) > index else "").split(rs):
                    value = rep.split(cs)[0].strip()
                    if len(value) >= 4:
                        ids.add(value)
            for rep in (fields[5] if len(fields) > 5 else "").split(rs):
                for part in rep.split(cs)[:3]:  # family, given, middle
                    names.update(w for w in re.findall(r"[A-Za-z']+", part) if len(w) >= 3)
            if len(fields) > 7 and len(fields[7]) >= 8:
                ids.add(fields[7][:8])  # date of birth
    return names, ids


def _fhir_patients() -> tuple[set[str], set[str]]:
    names: set[str] = set()
    ids: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("resourceType") == "Patient":
                for name in node.get("name", []):
                    for part in [name.get("family", ""), *name.get("given", [])]:
                        if isinstance(part, str):
                            names.update(w for w in re.findall(r"[A-Za-z']+", part) if len(w) >= 3)
                for identifier in node.get("identifier", []):
                    value = str(identifier.get("value", ""))
                    if len(value) >= 4:
                        ids.add(value)
                if node.get("birthDate"):
                    ids.add(str(node["birthDate"]))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for path in (CORPUS / "fhir").glob("*.json"):
        walk(json.loads(path.read_text(encoding="utf-8-sig")))
    return names, ids


def corpus_phi() -> tuple[set[str], set[str]]:
    hl7_names, hl7_ids = _hl7_patients()
    fhir_names, fhir_ids = _fhir_patients()
    return hl7_names | fhir_names, hl7_ids | fhir_ids


def phi_found(body: str, names: set[str], ids: set[str]) -> list[str]:
    words = {w.casefold() for w in re.findall(r"[A-Za-z']+", body)}
    hits = sorted(n for n in names if n.casefold() in words)
    hits += sorted(
        i for i in ids if re.search(rf"(?<![0-9A-Za-z]){re.escape(i)}(?![0-9A-Za-z])", body)
    )
    return hits


def test_corpus_yields_patients_to_scan_for() -> None:
    names, ids = corpus_phi()
    assert len(names) > 20 and len(ids) > 20
    # the scanner does find a corpus patient when one is there
    name = sorted(names)[0]
    assert phi_found(f"Hello {name}. Reply STOP", names, ids) == [name]


def test_zz_no_sms_body_sent_in_this_module_carries_corpus_phi(prism: Prism) -> None:
    """Runs last in this module (and stands alone): sends every shipped template once
    more, then scans every body any test here put on the wire."""

    async def main() -> None:
        cfg = SmsConfig(
            ACCOUNT_SID, AUTH_TOKEN, messaging_service_sid=SERVICE_SID, api_base=prism.base
        )
        async with recording_client() as (http, _):
            sms = TwilioSms(cfg, http=http)
            for i, (name, body) in enumerate(shipped_bodies()):
                await sms.send(item(body, outbox_id=100 + i, kind=name))

    run(main())
    names, ids = corpus_phi()
    assert len(SENT_BODIES) >= len(shipped_bodies())
    leaks = {body: phi_found(body, names, ids) for body in set(SENT_BODIES)}
    assert {b: h for b, h in leaks.items() if h} == {}
