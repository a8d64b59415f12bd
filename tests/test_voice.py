"""Automated voice channel (channels.voice): a nudge row goes through the dispatcher and
the real twilio SDK to prism serving Twilio's own OpenAPI description (Calls.json); the
spoken prompt is allow-listed like SMS; consent, suppression and the contact window hold
a call back; provider errors map to retryable or final errors; routes.yaml problems name
file:line.

Prism comes from ``make test`` (tests/node); the fixture is test_sms's.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import parse_qsl
from xml.etree import ElementTree

import httpx
import pytest
import test_sms
from aiohttp import web
from helpers import refloop
from test_sms import Prism

from channels.sms.templates import SmsContext, SmsTemplates
from channels.voice.twilio import (
    DEFAULT_MAX_CHARS,
    TwilioVoice,
    VoiceConfig,
    voice_body_problems,
)
from engine.clock import Clock, VirtualClock
from engine.delivery.dispatch import (
    VOICE_TEMPLATE_DIR,
    Dispatcher,
    Renderer,
    RetryPolicy,
    Rotation,
)
from engine.delivery.factory import build_channels
from engine.errors import ConfigError
from engine.model import Identifiers, PatientContact, Provider, ReferralCreated
from engine.routing.table import ChannelSpec, PracticeSpec
from engine.store import outbox
from engine.store import referrals as referral_store
from engine.store.db import Database, open_database
from engine.tracking.escalation import Policy
from engine.tracking.tracker import Tracker

pytestmark = pytest.mark.store  # every test here uses the store

ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
AUTH_TOKEN = "test-auth-token-not-a-secret"
CALLBACK = "https://refloop.example.org/hooks/twilio/voice-status"
FROM = "+15005550001"
PRACTICE = PracticeSpec(name="Riverside Family Medicine", phone="555-010-0123")
PATIENT_NAME = "Zebediah Quirrell"  # must never be spoken
# Tuesday 6 January 2026, 10:00 and 01:00 in New York (UTC-5): inside / outside the
# default contact window 09:00-20:00 (engine.tracking.escalation.ContactRules).
DAY = datetime(2026, 1, 6, 15, 0, tzinfo=UTC).timestamp()
NIGHT = datetime(2026, 1, 6, 6, 0, tzinfo=UTC).timestamp()
NINE_AM = datetime(2026, 1, 6, 14, 0, tzinfo=UTC).timestamp()
VOICE = ChannelSpec("voice", "voice", MappingProxyType({}), MappingProxyType({}))
# test_sms's session fixture (prism on Twilio's spec), shared so it starts once per run.
prism = test_sms.prism
PORTAL = ChannelSpec("portal", "webhook", MappingProxyType({}), MappingProxyType({}))


def new_referral(db: Database, clock: Clock, placer: str, **contact: Any) -> int:
    with db.transaction() as conn:
        result = Tracker(db, clock).apply(
            ReferralCreated(
                ids=Identifiers(sending_facility="EPIC", placer_number=placer),
                occurred_at=clock.now(),
                specialist=Provider(name="Dr Heart"),
                contact=PatientContact(**contact),
            ),
            conn,
        )
    assert result.referral_id is not None
    return result.referral_id


def enqueue(db: Database, rid: int, key: str, template: str, due: float) -> int:
    with db.transaction() as conn:
        referral_store.enqueue_outbox(
            conn, rid, "voice", template, json.dumps({"kind": template}), key, due, now=due
        )
    found = outbox.id_for_key(db.conn, key)
    assert found is not None
    return found


def dispatcher(
    db: Database, channels: dict[str, Any], clock: Clock, policy: Policy | None = None
) -> Dispatcher:
    table = {"voice": VOICE, "portal": PORTAL}
    return Dispatcher(
        db,
        channels,
        renderer=Renderer(table, PRACTICE),
        clock=clock,
        tracker=Tracker(db, clock),
        default_policy=RetryPolicy(max_attempts=3, base=10.0, cap=100.0),
        rng=random.Random(3),
        rotation=Rotation.from_channels(policy or Policy(), table),
    )


@asynccontextmanager
async def recording() -> AsyncIterator[tuple[httpx.AsyncClient, list[dict[str, Any]]]]:
    """An httpx client recording each request's form and each reply's status."""
    seen: list[dict[str, Any]] = []

    async def on_request(request: httpx.Request) -> None:
        seen.append({"url": str(request.url), "form": dict(parse_qsl(request.content.decode()))})

    async def on_response(response: httpx.Response) -> None:
        await response.aread()
        seen[-1].update(status=response.status_code, headers=dict(response.headers))

    async with httpx.AsyncClient(
        event_hooks={"request": [on_request], "response": [on_response]}
    ) as http:
        yield http, seen


def voice(http: httpx.AsyncClient, base: str, clock: Clock) -> TwilioVoice:
    cfg = VoiceConfig(
        account_sid=ACCOUNT_SID,
        auth_token=AUTH_TOKEN,
        from_number=FROM,
        status_callback_url=CALLBACK,
        api_base=base,
    )
    return TwilioVoice(cfg, http=http, clock=clock.now)


def spoken(twiml: str) -> str:
    root = ElementTree.fromstring(twiml)
    says = root.findall("Say")
    assert len(says) == 1 and says[0].get("loop") == "2", twiml
    return says[0].text or ""


# ---------------------------------------------------------------------------
# Through the dispatcher, the real SDK, Twilio's spec


def test_voice_nudge_is_a_twilio_call_with_an_allow_listed_prompt(
    tmp_path: Path, prism: Prism
) -> None:
    """With consent the call is placed (prism validates the SDK's Calls.json request
    against Twilio's spec) and the referral is nudged; without consent, or to a
    suppressed number, nobody is called and the rotation moves to the portal."""
    clock = VirtualClock(DAY)
    db = open_database(tmp_path / "refloop.db")
    ok = new_referral(db, clock, "A", phone="(555) 010-0001", sms_consent=True)
    no_consent = new_referral(db, clock, "B", phone="+15550100002")
    suppressed = new_referral(db, clock, "C", phone="+15550100003", sms_consent=True)
    with db.transaction() as conn:
        outbox.suppress(conn, "+15550100003", "stop", DAY)
    rows = [enqueue(db, r, f"v{r}", "second-nudge", DAY) for r in (ok, no_consent, suppressed)]

    async def main() -> list[dict[str, Any]]:
        async with recording() as (http, seen):
            d = dispatcher(db, {"voice": voice(http, prism.base, clock)}, clock)
            assert await d.run_once("voice") == 3
            assert await d.run_once("voice") == 0  # a recorded row is never placed again
        return seen

    seen = asyncio.run(main())
    assert len(seen) == 1
    call = seen[0]
    assert call["url"] == f"{prism.base}/2010-04-01/Accounts/{ACCOUNT_SID}/Calls.json"
    assert call["status"] == 201 and "sl-violations" not in call["headers"]
    form = call["form"]
    assert form["To"] == "+15550100001" and form["From"] == FROM
    assert form["StatusCallback"] == f"{CALLBACK}?outbox={rows[0]}"
    text = spoken(form["Twiml"])
    assert "Riverside Family Medicine" in text and "555-010-0123" in text
    assert "stop" in text.lower() and "Dr Heart" not in text
    sent = outbox.get(db.conn, rows[0])
    assert sent is not None and sent.status == "sent" and sent.provider_id
    referral = referral_store.get_referral(db.conn, ok)
    assert referral is not None and referral.patient_status == "nudged"
    for rid, why in ((rows[1], "consent"), (rows[2], "suppression")):
        row = outbox.get(db.conn, rid)
        assert row is not None and row.status == "cancelled" and why in row.last_error
    moved = [outbox.get(db.conn, outbox.id_for_key(db.conn, f"v{r}:next") or 0) for r in (2, 3)]
    assert [m.channel for m in moved if m] == ["portal", "portal"]
    db.close()


def test_a_call_due_at_night_waits_for_the_contact_window(tmp_path: Path, prism: Prism) -> None:
    """The day-30 outreach call falls due at 01:00 local: it is held (without spending an
    attempt) until 09:00 local, then placed."""
    clock = VirtualClock(NIGHT)
    db = open_database(tmp_path / "refloop.db")
    rid = new_referral(
        db, clock, "A", phone="+15550100001", sms_consent=True, time_zone="America/New_York"
    )
    oid = enqueue(db, rid, "outreach", "outreach-call", NIGHT)

    async def main() -> list[dict[str, Any]]:
        async with recording() as (http, seen):
            d = dispatcher(db, {"voice": voice(http, prism.base, clock)}, clock)
            await d.run_once("voice")
            held = outbox.get(db.conn, oid)
            assert held is not None and held.status == "pending"
            assert held.due == NINE_AM and held.attempts == 0
            assert seen == []
            clock.set(NINE_AM)
            assert await d.run_once("voice") == 1
        return seen

    seen = asyncio.run(main())
    assert len(seen) == 1 and seen[0]["status"] == 201
    assert "not yet heard" in spoken(seen[0]["form"]["Twiml"])
    row = outbox.get(db.conn, oid)
    assert row is not None and row.status == "sent" and row.attempts == 1
    db.close()


@pytest.mark.parametrize(
    ("status", "headers", "final", "retryable_reason"),
    [
        (503, {}, "pending", "HTTP 503"),
        (429, {"Retry-After": "120"}, "pending", "HTTP 429"),
        (400, {}, "dead", "HTTP 400 (error 21215)"),
    ],
)
def test_provider_errors_map_to_retry_or_dead(
    tmp_path: Path, status: int, headers: dict[str, str], final: str, retryable_reason: str
) -> None:
    """Twilio's 429/5xx leave the row to retry (429 not before Retry-After); a 4xx with
    Twilio's error code is final. The reason names status and code, never the number."""
    clock = VirtualClock(DAY)
    db = open_database(tmp_path / "refloop.db")
    rid = new_referral(db, clock, "A", phone="+15550100001", sms_consent=True)
    oid = enqueue(db, rid, "v", "first-nudge", DAY)

    async def handler(request: web.Request) -> web.Response:
        await request.post()
        body = {"code": 21215, "message": "Geo permission for +15550100001", "status": status}
        return web.json_response(body, status=status, headers=headers)

    async def main() -> None:
        app = web.Application()
        app.router.add_post(f"/2010-04-01/Accounts/{ACCOUNT_SID}/Calls.json", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            base = f"http://127.0.0.1:{runner.addresses[0][1]}"
            async with httpx.AsyncClient() as http:
                d = dispatcher(db, {"voice": voice(http, base, clock)}, clock)
                await d.run_once("voice")
        finally:
            await runner.cleanup()

    asyncio.run(main())
    row = outbox.get(db.conn, oid)
    assert row is not None and row.status == final
    assert retryable_reason in row.last_error and "+1555" not in row.last_error
    if status == 429:
        assert row.due >= DAY + 120
    db.close()


# ---------------------------------------------------------------------------
# The prompt: the SMS allow-list, the spoken-prompt rules


def test_shipped_voice_templates_are_allow_listed_and_carry_the_opt_out() -> None:
    templates = SmsTemplates(
        VOICE_TEMPLATE_DIR,
        max_chars=DEFAULT_MAX_CHARS,
        body_rules=voice_body_problems,
        label="voice",
    )
    ctx = SmsContext(practice_name="Riverside Family Medicine", practice_phone="555-0100")
    names = templates.names()
    assert {"first_nudge", "second_nudge", "outreach_call", "appointment_reminder"} <= set(names)
    assert templates.check(ctx) == []
    for name in names:
        assert "stop these calls" in templates.render(name, ctx)


def test_a_voice_prompt_cannot_reach_for_phi(tmp_path: Path) -> None:
    (tmp_path / "first_nudge.txt").write_text(
        "Hello {{ patient_name }}, call {{ practice_phone }}. To stop these calls, say stop."
    )
    (tmp_path / "second_nudge.txt").write_text("Call {{ practice_phone }} to book.")
    templates = SmsTemplates(
        tmp_path, max_chars=DEFAULT_MAX_CHARS, body_rules=voice_body_problems, label="voice"
    )
    problems = templates.check(SmsContext(practice_name="P", practice_phone="555-0100"))
    assert any("first_nudge.txt" in p and "'patient_name'" in p for p in problems)
    assert any("second_nudge.txt" in p and "stop the calls" in p for p in problems)


# ---------------------------------------------------------------------------
# routes.yaml: keys and templates located by file:line; the factory's value checks


ROUTES = """\
version: 1
practice:
  name: Riverside Family Medicine
  phone: 555-0100
channels:
  voice:
    type: voice
    account_sid: {sid}
    auth_token: ${{env:TWILIO_TOKEN}}
    from_number: "{from_}"
    ring_time: 30
    templates:
      first_nudge: "Hello {{{{ patient_name }}}}, call {{{{ practice_phone }}}}. Say stop."
"""


def test_routes_check_locates_voice_problems(tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(ROUTES.format(sid=ACCOUNT_SID, from_=FROM))
    result = refloop("routes", "check", "--routes", str(routes))
    err = result.stderr.decode() + result.stdout.decode()
    assert result.returncode == 2, err  # a config error (docs/cli.md)
    assert f"{routes}:11" in err and "ring_time" in err
    assert f"{routes}:13" in err and "'patient_name'" in err
    assert "Traceback" not in err


def test_factory_names_each_unusable_voice_setting() -> None:
    spec = ChannelSpec(
        "voice",
        "voice",
        MappingProxyType({}),
        MappingProxyType(
            {"account_sid": "ACnope", "from_number": "555-0100", "status_callback_url": "http://x"}
        ),
    )

    async def main() -> list[str]:
        async with httpx.AsyncClient() as http:
            with pytest.raises(ConfigError) as info:
                build_channels({"voice": spec}, http=http, clock=VirtualClock(DAY), env={})
        return list(info.value.problems)

    problems = asyncio.run(main())
    for key in ("account_sid", "auth_token", "from_number", "status_callback_url"):
        assert any(p.startswith(f"channels.voice.{key}: ") for p in problems), problems


@pytest.mark.parametrize(
    ("template", "nudge_call_task", "task_expected"),
    [
        ("second-nudge", False, False),  # default: the 14-day step is the person's call
        ("second-nudge", True, True),  # escalation nudge_call_task: true
        ("outreach-call", False, True),  # the 30-day call is a person's step either way
        ("followup-call", False, True),  # so is the 14-day call
    ],
)
def test_a_call_that_cannot_be_placed_becomes_a_call_patient_task(
    tmp_path: Path, prism: Prism, template: str, nudge_call_task: bool, task_expected: bool
) -> None:
    """No consent to automated calls and no portal: nothing automated can reach the
    patient. A call that asks the patient to book then goes to a person (a
    ``call-patient`` task on ``task``, with the documented priority score), except a
    rotation nudge under the default ``nudge_call_task: false`` (docs/escalation.md)."""
    clock = VirtualClock(DAY)
    db = open_database(tmp_path / "refloop.db")
    rid = new_referral(db, clock, "A", phone="+15550100002", portal=False)
    later = DAY + 8 * 86400  # 10:00 New York, the referral 8 days old: the score counts it
    clock.set(later)
    oid = enqueue(db, rid, "v", template, later)
    policy = Policy(nudge_call_task=nudge_call_task)

    async def main() -> list[dict[str, Any]]:
        async with recording() as (http, seen):
            d = dispatcher(db, {"voice": voice(http, prism.base, clock)}, clock, policy)
            assert await d.run_once("voice") == 1
        return seen

    assert asyncio.run(main()) == []
    skipped = outbox.get(db.conn, oid)
    assert skipped is not None and skipped.status == "cancelled"
    task_id = outbox.id_for_key(db.conn, "v:call")
    if not task_expected:
        assert task_id is None
        db.close()
        return
    task = outbox.get(db.conn, task_id or 0)
    assert task is not None and task.channel == "task" and task.template == "call-patient"
    payload = task.payload_dict()
    assert payload["referral_id"] == rid and "consent" in payload["reason"]
    # coordinator_priority by hand: routine 10 + age 8 days // 2 = 4, no failed contact
    assert payload["priority_score"] == 14
    db.close()


def test_a_reminder_call_that_cannot_be_placed_is_no_call_to_book(
    tmp_path: Path, prism: Prism
) -> None:
    """A reminder (the patient is booked) that reached the voice slot and may not be
    placed asks nobody to call the patient to book."""
    clock = VirtualClock(DAY)
    db = open_database(tmp_path / "refloop.db")
    rid = new_referral(db, clock, "A", phone="+15550100002", portal=False)
    oid = enqueue(db, rid, "r", "appointment_reminder", DAY)

    async def main() -> None:
        async with recording() as (http, _seen):
            d = dispatcher(db, {"voice": voice(http, prism.base, clock)}, clock)
            assert await d.run_once("voice") == 1

    asyncio.run(main())
    skipped = outbox.get(db.conn, oid)
    assert skipped is not None and skipped.status == "cancelled"
    assert outbox.id_for_key(db.conn, "r:call") is None
    db.close()
