"""What inbound Direct mail and packet outcomes do to referrals (docs/direct.md, "The
flow"): the engine side of :mod:`channels.direct.inbound` and the packet fallback.

::

    packet sent by Direct ──► timer direct-mdn-timeout (default 24 h)
        MDN processed   ──► packet-delivered (specialist branch "delivered")
        MDN dispatched  ──► specialist-confirmed; the timer is cancelled
        MDN failed, DSN failed, the timer fires first, or the row is dead
                        ──► the packet again by e-fax (else a coordinator task)
    packet sent by fax: callback failure or a dead row ──► coordinator task
                        ("call the specialist office")

Inbound mail (:meth:`DirectFlow.handle`, the :class:`~channels.direct.inbound.
DirectHandler` callback; one durable transaction before the listener answers 250):

* :class:`~engine.model.Quarantined`: an inbox row, source ``direct``, status
  ``rejected``, error ``quarantined: <reason>``, the message as received. No effect.
* MDN / DSN: mapped to the packet's outbox row by the random Message-ID stored with the
  row (``outbox.message_id``; rows from before that column by ``provider_id``); the
  row's ``provider_status`` moves forward only (accepted → processed → dispatched |
  failed), so repeats and late arrivals do nothing.
* a reply: every attachment that is an HL7 v2 message enters the inbox as source
  ``direct`` (the processor routes it like MLLP input); a PDF or C-CDA document in a
  reply whose In-Reply-To/References names one of our packets is stored (status
  ``routed``) and records ``report-received`` on that referral, closing the loop.

Who may answer a packet: the channel checked that the signer certificate is bound to the
From address (Direct AS v1.3 §4: rfc822Name = the address, or dNSName = its domain); an
MDN or a reply about one of our packets acts on it only when that address is also the
one the packet went to (the row's recipient) or the specialist's Direct address in the
directory for its referral (:func:`answerers`). Any other trusted sender's MDN or reply
about it is quarantined (reason :data:`NOT_RECIPIENT`) and changes nothing: a valid
Direct certificate makes a sender authentic, not the recipient of someone else's packet.

Fallback rows use the key ``<packet row key>:fallback`` and fax-failure tasks
``<fax row key>:fax-failed``: whatever triggers them first, and however often, they are
queued once. Every fallback is written on the referral's timeline (kind
``packet-fallback``, recorded only) and in the audit log. Nothing here logs PHI.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Final

from channels.direct.inbound import attachment_kind
from engine.canonical import canonical_json
from engine.clock import Clock, isoformat
from engine.errors import MessageRejected
from engine.hl7v2.message import choose_codec, read_msh
from engine.model import (
    DirectInbound,
    DsnResult,
    Identifiers,
    Inbound,
    MdnResult,
    Quarantined,
    ReplyWithAttachments,
    ReportReceived,
)
from engine.store import audit as audit_store
from engine.store import outbox
from engine.store import referrals as referral_store
from engine.store.db import Database, savepoint
from engine.store.inbox import Inbox
from engine.store.referrals import Conn
from engine.tracking import specialists, states

log = logging.getLogger(__name__)

SOURCE: Final = "direct"
MDN_TIMEOUT_KIND: Final = "direct-mdn-timeout"
DEFAULT_MDN_TIMEOUT: Final = 24 * 3600.0
PACKET_TEMPLATE: Final = "specialist-packet"
FAX_FAILED_TEMPLATE: Final = "fax-failed"
TASK_CHANNEL: Final = "task"
FAX_CHANNEL: Final = "fax"
# Direct provider statuses in the order they may follow each other (failed is terminal).
_RANK: Final[dict[str, int]] = {
    "": 0,
    "accepted": 1,
    "processed": 2,
    "dispatched": 3,
    "failed": 3,
}
_DONE: Final = frozenset({"confirmed", "declined", "report-received"})
HL7_TYPES: Final = frozenset({"ORU", "MDM", "SIU", "OSU"})
# Quarantine reason: a trusted, address-bound sender answering a packet sent to another.
NOT_RECIPIENT: Final = "sender-not-recipient"


def _dumps(value: Mapping[str, Any]) -> str:
    return canonical_json(value)


def _newer(old: str, new: str) -> bool:
    if old in ("dispatched", "failed"):
        return False
    return _RANK.get(new, 0) > _RANK.get(old, 0)


# ---------------------------------------------------------------------------
# The fallback (shared by MDNs, DSNs, the timer and dead rows)


def _note(
    conn: Conn, rid: int, kind: str, detail: Mapping[str, Any], actor: str, now: float
) -> None:
    """A recorded-only entry on the referral's timeline, and its audit row."""
    row = referral_store.get_referral(conn, rid)
    if row is None:
        return
    digest = hashlib.sha256(_dumps({"kind": kind, **detail}).encode()).hexdigest()[:32]
    referral_store.insert_event(
        conn,
        referral_id=rid,
        kind=kind,
        message_id=None,
        fingerprint=digest,
        source="internal",
        actor=actor,
        occurred_at=now,
        recorded_at=now,
        changed=False,
        statuses=(row.status, row.patient_status, row.specialist_status),
        effects=(),
        detail=detail,
    )
    audit_store.append(
        conn,
        at=isoformat(now),
        actor=actor,
        action=kind,
        referral_id=rid,
        message_id=None,
        detail=dict(detail),
    )


# Public name for the same timeline + audit entry (engine.delivery.task_queue records
# done tasks with it).
timeline_note: Final = _note


def fallback(
    conn: Conn,
    packet: outbox.Item,
    reason: str,
    now: float,
    *,
    actor: str,
    served: Collection[str] | None = None,
) -> str:
    """Queue the packet again without Direct: by fax when the specialist has a fax
    number, else a coordinator task. Nothing when the specialist branch already moved
    past ``delivered`` or the referral is closed. Returns what was done
    (``fax``, ``task``, ``moot``, ``already``)."""
    if packet.referral_id is None or packet.template != PACKET_TEMPLATE:
        return "moot"  # only the packet falls back (not a report request or a notice)
    rid = packet.referral_id
    referral = referral_store.get_referral(conn, rid)
    if referral is None:
        return "moot"
    state = states.from_dict(referral.state)
    if state.status == "closed" or state.specialist_status in _DONE:
        return "moot"
    route = specialists.packet_route(conn, referral.details, without_direct=True, served=served)
    key = f"{packet.idempotency_key}:fallback"
    payload: dict[str, Any] = {
        "referral_id": rid,
        "effect": "send-packet",
        "fallback_from": packet.id,
        "reason": reason,
    }
    if route.channel == FAX_CHANNEL:
        payload["to"] = route.address
        channel, template = FAX_CHANNEL, PACKET_TEMPLATE
    else:
        payload["task"] = specialists.NO_WAY_TEMPLATE
        channel, template = TASK_CHANNEL, specialists.NO_WAY_TEMPLATE
    referral_store.cancel_timers(conn, rid, [MDN_TIMEOUT_KIND])
    if not referral_store.enqueue_outbox(
        conn, rid, channel, template, _dumps(payload), key, now, now=now
    ):
        return "already"
    _note(
        conn,
        rid,
        "packet-fallback",
        {"from": packet.channel, "to": channel, "reason": reason, "outbox_id": packet.id},
        actor,
        now,
    )
    log.info("referral %d: packet outbox %d %s; fallback by %s", rid, packet.id, reason, channel)
    return channel


def fax_failed(conn: Conn, fax_row: outbox.Item, reason: str, now: float, *, actor: str) -> bool:
    """A faxed packet did not go through: a coordinator task to call the specialist
    office (key ``<fax row key>:fax-failed``). True when it was queued now."""
    if fax_row.referral_id is None or fax_row.template != PACKET_TEMPLATE:
        return False
    rid = fax_row.referral_id
    referral = referral_store.get_referral(conn, rid)
    if referral is None or states.from_dict(referral.state).status == "closed":
        return False
    payload = {
        "referral_id": rid,
        "kind": "coordinator-task",
        "task": FAX_FAILED_TEMPLATE,
        "subject": "Fax to the specialist failed: call the office",
        "reason": reason,
        "fax_outbox_id": fax_row.id,
    }
    key = f"{fax_row.idempotency_key}:fax-failed"
    queued = referral_store.enqueue_outbox(
        conn, rid, TASK_CHANNEL, FAX_FAILED_TEMPLATE, _dumps(payload), key, now, now=now
    )
    if queued:
        _note(
            conn,
            rid,
            "packet-fallback",
            {"from": FAX_CHANNEL, "to": TASK_CHANNEL, "reason": reason, "outbox_id": fax_row.id},
            actor,
            now,
        )
    return queued


class PacketEvents:
    """The dispatcher's packet hooks (``engine.delivery.dispatch.Dispatcher(packet_events=...)``),
    called inside its record transaction: a Direct packet that was sent starts the MDN
    timer; a dead Direct packet falls back to fax; a dead faxed packet becomes a
    coordinator task. ``direct_channels`` maps each Direct channel name to its MDN
    timeout (seconds)."""

    def __init__(self, direct_channels: Mapping[str, float], fax_channels: Sequence[str] = ()):
        self.direct_channels = dict(direct_channels)
        self.fax_channels = frozenset(fax_channels) | {FAX_CHANNEL}

    def sent(self, conn: Conn, item: outbox.Item, now: float) -> None:
        timeout = self.direct_channels.get(item.channel)
        if timeout is None or item.template != PACKET_TEMPLATE or item.referral_id is None:
            return
        rid = item.referral_id
        referral_store.schedule_timer(
            conn, rid, MDN_TIMEOUT_KIND, now + timeout, 1, f"{rid}:{MDN_TIMEOUT_KIND}:{item.id}",
            now=now,
        )  # fmt: skip

    def dead(self, conn: Conn, item: outbox.Item, reason: str, now: float) -> bool:
        """True when rows were queued (wake the dispatcher)."""
        if item.template != PACKET_TEMPLATE:
            return False
        if item.channel in self.direct_channels:
            return fallback(conn, item, "direct-send-failed", now, actor="outbox") in (
                "fax",
                "task",
            )
        if item.channel in self.fax_channels:
            return fax_failed(conn, item, "fax-send-failed", now, actor="outbox")
        return False


def answerers(conn: Conn, packet: outbox.Item) -> frozenset[str]:
    """The addresses that may answer a Direct packet, lower-cased: the one it was sent to
    (the row's recipient once the send is recorded, the tracker's ``to`` before) and the
    specialist's Direct address in the directory for its referral."""
    found = {packet.recipient, str(packet.payload_dict().get("to") or "")}
    if packet.referral_id is not None:
        referral = referral_store.get_referral(conn, packet.referral_id)
        if referral is not None:
            found.add(specialists.direct_address(conn, referral.details))
    return frozenset(a.strip().lower() for a in found if a.strip())


def packet_for_timer(conn: Conn, referral_id: int, key: str) -> outbox.Item | None:
    """The Direct packet row a ``direct-mdn-timeout`` timer (key ``<rid>:<kind>:<outbox
    id>``) is about."""
    tail = key.rpartition(":")[2]
    return outbox.get(conn, int(tail)) if tail.isdigit() else None


# ---------------------------------------------------------------------------
# Inbound Direct mail


class DirectFlow:
    """Applies classified inbound Direct mail. ``direct_channels`` are the routes.yaml
    names of the Direct channels (their rows carry the Message-IDs MDNs refer to);
    ``tracker`` is :class:`engine.tracking.tracker.Tracker`; ``notify`` wakes the processor
    (new inbox rows) and ``wake`` the dispatcher (new outbox rows)."""

    def __init__(
        self,
        db: Database,
        inbox: Inbox,
        tracker: Any,
        clock: Clock,
        *,
        direct_channels: Sequence[str],
        notify: Callable[[], None] | None = None,
        wake: Callable[[], None] | None = None,
    ) -> None:
        self.db = db
        self.inbox = inbox
        self.tracker = tracker
        self.clock = clock
        self.direct_channels = tuple(direct_channels)
        self.notify = notify
        self.wake = wake

    async def on_result(self, result: DirectInbound) -> None:
        """The listener's callback: store and apply, then return (the listener answers
        250 only after this; an exception becomes 451 and the HISP retries)."""
        self.handle(result)

    def handle(self, result: DirectInbound) -> str:
        """Apply one inbound message in one durable transaction; returns what it did
        (a short code, for logs and tests)."""
        now = self.clock.now()
        with self.db.transaction() as conn:
            if isinstance(result, Quarantined):
                outcome = self._quarantine(conn, result, now)
            elif isinstance(result, MdnResult):
                outcome = self._mdn(conn, result, now)
            elif isinstance(result, DsnResult):
                outcome = self._dsn(conn, result, now)
            else:
                outcome = self._reply(conn, result, now)
        if outcome.startswith(("fallback", "hl7")) and self.notify is not None:
            self.notify()
        if outcome.startswith("fallback") and self.wake is not None:
            self.wake()
        log.info("direct inbound: %s", outcome)
        return outcome

    def _packet(self, conn: Conn, message_id: str) -> outbox.Item | None:
        for name in self.direct_channels:
            item = outbox.find_by_message_id(conn, name, message_id)
            if item is not None:
                return item
        return None

    def _quarantine(self, conn: Conn, q: Quarantined, now: float) -> str:
        inbound = Inbound(
            source=SOURCE,
            peer=q.claimed_sender,
            raw=q.raw,
            received_at=now,
            msh=None,
            text_encoding=choose_codec(q.raw, ""),
            reject=("AR", "", "", f"quarantined: {q.reason}"),
            sender=q.claimed_sender,
            control_id=q.message_id,
            message_type="direct/quarantined",
        )
        self.inbox.add_in(conn, [inbound], "")
        log.warning("direct inbound quarantined (%s)", q.reason)
        return f"quarantined:{q.reason}"

    def _foreign(
        self, conn: Conn, packet: outbox.Item, answer: MdnResult | ReplyWithAttachments, now: float
    ) -> str:
        """The quarantine outcome when ``answer``'s sender may not answer ``packet``
        (:func:`answerers`), else ''. The log names the outbox row, never an address."""
        if answer.sender.strip().lower() in answerers(conn, packet):
            return ""
        log.warning("direct inbound about outbox %d from a sender it was not sent to", packet.id)
        quarantined = Quarantined(
            reason=NOT_RECIPIENT,
            raw=answer.raw,
            claimed_sender=answer.sender,
            message_id=answer.message_id,
        )
        return self._quarantine(conn, quarantined, now)

    def _status(self, conn: Conn, item: outbox.Item, status: str, now: float) -> bool:
        if not _newer(item.provider_status, status):
            return False
        outbox.set_provider_status(conn, item.id, status, now)
        return True

    def _apply(self, conn: Conn, rid: int, kind: states.InternalKind, now: float) -> None:
        with savepoint(conn, "direct_event"):
            self.tracker.apply_internal(
                rid, states.InternalEvent(kind, occurred_at=now), conn, actor="direct:mdn"
            )

    def _mdn(self, conn: Conn, mdn: MdnResult, now: float) -> str:
        item = self._packet(conn, mdn.original_message_id)
        foreign = self._foreign(conn, item, mdn, now) if item is not None else ""
        if foreign:
            return foreign
        audit_store.append(
            conn,
            at=isoformat(now),
            actor="direct:mdn",
            action="direct-mdn",
            referral_id=item.referral_id if item else None,
            message_id=None,
            detail={"disposition": mdn.disposition, "outbox_id": item.id if item else None},
        )
        if item is None or item.referral_id is None:
            log.warning("direct MDN %s for no known packet", mdn.disposition)
            return "mdn:unknown"
        rid = item.referral_id
        if mdn.disposition == "other":
            return "mdn:other"
        if not self._status(conn, item, mdn.disposition, now):
            return f"mdn:{mdn.disposition}:stale"
        if item.template != PACKET_TEMPLATE:
            # a report request or a notice by Direct: its MDN is not news about the packet
            return f"mdn:{mdn.disposition}:not-packet"
        if mdn.disposition == "processed":
            self._apply(conn, rid, "packet-delivered", now)
            return "mdn:processed"
        if mdn.disposition == "dispatched":
            referral_store.cancel_timers(conn, rid, [MDN_TIMEOUT_KIND])
            self._apply(conn, rid, "specialist-confirmed", now)
            return "mdn:dispatched"
        done = fallback(conn, item, "mdn-failed", now, actor="direct:mdn")
        return f"fallback:{done}"

    def _dsn(self, conn: Conn, dsn: DsnResult, now: float) -> str:
        item = self._packet(conn, dsn.original_message_id)
        if item is None:
            return "dsn:unknown"
        if not dsn.failed:
            return "dsn:other"
        self._status(conn, item, "failed", now)
        return f"fallback:{fallback(conn, item, 'dsn-failed', now, actor='direct:dsn')}"

    def _reply(self, conn: Conn, reply: ReplyWithAttachments, now: float) -> str:
        packet = next((p for p in (self._packet(conn, ref) for ref in reply.references) if p), None)
        foreign = self._foreign(conn, packet, reply, now) if packet is not None else ""
        if foreign:  # nothing of it is stored but the quarantine row, HL7 included
            return foreign
        hl7: list[Inbound] = []
        documents: list[Inbound] = []
        for n, att in enumerate(reply.attachments, 1):
            kind = attachment_kind(att)
            if kind == "hl7v2":
                hl7.append(self._hl7(reply.sender, att.data, now))
            elif kind in ("pdf", "cda"):
                documents.append(
                    Inbound(
                        source=SOURCE,
                        peer=reply.sender,
                        raw=att.data,
                        received_at=now,
                        msh=None,
                        text_encoding=choose_codec(att.data, ""),
                        sender=reply.sender,
                        control_id=f"{reply.message_id}#{n}",
                        message_type=f"direct/{kind}",
                    )
                )
        if hl7:
            self.inbox.add_in(conn, hl7, "AA")
        outcome = f"hl7:{len(hl7)}" if hl7 else "reply"
        if not documents:
            return outcome
        stored = self.inbox.add_in(conn, documents, "")
        fresh = [s for s in stored if not s.duplicate]
        rid = packet.referral_id if packet is not None else None
        for s in fresh:
            if rid is None:
                self.inbox.mark(s.id, "filtered", error="reply names no packet of ours", now=now)
            else:
                self.inbox.mark(s.id, "routed", route="direct-report", now=now)
        if rid is None or not fresh:
            return outcome
        referral = referral_store.get_referral(conn, rid)
        if referral is None:
            return outcome
        event = ReportReceived(
            ids=Identifiers(
                sending_facility=referral.sending_facility, placer_number=referral.placer_number
            ),
            occurred_at=now,
            message_id=fresh[0].id,
            report_id=reply.message_id or f"direct:{fresh[0].id}",
            status="final",
        )
        with savepoint(conn, "direct_report"):
            self.tracker.apply(event, conn)
        return f"{outcome},report"

    def _hl7(self, sender: str, raw: bytes, now: float) -> Inbound:
        try:
            msh, codec = read_msh(raw)
            reject = None
        except MessageRejected as exc:
            msh, codec = None, choose_codec(raw, "")
            reject = (exc.ack, exc.code, exc.location, exc.reason)
        if msh is not None and msh.message_type.partition("^")[0] not in HL7_TYPES:
            reject = ("AR", "200", "MSH^1^9", "message type not accepted by Direct")
        return Inbound(
            source=SOURCE,
            peer=sender,
            raw=raw,
            received_at=now,
            msh=msh,
            text_encoding=codec,
            reject=reject,
            sender=sender,
        )
