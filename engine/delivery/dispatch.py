"""Outbox dispatch: one worker per channel takes due outbox rows, renders them, calls the
channel and records the result (docs/delivery.md, "Outbox").

Each row goes through two transactions:

1. **claim** (durable: fsync'd): ``pending → sending``, attempts + 1. Everything committed
   before it (the tracker's non-durable processing commits that wrote the row) becomes
   durable with it.
2. **record** (after the provider answered): ``sent`` (plus the tracker consequence, e.g.
   ``packet-sent`` or ``patient-nudged``, in the same transaction), or back to
   ``pending`` with a backoff due time, or ``dead``.

The claim is a lease: the row records the node (``node_id``, default ``hostname:pid``) and
``lease_until`` (now + ``lease_seconds``), renewed every third of the lease while the send
runs; the record is fenced on the claim (node and attempt number), so a node whose lease
ran out and whose row another node claimed records nothing (counted in
``refloop_outbox_lease_lost_total``). A daemon killed between the two leaves the row
``sending``; once its lease has expired, the reaper (every round, on every node) makes it
``pending`` again (``refloop_outbox_lease_expired_total``) and it is sent again with the
**same idempotency key**: at-least-once, with the duplicate confined to that window and
made harmless where the provider dedupes on the key. A row whose result was recorded is
never sent again, and a row another node is sending is never taken from it while its
lease runs.

Backoff: after the n-th failed attempt the row waits ``uniform(0, min(cap, base·2^(n-1)))``
seconds ("full jitter", from an injected ``random.Random``), at least the provider's
``Retry-After``; after ``max_attempts`` attempts (default 8) it is ``dead``: counted in
``refloop_outbox_dead{channel}`` and retryable with ``refloop outbox retry``.

Order: a referral's rows go out in id order (``engine.store.outbox.claim_due``); different
referrals go in parallel, up to ``concurrency`` sends per channel at once.

Nothing here logs PHI: lines name the outbox id, channel, template, attempt and the
channel's reason (which never carries a recipient or body).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from channels.base import Channel
from channels.direct.send import new_message_id
from channels.sms.templates import SmsContext, SmsTemplates
from channels.sms.twilio import RecipientOptedOut, e164
from channels.voice.twilio import DEFAULT_MAX_CHARS as VOICE_MAX_CHARS
from channels.voice.twilio import voice_body_problems
from engine.canonical import canonical_json
from engine.clock import Clock, isoformat
from engine.delivery.rotation import Rotation
from engine.errors import ChannelError, StoreError
from engine.metrics import Metrics
from engine.model import Attachment, OutboundMessage
from engine.routing.expressions import make_environment
from engine.routing.table import ChannelSpec, PracticeSpec
from engine.store import audit as audit_store
from engine.store import outbox
from engine.store import referrals as referral_store
from engine.store.db import Database, DatabaseError, fault_kind, savepoint
from engine.store.outbox import Item
from engine.store.referrals import Conn, ReferralRow
from engine.tracking import states
from engine.tracking.escalation import next_contact_time

log = logging.getLogger(__name__)

DEFAULT_MAX_ATTEMPTS: Final = 8
DEFAULT_RETRY_BASE: Final = 30.0  # seconds
DEFAULT_RETRY_CAP: Final = 6 * 3600.0
DEFAULT_CONCURRENCY: Final = 4
DEFAULT_LEASE_SECONDS: Final = 30.0  # an outbox claim's lease (store.lease_seconds)
# While a channel's worker has rows to send, it refreshes the outbox gauges at most this
# often (seconds); a round that leaves nothing due refreshes them at once. Each refresh
# counts the queued rows: 2 ms with a backlog of thousands, after every round it was 6 %
# of the worker process's time under ingest load (docs/performance.md, issue 18).
METRICS_EVERY: Final = 1.0
SMS_TEMPLATE_DIR: Final = Path(__file__).resolve().parents[2] / "templates" / "sms"
VOICE_TEMPLATE_DIR: Final = SMS_TEMPLATE_DIR.parent / "voice"
# Channel types that reach the patient's phone with non-PHI, allow-listed text: consent,
# suppression and (voice) the contact window are checked before each send.
PATIENT_PHONE_TYPES: Final = frozenset({"sms", "voice"})
# What a sent row means for its referral (engine.tracking.states internal event kinds). A row's
# payload may name its own with ``"event": "<kind>"``.
CONSEQUENCES: Final[dict[str, states.InternalKind]] = {
    "specialist-packet": "packet-sent",
    "first-nudge": "patient-nudged",
    "first_nudge": "patient-nudged",
    "second-nudge": "patient-nudged",
    "second_nudge": "patient-nudged",
    "patient-nudge": "patient-nudged",
}
# Rows that carry the referral packet (engine.delivery.packet renders it).
PACKET_TEMPLATES: Final = frozenset({"specialist-packet"})
# Which referral columns address each party, by channel type.
_ADDRESS: Final[dict[str, str]] = {"direct": "direct_address", "fax": "fax"}


class Tracker(Protocol):
    """What dispatch and the webhooks need of ``engine.tracking.tracker.Tracker``."""

    def apply_internal(
        self,
        referral_id: int,
        event: states.InternalEvent,
        conn: Conn,
        *,
        actor: str = "system",
        message_id: int | None = None,
    ) -> Any: ...


Sleep = Callable[[float], Awaitable[None]]


class PacketEvents(Protocol):
    """Packet outcomes (engine.delivery.direct_inbound.PacketEvents), inside the record
    transaction."""

    def sent(self, conn: Conn, item: Item, now: float) -> None:
        """A packet row was sent (a Direct send starts its MDN timer)."""
        ...

    def dead(self, conn: Conn, item: Item, reason: str, now: float) -> bool:
        """A packet row is dead (fallback); True when rows were queued."""
        ...


class LocalChannel(Protocol):
    """A channel refloop serves itself, inside its own database (the built-in task queue,
    engine.delivery.task_queue.TaskQueue): no provider, so no send; delivery is one write."""

    def deliver(self, conn: Conn, item: Item, now: float) -> int:
        """Deliver the row inside the caller's transaction (idempotent per outbox id)."""
        ...


class Packets(Protocol):
    """What the renderer needs to attach the referral packet (engine.delivery.packet)."""

    def build(self, item: Item, referral: ReferralRow) -> tuple[str, tuple[Attachment, ...]]:
        """(cover text, attachments) for a ``specialist-packet`` row."""
        ...


# ---------------------------------------------------------------------------
# Retry policy


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Per channel (routes.yaml ``channels.<name>``: ``max_attempts``, ``retry_base``,
    ``retry_cap``, ``concurrency``)."""

    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    base: float = DEFAULT_RETRY_BASE
    cap: float = DEFAULT_RETRY_CAP
    concurrency: int = DEFAULT_CONCURRENCY

    def ceiling(self, attempt: int) -> float:
        """The most the row waits after its ``attempt``-th failure (1-based)."""
        return float(min(self.cap, self.base * 2 ** max(0, attempt - 1)))

    def delay(self, attempt: int, rng: random.Random, retry_after: float | None = None) -> float:
        """Full jitter: uniform in [0, ceiling], but never sooner than ``retry_after``."""
        wait = rng.uniform(0.0, self.ceiling(attempt))
        if retry_after is not None:
            wait = max(wait, retry_after)
        return wait

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> RetryPolicy:
        return cls(
            max_attempts=int(settings.get("max_attempts", DEFAULT_MAX_ATTEMPTS)),
            base=float(settings.get("retry_base", DEFAULT_RETRY_BASE)),
            cap=float(settings.get("retry_cap", DEFAULT_RETRY_CAP)),
            concurrency=int(settings.get("concurrency", DEFAULT_CONCURRENCY)),
        )


# ---------------------------------------------------------------------------
# Rendering


class Renderer:
    """Turns an outbox row into the :class:`OutboundMessage` its channel sends.

    * ``sms`` channels: the template (``channels.<name>.templates.<template>``, else
      ``templates/sms/<template>.txt`` with ``-`` read as ``_``) rendered by
      :class:`channels.sms.templates.SmsTemplates` with the allow-listed context built
      from ``practice:`` only (plus the specialty category where
      ``practice.sms_may_name_specialty``). The recipient is the payload's ``to`` or the
      referral's patient phone. Never any other referral field.
    * ``voice`` channels (automated calls, channels.voice): the same, from
      ``templates/voice/`` with the spoken-prompt rules
      (:func:`channels.voice.twilio.voice_body_problems`) instead of the SMS ones.
    * every other channel (PHI-bearing, secure): the channel's template, if it has one
      of that name, rendered with the sandboxed refloop Jinja environment and the context
      ``referral`` (the referral's detail columns and id), ``practice``, ``payload`` (the
      row's JSON payload) and ``outbox_id``; otherwise the payload's ``body``. The row's
      payload also travels as ``OutboundMessage.payload`` (JSON). The recipient is the
      payload's ``to``, else the party's address on the referral (``specialist-*``
      templates → the specialist, ``referrer-*`` → the referring provider; Direct address
      or fax number by channel type), else the channel's ``queue``.
    * a ``specialist-packet`` row (``packets`` given): the packet PDF and the documents
      it carries as attachments (``engine.delivery.packet``), and its cover text as the
      body unless the channel has a template or the payload a body of its own.
    """

    def __init__(
        self,
        channels: Mapping[str, ChannelSpec],
        practice: PracticeSpec,
        *,
        sms_dir: Path = SMS_TEMPLATE_DIR,
        voice_dir: Path = VOICE_TEMPLATE_DIR,
        packets: Packets | None = None,
    ) -> None:
        self.channels = channels
        self.practice = practice
        self.sms_dir = sms_dir
        self.voice_dir = voice_dir
        self.packets = packets
        self._env = make_environment()

    def sms_templates(self, channel: str) -> SmsTemplates:
        """The allow-listed template set of an SMS channel, or of a voice channel (same
        allow-list, its own directory and body rules)."""
        spec = self.channels.get(channel)
        allow = self.practice.sms_may_name_specialty
        if spec is not None and spec.type == "voice":
            max_chars = int(spec.settings.get("max_chars", VOICE_MAX_CHARS))
            return SmsTemplates(
                self.voice_dir,
                allow_specialty=allow,
                max_chars=max_chars,
                body_rules=voice_body_problems,
                label="voice",
            )
        max_chars = int(spec.settings.get("max_chars", 160)) if spec else 160
        return SmsTemplates(self.sms_dir, allow_specialty=allow, max_chars=max_chars)

    def sms_context(self, referral: ReferralRow | None) -> SmsContext:
        category = ""
        if referral is not None and self.practice.sms_may_name_specialty:
            category = str(referral.details.get("specialty_category") or "")
        return SmsContext(
            practice_name=self.practice.name,
            practice_phone=self.practice.phone,
            booking_link=self.practice.booking_link,
            specialty_category=category,
        )

    def render_sms_text(self, channel: str, template: str, referral: ReferralRow | None) -> str:
        """One SMS body (also used for the HELP reply) or spoken prompt (voice channels).
        Raises SmsTemplateError."""
        spec = self.channels.get(channel)
        templates = self.sms_templates(channel)
        ctx = self.sms_context(referral)
        if spec is not None and template in spec.templates:
            return templates.render_source(spec.templates[template], ctx, name=template)
        directory = templates.directory
        name = template if (directory / f"{template}.txt").exists() else template.replace("-", "_")
        return templates.render(name, ctx)

    def recipient(self, item: Item, spec: ChannelSpec, referral: ReferralRow | None) -> str:
        payload = item.payload_dict()
        if payload.get("to"):
            return str(payload["to"])
        details = referral.details if referral is not None else {}
        if spec.type in PATIENT_PHONE_TYPES:
            return e164(str(details.get("patient_phone") or ""))
        column = _ADDRESS.get(spec.type)
        if column:
            party = "referring" if item.template.startswith("referrer") else "specialist"
            return str(details.get(f"{party}_{column}") or "")
        return str(spec.settings.get("queue") or "")

    def message_domain(self, channel: str) -> str | None:
        """The id-right of the Message-IDs that rows of ``channel`` go out under (Direct:
        the domain of our address); None for a channel whose rows carry none."""
        spec = self.channels.get(channel)
        if spec is None or spec.type != "direct":
            return None
        return str(spec.settings.get("address") or "").rpartition("@")[2]

    def render(self, item: Item, referral: ReferralRow | None) -> OutboundMessage:
        """Raises :class:`ChannelError` (not retryable) when the row cannot be rendered."""
        spec = self.channels.get(item.channel)
        if spec is None:
            raise ChannelError(f"{item.channel}: no such channel in routes.yaml", retryable=False)
        payload = item.payload_dict()
        recipient = self.recipient(item, spec, referral)
        kind = str(payload.get("kind") or item.template)
        common: dict[str, Any] = {
            "outbox_id": item.id,
            "idempotency_key": item.idempotency_key,
            "channel": item.channel,
            "recipient": recipient,
            "kind": kind,
            "referral_id": "" if item.referral_id is None else str(item.referral_id),
            "message_id": item.message_id,
        }
        if spec.type in PATIENT_PHONE_TYPES:
            if not recipient:
                raise ChannelError(f"{item.channel}: no patient phone number", retryable=False)
            body = self.render_sms_text(item.channel, item.template, referral)
            return OutboundMessage(**common, body=body)
        details: dict[str, Any] = dict(referral.details) if referral is not None else {}
        if referral is not None:
            details["id"] = referral.id
            details["status"] = referral.status
        source = spec.templates.get(item.template)
        if source is not None:
            context = {
                "referral": details,
                "practice": {
                    "name": self.practice.name,
                    "phone": self.practice.phone,
                    "booking_link": self.practice.booking_link,
                },
                "payload": payload,
                "outbox_id": item.id,
            }
            try:
                body = self._env.from_string(source).render(context)
            except Exception as exc:  # jinja2 errors: the message names a variable, not data
                raise ChannelError(
                    f"{item.channel}: template {item.template!r} failed ({type(exc).__name__})",
                    retryable=False,
                ) from None
        else:
            body = str(payload.get("body") or "")
        attachments: tuple[Attachment, ...] = ()
        if self.packets is not None and referral is not None and item.template in PACKET_TEMPLATES:
            cover, attachments = self.packets.build(item, referral)
            body = body or cover
        priority = str(payload.get("priority") or details.get("priority") or "routine")
        score = payload.get("priority_score")
        return OutboundMessage(
            **common,
            body=body,
            subject=str(payload.get("subject") or item.template),
            attachments=attachments,
            payload=canonical_json(payload),
            patient_ref=str(payload.get("patient_ref") or ""),
            based_on=str(payload.get("based_on") or ""),
            priority=priority if priority in ("routine", "urgent", "asap", "stat") else "routine",
            priority_score=float(score) if isinstance(score, int | float) else None,
        )


# ---------------------------------------------------------------------------
# The patient-channel rotation


# ---------------------------------------------------------------------------
# The dispatcher


class Dispatcher:
    """One worker per channel in ``channels`` (name → :class:`channels.base.Channel`) and
    in ``local`` (name → :class:`LocalChannel`: a row is delivered and marked ``sent`` in
    one transaction).

    ``sleep`` waits between polls (tests pass one that advances a VirtualClock);
    ``rng`` draws the backoff jitter (tests seed it). :meth:`run_once` is one claim-send-
    record round for one channel, for tests and tools.
    """

    def __init__(
        self,
        db: Database,
        channels: Mapping[str, Channel],
        *,
        renderer: Renderer,
        clock: Clock,
        metrics: Metrics | None = None,
        tracker: Tracker | None = None,
        policies: Mapping[str, RetryPolicy] | None = None,
        default_policy: RetryPolicy = RetryPolicy(),
        rotation: Rotation | None = None,
        rng: random.Random | None = None,
        sleep: Sleep = asyncio.sleep,
        poll_interval: float = 5.0,
        packet_events: PacketEvents | None = None,
        local: Mapping[str, LocalChannel] | None = None,
        node_id: str = "",
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
    ) -> None:
        self.db = db
        self.node_id = node_id or default_node_id()
        self.lease_seconds = lease_seconds
        self.channels = dict(channels)
        self.local = {n: c for n, c in (local or {}).items() if n not in self.channels}
        self.renderer = renderer
        self.clock = clock
        self.metrics = metrics
        self.tracker = tracker
        self.policies = dict(policies or {})
        self.default_policy = default_policy
        self.rotation = rotation or Rotation()
        self.rng = rng or random.Random()
        self.sleep = sleep
        self.poll_interval = poll_interval
        self.packet_events = packet_events
        self._stopping = False
        self._wake: dict[str, asyncio.Event] = {}
        self._in_flight: dict[int, Item] = {}  # rows this node is sending now, by id
        self._faults: dict[str, str] = {}  # channel -> kind of its round's storage fault
        self._refreshed = 0.0  # monotonic time of the last refresh_metrics

    @property
    def fault(self) -> str:
        """The kind of storage fault (``full``, ``io``, ``locked``, ``other``) a channel's
        last round failed on, until its next round completes; "" when none. /readyz asks."""
        return next(iter(self._faults.values()), "")

    def names(self) -> list[str]:
        """Every channel with a worker: the provider channels, then the local ones."""
        return [*self.channels, *self.local]

    def policy(self, channel: str) -> RetryPolicy:
        return self.policies.get(channel, self.default_policy)

    # -- lifecycle ---------------------------------------------------------------

    def reap(self) -> int:
        """Rows left ``sending`` past their lease (their node died or stalled mid-send)
        become ``pending`` (durably); returns how many. Never a row this node is sending.
        Runs at start and in every claim round."""
        with self.db.transaction() as conn:
            reaped = outbox.reap_expired(conn, self.clock.now(), keep=list(self._in_flight))
        self._reaped(reaped)
        return len(reaped)

    def _reaped(self, reaped: list[tuple[int, str, str]]) -> None:
        for outbox_id, channel, holder in reaped:
            if self.metrics is not None:
                self.metrics.outbox_lease_expired.labels(channel).inc()
            log.warning(
                "outbox %d: %s lease of %s expired mid-send; sending again (same key)",
                outbox_id,
                channel,
                holder or "an earlier refloop",
            )
        for channel in {channel for _, channel, _ in reaped}:
            self.wake(channel)

    async def run(self) -> None:
        """Reap expired leases, then run every channel's worker until :meth:`stop`."""
        self.reap()
        self.refresh_metrics()
        async with asyncio.TaskGroup() as tg:
            for name in self.names():
                tg.create_task(self._worker(name), name=f"dispatch-{name}")

    def stop(self) -> None:
        """Workers finish the sends in flight, record them, and return."""
        self._stopping = True
        for event in self._wake.values():
            event.set()

    def wake(self, channel: str | None = None) -> None:
        """New rows may be due (a CLI retry, a webhook): poll now instead of waiting."""
        for name, event in self._wake.items():
            if channel is None or name == channel:
                event.set()

    async def _worker(self, name: str) -> None:
        event = self._wake.setdefault(name, asyncio.Event())
        while not self._stopping:
            try:
                count = await self.run_once(name)
            except Exception as exc:  # e.g. the database locked by a long CLI write
                # A row whose result could not be recorded stays "sending" and is resent
                # (same key) once its lease expires; the worker itself keeps going.
                log.error("outbox %s: round failed (%s: %s)", name, type(exc).__name__, exc)
                if isinstance(exc, DatabaseError):
                    kind = self._faults[name] = fault_kind(exc)
                    if self.metrics is not None:
                        self.metrics.store_errors.labels("dispatch", kind).inc()
                count = 0
            else:
                self._faults.pop(name, None)
            if not count or time.monotonic() - self._refreshed >= METRICS_EVERY:
                self.refresh_metrics()
            if self._stopping:
                break
            if count:
                continue
            event.clear()
            await self._idle(name, event)

    async def _idle(self, name: str, event: asyncio.Event) -> None:
        now = self.clock.now()
        wait = self.poll_interval
        nxt = outbox.next_due(self.db.conn, name)
        if nxt is not None:
            wait = min(wait, max(0.0, nxt - now))
        expiry = outbox.next_expiry(self.db.conn)  # a lease to reap (not ours: renewed)
        if expiry is not None and expiry > now:
            wait = min(wait, expiry - now + 0.001)
        sleeper = asyncio.ensure_future(self.sleep(max(wait, 0.001)))
        waker = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeper, waker):
                task.cancel()
            await asyncio.gather(sleeper, waker, return_exceptions=True)

    # -- one round -----------------------------------------------------------------

    async def run_once(self, name: str) -> int:
        """Claim the channel's due rows (durable commit), send them concurrently, record
        each result. Returns how many rows were claimed."""
        policy = self.policy(name)
        domain = self.renderer.message_domain(name)
        now = self.clock.now()
        # durable before any send. On SQLite the claim commits without its fsync and the
        # WAL is fsync'd right after, off the write lock (Database.sync): the inbox's group
        # commit does not wait behind this fsync (docs/delivery.md, "Claims")
        apart = self.db.sync_apart
        with self.db.transaction(durable=not apart) as conn:
            reaped = outbox.reap_expired(conn, now, keep=list(self._in_flight))
            items = outbox.claim_due(
                conn, name, now, policy.concurrency, node=self.node_id, lease=self.lease_seconds
            )
            if items and domain is not None:  # random, stored before the first send
                items = outbox.assign_message_ids(conn, items, lambda: new_message_id(domain))
        self._reaped(reaped)
        if not items:
            return 0
        if apart:
            await asyncio.to_thread(self.db.sync)  # the claim is durable before the send
        self._in_flight.update((item.id, item) for item in items)
        renewer = asyncio.ensure_future(self._renew(name, [item.id for item in items]))
        try:
            await asyncio.gather(*(self._deliver_claimed(name, item) for item in items))
        finally:
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)
            for item in items:
                self._in_flight.pop(item.id, None)
        return len(items)

    async def _deliver_claimed(self, name: str, item: Item) -> None:
        try:
            await self._deliver(name, item)
        finally:
            self._in_flight.pop(item.id, None)  # recorded (or not): no longer renewed

    async def _renew(self, name: str, ids: list[int]) -> None:
        """Extend the leases of this round's rows every third of the lease (real time)
        while their sends run: a slow send (a fax, a large Direct message) keeps its row."""
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            items = [self._in_flight[i] for i in ids if i in self._in_flight]
            if not items:
                return
            try:
                with self.db.transaction(durable=False) as conn:
                    lost = outbox.renew(conn, items, self.clock.now() + self.lease_seconds)
            except DatabaseError as exc:  # the next renewal tries again
                log.error("outbox %s: lease renewal failed: %s", name, exc)
                continue
            for outbox_id in lost:
                log.warning("outbox %d: lease lost while sending (claimed again)", outbox_id)

    def _lease_lost(self, item: Item, result: str) -> None:
        """A result this node could not record: its claim expired and the row was
        claimed again (or recorded) meanwhile; the current holder's result stands."""
        if self.metrics is not None:
            self.metrics.outbox_lease_lost.labels(item.channel).inc()
        log.warning(
            "outbox %d: %s (attempt %d) not recorded: the lease was lost",
            item.id,
            result,
            item.attempts,
        )

    async def _deliver(self, name: str, item: Item) -> None:
        if name in self.local:
            self._deliver_local(self.local[name], item)
            return
        channel = self.channels[name]
        referral = self._referral(item)
        started = self.clock.monotonic()
        message: OutboundMessage | None = None
        try:
            skip = self._skip_reason(item, referral)
            if skip:
                self._skipped(item, referral, skip)
                return
            quiet_until = self._quiet_until(item, referral)
            if quiet_until is not None:
                self._deferred(item, quiet_until)
                return
            message = self.renderer.render(item, referral)
            receipt = await channel.send(message)
        except ChannelError as exc:
            self._observe(name, started)
            self._failed(item, referral, exc, message)
            return
        except Exception as exc:  # a bug in a channel: retry, and say what kind of error
            self._observe(name, started)
            reason = f"{name}: internal error ({type(exc).__name__})"
            log.error("outbox %d: %s", item.id, reason)
            self._failed(item, referral, ChannelError(reason, retryable=True), message)
            return
        self._observe(name, started)
        self._sent(item, message, receipt.provider_message_id, receipt.provider_status)

    def _deliver_local(self, channel: LocalChannel, item: Item) -> None:
        """Mark the row sent and deliver it in the same transaction: both or neither."""
        now = self.clock.now()
        with self.db.transaction(durable=False) as conn:
            recorded = outbox.mark_sent(
                conn,
                item.id,
                recipient="",
                provider_id=f"local:{item.channel}",
                provider_status="delivered",
                now=now,
                lease=item.lease,
            )
            if recorded:
                channel.deliver(conn, item, now)
                self._consequence(conn, item, now)
        if not recorded:
            self._lease_lost(item, "local delivery")
            return
        self._count(item.channel, "sent")
        log.info("outbox %d: %s %s delivered locally", item.id, item.channel, item.template)

    def _referral(self, item: Item) -> ReferralRow | None:
        if item.referral_id is None:
            return None
        return referral_store.get_referral(self.db.conn, item.referral_id)

    def _observe(self, name: str, started: float) -> None:
        if self.metrics is not None:
            self.metrics.outbox_send_seconds.labels(name).observe(
                max(0.0, self.clock.monotonic() - started)
            )

    def _count(self, name: str, result: str) -> None:
        if self.metrics is not None:
            self.metrics.outbox_sends.labels(name, result).inc()

    def _skip_reason(self, item: Item, referral: ReferralRow | None) -> str:
        """Why an SMS or automated-call row must not be sent at all: no recorded consent
        (``sms_consent``: the consent to automated texts and calls, TCPA;
        referral-standards.md §7), or the number is on the suppression list (a STOP to a
        text revokes the calls too: revocation "by any reasonable means", FCC 24-18).
        Other channels are never skipped here."""
        spec = self.renderer.channels.get(item.channel)
        if spec is None or spec.type not in PATIENT_PHONE_TYPES:
            return ""
        no_consent = (
            "no recorded SMS consent"
            if spec.type == "sms"
            else "no recorded consent to automated calls"
        )
        if referral is not None and not referral.details.get("sms_consent"):
            return no_consent
        if referral is None and not item.payload_dict().get("to"):
            return no_consent
        number = self.renderer.recipient(item, spec, referral)
        if number and outbox.is_suppressed(self.db.conn, number):
            return "number is on the suppression list"
        return ""

    def _quiet_until(self, item: Item, referral: ReferralRow | None) -> float | None:
        """For an automated call: the next moment inside the patient's contact window
        (escalation ``contact:``, the patient's time zone) when now is outside it; None
        when the call may go now. The timers already place nudges inside the window, but
        not every call row comes from a nudge (the day-30 outreach call), and a retry can
        fall at night. Texts are not held here: replies (HELP, STOP confirmation) answer
        the patient at once, and the timers window the nudges and reminders."""
        spec = self.renderer.channels.get(item.channel)
        if spec is None or spec.type != "voice":
            return None
        now = self.clock.now()
        tz = str(referral.details.get("time_zone") or "") if referral is not None else ""
        when = next_contact_time(now, self.rotation.policy.contact, time_zone=tz)
        return when if when > now + 1.0 else None

    def _deferred(self, item: Item, until: float) -> None:
        """Back to pending until ``until`` without spending an attempt."""
        now = self.clock.now()
        with self.db.transaction(durable=False) as conn:
            recorded = outbox.defer(
                conn,
                item.id,
                due=until,
                reason="outside the contact window",
                now=now,
                lease=item.lease,
            )
        if not recorded:
            self._lease_lost(item, "deferral")
            return
        self._count(item.channel, "deferred")
        log.info("outbox %d: %s held until %s (contact window)", item.id, item.channel,
                 isoformat(until))  # fmt: skip

    def _sent(
        self, item: Item, message: OutboundMessage, provider_id: str, provider_status: str
    ) -> None:
        now = self.clock.now()
        with self.db.transaction(durable=False) as conn:
            recorded = outbox.mark_sent(
                conn,
                item.id,
                recipient=message.recipient,
                provider_id=provider_id,
                provider_status=provider_status,
                now=now,
                lease=item.lease,
            )
            if recorded:
                self._consequence(conn, item, now)
                if self.packet_events is not None:
                    self.packet_events.sent(conn, item, now)
        if not recorded:
            self._lease_lost(item, "sent")
            return
        self._count(item.channel, "sent")
        log.info(
            "outbox %d: %s %s sent (attempt %d)",
            item.id,
            item.channel,
            item.template,
            item.attempts,
        )

    def _consequence(self, conn: Conn, item: Item, now: float) -> None:
        """The tracker event a sent row means, applied in the recording transaction. A
        failure here (the referral is gone) is logged and does not undo the record."""
        if self.tracker is None or item.referral_id is None:
            return
        kind = item.payload_dict().get("event") or CONSEQUENCES.get(item.template)
        if kind not in states.INTERNAL_KINDS or kind == "closed-by-operator":
            return
        try:
            with savepoint(conn, "consequence"):
                self.tracker.apply_internal(
                    item.referral_id,
                    states.InternalEvent(kind, occurred_at=now),
                    conn,
                    actor=f"outbox:{item.channel}",
                )
        except (StoreError, ValueError) as exc:
            log.error("outbox %d: %s not applied: %s", item.id, kind, exc)

    def _skipped(self, item: Item, referral: ReferralRow | None, reason: str) -> None:
        now = self.clock.now()
        with self.db.transaction(durable=False) as conn:
            recorded = outbox.mark_skipped(conn, item.id, reason=reason, now=now, lease=item.lease)
            nxt = self.rotation.advance(conn, item, referral, reason, now) if recorded else None
        if not recorded:
            self._lease_lost(item, "skip")
            return
        self._count(item.channel, "skipped")
        log.info(
            "outbox %d: %s not sent (%s)%s",
            item.id,
            item.channel,
            reason,
            f"; rotation moves to outbox {nxt}" if nxt else "",
        )
        if nxt:
            self.wake()

    def _failed(
        self,
        item: Item,
        referral: ReferralRow | None,
        exc: ChannelError,
        message: OutboundMessage | None,
    ) -> None:
        now = self.clock.now()
        reason = str(exc)
        if isinstance(exc, RecipientOptedOut):
            # Twilio refuses the number (21610): remember it, and move the rotation on.
            with self.db.transaction(durable=False) as conn:
                if message is not None:
                    outbox.suppress(conn, message.recipient, "provider-opt-out", now)
            self._skipped(item, referral, "recipient opted out at the provider")
            return
        policy = self.policy(item.channel)
        if exc.retryable and item.attempts < policy.max_attempts:
            wait = policy.delay(item.attempts, self.rng, exc.retry_after)
            with self.db.transaction(durable=False) as conn:
                recorded = outbox.mark_retry(
                    conn, item.id, due=now + wait, error=reason, now=now, lease=item.lease
                )
            if not recorded:
                self._lease_lost(item, "retry")
                return
            self._count(item.channel, "retry")
            log.warning(
                "outbox %d: attempt %d/%d failed, retry in %.0fs: %s",
                item.id,
                item.attempts,
                policy.max_attempts,
                wait,
                reason,
            )
            return
        queued = False
        with self.db.transaction(durable=False) as conn:
            recorded = outbox.mark_dead(conn, item.id, error=reason, now=now, lease=item.lease)
            if recorded and self.packet_events:
                queued = self.packet_events.dead(conn, item, reason, now)
        if not recorded:
            self._lease_lost(item, "dead letter")
            return
        self._count(item.channel, "dead")
        if queued:
            self.wake()
        log.error(
            "outbox %d: dead after %d attempt(s) (%s): %s",
            item.id,
            item.attempts,
            "retryable" if exc.retryable else "not retryable",
            reason,
        )

    def refresh_metrics(self) -> None:
        """Depth, oldest age and dead rows per channel, from the table."""
        if self.metrics is None:
            return
        self._refreshed = time.monotonic()
        now = self.clock.now()
        seen: set[str] = set()
        for s in outbox.stats(self.db.conn, now):
            seen.add(s.channel)
            self.metrics.outbox_depth.labels(s.channel).set(s.depth)
            self.metrics.outbox_oldest.labels(s.channel).set(s.oldest_age)
            self.metrics.outbox_dead.labels(s.channel).set(s.dead)
        for name in self.names():
            if name not in seen:
                self.metrics.outbox_depth.labels(name).set(0)
                self.metrics.outbox_oldest.labels(name).set(0)
                self.metrics.outbox_dead.labels(name).set(0)


def default_node_id() -> str:
    """This process's name in ``outbox.claimed_by`` when ``store.node_id`` is not set:
    ``hostname:pid`` (a restarted daemon is a new node: it waits for the old one's leases
    to expire like any other node would)."""
    return f"{socket.gethostname()}:{os.getpid()}"


# ---------------------------------------------------------------------------
# Operator actions (``refloop outbox``): each in its own short transaction, audited.


def list_outbox(
    db: Database, *, status: str = "", channel: str = "", limit: int = 0
) -> list[dict[str, Any]]:
    """Rows newest first, without payloads or recipients (they may be PHI)."""
    return [
        i.as_dict() for i in outbox.list_items(db.conn, status=status, channel=channel, limit=limit)
    ]


def _audit(conn: Conn, now: float, actor: str, action: str, item: Item) -> None:
    audit_store.append(
        conn,
        at=isoformat(now),
        actor=actor,
        action=action,
        referral_id=item.referral_id,
        message_id=None,
        detail={"outbox_id": item.id, "channel": item.channel, "template": item.template},
    )


def retry_item(db: Database, outbox_id: int, clock: Clock, actor: str) -> dict[str, Any]:
    """Make a dead (or waiting) row due now with a fresh attempt budget."""
    now = clock.now()
    with db.transaction() as conn:
        try:
            item = outbox.retry(conn, outbox_id, now)
        except ValueError as exc:
            raise StoreError(str(exc)) from None
        _audit(conn, now, actor, "outbox-retry", item)
    return item.as_dict()


def retry_dead(db: Database, clock: Clock, actor: str, channel: str = "") -> list[int]:
    """Every dead row (of ``channel``) due now again; their ids."""
    now = clock.now()
    with db.transaction() as conn:
        ids = outbox.retry_dead(conn, now, channel)
        for outbox_id in ids:
            item = outbox.get(conn, outbox_id)
            if item is not None:
                _audit(conn, now, actor, "outbox-retry", item)
    return ids


def cancel_item(db: Database, outbox_id: int, clock: Clock, actor: str) -> dict[str, Any]:
    """Cancel a pending or dead row; it will never be sent."""
    now = clock.now()
    with db.transaction() as conn:
        try:
            item = outbox.cancel(conn, outbox_id, now, reason=f"cancelled by {actor}")
        except ValueError as exc:
            raise StoreError(str(exc)) from None
        _audit(conn, now, actor, "outbox-cancel", item)
    return item.as_dict()
