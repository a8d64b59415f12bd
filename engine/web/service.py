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
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import islice
from typing import Any, Final, Protocol

from engine.clock import Clock, isoformat, parse_iso
from engine.errors import StoreError
from engine.model import AppointmentBooked, Identifiers, SpecialistDeclined
from engine.store import audit as audit_store
from engine.store import outbox as outbox_store
from engine.store import referrals as referral_store
from engine.store import worklist
from engine.store.db import Database
from engine.tracking import states
from engine.tracking.report import closure_report, report_to_dict
from engine.web.auth import Principal

log = logging.getLogger(__name__)

DAY: Final = 86400.0
MAX_ID: Final = 2**53 - 1
# How long a referral may stay open before the worklist calls it overdue, by priority
# (unless its needed-by date comes first). Days.
TARGET_DAYS: Final[dict[str, float]] = {"stat": 2.0, "urgent": 7.0, "routine": 30.0}
PRIORITY_RANK: Final[dict[str, int]] = {"stat": 0, "urgent": 1, "routine": 2}
REPORT_GROUPS: Final = ("specialty", "specialist", "referrer", "month")


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

    # -- referrals --

    def worklist(
        self,
        *,
        status: str | None = None,
        open_only: bool = False,
        specialty: str | None = None,
        specialist: str | None = None,
        referring: str | None = None,
        days_open_min: float | None = None,
        overdue: bool | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Referral summaries, prioritised: overdue first, then by priority (stat,
        urgent, routine), then oldest first."""
        now = self.clock.now()
        rows = worklist.search_referrals(
            self.db.conn,
            status=status,
            open_only=open_only,
            specialty=specialty,
            specialist=specialist,
            referring=referring,
            opened_before=now - days_open_min * DAY if days_open_min is not None else None,
            limit=5000,
        )
        items = [referral_item(r, now) for r in rows]
        if overdue is not None:
            items = [i for i in items if i["overdue"] == overdue]
        items.sort(
            key=lambda i: (
                not i["overdue"],
                i["status"] == "closed",
                PRIORITY_RANK.get(i["priority"], 3),
                i["opened_at"],
                i["id"],
            )
        )
        return items[:limit]

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
        """``done`` (value: the note) or ``assign`` (value: the user; "" unassigns),
        with ``actor = user:<name>``: audited, and a done task on the referral's timeline."""
        from engine.delivery import task_queue as tasks

        try:
            if action == "done":
                return tasks.complete(self.db, self.clock, task_id, note=value, by=principal.actor)
            return tasks.assign(self.db, self.clock, task_id, value, by=principal.actor)
        except KeyError:
            raise ApiError(404, f"no task {task_id}") from None
        except StoreError as exc:
            raise ApiError(409, str(exc)) from None

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
        if isinstance(found, float):
            raise ApiError(
                410,
                f"the bytes of message {message_id} were pruned {isoformat(found)} "
                "under the retention policy; its metadata is kept",
            )
        raw, charset = found
        try:
            text = raw.decode(charset, errors="replace")
        except LookupError:
            text = raw.decode("latin-1")
        self._audit_view(principal, "viewed-message", message_id=message_id, via=via)
        return text

    # -- audit, report --

    def audit(
        self, *, since: str | None = None, after_id: int = 0, limit: int = 500
    ) -> list[dict[str, Any]]:
        rows = audit_store.rows(self.db.conn, since=since, after_id=after_id)
        return [r.as_dict() for r in islice(rows, limit)]

    def report(self, start: dt.date, end: dt.date, by: str | None) -> dict[str, Any]:
        """The closure report (engine.tracking.report) as :data:`REPORT`'s dict; 400 when the
        period ends before it starts."""
        try:
            r = closure_report(self.db.conn, start, end, by=by, now=self.clock.now())
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        return _finite(report_to_dict(r))


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


def _outbox_dict(item: outbox_store.Item) -> dict[str, Any]:
    d = item.as_dict()
    for key in ("due", "created_at", "updated_at", "sent_at", "dead_at"):
        d[key] = isoformat(d[key]) if d[key] is not None else None
    return d


def _extras(row: referral_store.ReferralRow, now: float) -> dict[str, Any]:
    days_open = max(0.0, ((row.closed_at or now) - row.opened_at) / DAY)
    priority = str(row.details.get("priority") or "routine")
    needed_by = str(row.details.get("needed_by") or "")
    overdue = False
    if row.status != "closed":
        overdue = days_open > TARGET_DAYS.get(priority, TARGET_DAYS["routine"])
        today = dt.datetime.fromtimestamp(now, dt.UTC).date().isoformat()
        if needed_by and needed_by[:10] < today:
            overdue = True
    return {
        "days_open": round(days_open, 1),
        "overdue": overdue,
        "needed_by": needed_by,
        "specialist": str(
            row.details.get("specialist_name") or row.details.get("specialist_organisation") or ""
        ),
        "referring": str(row.details.get("referring_name") or ""),
    }


def referral_item(row: referral_store.ReferralRow, now: float) -> dict[str, Any]:
    """A worklist row: the referral summary plus age, overdue and provider names (no
    patient identifiers)."""
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
    }


# ---------------------------------------------------------------------------
# The route table
