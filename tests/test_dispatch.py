"""Outbox dispatch against real loopback HTTP servers that fail, time out, answer 429/5xx
and recover: backoff timing on the virtual clock, dead letters after max attempts,
per-referral order with referrals in parallel, restart recovery, and a kill -9 between
send and record (at most one resend per row in flight, with the same idempotency key).

Run as ``python tests/test_dispatch.py DB URL`` this file is the kill test's child: it
dispatches the ``hook`` channel of DB to URL one row at a time until nothing is due.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import MappingProxyType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if __name__ == "__main__":  # the kill test's child: make the repo importable
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import pytest  # noqa: E402
from aiohttp import web  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

from channels.sms.twilio import SmsConfig, TwilioSms  # noqa: E402
from channels.webhook import IDEMPOTENCY_HEADER, WebhookChannel, WebhookConfig  # noqa: E402
from engine.clock import Clock, VirtualClock, WallClock  # noqa: E402
from engine.delivery.dispatch import Dispatcher, Renderer, RetryPolicy  # noqa: E402
from engine.delivery.factory import build_channels  # noqa: E402
from engine.delivery.rotation import Rotation  # noqa: E402
from engine.errors import ConfigError  # noqa: E402
from engine.metrics import Metrics  # noqa: E402
from engine.model import Identifiers, PatientContact, Provider, ReferralCreated  # noqa: E402
from engine.routing.table import ChannelSpec, PracticeSpec  # noqa: E402
from engine.store import outbox  # noqa: E402
from engine.store import referrals as referral_store  # noqa: E402
from engine.store.db import Database, DatabaseError, open_database  # noqa: E402
from engine.tracking.escalation import Policy  # noqa: E402
from engine.tracking.tracker import Tracker  # noqa: E402

T0 = 1_767_225_600.0
SECRET = "dispatch-test-secret-0123456789"
ACCOUNT = "AC" + "0" * 32
POLICY = RetryPolicy(max_attempts=4, base=10.0, cap=1000.0)
PRACTICE = PracticeSpec(name="Riverside Family Medicine", phone="555-0100")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def serve(handler: Handler, path: str = "/hook") -> AsyncIterator[str]:
    """An aiohttp server on 127.0.0.1 port 0; yields the URL of ``path``."""

    async def handle(request: web.Request) -> web.StreamResponse:
        return await handler(request)

    app = web.Application()
    app.router.add_post(path, handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}{path}"
    finally:
        await runner.cleanup()


class Script:
    """A receiver that answers each request with the next scripted behaviour (then 200):
    an HTTP status, ``(status, headers)``, ``"hang"`` (never answers) or ``"drop"``
    (closes the connection). Records every request's idempotency key and body."""

    def __init__(self, *steps: Any) -> None:
        self.steps = list(steps)
        self.keys: list[str] = []
        self.bodies: list[dict[str, Any]] = []
        self.release = asyncio.Event()

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        self.keys.append(request.headers.get(IDEMPOTENCY_HEADER, ""))
        self.bodies.append(json.loads(await request.read()))
        step = self.steps.pop(0) if self.steps else 200
        if step == "hang":
            await self.release.wait()
            return web.Response(status=200)
        if step == "drop":
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=200)
        status, headers = step if isinstance(step, tuple) else (step, {})
        return web.json_response({"id": f"rx-{len(self.keys)}"}, status=status, headers=headers)


def make_db(store_url: str) -> Database:
    return open_database(store_url)


def new_referral(db: Database, clock: Clock, placer: str, **contact: Any) -> int:
    tracker = Tracker(db, clock)
    with db.transaction() as conn:
        result = tracker.apply(
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


def enqueue(
    db: Database,
    referral_id: int | None,
    key: str,
    *,
    channel: str = "hook",
    template: str = "coordinator-task",
    due: float = T0,
    **payload: Any,
) -> int:
    with db.transaction() as conn:
        referral_store.enqueue_outbox(
            conn, referral_id, channel, template, json.dumps(payload), key, due, now=due
        )
        row = conn.execute("SELECT id FROM outbox WHERE idempotency_key = ?", (key,)).fetchone()
    return int(row[0])


def specs(**extra: ChannelSpec) -> dict[str, ChannelSpec]:
    out = {"hook": ChannelSpec("hook", "webhook", MappingProxyType({}), MappingProxyType({}))}
    out.update(extra)
    return out


def dispatcher(
    db: Database,
    channels: dict[str, Any],
    clock: Clock,
    *,
    policy: RetryPolicy = POLICY,
    seed: int = 7,
    metrics: Metrics | None = None,
    tracker: Tracker | None = None,
    channel_specs: dict[str, ChannelSpec] | None = None,
    **kw: Any,
) -> Dispatcher:
    table = channel_specs or specs()
    return Dispatcher(
        db,
        channels,
        renderer=Renderer(table, PRACTICE),
        clock=clock,
        metrics=metrics,
        tracker=tracker,
        default_policy=policy,
        rng=random.Random(seed),
        rotation=Rotation.from_channels(Policy(), table),
        **kw,
    )


def hook(url: str, http: httpx.AsyncClient, clock: Clock, timeout: float = 5.0) -> WebhookChannel:
    return WebhookChannel(
        "hook", WebhookConfig(url=url, secret=SECRET, timeout=timeout), http=http, clock=clock.now
    )


def row(db: Database, outbox_id: int) -> outbox.Item:
    item = outbox.get(db.conn, outbox_id)
    assert item is not None
    return item


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


# ---------------------------------------------------------------------------
# Failures, backoff and dead letters


def test_backoff_timing_and_dead_letter_on_the_virtual_clock(store_url: str) -> None:
    """503 every time: each retry waits uniform(0, min(cap, base*2^(n-1))) from the seeded
    random; after max_attempts the row is dead, counted and visible in the gauge."""
    clock = VirtualClock(T0)
    db = make_db(store_url)
    metrics = Metrics(CollectorRegistry())
    oid = enqueue(db, None, "k1")
    script = Script(503, 503, 503, 503)
    mirror = random.Random(7)
    policy = RetryPolicy(max_attempts=4, base=10.0, cap=1000.0)

    async def main() -> None:
        async with serve(script) as url, httpx.AsyncClient() as http:
            d = dispatcher(db, {"hook": hook(url, http, clock)}, clock, metrics=metrics)
            for attempt in (1, 2, 3):
                assert await d.run_once("hook") == 1
                item = row(db, oid)
                expected = mirror.uniform(0.0, policy.ceiling(attempt))
                assert item.status == "pending" and item.attempts == attempt
                assert item.due == pytest.approx(clock.now() + expected)
                assert item.due <= clock.now() + 10.0 * 2 ** (attempt - 1)
                assert "HTTP 503" in item.last_error
                clock.set(item.due - 0.001)
                assert await d.run_once("hook") == 0  # not due yet
                clock.set(item.due)
            assert await d.run_once("hook") == 1
            d.refresh_metrics()

    asyncio.run(main())
    item = row(db, oid)
    assert item.status == "dead" and item.attempts == 4 and item.dead_at == clock.now()
    assert len(script.keys) == 4 and set(script.keys) == {"k1"}
    assert sample(metrics, "refloop_outbox_sends_total", channel="hook", result="retry") == 3
    assert sample(metrics, "refloop_outbox_sends_total", channel="hook", result="dead") == 1
    assert sample(metrics, "refloop_outbox_dead", channel="hook") == 1
    assert sample(metrics, "refloop_outbox_depth", channel="hook") == 0
    db.close()


FAULTS: list[tuple[str, Any, str]] = [
    ("500", 500, "HTTP 500"),
    ("502", 502, "HTTP 502"),
    ("429", 429, "HTTP 429"),
    ("timeout", "hang", "timed out"),
    ("dropped-connection", "drop", "outcome unknown"),
]


@pytest.mark.parametrize(("fault", "step", "reason"), FAULTS, ids=[f[0] for f in FAULTS])
def test_retryable_fault_then_recovery(store_url: str, fault: str, step: Any, reason: str) -> None:
    clock = VirtualClock(T0)
    db = make_db(store_url)
    oid = enqueue(db, None, "k1")
    script = Script(step)

    async def main() -> None:
        async with serve(script) as url, httpx.AsyncClient() as http:
            d = dispatcher(db, {"hook": hook(url, http, clock, timeout=0.3)}, clock)
            await d.run_once("hook")
            item = row(db, oid)
            assert item.status == "pending" and reason in item.last_error
            script.release.set()
            clock.set(item.due)
            await d.run_once("hook")

    asyncio.run(main())
    item = row(db, oid)
    assert item.status == "sent" and item.attempts == 2 and item.last_error == ""
    assert item.provider_id == "rx-2" and item.provider_status == "200"
    assert script.keys == ["k1", "k1"]  # the retry carried the same idempotency key
    db.close()


def test_retry_after_is_honoured(store_url: str) -> None:
    clock = VirtualClock(T0)
    db = make_db(store_url)
    oid = enqueue(db, None, "k1")

    async def main() -> None:
        async with serve(Script((429, {"Retry-After": "120"}))) as url, httpx.AsyncClient() as h:
            d = dispatcher(db, {"hook": hook(url, h, clock)}, clock)
            await d.run_once("hook")

    asyncio.run(main())
    assert row(db, oid).due == T0 + 120.0  # jitter (at most 10 s) is below Retry-After
    db.close()


def test_a_4xx_is_dead_at_once(store_url: str) -> None:
    clock = VirtualClock(T0)
    db = make_db(store_url)
    oid = enqueue(db, None, "k1")

    async def main() -> None:
        async with serve(Script(400)) as url, httpx.AsyncClient() as http:
            await dispatcher(db, {"hook": hook(url, http, clock)}, clock).run_once("hook")

    asyncio.run(main())
    item = row(db, oid)
    assert item.status == "dead" and item.attempts == 1 and "HTTP 400" in item.last_error
    db.close()


def test_worker_loop_waits_on_the_virtual_clock(store_url: str) -> None:
    """The real worker loop: its sleep moves the virtual clock exactly to each retry's due
    time (no real waiting); fail, fail, succeed."""
    clock = VirtualClock(T0)
    db = make_db(store_url)
    oid = enqueue(db, None, "k1")
    script = Script(503, 503)
    at: list[float] = []  # the virtual time of each request
    slept: list[float] = []
    mirror = random.Random(7)
    policy = RetryPolicy(max_attempts=4, base=10.0, cap=1000.0)

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.advance(seconds)
        await asyncio.sleep(0)

    async def handler(request: web.Request) -> web.StreamResponse:
        at.append(clock.now())
        return await script(request)

    async def main() -> None:
        async with serve(handler) as url, httpx.AsyncClient() as http:
            d = dispatcher(db, {"hook": hook(url, http, clock)}, clock, sleep=sleep)
            task = asyncio.create_task(d.run())
            for _ in range(1000):  # bounded: each turn is one loop iteration, no time passes
                if row(db, oid).status == "sent":
                    break
                await asyncio.sleep(0)
            d.stop()
            await asyncio.wait_for(task, 5)

    asyncio.run(main())
    assert row(db, oid).status == "sent"
    waits = [mirror.uniform(0.0, policy.ceiling(1)), mirror.uniform(0.0, policy.ceiling(2))]
    assert at == pytest.approx([T0, T0 + waits[0], T0 + waits[0] + waits[1]])
    assert slept[:2] == pytest.approx(waits)
    db.close()


# ---------------------------------------------------------------------------
# Order and parallelism


def test_per_referral_order_with_referrals_in_parallel(store_url: str) -> None:
    """Two referrals, two rows each: the first rows of both are in flight together (the
    receiver waits for both before answering); a referral's second row waits for its
    first, even while the first is backing off, and the other referral is not held up."""
    clock = VirtualClock(T0)
    db = make_db(store_url)
    a = new_referral(db, clock, "A")
    b = new_referral(db, clock, "B")
    a1, b1 = enqueue(db, a, "a1"), enqueue(db, b, "b1")
    a2, b2 = enqueue(db, a, "a2"), enqueue(db, b, "b2")
    both_arrived = asyncio.Event()
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        key = request.headers[IDEMPOTENCY_HEADER]
        seen.append(key)
        if key in ("a1", "b1") and len(seen) <= 2:
            if {"a1", "b1"} <= set(seen):
                both_arrived.set()
            await asyncio.wait_for(both_arrived.wait(), 5)  # fails unless sent in parallel
            if key == "a1":
                return web.Response(status=503)
        return web.Response(status=200)

    async def main() -> None:
        async with serve(handler) as url, httpx.AsyncClient() as http:
            d = dispatcher(db, {"hook": hook(url, http, clock)}, clock)
            assert await d.run_once("hook") == 2  # a1 and b1; a2, b2 wait for them
            assert row(db, a1).status == "pending" and row(db, b1).status == "sent"
            assert await d.run_once("hook") == 1  # b2 only: a2 must not overtake a1
            assert row(db, b2).status == "sent" and row(db, a2).status == "pending"
            clock.set(row(db, a1).due)
            assert await d.run_once("hook") == 1  # a1 again
            assert await d.run_once("hook") == 1  # then a2

    asyncio.run(main())
    assert sorted(seen[:2]) == ["a1", "b1"]
    assert seen[2:] == ["b2", "a1", "a2"]
    assert all(row(db, i).status == "sent" for i in (a1, a2, b1, b2))
    db.close()


def test_dead_row_does_not_block_the_referral_forever(store_url: str) -> None:
    clock = VirtualClock(T0)
    db = make_db(store_url)
    a = new_referral(db, clock, "A")
    first, second = enqueue(db, a, "a1"), enqueue(db, a, "a2")

    async def main() -> None:
        async with serve(Script(400)) as url, httpx.AsyncClient() as http:
            d = dispatcher(db, {"hook": hook(url, http, clock)}, clock)
            await d.run_once("hook")
            await d.run_once("hook")

    asyncio.run(main())
    assert (row(db, first).status, row(db, second).status) == ("dead", "sent")
    db.close()


def test_next_due_ignores_rows_held_back_by_their_referral(store_url: str) -> None:
    """The idle wait is until the blocking row is due, not 0 (no busy polling)."""
    clock = VirtualClock(T0)
    db = make_db(store_url)
    a = new_referral(db, clock, "A")
    first = enqueue(db, a, "a1", due=T0 + 600)
    enqueue(db, a, "a2", due=T0)
    assert outbox.next_due(db.conn, "hook") == T0 + 600
    with db.transaction() as conn:
        assert outbox.claim_due(conn, "hook", T0, 10) == []
    assert row(db, first).status == "pending"
    db.close()


def test_channel_factory_names_each_unusable_setting() -> None:
    sms = ChannelSpec(
        "sms",
        "sms",
        MappingProxyType({}),
        MappingProxyType({"account_sid": "nope", "auth_token": "${env:NOT_SET}"}),
    )
    good = specs()["hook"]
    good = ChannelSpec(
        "hook",
        "webhook",
        good.templates,
        MappingProxyType({"url": "https://x.example.org/h", "secret": "${env:S}"}),
    )

    async def main() -> None:
        async with httpx.AsyncClient() as http:
            with pytest.raises(ConfigError) as info:
                build_channels({"sms": sms}, http=http, clock=WallClock(), env={})
            problems = info.value.problems
            assert any(p.startswith("channels.sms.account_sid: must be a Twilio") for p in problems)
            assert any(
                p.startswith("channels.sms.auth_token: environment variable NOT_SET")
                for p in problems
            )
            built = build_channels(
                {"hook": good}, http=http, clock=WallClock(), env={"S": "s" * 20}
            )
            assert isinstance(built["hook"], WebhookChannel)

    asyncio.run(main())


# ---------------------------------------------------------------------------
# Consequences, SMS consent and suppression


def test_sent_packet_records_packet_sent_on_the_referral(store_url: str) -> None:
    clock = VirtualClock(T0)
    db = make_db(store_url)
    tracker = Tracker(db, clock)
    rid = new_referral(db, clock, "A")
    oid = enqueue(db, rid, "p1", template="specialist-packet", to="worklist:cardio")

    async def main() -> None:
        async with serve(Script()) as url, httpx.AsyncClient() as http:
            d = dispatcher(db, {"hook": hook(url, http, clock)}, clock, tracker=tracker)
            await d.run_once("hook")

    asyncio.run(main())
    referral = referral_store.get_referral(db.conn, rid)
    assert referral is not None and referral.specialist_status == "packet-sent"
    assert row(db, oid).recipient == "worklist:cardio"
    kinds = [e.kind for e in referral_store.timeline(db.conn, rid)]
    assert kinds[-1] == "packet-sent"
    db.close()


def fake_twilio() -> tuple[Handler, list[dict[str, str]]]:
    """Twilio's Messages.json answered with a 201 Message resource."""
    sent: list[dict[str, str]] = []

    async def handler(request: web.Request) -> web.Response:
        form = await request.post()
        sent.append({k: str(v) for k, v in form.items()})
        sid = f"SM{len(sent):032d}"
        return web.json_response(
            {"sid": sid, "status": "queued", "to": form.get("To"), "account_sid": ACCOUNT},
            status=201,
        )

    return handler, sent


SMS_SPEC = ChannelSpec("sms", "sms", MappingProxyType({}), MappingProxyType({}))
PORTAL_SPEC = ChannelSpec("portal", "webhook", MappingProxyType({}), MappingProxyType({}))


def test_sms_nudge_through_twilio_and_consent_rules(store_url: str) -> None:
    """With consent the allow-listed text goes to Twilio and the referral is nudged; without
    consent, or to a suppressed number, nothing is texted and the rotation moves to the
    portal."""
    clock = VirtualClock(T0)
    db = make_db(store_url)
    tracker = Tracker(db, clock)
    ok = new_referral(db, clock, "A", phone="+15550100001", sms_consent=True)
    no_consent = new_referral(db, clock, "B", phone="+15550100002")
    suppressed = new_referral(db, clock, "C", phone="+15550100003", sms_consent=True)
    with db.transaction() as conn:
        outbox.suppress(conn, "+15550100003", "stop", T0)
    rows = [
        enqueue(db, r, f"n{r}", channel="sms", template="first-nudge")
        for r in (ok, no_consent, suppressed)
    ]
    handler, sent = fake_twilio()
    portal = Script()
    table = {"sms": SMS_SPEC, "portal": PORTAL_SPEC}

    async def main() -> None:
        path = f"/2010-04-01/Accounts/{ACCOUNT}/Messages.json"
        async with (
            serve(handler, path) as twilio_url,
            serve(portal) as portal_url,
            httpx.AsyncClient() as http,
        ):
            base = twilio_url.split("/2010-04-01")[0]
            cfg = SmsConfig(
                account_sid=ACCOUNT,
                auth_token="t" * 32,
                from_number="+15550009999",
                api_base=base,
            )
            channels = {
                "sms": TwilioSms(cfg, http=http, clock=clock.now),
                "portal": hook(portal_url, http, clock),
            }
            d = dispatcher(db, channels, clock, tracker=tracker, channel_specs=table)
            assert await d.run_once("sms") == 3
            assert await d.run_once("portal") == 2

    asyncio.run(main())
    assert [s["To"] for s in sent] == ["+15550100001"]
    assert "Riverside Family Medicine" in sent[0]["Body"] and "STOP" in sent[0]["Body"]
    first = row(db, rows[0])
    assert (
        first.status == "sent"
        and first.provider_id.startswith("SM")
        and first.provider_status == "queued"
    )
    referral = referral_store.get_referral(db.conn, ok)
    assert referral is not None and referral.patient_status == "nudged"
    assert row(db, rows[1]).status == "cancelled" and "consent" in row(db, rows[1]).last_error
    assert row(db, rows[2]).status == "cancelled" and "suppression" in row(db, rows[2]).last_error
    assert sorted(portal.keys) == sorted([f"n{no_consent}:next", f"n{suppressed}:next"])
    assert all(b["payload"]["rotated_from"] == "sms" for b in portal.bodies)
    db.close()


# ---------------------------------------------------------------------------
# Restart


def test_restart_resends_in_flight_rows_and_never_recorded_ones(store_url: str) -> None:
    """A row a dead node left sending is resent once its lease has expired, not before
    (until then that node, or another one, may still be sending it)."""
    clock = VirtualClock(T0)
    db = make_db(store_url)
    in_flight = enqueue(db, None, "k-in-flight")
    done = enqueue(db, None, "k-done")
    with db.transaction() as conn:  # a daemon claimed both, recorded one, then died
        outbox.claim_due(conn, "hook", T0, 10, node="dead:1", lease=30.0)
        outbox.mark_sent(conn, done, recipient="", provider_id="rx", provider_status="200", now=T0)
    script = Script()

    async def main() -> None:
        async with serve(script) as url, httpx.AsyncClient() as http:
            d = dispatcher(db, {"hook": hook(url, http, clock)}, clock)
            assert d.reap() == 0  # its lease runs until T0 + 30
            assert await d.run_once("hook") == 0
            clock.set(T0 + 30.5)
            assert d.reap() == 1
            assert await d.run_once("hook") == 1
            assert await d.run_once("hook") == 0

    asyncio.run(main())
    assert script.keys == ["k-in-flight"]
    assert row(db, in_flight).status == "sent" and row(db, in_flight).attempts == 2
    assert row(db, done).status == "sent"
    db.close()


# ---------------------------------------------------------------------------
# Leases: several nodes on one outbox


def test_a_starting_node_leaves_another_nodes_send_alone_until_its_lease_ends(
    store_url: str,
) -> None:
    """Start-up used to return every sending row to pending: on a shared database that
    resends what another node is sending right now. Only an expired lease is reaped."""
    clock = VirtualClock(T0)
    db = make_db(store_url)
    oid = enqueue(db, None, "k-busy")
    with db.transaction() as conn:
        (item,) = outbox.claim_due(conn, "hook", T0, 10, node="node-a:1", lease=30.0)
    assert (item.claimed_by, item.lease_until, item.attempts) == ("node-a:1", T0 + 30.0, 1)
    metrics = Metrics(CollectorRegistry())

    async def main() -> None:
        async with serve(Script()) as url, httpx.AsyncClient() as http:
            b = dispatcher(db, {"hook": hook(url, http, clock)}, clock, metrics=metrics,
                           node_id="node-b:2")  # fmt: skip
            assert b.reap() == 0
            assert await b.run_once("hook") == 0
            assert row(db, oid).status == "sending" and row(db, oid).claimed_by == "node-a:1"
            clock.set(T0 + 29.9)
            assert await b.run_once("hook") == 0
            clock.set(T0 + 30.1)  # node a is gone: b takes the row over
            assert await b.run_once("hook") == 1

    asyncio.run(main())
    final = row(db, oid)
    assert (final.status, final.claimed_by, final.attempts) == ("sent", "node-b:2", 2)
    assert sample(metrics, "refloop_outbox_lease_expired_total", channel="hook") == 1
    db.close()


def test_a_result_is_fenced_on_the_claim(store_url: str) -> None:
    """Node a's send outlives its lease; node b reaps the row and sends it (attempt 2).
    When a's answer finally comes, a records nothing (lease lost, counted): the row
    stays as b recorded it."""
    clock = VirtualClock(T0)
    db = make_db(store_url)
    oid = enqueue(db, None, "k-slow")
    slow, fast = Script("hang"), Script()
    metrics_a = Metrics(CollectorRegistry())

    async def main() -> None:
        async with (
            serve(slow) as slow_url,
            serve(fast) as fast_url,
            httpx.AsyncClient() as http,
        ):
            a = dispatcher(db, {"hook": hook(slow_url, http, clock, timeout=30.0)}, clock,
                           metrics=metrics_a, node_id="node-a:1", lease_seconds=30.0)  # fmt: skip
            b = dispatcher(db, {"hook": hook(fast_url, http, clock)}, clock, node_id="node-b:2",
                           lease_seconds=30.0)  # fmt: skip
            sending = asyncio.ensure_future(a.run_once("hook"))
            while not slow.keys:
                await asyncio.sleep(0.01)
            clock.set(T0 + 31.0)  # a stalled past its lease (no renewal in virtual time)
            assert await b.run_once("hook") == 1
            assert row(db, oid).status == "sent" and row(db, oid).claimed_by == "node-b:2"
            slow.release.set()
            assert await sending == 1

    asyncio.run(main())
    assert slow.keys == ["k-slow"] and fast.keys == ["k-slow"]  # same key both times
    final = row(db, oid)
    assert (final.status, final.claimed_by, final.attempts) == ("sent", "node-b:2", 2)
    assert sample(metrics_a, "refloop_outbox_lease_lost_total", channel="hook") == 1
    assert sample(metrics_a, "refloop_outbox_sends_total", channel="hook", result="sent") == 0
    with db.transaction() as conn:  # the store function itself: the stale claim writes nothing
        stale = outbox.Lease("node-a:1", 1)
        assert not outbox.mark_dead(conn, oid, error="x", now=T0, lease=stale)
    db.close()


def test_a_lease_is_renewed_while_the_send_runs(store_url: str) -> None:
    """A send slower than the lease keeps its row: the holder renews every third of it."""
    clock = WallClock()
    db = make_db(store_url)
    oid = enqueue(db, None, "k-long", due=clock.now())
    script = Script("hang")

    async def main() -> None:
        async with serve(script) as url, httpx.AsyncClient() as http:
            a = dispatcher(db, {"hook": hook(url, http, clock, timeout=30.0)}, clock,
                           node_id="node-a:1", lease_seconds=1.5)  # fmt: skip
            sending = asyncio.ensure_future(a.run_once("hook"))
            while not script.keys:
                await asyncio.sleep(0.01)
            first = row(db, oid).lease_until
            await asyncio.sleep(2.0)  # longer than the lease
            renewed = row(db, oid).lease_until
            assert first is not None and renewed is not None and renewed > first
            assert renewed > clock.now()  # still held: another node's reaper leaves it
            with db.transaction() as conn:
                assert outbox.reap_expired(conn, clock.now()) == []
            script.release.set()
            assert await sending == 1

    asyncio.run(main())
    assert row(db, oid).status == "sent" and row(db, oid).attempts == 1
    db.close()


def test_one_row_per_referral_and_channel_in_flight(store_url: str) -> None:
    """An operator retry of a referral's earlier dead row waits while a later row of the
    same referral and channel is sending (it used to be claimed beside it); the partial
    unique index refuses a second in-flight row however it would be written."""
    clock = VirtualClock(T0)
    db = make_db(store_url)
    rid = new_referral(db, clock, "R-ONE")
    first = enqueue(db, rid, "k-first")
    second = enqueue(db, rid, "k-second")
    with db.transaction() as conn:
        (claimed,) = outbox.claim_due(conn, "hook", T0, 10, node="a")
        assert claimed.id == first
        assert outbox.mark_dead(conn, first, error="x", now=T0, lease=claimed.lease)
        (claimed,) = outbox.claim_due(conn, "hook", T0, 10, node="a")
        assert claimed.id == second
        outbox.retry(conn, first, T0)  # the operator retries the dead one meanwhile
        assert outbox.claim_due(conn, "hook", T0, 10, node="a") == []
        assert outbox.next_due(conn, "hook") is None
    with pytest.raises(DatabaseError, match=r"(?i)unique"), db.transaction() as conn:
        conn.execute("UPDATE outbox SET status = 'sending' WHERE id = ?", (first,))
    with db.transaction() as conn:
        outbox.mark_sent(conn, second, recipient="", provider_id="p", provider_status="",
                         now=T0, lease=claimed.lease)  # fmt: skip
        (again,) = outbox.claim_due(conn, "hook", T0, 10, node="a")
    assert again.id == first
    db.close()


# ---------------------------------------------------------------------------
# kill -9 between send and record


def test_kill_9_between_send_and_record_resends_once_with_the_same_key(store_url: str) -> None:
    """The receiver kills the dispatcher (SIGKILL) when row 3 arrives, before answering:
    row 3 was sent but its result never recorded. After a restart row 3 is sent again
    once its lease has expired, with the same idempotency key, and nothing else is sent
    twice."""
    db_path = store_url
    db = open_database(db_path)
    ids = [enqueue(db, None, f"k{i}") for i in range(1, 6)]
    db.close()
    received: list[str] = []
    child: list[asyncio.subprocess.Process] = []

    async def handler(request: web.Request) -> web.Response:
        key = request.headers[IDEMPOTENCY_HEADER]
        received.append(key)
        if key == "k3" and received.count("k3") == 1:
            child[0].kill()  # SIGKILL: the dispatcher dies between send and record
            await child[0].wait()
        return web.Response(status=200)

    async def spawn(url: str) -> int:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, str(db_path), url, cwd=str(REPO)
        )
        child[:] = [proc]
        return await asyncio.wait_for(proc.wait(), 30)

    async def main() -> None:
        async with serve(handler) as url:
            assert await spawn(url) == -9
            seen = open_database(db_path, readonly=True)
            statuses = dict(seen.conn.execute("SELECT idempotency_key, status FROM outbox"))
            seen.close()
            assert statuses == {
                "k1": "sent",
                "k2": "sent",
                "k3": "sending",
                "k4": "pending",
                "k5": "pending",
            }
            assert await spawn(url) == 0

    asyncio.run(main())
    # row 3 goes again once its lease is over: before rows 4 and 5 or after them, by
    # whether the restart took longer than the lease
    assert received[:3] == ["k1", "k2", "k3"]
    assert sorted(received[3:]) == ["k3", "k4", "k5"]
    db = open_database(db_path)
    assert [row(db, i).status for i in ids] == ["sent"] * 5
    assert row(db, ids[2]).attempts == 2
    db.close()


def _child(db_path: str, url: str) -> None:
    """Dispatch the ``hook`` channel one row at a time (leases of one second) until no
    row is pending or sending."""

    async def main() -> None:
        db = open_database(db_path)
        clock = WallClock()
        async with httpx.AsyncClient() as http:
            d = dispatcher(
                db,
                {"hook": hook(url, http, clock)},
                clock,
                policy=RetryPolicy(concurrency=1),
                lease_seconds=1.0,
            )
            while True:
                if await d.run_once("hook"):
                    continue
                if not [i for i in outbox.list_items(db.conn) if i.status in outbox.ACTIVE]:
                    break
                await asyncio.sleep(0.1)  # a lease left by the killed run is not over yet
        db.close()

    asyncio.run(main())


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])


@pytest.mark.sqlite_file("the claim's fsync of the SQLite WAL")
def test_the_claim_is_fsynced_before_the_send_with_the_write_lock_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim is durable before anything is sent, and its fsync (of the WAL) runs
    once the write lock is free: another writer (the inbox's group commit) takes the lock
    while it runs instead of waiting behind it."""
    import sqlite3

    clock = VirtualClock(T0)
    db = open_database(tmp_path / "refloop.db")
    oid = enqueue(db, None, "k1")
    events: list[tuple[str, str]] = []
    real_sync = Database.sync

    def sync(self: Database) -> None:
        other = sqlite3.connect(self.path, timeout=0, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # raises "database is locked" if it were held
            status = other.execute("SELECT status FROM outbox WHERE id = ?", (oid,)).fetchone()
            other.execute("ROLLBACK")
        finally:
            other.close()
        events.append(("sync", str(status[0])))
        real_sync(self)

    monkeypatch.setattr(Database, "sync", sync)

    async def receiver(request: web.Request) -> web.StreamResponse:
        events.append(("send", ""))
        return web.json_response({"id": "rx-1"})

    async def main() -> None:
        async with serve(receiver) as url, httpx.AsyncClient() as http:
            await dispatcher(db, {"hook": hook(url, http, clock)}, clock).run_once("hook")

    asyncio.run(main())
    assert events == [("sync", "sending"), ("send", "")]
    assert row(db, oid).status == "sent"
    db.close()


@pytest.mark.sqlite_file("the claim's fsync of the SQLite WAL")
def test_a_store_with_synchronous_normal_fsyncs_no_claim(tmp_path: Path) -> None:
    """``store.synchronous: normal`` means no fsync per commit (the simulator's store runs
    so): the claim commits as any transaction there, and is not fsync'd apart either (it
    was, after the claim's fsync moved off the write lock: the simulator slowed by 12 %)."""
    full = open_database(tmp_path / "full.db")
    normal = open_database(tmp_path / "normal.db", synchronous="normal")
    try:
        assert full.sync_apart and not normal.sync_apart
    finally:
        full.close()
        normal.close()
