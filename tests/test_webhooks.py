"""The webhooks through the engine's real HTTP server on 127.0.0.1 port 0: Twilio
signatures (valid, tampered body, tampered URL, missing header → 403), STOP / START /
HELP / YES, out-of-order delivery statuses, a failed text moving the rotation to the
portal, the Phaxio callback, the /confirm/<token> link and the /api/ bearer token."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import httpx
import pytest
import yaml
from aiohttp import web
from twilio.request_validator import RequestValidator

from channels.confirm import make_token
from channels.fax.phaxio import SIGNATURE_HEADER as PHAXIO_HEADER
from channels.fax.phaxio import phaxio_signature
from channels.sms.twilio import SIGNATURE_HEADER, compute_twilio_signature, status_callback_url
from channels.webhook import IDEMPOTENCY_HEADER
from engine.app import Engine
from engine.clock import VirtualClock
from engine.config import loads
from engine.model import Identifiers, PatientContact, Provider, ReferralCreated
from engine.store import outbox
from engine.store import referrals as referral_store

pytestmark = pytest.mark.store  # every test here uses the store

T0 = 1_767_225_600.0
PUBLIC = "https://refloop.example.org"
TOKEN = "twilio-auth-token-for-tests-0123"
VOICE_TOKEN = "twilio-voice-auth-token-for-tests-45"  # a second account's token
FAX_TOKEN = "phaxio-callback-token-for-tests"
CONFIRM_KEY = "confirm-key-for-tests-0123456789abcdef"
ADMIN = "admin-token-for-tests"
ACCOUNT = "AC" + "0" * 32
PATIENT = "+15550100001"
SMS_URL = f"{PUBLIC}/hooks/twilio/sms"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def receiver() -> AsyncIterator[tuple[str, list[str], asyncio.Event]]:
    """A webhook receiver (portal / coordinator): yields its URL, the idempotency keys
    received and an event set on each request."""
    keys: list[str] = []
    arrived = asyncio.Event()

    async def handle(request: web.Request) -> web.Response:
        keys.append(request.headers.get(IDEMPOTENCY_HEADER, ""))
        arrived.set()
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/in", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/in", keys, arrived
    finally:
        await runner.cleanup()


@dataclass
class Rig:
    engine: Engine
    http: httpx.AsyncClient
    base: str
    portal: tuple[list[str], asyncio.Event]
    coordinator: tuple[list[str], asyncio.Event]

    @property
    def db(self) -> Any:
        assert self.engine.db is not None
        return self.engine.db

    async def twilio(
        self,
        path: str,
        form: dict[str, str],
        *,
        signed_url: str | None = None,
        signed_form: dict[str, str] | None = None,
        signature: str | None = "",
        token: str = TOKEN,
    ) -> httpx.Response:
        """POST ``form`` to ``path`` signed as Twilio would for ``signed_url`` (default:
        the public URL of ``path``) and ``signed_form`` (default: ``form``)."""
        url = signed_url or f"{PUBLIC}{path}"
        headers = {}
        if signature is not None:
            headers[SIGNATURE_HEADER] = signature or compute_twilio_signature(
                url, signed_form or form, token
            )
        return await self.http.post(f"{self.base}{path}", data=form, headers=headers)

    def referral(self, placer: str, **contact: Any) -> int:
        tracker = self.engine.tracker
        with self.db.transaction() as conn:
            result = tracker.apply(
                ReferralCreated(
                    ids=Identifiers(sending_facility="EPIC", placer_number=placer),
                    occurred_at=T0,
                    specialist=Provider(name="Dr Heart"),
                    contact=PatientContact(**contact),
                ),
                conn,
            )
        assert result.referral_id is not None
        return int(result.referral_id)

    def sent_row(
        self, referral_id: int, channel: str, key: str, provider_id: str, status: str, to: str = ""
    ) -> int:
        """An outbox row as the dispatcher leaves it after the provider accepted it
        (written in one synchronous block, so the running dispatcher cannot take it)."""
        with self.db.transaction() as conn:
            referral_store.enqueue_outbox(
                conn, referral_id, channel, "first-nudge", "{}", key, T0, now=T0
            )
            (item,) = outbox.claim_due(conn, channel, T0 + 1, 100)
            outbox.mark_sent(
                conn, item.id, recipient=to, provider_id=provider_id, provider_status=status, now=T0
            )
        return item.id

    def row(self, outbox_id: int) -> outbox.Item:
        item = outbox.get(self.db.conn, outbox_id)
        assert item is not None
        return item


@asynccontextmanager
async def rig(tmp_path: Path, **sms_settings: Any) -> AsyncIterator[Rig]:
    async with (
        receiver() as (portal_url, portal_keys, portal_evt),
        receiver() as (
            coord_url,
            coord_keys,
            coord_evt,
        ),
    ):
        doc = {
            "version": 1,
            "store": {"file": "refloop.db"},
            "http": {
                "host": "127.0.0.1",
                "port": 0,
                "public_url": PUBLIC,
                "admin_token": ADMIN,
                "confirm_key": "${env:CONFIRM_KEY}",
            },
            "channels": {
                "sms": {
                    "type": "sms",
                    "account_sid": ACCOUNT,
                    "auth_token": "${env:TWILIO_TOKEN}",
                    "from_number": "+15550009999",
                    "api_base": "http://127.0.0.1:9",
                    **sms_settings,
                },
                "portal": {"type": "webhook", "url": portal_url, "secret": "${env:HOOK_SECRET}"},
                "voice": {
                    "type": "voice",
                    "account_sid": ACCOUNT,
                    "auth_token": "${env:VOICE_TOKEN}",
                    "from_number": "+15550009998",
                    "status_callback_url": f"{PUBLIC}/hooks/twilio/voice-status",
                    "api_base": "http://127.0.0.1:9",
                },
                "coordinator": {
                    "type": "webhook",
                    "url": coord_url,
                    "secret": "${env:HOOK_SECRET}",
                },
                "fax": {
                    "type": "fax",
                    "api_key": "${env:FAX_KEY}",
                    "api_secret": "${env:FAX_KEY}",
                    "callback_token": "${env:FAX_TOKEN}",
                    "api_url": "http://127.0.0.1:9",
                },
            },
            "practice": {"name": "Riverside Family Medicine", "phone": "555-0100"},
            "routes": [{"name": "all", "then": [{"drop": "tests"}]}],
        }
        env = {
            "TWILIO_TOKEN": TOKEN,
            "VOICE_TOKEN": VOICE_TOKEN,
            "HOOK_SECRET": "hook-secret-for-tests-0123",
            "FAX_KEY": "fax-key",
            "FAX_TOKEN": FAX_TOKEN,
            "CONFIRM_KEY": CONFIRM_KEY,
        }
        cfg = loads(yaml.safe_dump(doc, sort_keys=False), file="hooks.yaml", env=env)
        engine = Engine(cfg, tmp_path / "state", clock=VirtualClock(T0), drain_seconds=2.0)
        await engine.start()
        try:
            async with httpx.AsyncClient() as http:
                yield Rig(
                    engine,
                    http,
                    f"http://127.0.0.1:{engine.ports()['http']}",
                    (portal_keys, portal_evt),
                    (coord_keys, coord_evt),
                )
        finally:
            await engine.stop()


def run(body: Callable[[Rig], Awaitable[None]], tmp_path: Path, **sms_settings: Any) -> None:
    async def main() -> None:
        async with rig(tmp_path, **sms_settings) as r:
            await asyncio.wait_for(body(r), 20)

    asyncio.run(main())


def inbound(sid: str, body: str, sender: str = PATIENT) -> dict[str, str]:
    return {
        "MessageSid": sid,
        "AccountSid": ACCOUNT,
        "From": sender,
        "To": "+15550009999",
        "Body": body,
    }


# ---------------------------------------------------------------------------
# Signatures


SIGNATURE_CASES: list[tuple[str, dict[str, Any], int]] = [
    ("valid", {}, 200),
    ("tampered-body", {"signed_form": inbound("SM1", "START")}, 403),
    ("tampered-url", {"signed_url": f"{PUBLIC}/hooks/twilio/other"}, 403),
    ("other-host", {"signed_url": "https://attacker.example.org/hooks/twilio/sms"}, 403),
    ("missing-header", {"signature": None}, 403),
    ("garbage-header", {"signature": "bm90IGEgc2lnbmF0dXJl"}, 403),
]


@pytest.mark.parametrize(
    ("case", "kw", "expected"), SIGNATURE_CASES, ids=[c[0] for c in SIGNATURE_CASES]
)
def test_twilio_signature(tmp_path: Path, case: str, kw: dict[str, Any], expected: int) -> None:
    async def body(r: Rig) -> None:
        response = await r.twilio("/hooks/twilio/sms", inbound("SM1", "STOP"), **kw)
        assert response.status_code == expected
        assert outbox.is_suppressed(r.db.conn, PATIENT) is (expected == 200)
        status = await r.twilio("/hooks/twilio/status", {"MessageSid": "SM9"}, **kw)
        assert status.status_code == (204 if expected == 200 else 403)

    run(body, tmp_path)


# ---------------------------------------------------------------------------
# Replies


def test_stop_then_start_and_plain_language_opt_out(tmp_path: Path) -> None:
    async def body(r: Rig) -> None:
        for sid, text, suppressed in [
            ("SM1", "STOP", True),
            ("SM2", "START", False),
            ("SM3", "please stop texting me", True),
            ("SM4", "unstop", False),
            ("SM5", "QUIT", True),
        ]:
            response = await r.twilio("/hooks/twilio/sms", inbound(sid, text))
            assert response.status_code == 200
            assert response.headers["Content-Type"].startswith("application/xml")
            # an opt-out is confirmed once (stop_confirm, "START"); START gets no answer
            assert ("<Message>" in response.text) is suppressed, text
            assert outbox.is_suppressed(r.db.conn, PATIENT) is suppressed, text

    run(body, tmp_path)


def _twiml_message(xml: str) -> str | None:
    """The text of the one <Message> of a TwiML answer, or None."""
    root = ElementTree.fromstring(xml)
    assert root.tag == "Response"
    messages = root.findall("Message")
    assert len(messages) <= 1
    return messages[0].text if messages else None


def _sdk_signed(form: dict[str, str]) -> dict[str, str]:
    """The X-Twilio-Signature the official SDK computes for this webhook."""
    return {SIGNATURE_HEADER: RequestValidator(TOKEN).compute_signature(SMS_URL, form)}


def test_stop_is_confirmed_once_with_stop_confirm(tmp_path: Path) -> None:
    async def body(r: Rig) -> None:
        form = inbound("SM1", "STOP")
        first = await r.http.post(
            f"{r.base}/hooks/twilio/sms", data=form, headers=_sdk_signed(form)
        )
        assert first.status_code == 200
        text = _twiml_message(first.text)
        assert text == (
            "Riverside Family Medicine: you will get no more texts from us. "
            "Reply START to get texts again. Questions? Call 555-0100."
        )
        # a second STOP from a number already on the list: no second confirmation
        again = inbound("SM2", "stop")
        second = await r.http.post(
            f"{r.base}/hooks/twilio/sms", data=again, headers=_sdk_signed(again)
        )
        assert second.status_code == 200 and _twiml_message(second.text) is None
        # Twilio's Advanced Opt-Out answered this one itself (OptOutType in the webhook)
        await r.twilio("/hooks/twilio/sms", inbound("SM3", "START"))
        aoo = {**inbound("SM4", "STOP"), "OptOutType": "STOP"}
        third = await r.http.post(f"{r.base}/hooks/twilio/sms", data=aoo, headers=_sdk_signed(aoo))
        assert third.status_code == 200 and _twiml_message(third.text) is None
        assert outbox.is_suppressed(r.db.conn, PATIENT)

    run(body, tmp_path)


def test_advanced_opt_out_channel_leaves_the_stop_confirmation_to_twilio(tmp_path: Path) -> None:
    async def body(r: Rig) -> None:
        form = inbound("SM1", "STOP")
        response = await r.http.post(
            f"{r.base}/hooks/twilio/sms", data=form, headers=_sdk_signed(form)
        )
        assert response.status_code == 200 and _twiml_message(response.text) is None
        assert outbox.is_suppressed(r.db.conn, PATIENT)

    run(body, tmp_path, advanced_opt_out=True)


def test_help_answers_with_the_practice_phone(tmp_path: Path) -> None:
    async def body(r: Rig) -> None:
        response = await r.twilio("/hooks/twilio/sms", inbound("SM1", "HELP"))
        assert response.status_code == 200
        assert "<Message>" in response.text and "555-0100" in response.text
        assert "Riverside Family Medicine" in response.text

    run(body, tmp_path)


def test_yes_requests_booking_and_queues_a_coordinator_task(tmp_path: Path) -> None:
    async def body(r: Rig) -> None:
        rid = r.referral("R1", phone=PATIENT, sms_consent=True)
        r.sent_row(rid, "sms", "n1", "SM100", "queued", to=PATIENT)
        response = await r.twilio("/hooks/twilio/sms", inbound("SM1", "Yes please"))
        assert response.status_code == 200 and "call you to book" in response.text
        referral = referral_store.get_referral(r.db.conn, rid)
        assert referral is not None and referral.patient_status == "booking-requested"
        keys, arrived = r.coordinator
        await asyncio.wait_for(arrived.wait(), 5)  # the dispatcher sent the task
        assert keys == [f"{rid}:call-to-book:SM1"]
        # Twilio retries the same webhook: nothing happens twice
        again = await r.twilio("/hooks/twilio/sms", inbound("SM1", "Yes please"))
        assert again.status_code == 200
        tasks = [i for i in outbox.list_items(r.db.conn, channel="coordinator")]
        assert len(tasks) == 1
        events = [e.kind for e in referral_store.timeline(r.db.conn, rid)]
        assert events.count("booking-requested") == 1

    run(body, tmp_path)


# ---------------------------------------------------------------------------
# Delivery statuses


def test_statuses_never_move_backwards(tmp_path: Path) -> None:
    async def body(r: Rig) -> None:
        rid = r.referral("R1", phone=PATIENT, sms_consent=True)
        oid = r.sent_row(rid, "sms", "n1", "SM100", "queued", to=PATIENT)
        path = f"/hooks/twilio/status?outbox={oid}"
        for status, expected in [
            ("delivered", "delivered"),
            ("sent", "delivered"),  # late and older: ignored
            ("failed", "delivered"),  # final states never replace each other
            ("bogus", "delivered"),
        ]:
            form = {"MessageSid": "SM100", "MessageStatus": status, "AccountSid": ACCOUNT}
            response = await r.twilio(path, form)
            assert response.status_code == 204
            assert r.row(oid).provider_status == expected, status
        assert not [i for i in outbox.list_items(r.db.conn, channel="portal")]

    run(body, tmp_path)


def test_failed_text_moves_the_rotation_to_the_portal(tmp_path: Path) -> None:
    async def body(r: Rig) -> None:
        rid = r.referral("R1", phone=PATIENT, sms_consent=True)
        oid = r.sent_row(rid, "sms", "n1", "SM100", "queued", to=PATIENT)
        # the public StatusCallback URL the channel gave Twilio, query included
        callback = status_callback_url(f"{PUBLIC}/hooks/twilio/status", oid)
        path = callback.removeprefix(PUBLIC)
        for status in ("sent", "undelivered", "undelivered"):
            form = {"MessageSid": "SM100", "MessageStatus": status, "ErrorCode": "30003"}
            assert (await r.twilio(path, form, signed_url=callback)).status_code == 204
        assert r.row(oid).provider_status == "undelivered"
        keys, arrived = r.portal
        await asyncio.wait_for(arrived.wait(), 5)
        assert keys == ["n1:next"]
        rows = outbox.list_items(r.db.conn, channel="portal")
        assert len(rows) == 1 and rows[0].payload_dict()["rotated_from"] == "sms"

    run(body, tmp_path)


def test_status_found_by_message_sid_without_outbox_param(tmp_path: Path) -> None:
    async def body(r: Rig) -> None:
        rid = r.referral("R1", phone=PATIENT, sms_consent=True)
        oid = r.sent_row(rid, "sms", "n1", "SM100", "queued", to=PATIENT)
        form = {"MessageSid": "SM100", "MessageStatus": "delivered"}
        assert (await r.twilio("/hooks/twilio/status", form)).status_code == 204
        assert r.row(oid).provider_status == "delivered"

    run(body, tmp_path)


# ---------------------------------------------------------------------------
# Call statuses (docs/voice.md): signed like Twilio's SDK signs, with the voice token


def signed_by_sdk(url: str, form: dict[str, str], token: str) -> str:
    """The X-Twilio-Signature the twilio SDK's RequestValidator accepts for ``url``."""
    validator = RequestValidator(token)
    signature = str(validator.compute_signature(url, form))
    assert validator.validate(url, form, signature)
    return signature


def test_call_statuses_move_forward_and_a_failed_call_rotates(tmp_path: Path) -> None:
    async def body(r: Rig) -> None:
        rid = r.referral("R1", phone=PATIENT, sms_consent=True, portal=True)
        oid = r.sent_row(rid, "voice", "c1", "CA100", "queued", to=PATIENT)
        callback = f"{PUBLIC}/hooks/twilio/voice-status?outbox={oid}"
        path = callback.removeprefix(PUBLIC)
        for status, expected in [
            ("ringing", "ringing"),
            ("initiated", "ringing"),  # late and older: ignored
            ("no-answer", "no-answer"),  # recorded only: the next step's timer tries again
            ("completed", "no-answer"),  # finals never replace each other
        ]:
            form = {"CallSid": "CA100", "CallStatus": status, "AccountSid": ACCOUNT}
            sig = signed_by_sdk(callback, form, VOICE_TOKEN)
            response = await r.twilio(path, form, signed_url=callback, signature=sig)
            assert response.status_code == 204, status
            assert r.row(oid).provider_status == expected, status
        assert not outbox.list_items(r.db.conn, channel="portal")

        # the SMS token does not sign call callbacks
        form = {"CallSid": "CA100", "CallStatus": "failed"}
        bad = await r.twilio(path, form, signed_url=callback, token=TOKEN)
        assert bad.status_code == 403

        # a call that failed (the number cannot be called) moves the rotation on
        other = r.sent_row(rid, "voice", "c2", "CA200", "initiated", to=PATIENT)
        callback = f"{PUBLIC}/hooks/twilio/voice-status?outbox={other}"
        form = {"CallSid": "CA200", "CallStatus": "failed", "ErrorCode": "32009"}
        sig = signed_by_sdk(callback, form, VOICE_TOKEN)
        response = await r.twilio(
            callback.removeprefix(PUBLIC), form, signed_url=callback, signature=sig
        )
        assert response.status_code == 204
        assert r.row(other).provider_status == "failed"
        keys, arrived = r.portal
        await asyncio.wait_for(arrived.wait(), 5)
        assert keys == ["c2:next"]

    run(body, tmp_path)


def test_call_status_found_by_call_sid_without_outbox_param(tmp_path: Path) -> None:
    async def body(r: Rig) -> None:
        rid = r.referral("R1", phone=PATIENT, sms_consent=True)
        oid = r.sent_row(rid, "voice", "c1", "CA300", "queued", to=PATIENT)
        url = f"{PUBLIC}/hooks/twilio/voice-status"
        form = {"CallSid": "CA300", "CallStatus": "completed"}
        sig = signed_by_sdk(url, form, VOICE_TOKEN)
        response = await r.twilio("/hooks/twilio/voice-status", form, signature=sig)
        assert response.status_code == 204
        assert r.row(oid).provider_status == "completed"

    run(body, tmp_path)


# ---------------------------------------------------------------------------
# Fax, confirmation link, API


def test_phaxio_callback_records_packet_delivered(tmp_path: Path) -> None:
    async def body(r: Rig) -> None:
        rid = r.referral("R1")
        oid = r.sent_row(rid, "fax", "p1", "1234", "queued")
        fields = {
            "success": "true",
            "is_test": "false",
            "direction": "sent",
            "fax": json.dumps({"id": 1234, "status": "success", "num_pages": 2}),
        }
        url = f"{PUBLIC}/hooks/fax/phaxio"
        bad = await r.http.post(
            f"{r.base}/hooks/fax/phaxio", data=fields, headers={PHAXIO_HEADER: "0" * 40}
        )
        assert bad.status_code == 403
        good = await r.http.post(
            f"{r.base}/hooks/fax/phaxio",
            data=fields,
            headers={PHAXIO_HEADER: phaxio_signature(url, fields, {}, FAX_TOKEN)},
        )
        assert good.status_code == 200
        assert r.row(oid).provider_status == "success"
        referral = referral_store.get_referral(r.db.conn, rid)
        assert referral is not None and referral.specialist_status == "delivered"

    run(body, tmp_path)


def test_confirm_link(tmp_path: Path) -> None:
    async def body(r: Rig) -> None:
        rid = r.referral("R1")
        token = make_token(str(rid), T0 + 86400, CONFIRM_KEY.encode())
        page = await r.http.get(f"{r.base}/confirm/{token}")
        assert page.status_code == 200 and "<form" in page.text
        referral = referral_store.get_referral(r.db.conn, rid)
        assert referral is not None and referral.specialist_status != "confirmed"  # GET: no-op
        done = await r.http.post(f"{r.base}/confirm/{token}")
        assert done.status_code == 200
        referral = referral_store.get_referral(r.db.conn, rid)
        assert referral is not None and referral.specialist_status == "confirmed"
        forged = make_token(str(rid), T0 + 86400, b"k" * 32)
        assert (await r.http.post(f"{r.base}/confirm/{forged}")).status_code == 403
        expired = make_token(str(rid), T0 - 1, CONFIRM_KEY.encode())
        assert (await r.http.post(f"{r.base}/confirm/{expired}")).status_code == 410
        assert (await r.http.get(f"{r.base}/confirm/nonsense")).status_code == 400

    run(body, tmp_path)


def test_behind_the_public_url_hooks_and_confirm_still_work(tmp_path: Path) -> None:
    """A TLS proxy for public_url passes its Host on: /hooks/ and /confirm/ answer it, the
    specialist's same-origin confirm POST is accepted, a cross-site one is refused, and
    the confirm page is neither sniffed nor stored (issue 14.8)."""
    proxied = {"Host": "refloop.example.org"}

    async def body(r: Rig) -> None:
        r.http.headers.update(proxied)
        assert (await r.twilio("/hooks/twilio/sms", inbound("SM9", "HELP"))).status_code == 200
        rid = r.referral("R9")
        token = make_token(str(rid), T0 + 86400, CONFIRM_KEY.encode())
        page = await r.http.get(f"{r.base}/confirm/{token}")
        assert page.status_code == 200
        assert page.headers["X-Content-Type-Options"] == "nosniff"
        assert page.headers["Cache-Control"] == "no-store"
        cross = {"Origin": "https://attacker.example", "Sec-Fetch-Site": "cross-site"}
        assert (await r.http.post(f"{r.base}/confirm/{token}", headers=cross)).status_code == 403
        referral = referral_store.get_referral(r.db.conn, rid)
        assert referral is not None and referral.specialist_status != "confirmed"
        own = {"Origin": PUBLIC, "Sec-Fetch-Site": "same-origin"}
        done = await r.http.post(f"{r.base}/confirm/{token}", headers=own)
        assert done.status_code == 200 and done.headers["Cache-Control"] == "no-store"
        referral = referral_store.get_referral(r.db.conn, rid)
        assert referral is not None and referral.specialist_status == "confirmed"
        other = await r.http.get(f"{r.base}/confirm/{token}", headers={"Host": "evil.example"})
        assert other.status_code == 421

    run(body, tmp_path)


def test_api_needs_the_bearer_token(tmp_path: Path) -> None:
    async def body(r: Rig) -> None:
        assert (await r.http.get(f"{r.base}/api/referrals")).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert (await r.http.get(f"{r.base}/api/referrals", headers=wrong)).status_code == 401
        right = {"Authorization": f"Bearer {ADMIN}"}
        # authenticated: on to the JSON API (engine.web.api; tests/test_api.py)
        assert (await r.http.get(f"{r.base}/api/referrals", headers=right)).status_code == 200

    run(body, tmp_path)
