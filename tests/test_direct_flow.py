"""The packet's delivery loop on a virtual clock (acceptance 3): a Direct send starts a
24-hour wait for the dispatched MDN; processed means delivered, dispatched confirmed;
failed, a failed DSN, a dead row or no dispatched MDN in time send the fax instead (or a
coordinator task without a fax number); a fax that fails becomes a coordinator task; the
fax webhook refuses bad signatures and never moves backwards. Plus quarantine and replies."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

import httpx
import pytest
import yaml
from direct_pki import SPECIALIST, Pki, make_direct_pki

from channels.fax.phaxio import SIGNATURE_HEADER, phaxio_signature
from engine.app import Engine
from engine.clock import VirtualClock, isoformat
from engine.config import loads
from engine.delivery.direct_inbound import MDN_TIMEOUT_KIND, DirectFlow, PacketEvents
from engine.delivery.dispatch import Dispatcher, Renderer, RetryPolicy
from engine.errors import ChannelError
from engine.model import (
    AppointmentBooked,
    Attachment,
    DsnRecipient,
    DsnResult,
    Identifiers,
    MdnResult,
    OutboundMessage,
    Provider,
    Quarantined,
    ReferralCreated,
    ReplyWithAttachments,
    SendReceipt,
)
from engine.routing.table import ChannelSpec, PracticeSpec
from engine.store import outbox
from engine.store import referrals as rstore
from engine.store.db import Database, open_database
from engine.store.inbox import Inbox
from engine.timers.service import TimerService
from engine.tracking.escalation import DAY, Policy
from engine.tracking.specialists import import_csv
from engine.tracking.tracker import Tracker

pytestmark = pytest.mark.store  # every test here uses the store

T0 = 1_767_225_600.0
HOUR = 3600.0
NPI = "1234567893"
FAX = "+15555550100"
PDF = b"%PDF-1.4\nconsult note\n%%EOF\n"
ORU = (
    b"MSH|^~\\&|SPEC|SPECFAC|REFLOOP|CLINIC|20260102||ORU^R01|r1|P|2.5.1\r"
    b"OBR|1|R1||X|||||||||||||||||||||F\r"
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_direct_pki(tmp_path_factory.mktemp("flow-pki"))


class FakeChannel:
    """Accepts every message (Message-ID-like provider ids), or fails as told."""

    def __init__(self, fail: ChannelError | None = None) -> None:
        self.sent: list[OutboundMessage] = []
        self.fail = fail

    async def send(self, item: OutboundMessage) -> SendReceipt:
        if self.fail is not None:
            raise self.fail
        self.sent.append(item)
        return SendReceipt(
            outbox_id=item.outbox_id,
            idempotency_key=item.idempotency_key,
            channel=item.channel,
            provider_message_id=f"<m{item.outbox_id}@direct.clinic.test>",
            provider_status="accepted",
        )


def spec(name: str, kind: str) -> ChannelSpec:
    return ChannelSpec(name, kind, MappingProxyType({}), MappingProxyType({}))


class Loop:
    """Tracker, timers, dispatcher and the Direct flow on one virtual clock."""

    def __init__(self, db: Database, tmp: Path, pki: Pki, *, fax_number: str = FAX, **fail: Any):
        self.db = db
        self.clock = VirtualClock(T0)
        self.tracker = Tracker(db, self.clock)
        self.timers = TimerService(db, self.tracker, Policy(), self.clock)
        self.timers.load()
        self.channels = {name: FakeChannel(fail.get(name)) for name in ("direct", "fax", "task")}
        specs = {n: spec(n, n) for n in self.channels}
        self.dispatcher = Dispatcher(
            db,
            self.channels,
            renderer=Renderer(specs, PracticeSpec()),
            clock=self.clock,
            tracker=self.tracker,
            default_policy=RetryPolicy(max_attempts=1),
            packet_events=PacketEvents({"direct": DAY}, ["fax"]),
        )
        self.flow = DirectFlow(db, Inbox(db), self.tracker, self.clock, direct_channels=["direct"])
        csv = tmp / "specialists.csv"
        csv.write_text(
            "npi,name,direct_address,fax,certificate\n"
            f"{NPI},Dr Smith,{SPECIALIST},{fax_number},{pki.specialist.cert_path}\n"
        )
        import_csv(db, csv, self.clock)
        with db.transaction() as conn:
            result = self.tracker.apply(
                ReferralCreated(
                    ids=Identifiers(sending_facility="EPIC", placer_number="R1"),
                    occurred_at=T0,
                    message_id=0,
                    specialist=Provider(name="Dr Smith", npi=NPI),
                ),
                conn,
            )
        assert result.referral_id is not None
        self.rid = result.referral_id

    def dispatch(self, channel: str) -> int:
        return asyncio.run(self.dispatcher.run_once(channel))

    def advance(self, seconds: float) -> list[str]:
        self.clock.advance(seconds)
        fired = self.timers.tick()  # patient nudges fire too; only the MDN timer matters
        return [f"{f.kind}:{f.result}:{f.action}" for f in fired if f.kind == MDN_TIMEOUT_KIND]

    def referral(self) -> rstore.ReferralRow:
        row = rstore.get_referral(self.db.conn, self.rid)
        assert row is not None
        return row

    def rows(self) -> list[tuple[str, str, str]]:
        """The specialist side's rows (patient nudges left out)."""
        rows = rstore.outbox_for(self.db.conn, self.rid)
        return [(o.channel, o.template, o.status) for o in rows if o.channel in self.channels]

    def timer_kinds(self) -> list[str]:
        return [t.kind for t in rstore.timers_for(self.db.conn, self.rid)]

    def mdn(self, disposition: str, message_id: str = "<m1@direct.clinic.test>") -> str:
        return self.flow.handle(
            MdnResult(
                original_message_id=message_id,
                disposition=disposition,  # type: ignore[arg-type]
                disposition_text=disposition,
                sender=SPECIALIST,
            )
        )

    def timeline(self) -> list[str]:
        return [e.kind for e in rstore.timeline(self.db.conn, self.rid)]


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = open_database(tmp_path / "refloop.db")
    yield database
    database.close()


def test_direct_packet_starts_the_mdn_timer(db: Database, tmp_path: Path, pki: Pki) -> None:
    loop = Loop(db, tmp_path, pki)
    assert loop.rows() == [("direct", "specialist-packet", "pending")]
    assert loop.dispatch("direct") == 1
    assert loop.channels["direct"].sent[0].recipient == SPECIALIST
    assert loop.referral().specialist_status == "packet-sent"
    (timer,) = [t for t in rstore.timers_for(db.conn, loop.rid) if t.kind == MDN_TIMEOUT_KIND]
    assert timer.due == T0 + DAY


def test_no_dispatched_mdn_in_time_sends_the_fax(db: Database, tmp_path: Path, pki: Pki) -> None:
    loop = Loop(db, tmp_path, pki)
    loop.dispatch("direct")
    assert loop.mdn("processed") == "mdn:processed"
    assert loop.referral().specialist_status == "delivered"  # delivered, not confirmed
    assert loop.advance(23 * HOUR) == []
    assert loop.advance(HOUR) == [f"{MDN_TIMEOUT_KIND}:acted:fallback:fax"]
    assert loop.rows()[-1] == ("fax", "specialist-packet", "pending")
    assert loop.dispatch("fax") == 1
    faxed = loop.channels["fax"].sent[0]
    assert faxed.recipient == FAX
    assert json.loads(faxed.payload)["reason"] == "no-dispatched-mdn"
    assert "packet-fallback" in loop.timeline()
    assert loop.advance(DAY) == []  # fired once
    assert loop.mdn("dispatched") == "mdn:dispatched"  # a late MDN still confirms
    assert loop.referral().status == "specialist-confirmed"


def test_dispatched_mdn_confirms_and_cancels_the_timer(
    db: Database, tmp_path: Path, pki: Pki
) -> None:
    loop = Loop(db, tmp_path, pki)
    loop.dispatch("direct")
    assert loop.mdn("dispatched") == "mdn:dispatched"
    assert loop.referral().status == "specialist-confirmed"
    assert MDN_TIMEOUT_KIND not in loop.timer_kinds()
    # late and repeated notifications change nothing
    assert loop.mdn("processed") == "mdn:processed:stale"
    assert loop.mdn("dispatched") == "mdn:dispatched:stale"
    assert loop.mdn("failed") == "mdn:failed:stale"
    assert loop.advance(2 * DAY) == []
    assert [r[0] for r in loop.rows()] == ["direct"]
    assert loop.mdn("processed", "<unknown@x>") == "mdn:unknown"


class Racing(FakeChannel):
    """A HISP so fast that the specialist's MDN arrives before the send is recorded."""

    def __init__(self, loop: Loop) -> None:
        super().__init__()
        self.loop = loop
        self.outcomes: list[str] = []

    async def send(self, item: OutboundMessage) -> SendReceipt:
        mdn = MdnResult(
            original_message_id=item.message_id,
            disposition="processed",
            disposition_text="processed",
            sender=SPECIALIST,
        )
        self.outcomes.append(self.loop.flow.handle(mdn))
        return await super().send(item)


def test_an_mdn_that_beats_the_send_record_finds_the_stored_message_id(
    db: Database, tmp_path: Path, pki: Pki
) -> None:
    loop = Loop(db, tmp_path, pki)
    racing = Racing(loop)
    loop.dispatcher.channels["direct"] = racing
    assert loop.dispatch("direct") == 1
    assert racing.outcomes == ["mdn:processed"]  # the row was still "sending"
    (item,) = [o for o in rstore.outbox_for(db.conn, loop.rid) if o.channel == "direct"]
    row = outbox.get(db.conn, item.id)
    assert row is not None and (row.status, row.provider_status) == ("sent", "processed")
    assert loop.referral().specialist_status == "delivered"


def test_failed_mdn_falls_back_at_once_and_only_once(
    db: Database, tmp_path: Path, pki: Pki
) -> None:
    loop = Loop(db, tmp_path, pki)
    loop.dispatch("direct")
    assert loop.mdn("failed") == "fallback:fax"
    dsn = DsnResult(
        original_message_id="<m1@direct.clinic.test>",
        sender=SPECIALIST,
        recipients=(DsnRecipient(SPECIALIST, "failed", "5.4.72"),),
    )
    assert loop.flow.handle(dsn) == "fallback:already"
    assert MDN_TIMEOUT_KIND not in loop.timer_kinds()
    assert loop.advance(2 * DAY) == []
    assert [r[0] for r in loop.rows()] == ["direct", "fax"]


def test_no_fax_number_means_a_coordinator_task(db: Database, tmp_path: Path, pki: Pki) -> None:
    loop = Loop(db, tmp_path, pki, fax_number="")
    loop.dispatch("direct")
    assert loop.advance(DAY) == [f"{MDN_TIMEOUT_KIND}:acted:fallback:task"]
    assert loop.rows()[-1] == ("task", "no-way-to-reach-specialist", "pending")


def test_dead_direct_row_falls_back_to_fax(db: Database, tmp_path: Path, pki: Pki) -> None:
    loop = Loop(db, tmp_path, pki, direct=ChannelError("direct: HISP replied 554", retryable=False))
    loop.dispatch("direct")
    assert loop.rows() == [
        ("direct", "specialist-packet", "dead"),
        ("fax", "specialist-packet", "pending"),
    ]


def test_efax_failure_becomes_a_coordinator_task(db: Database, tmp_path: Path, pki: Pki) -> None:
    loop = Loop(
        db,
        tmp_path,
        pki,
        direct=ChannelError("direct: HISP replied 554", retryable=False),
        fax=ChannelError("fax: provider answered 422", retryable=False),
    )
    loop.dispatch("direct")
    loop.dispatch("fax")
    assert loop.rows()[-1] == ("task", "fax-failed", "pending")
    assert loop.timeline().count("packet-fallback") == 2  # direct → fax → task


def test_quarantine_is_kept_visibly_and_changes_nothing(
    db: Database, tmp_path: Path, pki: Pki
) -> None:
    loop = Loop(db, tmp_path, pki)
    before = loop.referral()
    raw = b"From: dr@direct.specialist.test\r\n\r\nnot encrypted"
    q = Quarantined("untrusted-signer", raw, "dr@direct.specialist.test", "<q1@x>")
    assert loop.flow.handle(q) == "quarantined:untrusted-signer"
    (row,) = list(loop.flow.inbox.list(source="direct"))
    assert (row.status, row.error, row.raw) == ("rejected", "quarantined: untrusted-signer", raw)
    assert loop.referral().state == before.state


def test_reply_hl7_enters_the_pipeline_and_a_report_closes_the_loop(
    db: Database, tmp_path: Path, pki: Pki
) -> None:
    loop = Loop(db, tmp_path, pki)
    loop.dispatch("direct")
    reply = ReplyWithAttachments(
        sender=SPECIALIST,
        message_id="<reply-1@direct.specialist.test>",
        references=("<m1@direct.clinic.test>",),
        attachments=(
            Attachment("consult.pdf", "application/pdf", PDF),
            Attachment("result.hl7", "application/hl7-v2", ORU),
        ),
    )
    assert loop.flow.handle(reply) == "hl7:1,report"
    rows = {r.message_type: r for r in loop.flow.inbox.list(source="direct")}
    assert rows["ORU^R01"].status == "received"  # the processor routes it
    assert (rows["direct/pdf"].status, rows["direct/pdf"].raw) == ("routed", PDF)
    referral = loop.referral()
    assert (referral.status, referral.close_reason) == ("closed", "report-received")
    assert loop.flow.handle(reply) == "hl7:1"  # a resend: stored once, no second report
    assert len(list(loop.flow.inbox.list(source="direct"))) == 2


# ---------------------------------------------------------------------------
# The fax webhook through the engine's HTTP server

PUBLIC = "https://refloop.example"
TOKEN = "fax-callback-token"


def fax_config() -> Any:
    doc = {
        "version": 1,
        "store": {"file": "refloop.db"},
        "http": {"host": "127.0.0.1", "port": 0, "public_url": PUBLIC},
        "channels": {
            "fax": {
                "type": "fax",
                "api_key": "${env:FAX_KEY}",
                "api_secret": "${env:FAX_KEY}",
                "callback_token": "${env:FAX_TOKEN}",
                "api_url": "http://127.0.0.1:9",
            },
        },
        "routes": [{"name": "all", "then": [{"drop": "tests"}]}],
    }
    env = {"FAX_KEY": "k", "FAX_TOKEN": TOKEN}
    return loads(yaml.safe_dump(doc), file="fax.yaml", env=env)


def fax_fields(status: str) -> dict[str, str]:
    fax = {"id": 777, "status": status, "error_type": "lineError" if status == "failure" else ""}
    return {"success": "false", "is_test": "true", "direction": "sent", "fax": json.dumps(fax)}


def test_fax_webhook_signature_and_out_of_order_statuses(tmp_path: Path) -> None:
    url = f"{PUBLIC}/hooks/fax/phaxio"

    async def main() -> None:
        engine = Engine(fax_config(), tmp_path / "state", clock=VirtualClock(T0), background=False)
        await engine.start()
        try:
            db = engine.db
            assert db is not None
            with db.transaction() as conn:
                rid = engine.tracker.apply(
                    ReferralCreated(
                        ids=Identifiers(sending_facility="EPIC", placer_number="F1"),
                        occurred_at=T0,
                        specialist=Provider(name="Dr Fax", fax=FAX),
                    ),
                    conn,
                ).referral_id
                (item,) = outbox.claim_due(conn, "fax", T0, 10)
                outbox.mark_sent(
                    conn,
                    item.id,
                    recipient=FAX,
                    provider_id="777",
                    provider_status="queued",
                    now=T0,
                )
            base = f"http://127.0.0.1:{engine.ports()['http']}/hooks/fax/phaxio"

            async def post(status: str, signature: str | None = None) -> int:
                fields = fax_fields(status)
                sig = (
                    signature if signature is not None else phaxio_signature(url, fields, {}, TOKEN)
                )
                async with httpx.AsyncClient() as http:
                    resp = await http.post(base, data=fields, headers={SIGNATURE_HEADER: sig})
                return resp.status_code

            def state() -> tuple[str, str, list[str]]:
                row = outbox.get(db.conn, item.id)
                ref = rstore.get_referral(db.conn, rid)
                assert row is not None and ref is not None
                tasks = [o.template for o in rstore.outbox_for(db.conn, rid) if o.channel == "task"]
                return row.provider_status, ref.specialist_status, tasks

            assert await post("failure", signature="0" * 40) == 403
            assert await post("failure", signature="") == 403
            assert state() == ("queued", "not-sent", [])  # no change at all
            assert await post("inprogress") == 200
            assert state()[0] == "sending"
            assert await post("queued") == 200  # late: ignored
            assert state()[0] == "sending"
            assert await post("failure") == 200
            assert state() == ("failure", "not-sent", ["fax-failed"])
            assert await post("failure") == 200  # Phaxio's retry: one task only
            assert await post("success") == 200  # terminal stays terminal
            assert state() == ("failure", "not-sent", ["fax-failed"])
        finally:
            await engine.stop()

    asyncio.run(main())


def test_mdn_for_a_report_request_is_not_news_about_the_packet(
    db: Database, tmp_path: Path, pki: Pki
) -> None:
    """After the visit the report request goes by Direct (docs/escalation.md); the
    specialist HISP's MDNs for it say nothing about the packet: a dispatched one does not
    confirm the referral, a failed one does not send the packet by fax."""
    loop = Loop(db, tmp_path, pki)
    loop.dispatch("direct")
    assert loop.mdn("processed") == "mdn:processed"
    visit = T0 + 2 * DAY
    with db.transaction() as conn:
        loop.tracker.apply(
            AppointmentBooked(
                ids=Identifiers(sending_facility="EPIC", placer_number="R1"),
                occurred_at=T0 + HOUR,
                message_id=0,
                appointment_id="A1",
                start=isoformat(visit),
            ),
            conn,
        )
    loop.advance(DAY)  # no dispatched MDN for the packet: it went by fax already
    assert loop.rows()[-1] == ("fax", "specialist-packet", "pending")
    loop.advance(visit + 3 * DAY - loop.clock.now())  # visit + 3 d: the first request
    assert loop.rows()[-1] == ("direct", "specialist-report-request", "pending")
    assert loop.dispatch("direct") == 1
    request = loop.channels["direct"].sent[-1]
    assert request.recipient == SPECIALIST
    assert "Please send the consult note for referral R1" in request.body
    rows = loop.rows()
    assert loop.mdn("failed", f"<m{request.outbox_id}@direct.clinic.test>") == (
        "mdn:failed:not-packet"
    )
    assert loop.rows() == rows  # no fax of the packet, no task


def test_dispatched_mdn_for_a_notice_does_not_confirm(
    db: Database, tmp_path: Path, pki: Pki
) -> None:
    """An MDN for a Direct row that is not the packet leaves the specialist branch alone."""
    loop = Loop(db, tmp_path, pki)
    loop.dispatch("direct")
    assert loop.mdn("processed") == "mdn:processed"
    with db.transaction() as conn:
        rstore.enqueue_outbox(conn, loop.rid, "direct", "specialist-report-request", "{}",
                              "notice:1", loop.clock.now(), now=loop.clock.now())  # fmt: skip
    assert loop.dispatch("direct") == 1
    other = loop.channels["direct"].sent[-1].outbox_id
    assert loop.mdn("dispatched", f"<m{other}@direct.clinic.test>") == "mdn:dispatched:not-packet"
    assert loop.referral().specialist_status == "delivered"
