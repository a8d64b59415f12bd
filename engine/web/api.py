"""The JSON API under ``/api/`` and the operations the dashboard shares with it.

:class:`Service` is the one path for reads and coordinator actions, whoever asks (the
API or a dashboard form): each action goes through the tracker or the outbox functions
with ``actor = user:<name>``, so it lands in the referral's timeline and the audit log
like a machine event. Every view of a referral's PHI (its detail) or of a raw message
appends an audit row naming the user.

:data:`ROUTES` is the one table of the API: the aiohttp routes, the parameter parsing,
the permission checks and the OpenAPI 3.0 document at ``/api/openapi.json`` are all built
from it, so the description cannot drift from the implementation.

Authentication happens before any of this (engine.web.server's middleware puts an
:class:`engine.web.auth.Principal` in ``request["principal"]``); here only the role is
checked (403).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Final, Literal, Protocol

from aiohttp import web

from engine.clock import Clock, isoformat, parse_iso
from engine.errors import StoreError
from engine.model import AppointmentBooked, Identifiers, SpecialistDeclined
from engine.store import audit as audit_store
from engine.store import outbox as outbox_store
from engine.store import referrals as referral_store
from engine.store import worklist
from engine.store.db import Database
from engine.tracking import states
from engine.tracking.report import AGING_LABELS, NUDGE_CHANNELS, closure_report, report_to_dict
from engine.web.auth import Permission, Principal
from engine.web.server import PRINCIPAL

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


ParamKind = Literal["string", "integer", "boolean", "date", "date-time"]


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    kind: ParamKind = "string"
    where: Literal["query", "path"] = "query"
    description: str = ""
    enum: tuple[str, ...] = ()
    minimum: int | None = None
    maximum: int | None = None
    default: Any = None
    max_length: int = 200

    def schema(self) -> dict[str, Any]:
        s: dict[str, Any]
        if self.kind in ("date", "date-time"):
            s = {"type": "string", "format": self.kind}
        elif self.kind == "string":
            s = {"type": "string", "maxLength": self.max_length}
        else:
            s = {"type": self.kind}
        if self.enum:
            s = {"type": "string", "enum": list(self.enum)}
        if self.minimum is not None:
            s["minimum"] = self.minimum
        if self.maximum is not None:
            s["maximum"] = self.maximum
        if self.default is not None:
            s["default"] = self.default
        return s

    def parse(self, raw: str | None) -> Any:
        if raw is None or (raw == "" and self.where == "query"):
            return self.default
        if len(raw) > max(self.max_length, 40):
            raise ApiError(400, f"{self.name}: too long")
        if self.enum:
            if raw not in self.enum:
                raise ApiError(400, f"{self.name}: must be one of {', '.join(self.enum)}")
            return raw
        if self.kind == "integer":
            try:
                value = int(raw)
            except ValueError:
                raise ApiError(400, f"{self.name}: not a whole number") from None
            lo = self.minimum if self.minimum is not None else -MAX_ID
            hi = self.maximum if self.maximum is not None else MAX_ID
            if not lo <= value <= hi:
                raise ApiError(400, f"{self.name}: must be between {lo} and {hi}")
            return value
        if self.kind == "boolean":
            if raw.lower() in ("true", "1", "yes"):
                return True
            if raw.lower() in ("false", "0", "no"):
                return False
            raise ApiError(400, f"{self.name}: must be true or false")
        if self.kind == "date":
            try:
                return dt.date.fromisoformat(raw)
            except ValueError:
                raise ApiError(400, f"{self.name}: not an ISO date (YYYY-MM-DD)") from None
        if self.kind == "date-time":
            try:
                return parse_iso(raw)
            except (ValueError, OverflowError, OSError):
                raise ApiError(400, f"{self.name}: not an ISO date-time") from None
        return raw


def _id(name: str) -> Param:
    return Param(name, "integer", "path", minimum=1, maximum=MAX_ID)


LIMIT: Final = Param("limit", "integer", minimum=1, maximum=500, default=100)


@dataclass(frozen=True, slots=True)
class Call:
    """What a handler gets: the caller, parsed parameters and the JSON body."""

    request: web.Request
    principal: Principal
    args: dict[str, Any]
    body: dict[str, Any]


Handler = Callable[["Api", Call], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Route:
    method: Literal["GET", "POST"]
    path: str
    operation_id: str
    summary: str
    permission: Permission | None
    handler: Handler
    response: dict[str, Any]
    params: tuple[Param, ...] = ()
    body: dict[str, Any] | None = None  # JSON Schema of the request body (an object)
    content_type: str = "application/json"
    statuses: tuple[int, ...] = ()  # besides 200, 400, 401, 403

    def parameters(self) -> tuple[Param, ...]:
        return self.params


# -- JSON Schema pieces ------------------------------------------------------------

STR: Final = {"type": "string"}
INT: Final = {"type": "integer"}
NUM: Final = {"type": "number"}
BOOL: Final = {"type": "boolean"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "nullable": True}


def _obj(props: dict[str, Any], *, extra: bool = True) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": props,
        "required": list(props),
        "additionalProperties": extra,
    }


def _list_of(item: dict[str, Any]) -> dict[str, Any]:
    return _obj({"items": {"type": "array", "items": item}})


ERROR: Final = _obj({"error": STR})
REFERRAL_ITEM: Final = _obj(
    {
        "id": INT,
        "sending_facility": STR,
        "placer_number": STR,
        "status": {"type": "string", "enum": list(states.OVERALL_STATUSES)},
        "patient_status": STR,
        "specialist_status": STR,
        "specialty": STR,
        "priority": STR,
        "opened_at": STR,
        "closed_at": _nullable(STR),
        "close_reason": STR,
        "days_open": NUM,
        "overdue": BOOL,
        "needed_by": STR,
        "specialist": STR,
        "referring": STR,
    }
)
TIMELINE_ENTRY: Final = _obj(
    {
        "id": INT,
        "kind": STR,
        "occurred_at": STR,
        "recorded_at": STR,
        "source": STR,
        "actor": STR,
        "message_id": _nullable(INT),
        "changed": BOOL,
        "status": STR,
        "effects": {"type": "array", "items": STR},
        "detail": {"type": "object"},
    }
)
MESSAGE: Final = _obj(
    {
        "id": INT,
        "received_at": NUM,
        "source": STR,
        "sending_app": STR,
        "sending_facility": STR,
        "control_id": STR,
        "message_type": STR,
        "version": STR,
        "status": STR,
        "ack_code": STR,
        "error": STR,
        "duplicates": INT,
        "flags": STR,
        "route": STR,
        "size": INT,
    }
)
REFERRAL_DETAIL: Final = {
    **REFERRAL_ITEM,
    "properties": {
        **REFERRAL_ITEM["properties"],
        "filler_numbers": {"type": "array", "items": STR},
        "patient_ids": {"type": "array", "items": STR},
        "details": {"type": "object"},
        "decline_reason": STR,
        "close_note": STR,
        "appointments": {"type": "array", "items": {"type": "object"}},
        "report_ids": {"type": "array", "items": STR},
        "prior_auth": _nullable({"type": "object"}),
        "timers": {"type": "array", "items": {"type": "object"}},
        "outbox": {"type": "array", "items": {"type": "object"}},
        "timeline": {"type": "array", "items": TIMELINE_ENTRY},
        "messages": {"type": "array", "items": MESSAGE},
    },
    "required": [
        *REFERRAL_ITEM["required"],
        "patient_ids",
        "details",
        "timeline",
        "outbox",
        "messages",
    ],
}
ACTION_RESULT: Final = _obj(
    {
        "referral_id": _nullable(INT),
        "outcome": STR,
        "status": STR,
        "effects": {"type": "array", "items": STR},
    }
)
OUTBOX_ITEM: Final = _obj(
    {
        "id": INT,
        "referral_id": _nullable(INT),
        "channel": STR,
        "template": STR,
        "status": STR,
        "attempts": INT,
        "due": STR,
        "created_at": STR,
        "updated_at": STR,
        "last_error": STR,
        "provider_id": STR,
        "provider_status": STR,
        "sent_at": _nullable(STR),
        "dead_at": _nullable(STR),
    }
)
TASK_ITEM: Final = _obj(
    {
        "id": INT,
        "referral_id": _nullable(INT),
        "outbox_id": INT,
        "kind": STR,
        "template": STR,
        "reason": STR,
        "priority": NUM,
        "attempts": {"type": "array", "items": _obj({"at": STR, "what": STR})},
        "status": {"type": "string", "enum": ["open", "done", "superseded"]},
        "assignee": STR,
        "due_at": _nullable(STR),
        "snoozed_until": _nullable(STR),
        "snoozed": BOOL,
        "note": STR,
        "created_at": STR,
        "done_at": _nullable(STR),
        "done_by": STR,
        "superseded_by": _nullable(INT),
    }
)
PARKED_ITEM: Final = _obj(
    {
        "id": INT,
        "message_id": _nullable(INT),
        "kind": STR,
        "why": STR,
        "sending_facility": STR,
        "placer_number": STR,
        "filler_numbers": {"type": "array", "items": STR},
        "parked_at": STR,
        "status": STR,
        "referral_id": _nullable(INT),
        "linked_by": STR,
    }
)
AUDIT_ROW: Final = _obj(
    {
        "id": INT,
        "at": STR,
        "actor": STR,
        "action": STR,
        "referral_id": _nullable(INT),
        "message_id": _nullable(INT),
        "detail": {"type": "object"},
        "prev_hash": STR,
        "hash": STR,
    }
)
ME: Final = _obj({"name": STR, "role": STR, "via": STR})
RATE: Final = {"type": "number", "minimum": 0, "maximum": 1, "nullable": True}
DAYS: Final = {"type": "number", "minimum": 0, "nullable": True}
COUNT: Final = {"type": "integer", "minimum": 0}
_COUNTS: Final = {"denominator": COUNT, "numerator": COUNT, "rate": RATE}
REPORT_ROW: Final = _obj({"key": STR, **_COUNTS, "median_days": DAYS, "p90_days": DAYS})
REPORT: Final = _obj(
    {
        "start": {"type": "string", "format": "date"},
        "end": {"type": "string", "format": "date"},
        "by": {"type": "string", "enum": [*REPORT_GROUPS, None], "nullable": True},
        "referrals_opened_from": {"type": "string", "format": "date"},
        "referrals_opened_to": {"type": "string", "format": "date"},
        "reports_received_by": {"type": "string", "format": "date"},
        "as_of": {"type": "string", "format": "date-time"},
        **_COUNTS,
        "median_days": DAYS,
        "p90_days": DAYS,
        "groups": {"type": "array", "items": REPORT_ROW},
        "nudge_channels": {
            "type": "array",
            "items": _obj(
                {"key": {"type": "string", "enum": list(NUDGE_CHANNELS)}, **_COUNTS}, extra=False
            ),
        },
        "open_aging": _obj({label: COUNT for label in AGING_LABELS}, extra=False),
    },
    extra=False,
)


def _body(props: dict[str, Any], required: tuple[str, ...]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": props,
        "required": list(required),
        "additionalProperties": False,
    }


CLOSE_BODY: Final = _body(
    {
        "reason": {"type": "string", "enum": list(states.CLOSE_PRECEDENCE)},
        "note": {"type": "string", "maxLength": 2000},
    },
    ("reason",),
)
BOOK_BODY: Final = _body(
    {
        "start": {"type": "string", "format": "date-time", "maxLength": 40},
        "appointment_id": {"type": "string", "maxLength": 100},
    },
    (),
)
TASK_DONE_BODY: Final = _body({"note": {"type": "string", "maxLength": 2000}}, ("note",))
TASK_ASSIGN_BODY: Final = _body({"user": {"type": "string", "maxLength": 100}}, ("user",))
DECLINE_BODY: Final = _body({"reason": {"type": "string", "maxLength": 2000}}, ())
LINK_BODY: Final = _body(
    {"referral_id": {"type": "integer", "minimum": 1, "maximum": MAX_ID}}, ("referral_id",)
)


def check_body(schema: Mapping[str, Any], body: Any) -> dict[str, Any]:
    """Validate a request body against the small JSON Schema subset used above."""
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    props: Mapping[str, Any] = schema["properties"]
    for name in schema.get("required", ()):
        if name not in body:
            raise ApiError(400, f"{name}: is required")
    for name, value in body.items():
        spec = props.get(name)
        if spec is None:
            raise ApiError(400, f"{name}: unknown field")
        if spec["type"] == "string":
            if not isinstance(value, str):
                raise ApiError(400, f"{name}: must be a string")
            if "enum" in spec and value not in spec["enum"]:
                raise ApiError(400, f"{name}: must be one of {', '.join(spec['enum'])}")
            if len(value) > spec.get("maxLength", 10_000):
                raise ApiError(400, f"{name}: too long")
        elif spec["type"] == "integer":
            if isinstance(value, bool) or not isinstance(value, int):
                raise ApiError(400, f"{name}: must be a whole number")
            if not spec.get("minimum", -MAX_ID) <= value <= spec.get("maximum", MAX_ID):
                raise ApiError(400, f"{name}: out of range")
    return body


# -- handlers ------------------------------------------------------------------------


async def _openapi(api: Api, call: Call) -> Any:
    return api.openapi()


async def _me(api: Api, call: Call) -> Any:
    p = call.principal
    return {"name": p.name, "role": p.role, "via": p.via}


async def _referrals(api: Api, call: Call) -> Any:
    a = call.args
    return {
        "items": api.service.worklist(
            status=a["status"],
            open_only=bool(a["open"]),
            specialty=a["specialty"],
            specialist=a["specialist"],
            referring=a["referring"],
            days_open_min=a["days_open_min"],
            overdue=a["overdue"],
            limit=a["limit"],
        )
    }


async def _referral(api: Api, call: Call) -> Any:
    return api.service.referral(call.principal, call.args["referral_id"], via="api")


async def _close(api: Api, call: Call) -> Any:
    b = call.body
    return api.service.close(
        call.principal, call.args["referral_id"], b["reason"], b.get("note", "")
    )


async def _book(api: Api, call: Call) -> Any:
    b = call.body
    return api.service.book(
        call.principal, call.args["referral_id"], b.get("start", ""), b.get("appointment_id", "")
    )


async def _decline(api: Api, call: Call) -> Any:
    return api.service.decline(
        call.principal, call.args["referral_id"], call.body.get("reason", "")
    )


async def _tasks(api: Api, call: Call) -> Any:
    status = call.args["status"] or "open"
    return {"items": api.service.tasks(status=status, limit=call.args["limit"])}


async def _task_done(api: Api, call: Call) -> Any:
    return api.service.task_action(call.principal, call.args["task_id"], "done", call.body["note"])


async def _task_assign(api: Api, call: Call) -> Any:
    return api.service.task_action(
        call.principal, call.args["task_id"], "assign", call.body["user"]
    )


async def _parked(api: Api, call: Call) -> Any:
    return {"items": api.service.parked(include_linked=bool(call.args["all"]))}


async def _link(api: Api, call: Call) -> Any:
    return api.service.link(call.principal, call.args["parked_id"], call.body["referral_id"])


async def _outbox(api: Api, call: Call) -> Any:
    a = call.args
    return {
        "items": api.service.outbox(
            status=a["status"] or "", channel=a["channel"] or "", limit=a["limit"]
        )
    }


async def _dead(api: Api, call: Call) -> Any:
    return {"items": api.service.outbox(status="dead", limit=call.args["limit"])}


async def _retry(api: Api, call: Call) -> Any:
    return api.service.retry(call.principal, call.args["outbox_id"])


async def _messages(api: Api, call: Call) -> Any:
    a = call.args
    return {
        "items": api.service.messages(
            message_type=a["type"],
            control_id=a["control_id"],
            status=a["status"],
            source=a["source"],
            since=a["since"],
            until=a["until"],
            before_id=a["before_id"],
            limit=a["limit"],
        )
    }


async def _message(api: Api, call: Call) -> Any:
    return api.service.message(call.args["message_id"])


async def _raw(api: Api, call: Call) -> Any:
    return api.service.raw(call.principal, call.args["message_id"], via="api")


async def _audit(api: Api, call: Call) -> Any:
    a = call.args
    since = isoformat(a["since"]) if a["since"] is not None else None
    return {"items": api.service.audit(since=since, after_id=a["after_id"], limit=a["limit"])}


async def _report(api: Api, call: Call) -> Any:
    a = call.args
    if a["start"] > a["end"]:
        raise ApiError(400, "start is after end")
    return api.service.report(a["start"], a["end"], a["by"])


_TEXT: Final = {"type": "string"}

ROUTES: Final[tuple[Route, ...]] = (
    Route("GET", "/api/openapi.json", "openapi", "This OpenAPI document", None, _openapi,
          {"type": "object"}),
    Route("GET", "/api/me", "me", "Who the caller is", None, _me, ME),
    Route(
        "GET", "/api/referrals", "listReferrals",
        "Referrals, prioritised: overdue first, then stat, urgent, routine, oldest first",
        "referrals", _referrals, _list_of(REFERRAL_ITEM),
        params=(
            Param("status", enum=states.OVERALL_STATUSES),
            Param("open", "boolean", description="Only referrals that are not closed."),
            Param("specialty", description="Exact specialty (case-insensitive)."),
            Param("specialist", description="Specialist name, NPI or organisation."),
            Param("referring", description="Referring provider name, NPI or organisation."),
            Param("days_open_min", "integer", minimum=0, maximum=36500,
                  description="Opened at least this many days ago."),
            Param("overdue", "boolean", description="Only overdue (true) or not (false)."),
            LIMIT,
        ),
    ),
    Route(
        "GET", "/api/referrals/{referral_id}", "getReferral",
        "One referral with its full timeline (audited as a PHI view)",
        "referrals", _referral, REFERRAL_DETAIL, params=(_id("referral_id"),), statuses=(404,),
    ),
    Route(
        "POST", "/api/referrals/{referral_id}/close", "closeReferral",
        "Close a referral with a reason (Tracker.close)", "act", _close, ACTION_RESULT,
        params=(_id("referral_id"),), body=CLOSE_BODY, statuses=(404, 409, 503),
    ),
    Route(
        "POST", "/api/referrals/{referral_id}/book", "bookReferral",
        "Mark booked: the patient called in with an appointment", "act", _book, ACTION_RESULT,
        params=(_id("referral_id"),), body=BOOK_BODY, statuses=(404, 409, 503),
    ),
    Route(
        "POST", "/api/referrals/{referral_id}/decline", "declineReferral",
        "Record that the specialist declined", "act", _decline, ACTION_RESULT,
        params=(_id("referral_id"),), body=DECLINE_BODY, statuses=(404, 409, 503),
    ),
    Route(
        "GET", "/api/tasks", "listTasks",
        "Coordinator tasks of the built-in queue; open ones most urgent first",
        "referrals", _tasks, _list_of(TASK_ITEM),
        params=(
            Param("status", enum=("open", "done", "superseded", "all"),
                  description="Default open; all: every task, newest first."),
            LIMIT,
        ),
    ),
    Route(
        "POST", "/api/tasks/{task_id}/done", "completeTask",
        "Complete an open task with a note (timeline and audit)", "act", _task_done,
        TASK_ITEM, params=(_id("task_id"),), body=TASK_DONE_BODY, statuses=(404, 409),
    ),
    Route(
        "POST", "/api/tasks/{task_id}/assign", "assignTask",
        "Give an open task to a user (an empty user unassigns)", "act", _task_assign,
        TASK_ITEM, params=(_id("task_id"),), body=TASK_ASSIGN_BODY, statuses=(404, 409),
    ),
    Route(
        "GET", "/api/parked", "listParked", "Parked events waiting for a link",
        "referrals", _parked, _list_of(PARKED_ITEM),
        params=(Param("all", "boolean", description="Include linked events."),),
    ),
    Route(
        "POST", "/api/parked/{parked_id}/link", "linkParked",
        "Apply a parked event to a referral (Tracker.link)", "act", _link, ACTION_RESULT,
        params=(_id("parked_id"),), body=LINK_BODY, statuses=(404, 409, 503),
    ),
    Route(
        "GET", "/api/outbox", "listOutbox", "Outbox rows, newest first (no payloads)",
        "outbox", _outbox, _list_of(OUTBOX_ITEM),
        params=(
            Param("status", enum=outbox_store.OUTBOX_STATUSES),
            Param("channel", max_length=64),
            LIMIT,
        ),
    ),
    Route(
        "GET", "/api/dead-letters", "listDeadLetters", "Dead outbox rows, newest first",
        "outbox", _dead, _list_of(OUTBOX_ITEM), params=(LIMIT,),
    ),
    Route(
        "POST", "/api/outbox/{outbox_id}/retry", "retryOutbox",
        "Retry a dead (or waiting) outbox row now", "act", _retry, OUTBOX_ITEM,
        params=(_id("outbox_id"),), statuses=(404, 409),
    ),
    Route(
        "GET", "/api/messages", "listMessages",
        "Inbox metadata search on indexed columns, newest first", "messages", _messages,
        _list_of(MESSAGE),
        params=(
            Param("type", max_length=64, description="TYPE^TRIGGER; * stands for any text."),
            Param("control_id", max_length=200),
            Param("status", enum=("received", "routed", "filtered", "error", "rejected")),
            Param("source", max_length=64),
            Param("since", "date-time"),
            Param("until", "date-time"),
            Param("before_id", "integer", minimum=1, maximum=MAX_ID),
            LIMIT,
        ),
    ),
    Route(
        "GET", "/api/messages/{message_id}", "getMessage", "One inbox row's metadata",
        "messages", _message, MESSAGE, params=(_id("message_id"),), statuses=(404,),
    ),
    Route(
        "GET", "/api/messages/{message_id}/raw", "getRawMessage",
        "The message exactly as received, as text (audited)", "messages", _raw, _TEXT,
        params=(_id("message_id"),), content_type="text/plain", statuses=(404,),
    ),
    Route(
        "GET", "/api/audit", "exportAudit", "Audit rows with their hashes, in id order",
        "audit", _audit, _list_of(AUDIT_ROW),
        params=(
            Param("since", "date-time"),
            Param("after_id", "integer", minimum=0, maximum=MAX_ID, default=0),
            Param("limit", "integer", minimum=1, maximum=5000, default=500),
        ),
    ),
    Route(
        "GET", "/api/report", "closureReport",
        "The closure report, MIPS 374 / CMS50 (engine.tracking.report; docs/reporting.md)",
        "report", _report, REPORT,
        params=(
            Param("start", "date", description="First day (inclusive, UTC)."),
            Param("end", "date", description="Last day (inclusive, UTC)."),
            Param("by", enum=REPORT_GROUPS,
                  description="Also break the denominator down by this."),
        ),
    ),
)  # fmt: skip
_REQUIRED_QUERY: Final = {("closureReport", "start"), ("closureReport", "end")}


# ---------------------------------------------------------------------------
# The aiohttp side


@dataclass
class Api:
    service: Service
    routes: tuple[Route, ...] = ROUTES
    _doc: dict[str, Any] | None = field(default=None, repr=False)

    def register(self, app: web.Application) -> None:
        for route in self.routes:
            app.router.add_route(route.method, route.path, self._wrap(route))

    def _wrap(self, route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            principal = request.get(PRINCIPAL)
            if not isinstance(principal, Principal):  # the middleware did not run
                return _error(401, "unauthorized")
            if route.permission is not None and not principal.may(route.permission):
                return _error(403, f"the {principal.role} role may not do this")
            try:
                args = self._args(route, request)
                body: dict[str, Any] = {}
                if route.body is not None:
                    try:
                        payload = await request.json()
                    except (ValueError, UnicodeDecodeError):
                        raise ApiError(400, "the body must be JSON") from None
                    body = check_body(route.body, payload)
                result = await route.handler(self, Call(request, principal, args, body))
            except ApiError as exc:
                return _error(exc.status, exc.reason)
            if route.content_type == "text/plain":
                return web.Response(text=str(result), content_type="text/plain", charset="utf-8")
            return web.json_response(result, dumps=_dumps)

        return handle

    def _args(self, route: Route, request: web.Request) -> dict[str, Any]:
        args: dict[str, Any] = {}
        for p in route.params:
            raw = request.match_info.get(p.name) if p.where == "path" else None
            if p.where == "query":
                values = request.query.getall(p.name, [])
                if len(values) > 1:
                    raise ApiError(400, f"{p.name}: given more than once")
                raw = values[0] if values else None
                if (route.operation_id, p.name) in _REQUIRED_QUERY and not raw:
                    raise ApiError(400, f"{p.name}: is required")
            args[p.name] = p.parse(raw)
        return args

    def openapi(self) -> dict[str, Any]:
        if self._doc is None:
            self._doc = build_openapi(self.routes)
        return self._doc


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False)


def _error(status: int, reason: str) -> web.Response:
    headers = {"WWW-Authenticate": 'Bearer realm="refloop"'} if status == 401 else None
    return web.json_response({"error": reason}, status=status, headers=headers)


_STATUS_TEXT: Final = {
    200: "OK",
    400: "Bad request: a parameter or the body is invalid",
    401: "No or unknown bearer token",
    403: "The caller's role may not do this",
    404: "Not found",
    409: "Conflict with the current state",
    503: "Unavailable in this configuration",
}


def build_openapi(routes: tuple[Route, ...] = ROUTES) -> dict[str, Any]:
    """The OpenAPI 3.0 document of ``routes``."""
    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        responses: dict[str, Any] = {
            "200": {"description": "OK", "content": {r.content_type: {"schema": r.response}}}
        }
        for status in (400, 401, 403, *r.statuses):
            responses[str(status)] = {
                "description": _STATUS_TEXT[status],
                "content": {"application/json": {"schema": ERROR}},
            }
        op: dict[str, Any] = {
            "operationId": r.operation_id,
            "summary": r.summary,
            "responses": responses,
        }
        if r.permission is not None:
            op["description"] = f"Needs the `{r.permission}` permission (engine.auth)."
        if r.params:
            op["parameters"] = [
                {
                    "name": p.name,
                    "in": p.where,
                    "required": p.where == "path" or (r.operation_id, p.name) in _REQUIRED_QUERY,
                    "schema": p.schema(),
                    **({"description": p.description} if p.description else {}),
                }
                for p in r.params
            ]
        if r.body is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": r.body}},
            }
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "refloop API",
            "version": "1",
            "description": "Closed-loop referral tracking: referrals, tasks, parked events, "
            "outbox, inbox metadata, audit and the closure report. See docs/api.md.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": paths,
    }
