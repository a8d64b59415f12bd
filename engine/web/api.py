"""The JSON API under ``/api/``: one route table, the aiohttp side built from it.

:data:`ROUTES` is the one table of the API: the aiohttp routes, the parameter parsing,
the permission checks and the OpenAPI document (:mod:`engine.web.openapi`) are all built
from it. Handlers are thin: each calls one :class:`engine.web.service.Service` method.

Authentication happens before any of this (engine.web.server's middleware puts an
:class:`engine.web.auth.Principal` in ``request["principal"]``); here only the role is
checked (403).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from aiohttp import web

from engine.clock import isoformat, parse_iso
from engine.store import outbox as outbox_store
from engine.store.referral_search import SORTS
from engine.tracking import states
from engine.web.auth import Permission, Principal
from engine.web.openapi import (
    ACTION_RESULT,
    AUDIT_ROW,
    BOOK_BODY,
    BULK_CLOSE_BODY,
    BULK_CLOSE_RESULT,
    CLOSE_BODY,
    DECLINE_BODY,
    LINK_BODY,
    ME,
    MESSAGE,
    MESSAGE_OUTCOME,
    MESSAGE_TREE,
    OUTBOX_ITEM,
    PARKED_ITEM,
    REFERRAL_DETAIL,
    REFERRAL_PAGE,
    REPLAY_ITEM,
    REPORT,
    REPROCESS_BODY,
    REQUIRED_QUERY,
    SOURCE_ITEM,
    TASK_ASSIGN_BODY,
    TASK_DONE_BODY,
    TASK_ITEM,
    TASK_SNOOZE_BODY,
    TRY_BODY,
    TRY_RESULT,
    build_openapi,
    capped_list_of,
    check_body,
    list_of,
)
from engine.web.server import PRINCIPAL
from engine.web.service import MAX_ID, REPORT_GROUPS, ApiError, Service

log = logging.getLogger(__name__)

TASK_LISTS: Final = ("due", "snoozed", "open", "done", "superseded", "all")  # task_queue.LISTS
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


# -- handlers ------------------------------------------------------------------------


async def _openapi(api: Api, call: Call) -> Any:
    return api.openapi()


async def _me(api: Api, call: Call) -> Any:
    p = call.principal
    return {"name": p.name, "role": p.role, "via": p.via}


async def _referrals(api: Api, call: Call) -> Any:
    a = call.args
    return api.service.worklist_page(
        call.principal,
        via="api",
        q=a["q"] or "",
        status=a["status"],
        open_only=bool(a["open"]),
        specialty=a["specialty"],
        specialist=a["specialist"],
        referring=a["referring"],
        days_open_min=a["days_open_min"],
        overdue=a["overdue"],
        sort=a["sort"],
        after=a["after"],
        before=a["before"],
        limit=a["limit"],
    )


async def _referral(api: Api, call: Call) -> Any:
    return api.service.referral(call.principal, call.args["referral_id"], via="api")


async def _close(api: Api, call: Call) -> Any:
    b = call.body
    return api.service.close(
        call.principal, call.args["referral_id"], b["reason"], b.get("note", "")
    )


async def _close_many(api: Api, call: Call) -> Any:
    b = call.body
    return api.service.close_many(
        call.principal, list(b["referral_ids"]), b["reason"], b.get("note", "")
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
    limit = call.args["limit"]
    return _capped(api.service.tasks(status=status, limit=limit + 1), limit)


async def _task_done(api: Api, call: Call) -> Any:
    return api.service.task_action(call.principal, call.args["task_id"], "done", call.body["note"])


async def _task_assign(api: Api, call: Call) -> Any:
    return api.service.task_action(
        call.principal, call.args["task_id"], "assign", call.body["user"]
    )


async def _task_snooze(api: Api, call: Call) -> Any:
    return api.service.task_action(
        call.principal, call.args["task_id"], "snooze", call.body["until"]
    )


async def _parked(api: Api, call: Call) -> Any:
    return {"items": api.service.parked(include_linked=bool(call.args["all"]))}


async def _link(api: Api, call: Call) -> Any:
    return api.service.link(call.principal, call.args["parked_id"], call.body["referral_id"])


def _capped(items: list[Any], limit: int, cursor: str = "") -> dict[str, Any]:
    """A list fetched with ``limit + 1``: ``items`` (at most ``limit``), ``more`` (rows
    are left) and, with ``cursor``, ``next`` (that parameter's value for the next page)."""
    out: dict[str, Any] = {"items": items[:limit], "more": len(items) > limit}
    if cursor:
        out["next"] = {cursor: items[limit - 1]["id"]} if out["more"] else None
    return out


async def _outbox(api: Api, call: Call) -> Any:
    a = call.args
    items = api.service.outbox(
        status=a["status"] or "", channel=a["channel"] or "", limit=a["limit"] + 1
    )
    return _capped(items, a["limit"])


async def _dead(api: Api, call: Call) -> Any:
    limit = call.args["limit"]
    return _capped(api.service.outbox(status="dead", limit=limit + 1), limit)


async def _retry(api: Api, call: Call) -> Any:
    return api.service.retry(call.principal, call.args["outbox_id"])


async def _messages(api: Api, call: Call) -> Any:
    a = call.args
    return _capped(
        api.service.messages(
            message_type=a["type"],
            control_id=a["control_id"],
            status=a["status"],
            source=a["source"],
            since=a["since"],
            until=a["until"],
            before_id=a["before_id"],
            limit=a["limit"] + 1,
        ),
        a["limit"],
        "before_id",
    )


async def _message(api: Api, call: Call) -> Any:
    return api.service.message(call.args["message_id"])


async def _raw(api: Api, call: Call) -> Any:
    return api.service.raw(call.principal, call.args["message_id"], via="api")


async def _outcome(api: Api, call: Call) -> Any:
    return api.service.message_detail(call.args["message_id"])


async def _tree(api: Api, call: Call) -> Any:
    return api.service.message_tree(call.principal, call.args["message_id"], via="api")


async def _reprocess(api: Api, call: Call) -> Any:
    b = call.body
    return api.service.reprocess(
        call.principal,
        call.args["message_id"],
        resend=bool(b.get("resend", False)),
        dry_run=bool(b.get("dry_run", False)),
    )


async def _audit(api: Api, call: Call) -> Any:
    a = call.args
    since = isoformat(a["since"]) if a["since"] is not None else None
    rows = api.service.audit(since=since, after_id=a["after_id"], limit=a["limit"] + 1)
    return _capped(rows, a["limit"], "after_id")


async def _report(api: Api, call: Call) -> Any:
    a = call.args
    if a["start"] > a["end"]:
        raise ApiError(400, "start is after end")
    return api.service.report(a["start"], a["end"], a["by"])


async def _sources(api: Api, call: Call) -> Any:
    return {"items": api.service.sources()}


async def _try(api: Api, call: Call) -> Any:
    b = call.body
    return api.service.try_messages(b["message"].encode("utf-8"), b.get("source", ""))


_TEXT: Final = {"type": "string"}

ROUTES: Final[tuple[Route, ...]] = (
    Route("GET", "/api/openapi.json", "openapi", "This OpenAPI document", None, _openapi,
          {"type": "object"}),
    Route("GET", "/api/me", "me", "Who the caller is", None, _me, ME),
    Route(
        "GET", "/api/referrals", "listReferrals",
        "Find referrals: a page of them (keyset), prioritised by default (overdue first, then "
        "stat, urgent, routine, oldest first), with the total; showing patients is audited",
        "referrals", _referrals, REFERRAL_PAGE,
        params=(
            Param("q", max_length=200, description=(
                "Search: placer or filler number, MRN, the start of the patient's family or "
                "given name (case and accents ignored), birth date (YYYY-MM-DD or "
                "MM/DD/YYYY), the start of the specialty or specialist, or the specialist's "
                "NPI. Every word must match.")),
            Param("status", enum=states.OVERALL_STATUSES),
            Param("open", "boolean", description="Only referrals that are not closed."),
            Param(
                "specialty",
                description="The specialty code as sent (OBR-4.1, REFCARD) or the specialty "
                "routes.yaml derives from it (specialty_category: Cardiology); whole, "
                "case-insensitive.",
            ),
            Param("specialist", description="Specialist name, NPI or organisation."),
            Param("referring", description="Referring provider name, NPI or organisation."),
            Param("days_open_min", "integer", minimum=0, maximum=36500,
                  description="Opened at least this many days ago."),
            Param("overdue", "boolean", description="Only overdue (true) or not (false)."),
            Param("sort", enum=(*SORTS, *(f"-{s}" for s in SORTS)), default="priority",
                  description="Sort key; a leading - sorts descending."),
            Param("after", "integer", minimum=1, maximum=MAX_ID,
                  description="The page after this referral id (next_after of a page)."),
            Param("before", "integer", minimum=1, maximum=MAX_ID,
                  description="The page before this referral id (prev_before of a page)."),
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
        "POST", "/api/referrals/close", "closeReferrals",
        "Close several referrals with one reason (one Tracker.close and audit row each)",
        "act", _close_many, BULK_CLOSE_RESULT, body=BULK_CLOSE_BODY, statuses=(503,),
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
        "referrals", _tasks, capped_list_of(TASK_ITEM),
        params=(
            Param("status", enum=TASK_LISTS,
                  description="Default open (most urgent first); due: open and not "
                  "snoozed, soonest due first; snoozed; done, superseded, all: newest first."),
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
        "POST", "/api/tasks/{task_id}/snooze", "snoozeTask",
        "Snooze an open task until a time (\"\" wakes it; audited)", "act", _task_snooze,
        TASK_ITEM, params=(_id("task_id"),), body=TASK_SNOOZE_BODY, statuses=(404, 409),
    ),
    Route(
        "GET", "/api/parked", "listParked", "Parked events waiting for a link",
        "referrals", _parked, list_of(PARKED_ITEM),
        params=(Param("all", "boolean", description="Include linked events."),),
    ),
    Route(
        "POST", "/api/parked/{parked_id}/link", "linkParked",
        "Apply a parked event to a referral (Tracker.link)", "act", _link, ACTION_RESULT,
        params=(_id("parked_id"),), body=LINK_BODY, statuses=(404, 409, 503),
    ),
    Route(
        "GET", "/api/outbox", "listOutbox", "Outbox rows, newest first (no payloads)",
        "outbox", _outbox, capped_list_of(OUTBOX_ITEM),
        params=(
            Param("status", enum=outbox_store.OUTBOX_STATUSES),
            Param("channel", max_length=64),
            LIMIT,
        ),
    ),
    Route(
        "GET", "/api/dead-letters", "listDeadLetters", "Dead outbox rows, newest first",
        "outbox", _dead, capped_list_of(OUTBOX_ITEM), params=(LIMIT,),
    ),
    Route(
        "POST", "/api/outbox/{outbox_id}/retry", "retryOutbox",
        "Retry a dead (or waiting) outbox row now", "act", _retry, OUTBOX_ITEM,
        params=(_id("outbox_id"),), statuses=(404, 409),
    ),
    Route(
        "GET", "/api/messages", "listMessages",
        "Inbox metadata search on indexed columns, newest first", "messages", _messages,
        capped_list_of(MESSAGE, "before_id"),
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
        params=(_id("message_id"),), content_type="text/plain", statuses=(404, 410),
    ),
    Route(
        "GET", "/api/messages/{message_id}/outcome", "getMessageOutcome",
        "What became of one message: the ACK (rebuilt), the route decision, the events, "
        "parked events and outbox rows it produced (no message content)", "messages",
        _outcome, MESSAGE_OUTCOME, params=(_id("message_id"),), statuses=(404,),
    ),
    Route(
        "GET", "/api/messages/{message_id}/tree", "getMessageTree",
        "The message text and its parsed tree, named from HL7 v2.5.1 (audited)", "messages",
        _tree, MESSAGE_TREE, params=(_id("message_id"),), statuses=(404, 410),
    ),
    Route(
        "POST", "/api/messages/{message_id}/reprocess", "reprocessMessage",
        "Replay one message through the current routes (refloop replay --id)", "reprocess",
        _reprocess, REPLAY_ITEM, params=(_id("message_id"),), body=REPROCESS_BODY,
        statuses=(404, 409, 503),
    ),
    Route(
        "GET", "/api/audit", "exportAudit", "Audit rows with their hashes, in id order",
        "audit", _audit, capped_list_of(AUDIT_ROW, "after_id"),
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
    Route(
        "GET", "/api/sources", "listSources",
        "Per source: open connections, last message, today's messages by status, last error",
        "messages", _sources, list_of(SOURCE_ITEM), statuses=(503,),
    ),
    Route(
        "POST", "/api/routes/test", "tryMessages",
        "What the running routes would do with these messages (nothing stored or sent)",
        "messages", _try, TRY_RESULT, body=TRY_BODY, statuses=(503,),
    ),
)  # fmt: skip


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
                    except web.HTTPRequestEntityTooLarge:
                        raise ApiError(413, "the body is over 1 MiB") from None
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
                if (route.operation_id, p.name) in REQUIRED_QUERY and not raw:
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
