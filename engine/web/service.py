"""What the API and the dashboard do, whoever asks: reads and coordinator actions.

:class:`Service` is the one path for reads and coordinator actions (the JSON API in
:mod:`engine.web.api` or a dashboard form in :mod:`engine.web.dashboard`): each action goes
through the tracker or the outbox functions with ``actor = user:<name>``, so it lands in
the referral's timeline and the audit log like a machine event. Every view of a referral's
PHI (its detail) or of a raw message appends an audit row naming the user. Raises
:class:`ApiError` (status + reason, never PHI) for any answer other than success.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import islice
from typing import Any, Final, Protocol

from engine.clock import Clock, isoformat, parse_iso
from engine.errors import MessageRejected, StoreError
from engine.ingest.status import Workbench
from engine.model import AppointmentBooked, Identifiers, SpecialistDeclined
from engine.store import audit as audit_store
from engine.store import outbox as outbox_store
from engine.store import referral_search, worklist
from engine.store import referrals as referral_store
from engine.store.db import Database
from engine.store.referral_filter import ReferralFilter
from engine.tracking import states
from engine.tracking.report import closure_report, open_aging_now, report_to_dict
from engine.web.auth import Principal

log = logging.getLogger(__name__)

DAY: Final = 86400.0
MAX_ID: Final = 2**53 - 1
# How long a referral may stay open before the worklist calls it overdue, by priority
# (unless its needed-by date comes first). Days.
TARGET_DAYS: Final[dict[str, float]] = {"stat": 2.0, "urgent": 7.0, "routine": 30.0}
PRIORITY_RANK: Final[dict[str, int]] = {"stat": 0, "urgent": 1, "routine": 2}
REPORT_GROUPS: Final = ("specialty", "specialist", "referrer", "month")
MAX_BULK: Final = 200  # referrals one bulk close may name


class ApiError(Exception):
    """An answer other than 200: ``status`` and a reason (never PHI)."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Wake(Protocol):
    def __call__(self, channel: str | None = None) -> None: ...


# ---------------------------------------------------------------------------
# The shared operations


@dataclass
class Service:
    """Reads and coordinator actions over the store. ``tracker`` is the engine's
    ``engine.tracking.tracker.Tracker`` (None when routes.yaml has no routes: actions answer 503);
    ``wake`` nudges the dispatcher after an action queued outbound work."""

    db: Database
    clock: Clock
    tracker: Any = None
    wake: Wake | None = None
    workbench: Workbench | None = None  # the Sources and Try pages (engine.ingest.status)
    # the daemon's current route handler (engine.routing.handler.RouteHandler, swapped by
    # a reload), for *Reprocess*; None or returning None: no routes (503)
    routes: Callable[[], Any] | None = None

    # -- referrals --

    def worklist_page(
        self,
        principal: Principal | None,
        *,
        via: str,
        q: str = "",
        status: str | None = None,
        open_only: bool = False,
        specialty: str | None = None,
        specialist: str | None = None,
        referring: str | None = None,
        days_open_min: float | None = None,
        overdue: bool | None = None,
        sort: str = "priority",
        after: int | None = None,
        before: int | None = None,
        limit: int = 50,
    ) -> dict[str, Any]:
        """One page of the worklist (keyset paging, engine.store.referral_search): the
        items with the patient's name, birth date and MRN, ``total`` matching, where the
        page starts and ends (1-based) and the cursors of the pages before and after.
        Showing patients is audited (``listed-referrals``, the ids shown; never the
        search text)."""
        now = self.clock.now()
        try:
            order = referral_search.sort_of(sort, now, TARGET_DAYS)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        flt = ReferralFilter(
            status=status,
            open_only=open_only,
            specialty=specialty,
            specialist=specialist,
            referring=referring,
            opened_before=now - days_open_min * DAY if days_open_min is not None else None,
            q=q,
            overdue=overdue,
            now=now,
            targets=tuple(TARGET_DAYS.items()),
        )
        found, rows = worklist.referral_page(
            self.db.conn, flt, order, limit=limit, after=after, before=before
        )
        people = referral_search.patients(self.db.conn, found.ids)
        items = [referral_item(r, now, people.get(r.id)) for r in rows]
        if principal is not None and items:
            with self.db.transaction() as conn:
                audit_store.append(
                    conn,
                    at=isoformat(now),
                    actor=principal.actor,
                    action="listed-referrals",
                    referral_id=None,
                    message_id=None,
                    detail={
                        "via": via,
                        "role": principal.role,
                        "search": bool(q.strip()),
                        "referral_ids": [i["id"] for i in items],
                    },
                )
        return {
            "items": items,
            "total": found.total,
            "first": found.start,
            "last": found.end,
            "sort": f"{'-' if order.descending else ''}{order.name}",
            "prev_before": found.ids[0] if found.has_prev else None,
            "next_after": found.ids[-1] if found.has_next else None,
        }

    def referral(self, principal: Principal, referral_id: int, *, via: str) -> dict[str, Any]:
        """One referral with its timeline; audited as a PHI view."""
        from engine.tracking.views import show_referral

        item = show_referral(self.db, referral_id)
        if item is None:
            raise ApiError(404, f"no referral {referral_id}")
        row = referral_store.get_referral(self.db.conn, referral_id)
        assert row is not None
        item.update(_extras(row, self.clock.now()))
        item["messages"] = [
            m.as_dict()
            for mid in worklist.referral_message_ids(self.db.conn, referral_id)
            if (m := worklist.get_message(self.db.conn, mid)) is not None
        ]
        item["tasks"] = self.referral_tasks(referral_id)
        self._audit_view(principal, "viewed-referral", referral_id=referral_id, via=via)
        return item

    def _audit_view(
        self,
        principal: Principal,
        action: str,
        *,
        referral_id: int | None = None,
        message_id: int | None = None,
        via: str,
    ) -> None:
        now = self.clock.now()
        with self.db.transaction() as conn:
            audit_store.append(
                conn,
                at=isoformat(now),
                actor=principal.actor,
                action=action,
                referral_id=referral_id,
                message_id=message_id,
                detail={"via": via, "role": principal.role},
            )

    def _tracker(self) -> Any:
        if self.tracker is None:
            raise ApiError(503, "no tracker: routes.yaml has no routes")
        return self.tracker

    def _require_referral(self, referral_id: int) -> referral_store.ReferralRow:
        row = referral_store.get_referral(self.db.conn, referral_id)
        if row is None:
            raise ApiError(404, f"no referral {referral_id}")
        return row

    def _result(self, result: Any) -> dict[str, Any]:
        if self.wake is not None and result.effects:
            self.wake()
        return {
            "referral_id": result.referral_id,
            "outcome": result.outcome,
            "status": result.status,
            "effects": list(result.effects),
        }

    def close(
        self, principal: Principal, referral_id: int, reason: str, note: str = ""
    ) -> dict[str, Any]:
        """Close with a reason (engine.tracking.states.CLOSE_REASONS) via Tracker.close."""
        if reason not in states.CLOSE_REASONS:
            raise ApiError(400, f"reason must be one of {', '.join(states.CLOSE_PRECEDENCE)}")
        tracker = self._tracker()
        self._require_referral(referral_id)
        try:
            result = tracker.close(referral_id, reason, note, actor=principal.actor)
        except StoreError as exc:
            raise ApiError(409, str(exc)) from None
        return self._result(result)

    def close_many(
        self, principal: Principal, referral_ids: list[int], reason: str, note: str = ""
    ) -> dict[str, Any]:
        """Close each referral with one reason and note, one :meth:`close` (one tracker
        transaction, one audit row) per referral, so one that cannot be closed (gone,
        already closed: not closed again) does not stop the others: its item carries the
        error instead."""
        if reason not in states.CLOSE_REASONS:
            raise ApiError(400, f"reason must be one of {', '.join(states.CLOSE_PRECEDENCE)}")
        if not referral_ids or len(referral_ids) > MAX_BULK:
            raise ApiError(400, f"give 1 to {MAX_BULK} referral ids")
        if len(set(referral_ids)) != len(referral_ids):
            raise ApiError(400, "referral ids repeat")
        self._tracker()
        items: list[dict[str, Any]] = []
        for rid in referral_ids:
            try:
                if self._require_referral(rid).status == "closed":
                    raise ApiError(409, f"referral {rid} is already closed")
                items.append({**self.close(principal, rid, reason, note), "error": ""})
            except ApiError as exc:
                items.append(
                    {"referral_id": rid, "outcome": "refused", "status": "",
                     "effects": [], "error": exc.reason}
                )  # fmt: skip
        closed = sum(1 for i in items if not i["error"])
        return {"closed": closed, "refused": len(items) - closed, "items": items}

    def book(
        self, principal: Principal, referral_id: int, start: str = "", appointment_id: str = ""
    ) -> dict[str, Any]:
        """The patient called in with a booking: an appointment-booked event applied by
        the tracker with the user as actor (cancels the patient nudges)."""
        tracker = self._tracker()
        self._require_referral(referral_id)
        now = self.clock.now()
        if start:
            try:
                start = isoformat(parse_iso(start))
            except (ValueError, OverflowError, OSError):
                raise ApiError(400, "start must be an ISO date or date-time") from None
        event = AppointmentBooked(
            ids=Identifiers(),
            occurred_at=now,
            appointment_id=appointment_id or f"operator-{referral_id}-{int(now)}",
            start=start,
        )
        return self._apply(tracker, principal, referral_id, event)

    def decline(self, principal: Principal, referral_id: int, reason: str = "") -> dict[str, Any]:
        """The specialist declined (told by phone): the specialist-declined path."""
        tracker = self._tracker()
        self._require_referral(referral_id)
        event = SpecialistDeclined(ids=Identifiers(), occurred_at=self.clock.now(), reason=reason)
        return self._apply(tracker, principal, referral_id, event)

    def _apply(
        self, tracker: Any, principal: Principal, referral_id: int, event: Any
    ) -> dict[str, Any]:
        # Tracker.apply_internal applies any event to a known referral (its _apply_to
        # takes model events too); operator-reported events carry no message id.
        try:
            with self.db.transaction() as conn:
                result = tracker.apply_internal(referral_id, event, conn, actor=principal.actor)
        except StoreError as exc:
            raise ApiError(409, str(exc)) from None
        return self._result(result)

    def link(self, principal: Principal, parked_id: int, referral_id: int) -> dict[str, Any]:
        tracker = self._tracker()
        self._require_referral(referral_id)
        parked = referral_store.get_parked(self.db.conn, parked_id)
        if parked is None:
            raise ApiError(404, f"no parked event {parked_id}")
        try:
            result = tracker.link(parked_id, referral_id, actor=principal.actor)
        except StoreError as exc:
            raise ApiError(409, str(exc)) from None
        return self._result(result)

    def parked(self, *, include_linked: bool = False) -> list[dict[str, Any]]:
        from engine.tracking.views import list_parked

        return list_parked(self.db, include_linked=include_linked)

    # -- outbox --

    def outbox(
        self, *, status: str = "", channel: str = "", limit: int = 100
    ) -> list[dict[str, Any]]:
        return [
            _outbox_dict(i)
            for i in outbox_store.list_items(
                self.db.conn, status=status, channel=channel, limit=limit
            )
        ]

    # -- coordinator tasks (engine.delivery.task_queue) --

    def tasks(self, *, status: str = "open", limit: int = 100) -> list[dict[str, Any]]:
        """Coordinator tasks of the built-in queue: open ones most urgent first."""
        from engine.delivery import task_queue as tasks

        try:
            return tasks.list_tasks(self.db, self.clock, status=status, limit=limit)
        except StoreError as exc:
            raise ApiError(400, str(exc)) from None

    def task_action(
        self, principal: Principal, task_id: int, action: str, value: str
    ) -> dict[str, Any]:
        """``done`` (value: the note), ``assign`` (value: the user; "" unassigns) or
        ``snooze`` (value: until when, ISO-8601; "" wakes the task), with ``actor =
        user:<name>``: audited, and a done task on the referral's timeline."""
        from engine.delivery import task_queue as tasks

        try:
            if action == "done":
                return tasks.complete(self.db, self.clock, task_id, note=value, by=principal.actor)
            if action == "snooze":
                until = self._until(value)
                return tasks.snooze(self.db, self.clock, task_id, until, by=principal.actor)
            return tasks.assign(self.db, self.clock, task_id, value, by=principal.actor)
        except KeyError:
            raise ApiError(404, f"no task {task_id}") from None
        except StoreError as exc:
            raise ApiError(409, str(exc)) from None

    def _until(self, value: str) -> float | None:
        """A snooze's end: None for "" (wake now); it must lie in the future."""
        if not value:
            return None
        try:
            until = parse_iso(value)
        except (ValueError, OverflowError, OSError):
            raise ApiError(400, "until must be an ISO date or date-time") from None
        if until <= self.clock.now():
            raise ApiError(400, "until must be in the future")
        return until

    def referral_tasks(self, referral_id: int) -> list[dict[str, Any]]:
        from engine.delivery import task_queue as tasks

        return tasks.referral_tasks(self.db, self.clock, referral_id)

    def retry(self, principal: Principal, outbox_id: int) -> dict[str, Any]:
        from engine.delivery.dispatch import retry_item

        item = outbox_store.get(self.db.conn, outbox_id)
        if item is None:
            raise ApiError(404, f"no outbox row {outbox_id}")
        try:
            retry_item(self.db, outbox_id, self.clock, principal.actor)
        except StoreError as exc:
            raise ApiError(409, str(exc)) from None
        if self.wake is not None:
            self.wake(item.channel)
        updated = outbox_store.get(self.db.conn, outbox_id)
        assert updated is not None
        return _outbox_dict(updated)

    # -- messages --

    def messages(self, **filters: Any) -> list[dict[str, Any]]:
        return [m.as_dict() for m in worklist.search_messages(self.db.conn, **filters)]

    def message_page(
        self,
        *,
        before: int | None = None,
        after: int | None = None,
        limit: int = 100,
        **filters: Any,
    ) -> dict[str, Any]:
        """A page of inbox metadata, newest first: ``items``, ``total`` matching,
        ``first`` / ``last`` (1-based), ``newer`` (the ``after`` of the page before) and
        ``older`` (the ``before`` of the next), each None at an end."""
        from engine.store.message_filter import MessageFilter

        page = worklist.message_page(
            self.db.conn, MessageFilter(**filters), limit=limit, before=before, after=after
        )
        return _page_dict(page, [m.as_dict() for m in page.rows])

    def outbox_page(
        self, *, status: str = "", before: int | None = None, after: int | None = None,
        limit: int = 100,
    ) -> dict[str, Any]:  # fmt: skip
        """A page of outbox rows of ``status`` ("" any), newest first (as message_page)."""
        page = worklist.outbox_page(
            self.db.conn, status=status, limit=limit, before=before, after=after
        )
        return _page_dict(page, [_outbox_dict(i) for i in page.rows])

    def message(self, message_id: int) -> dict[str, Any]:
        m = worklist.get_message(self.db.conn, message_id)
        if m is None:
            raise ApiError(404, f"no message {message_id}")
        return m.as_dict()

    def raw(self, principal: Principal, message_id: int, *, via: str) -> str:
        """The message as text (decoded with its stored charset); audited."""
        found = worklist.raw_message(self.db.conn, message_id)
        if found is None:
            raise ApiError(404, f"no message {message_id}")
        raw, charset = found
        try:
            text = raw.decode(charset, errors="replace")
        except LookupError:
            text = raw.decode("latin-1")
        self._audit_view(principal, "viewed-message", message_id=message_id, via=via)
        return text

    # -- the analyst's tools: what one message did, its tree, reprocess --

    def message_detail(self, message_id: int) -> dict[str, Any]:
        """One message's metadata with what became of it, codes only (no message content):
        the ACK it was answered with (rebuilt), the route decision, the referral events
        and parked events it produced and the outbox rows its routes queued."""
        from engine.store.decisions import Decisions

        meta = self.message(message_id)
        conn = self.db.conn
        decisions = Decisions(self.db)
        decision = decisions.get(message_id) if decisions.available() else None
        found = worklist.raw_message(conn, message_id)
        meta["ack"] = _ack_text(found[0] if found else b"", meta)
        meta["decision"] = None if decision is None else {
            "status": decision.status,
            "route": decision.route,
            "reason": decision.reason,
            "actions": [_action_summary(a) for a in decision.actions],
            "decided_at": isoformat(decision.decided_at),
            "replayed_at": isoformat(decision.replayed_at) if decision.replayed_at else None,
            "replayed_by": decision.replayed_by,
        }  # fmt: skip
        meta["events"] = [
            {"id": eid, "referral_id": rid, "kind": kind, "status": status, "changed": changed}
            for eid, rid, kind, status, changed in referral_store.message_events(conn, message_id)
        ]
        meta["parked"] = [
            {"id": p.id, "kind": p.kind, "why": p.why, "status": p.status,
             "referral_id": p.referral_id}
            for p in referral_store.message_parked(conn, message_id)
        ]  # fmt: skip
        meta["outbox"] = [_outbox_dict(i) for i in outbox_store.for_message(conn, message_id)]
        return meta

    def message_tree(self, principal: Principal, message_id: int, *, via: str) -> dict[str, Any]:
        """The message text and its parsed tree (engine.hl7v2.tree); audited as a view of
        the raw message (one ``viewed-message`` row)."""
        from engine.hl7v2.tree import MAX_SEGMENTS, TreeError, build_tree, segment_count

        text = self.raw(principal, message_id, via=via)
        try:
            segments, error = [s.as_dict() for s in build_tree(text)], ""
        except TreeError as exc:
            segments, error = [], str(exc)
        if len(segments) == MAX_SEGMENTS and segment_count(text) > MAX_SEGMENTS:
            error = f"the tree shows the first {MAX_SEGMENTS} segments; the text has them all"
        return {"id": message_id, "text": text, "segments": segments, "error": error}

    def reprocess(
        self, principal: Principal, message_id: int, *, resend: bool = False, dry_run: bool = False
    ) -> dict[str, Any]:
        """Replay one message through the daemon's current routes
        (engine.routing.replay.replay_one: the path of ``refloop replay --id``), with
        ``actor = user:<name>`` in the audit log. A decision that did not change applies
        nothing unless ``resend`` (queue the message's send / forward rows again)."""
        from engine.routing.replay import replay_one

        handler = self.routes() if self.routes is not None else None
        if handler is None or not hasattr(handler, "table"):
            raise ApiError(503, "no routes: routes.yaml has none")
        self.message(message_id)  # 404 first
        try:
            item = replay_one(
                handler, message_id, user=principal.name, actor=principal.actor,
                resend=resend, dry_run=dry_run,
            )  # fmt: skip
        except StoreError as exc:
            raise ApiError(409, str(exc)) from None
        if item is None:
            raise ApiError(404, f"no message {message_id}")
        if item.skipped:
            raise ApiError(409, f"message {message_id} is not replayed: {item.skipped}")
        queued = handler.take_enqueued() if hasattr(handler, "take_enqueued") else 0
        if self.tracker is not None:
            queued += self.tracker.take_enqueued()
        if queued and self.wake is not None:
            self.wake()
        return item.as_dict()

    def message_retry(
        self, principal: Principal, message_id: int, outbox_id: int
    ) -> dict[str, Any]:
        """*Retry* one of the outbox rows a message's routes queued (the path of ``refloop
        outbox retry``); 404 when the row is not that message's."""
        if outbox_id not in {i.id for i in outbox_store.for_message(self.db.conn, message_id)}:
            raise ApiError(404, f"outbox row {outbox_id} is not message {message_id}'s")
        return self.retry(principal, outbox_id)

    # -- audit, report --

    def audit(
        self, *, since: str | None = None, after_id: int = 0, limit: int = 500
    ) -> list[dict[str, Any]]:
        rows = audit_store.rows(self.db.conn, since=since, after_id=after_id)
        return [r.as_dict() for r in islice(rows, limit)]

    def open_aging(self) -> list[tuple[str, int]]:
        """Every open referral by whole days open, whatever its opening date."""
        return list(open_aging_now(self.db.conn, self.clock.now()))

    def report(self, start: dt.date, end: dt.date, by: str | None) -> dict[str, Any]:
        """The closure report (engine.tracking.report) as :data:`REPORT`'s dict; 400 when the
        period ends before it starts."""
        try:
            r = closure_report(self.db.conn, start, end, by=by, now=self.clock.now())
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        return _finite(report_to_dict(r))

    # -- the analyst's workbench: sources, try a message --

    def _workbench(self) -> Workbench:
        if self.workbench is None:
            raise ApiError(503, "not available in this process")
        return self.workbench

    def sources(self) -> list[dict[str, Any]]:
        """Per source: connections, last message, today's messages by status, last error."""
        return self._workbench().sources(self.db.conn, self.clock.now())

    def try_messages(self, data: bytes, source: str = "") -> dict[str, Any]:
        """What the running routes would do with ``data``'s messages; nothing is stored,
        sent or logged. 400 when it holds no message or names an unknown source."""
        bench = self._workbench()
        if source and source not in bench.source_names():
            raise ApiError(400, "unknown source")
        try:
            return bench.try_messages(data, source)
        except MessageRejected as exc:
            raise ApiError(400, exc.reason) from None


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, dt.date | dt.datetime):
        return value.isoformat()
    return value


def _action_summary(action: Mapping[str, Any]) -> dict[str, str]:
    """A decision's action as the message view shows it: route, action, channel or
    event kind (the recorded key fields may hold identifiers: left out)."""
    return {
        "route": str(action.get("route", "")),
        "action": str(action.get("action", "")),
        "what": str(action.get("kind") or action.get("channel") or action.get("template") or ""),
    }


def _ack_text(raw: bytes, meta: Mapping[str, Any]) -> str:
    """The ACK the message was answered with, rebuilt (engine.hl7v2.ack.build_ack) from
    its MSH, the recorded code and error text, at its receive time. Not kept from the one
    sent: its MSH-7 time and MSH-10 control id (this one's differ) and the ERR segment's
    error code (left out). "" for a FHIR resource (JSON or XML) or without a code."""
    from engine.errors import MessageRejected
    from engine.hl7v2.ack import build_ack
    from engine.hl7v2.message import read_msh, reply_header
    from engine.model import MshInfo

    code = str(meta.get("ack_code") or "")
    if not raw or not code or raw.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] in (b"{", b"<"):
        return ""
    msh: MshInfo | None
    try:
        msh, codec = read_msh(raw)
    except MessageRejected:  # it was answered from whatever header could be read
        msh, codec = reply_header(raw), "latin-1"
    error = ("207", "", str(meta.get("error") or "")) if code not in ("AA", "CA") else None
    ack = build_ack(msh, code, now=parse_iso(str(meta["received_at"])), error=error, codec=codec)
    lines = ack.decode(codec, errors="replace").split("\r")
    return "\n".join(line for line in lines if line and not line.startswith("ERR"))


def _page_dict(page: Any, items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "items": items,
        "total": page.total,
        "first": page.start,
        "last": page.end,
        "newer": page.newer,
        "older": page.older,
    }


def _outbox_dict(item: outbox_store.Item) -> dict[str, Any]:
    d = item.as_dict()
    for key in ("due", "created_at", "updated_at", "sent_at", "dead_at"):
        d[key] = isoformat(d[key]) if d[key] is not None else None
    return d


def _patient(p: referral_search.Patient | None) -> dict[str, Any]:
    return {
        "patient_name": p.name if p else "",
        "patient_birth_date": p.birth_date if p else "",
        "patient_mrn": p.mrn if p else "",
    }


def whole_days(seconds: float) -> int:
    """Whole days in ``seconds`` (rounded down; never negative)."""
    return max(0, math.floor(seconds / DAY))


def _extras(row: referral_store.ReferralRow, now: float) -> dict[str, Any]:
    end = row.closed_at if row.closed_at is not None else now
    days_open = max(0.0, (end - row.opened_at) / DAY)
    priority = str(row.details.get("priority") or "routine")
    needed_by = str(row.details.get("needed_by") or "")
    overdue = False
    if row.status != "closed":
        overdue = days_open > TARGET_DAYS.get(priority, TARGET_DAYS["routine"])
        today = dt.datetime.fromtimestamp(now, dt.UTC).date().isoformat()
        if needed_by and needed_by[:10] < today:
            overdue = True
    return {
        # whole days: open so far, or (closed) from opening to closing
        "days_open": whole_days(end - row.opened_at),
        "overdue": overdue,
        "needed_by": needed_by,
        "specialist": str(
            row.details.get("specialist_name") or row.details.get("specialist_organisation") or ""
        ),
        "referring": str(row.details.get("referring_name") or ""),
    }


def referral_item(
    row: referral_store.ReferralRow, now: float, patient: referral_search.Patient | None = None
) -> dict[str, Any]:
    """A worklist row: the referral summary plus age, overdue, provider names and the
    patient's name, birth date and MRN (for signed-in users only)."""
    return {
        "id": row.id,
        "sending_facility": row.sending_facility,
        "placer_number": row.placer_number,
        "status": row.status,
        "patient_status": row.patient_status,
        "specialist_status": row.specialist_status,
        "specialty": str(row.details.get("specialty") or ""),
        "priority": str(row.details.get("priority") or ""),
        "opened_at": isoformat(row.opened_at),
        "closed_at": isoformat(row.closed_at) if row.closed_at is not None else None,
        "close_reason": row.close_reason,
        **_extras(row, now),
        **_patient(patient),
    }


# ---------------------------------------------------------------------------
# The route table
