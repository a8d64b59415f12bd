"""The API's JSON Schemas and its OpenAPI 3.0 document.

The schema pieces here describe every response and request body of the route table in
:mod:`engine.web.api`; :func:`check_body` validates request bodies against the same
schemas, and :func:`build_openapi` turns the table into the document served at
``/api/openapi.json`` — one description, so it cannot drift from the implementation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final, Protocol

from engine.tracking import states
from engine.tracking.report import AGING_LABELS, NUDGE_CHANNELS
from engine.web.service import MAX_BULK, MAX_ID, REPORT_GROUPS, ApiError

# -- JSON Schema pieces ------------------------------------------------------------

STR: Final = {"type": "string"}
INT: Final = {"type": "integer"}
NUM: Final = {"type": "number"}
BOOL: Final = {"type": "boolean"}
COUNT_: Final = {"type": "integer", "minimum": 0}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "nullable": True}


def _obj(props: dict[str, Any], *, extra: bool = True) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": props,
        "required": list(props),
        "additionalProperties": extra,
    }


def list_of(item: dict[str, Any]) -> dict[str, Any]:
    return _obj({"items": {"type": "array", "items": item}})


def capped_list_of(item: dict[str, Any], cursor: str = "") -> dict[str, Any]:
    """A list that stops at ``limit``: ``more`` says rows are left; with a cursor
    parameter, ``next`` is its value for the next page (null at the end)."""
    props: dict[str, Any] = {"items": {"type": "array", "items": item}, "more": BOOL}
    if cursor:
        props["next"] = _nullable(_obj({cursor: INT}))
    return _obj(props)


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
        "days_open": INT,
        "overdue": BOOL,
        "needed_by": STR,
        "specialist": STR,
        "referring": STR,
        "patient_name": STR,
        "patient_birth_date": STR,
        "patient_mrn": STR,
    }
)
REFERRAL_PAGE: Final = _obj(
    {
        "items": {"type": "array", "items": REFERRAL_ITEM},
        "total": INT,
        "first": INT,
        "last": INT,
        "sort": STR,
        "prev_before": _nullable(INT),
        "next_after": _nullable(INT),
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
        "received_at": {"type": "string", "format": "date-time"},
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
        "tasks": {"type": "array", "items": {"type": "object"}},
    },
    "required": [
        *REFERRAL_ITEM["required"],
        "patient_ids",
        "details",
        "timeline",
        "outbox",
        "messages",
        "tasks",
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
        "due": STR,
        "snoozed_until": _nullable(STR),
        "snoozed": BOOL,
        "note": STR,
        "created_at": STR,
        "done_at": _nullable(STR),
        "done_by": STR,
        "superseded_by": _nullable(INT),
    }
)
BULK_CLOSE_RESULT: Final = _obj(
    {
        "closed": COUNT_,
        "refused": COUNT_,
        "items": {
            "type": "array",
            "items": _obj({**ACTION_RESULT["properties"], "error": STR}),
        },
    }
)
_SIDE: Final = _obj(
    {"status": STR, "route": STR, "reason": STR, "events": {"type": "array", "items": STR}}
)
REPLAY_ITEM: Final = _obj(
    {
        "id": INT,
        "type": STR,
        "old": _SIDE,
        "new": _nullable(_SIDE),
        "changed": BOOL,
        "applied": BOOL,
        "skipped": STR,
    }
)
MESSAGE_OUTCOME: Final = {
    **MESSAGE,
    "properties": {
        **MESSAGE["properties"],
        "ack": STR,
        "decision": _nullable(
            _obj(
                {
                    "status": STR,
                    "route": STR,
                    "reason": STR,
                    "actions": {
                        "type": "array",
                        "items": _obj({"route": STR, "action": STR, "what": STR}),
                    },
                    "decided_at": STR,
                    "replayed_at": _nullable(STR),
                    "replayed_by": STR,
                }
            )
        ),
        "events": {
            "type": "array",
            "items": _obj(
                {"id": INT, "referral_id": INT, "kind": STR, "status": STR, "changed": BOOL}
            ),
        },
        "parked": {
            "type": "array",
            "items": _obj(
                {"id": INT, "kind": STR, "why": STR, "status": STR, "referral_id": _nullable(INT)}
            ),
        },
        "outbox": {"type": "array", "items": OUTBOX_ITEM},
    },
    "required": [*MESSAGE["required"], "ack", "decision", "events", "parked", "outbox"],
}
TREE_NODE: Final = {
    "type": "object",
    "description": "An element: path like PID-3[2].4, its HL7 v2.5.1 name, data type, "
    "value as sent, and its children (the same shape, nested).",
    "properties": {
        "path": STR,
        "name": STR,
        "type": STR,
        "value": STR,
        "children": {"type": "array", "items": {"type": "object"}},
    },
    "required": ["path", "name", "type", "value", "children"],
}
MESSAGE_TREE: Final = _obj(
    {
        "id": INT,
        "text": STR,
        "error": STR,
        "segments": {
            "type": "array",
            "items": _obj(
                {
                    "id": STR,
                    "occurrence": INT,
                    "name": STR,
                    "fields": {"type": "array", "items": TREE_NODE},
                }
            ),
        },
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
TASK_SNOOZE_BODY: Final = _body(
    {"until": {"type": "string", "maxLength": 40, "description": "ISO date or date-time "
               "in the future; \"\" wakes the task"}},
    ("until",),
)  # fmt: skip
BULK_CLOSE_BODY: Final = _body(
    {
        "referral_ids": {
            "type": "array",
            "items": {"type": "integer", "minimum": 1, "maximum": MAX_ID},
            "minItems": 1,
            "maxItems": MAX_BULK,
            "uniqueItems": True,
        },
        "reason": {"type": "string", "enum": list(states.CLOSE_PRECEDENCE)},
        "note": {"type": "string", "maxLength": 2000},
    },
    ("referral_ids", "reason"),
)
REPROCESS_BODY: Final = _body({"resend": BOOL, "dry_run": BOOL}, ())
DECLINE_BODY: Final = _body({"reason": {"type": "string", "maxLength": 2000}}, ())
LINK_BODY: Final = _body(
    {"referral_id": {"type": "integer", "minimum": 1, "maximum": MAX_ID}}, ("referral_id",)
)

# The analyst's workbench (engine.ingest.status): sources, try a message.
SOURCE_ITEM: Final = _obj(
    {
        "name": STR,
        "kind": {"type": "string", "enum": ["mllp", "fhir", "direct", "other"]},
        "address": STR,
        "connections_open": _nullable({"type": "integer", "minimum": 0}),
        "last_message_at": _nullable({"type": "string", "format": "date-time"}),
        "today": _obj({s: COUNT for s in ("received", "routed", "filtered", "error", "rejected")}),
        "today_total": COUNT,
        "last_error_at": _nullable({"type": "string", "format": "date-time"}),
        "last_error": STR,
    }
)
TRY_ITEM: Final = _obj(
    {
        "index": {"type": "integer", "minimum": 1},
        "kind": {"type": "string", "enum": ["hl7v2", "fhir"]},
        "type": STR,
        "control_id": STR,
        "source": STR,
        "status": {"type": "string", "enum": ["routed", "filtered", "error"]},
        "routes": {"type": "array", "items": STR},
        "reason": STR,
        "extracted": {"type": "object", "additionalProperties": {"type": "object"}},
        "events": {"type": "array", "items": {"type": "object"}},
        "actions": {"type": "array", "items": {"type": "object"}},
    }
)
TRY_RESULT: Final = _obj({"items": {"type": "array", "items": TRY_ITEM}, "not_tried": COUNT})
TRY_BODY: Final = _body(
    {
        "message": {"type": "string", "maxLength": 900_000},
        "source": {"type": "string", "maxLength": 64},
    },
    ("message",),
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
            _check_integer(name, spec, value)
        elif spec["type"] == "boolean":
            if not isinstance(value, bool):
                raise ApiError(400, f"{name}: must be true or false")
        elif spec["type"] == "array":
            if not isinstance(value, list):
                raise ApiError(400, f"{name}: must be an array")
            if not spec.get("minItems", 0) <= len(value) <= spec.get("maxItems", 10_000):
                raise ApiError(400, f"{name}: {len(value)} items is out of range")
            for item in value:
                _check_integer(name, spec["items"], item)
            if spec.get("uniqueItems") and len(set(value)) != len(value):
                raise ApiError(400, f"{name}: items repeat")
    return body


def _check_integer(name: str, spec: Mapping[str, Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{name}: must be a whole number")
    if not spec.get("minimum", -MAX_ID) <= value <= spec.get("maximum", MAX_ID):
        raise ApiError(400, f"{name}: out of range")


class ParamSpec(Protocol):
    """What the document needs of a route parameter (engine.web.api.Param)."""

    @property
    def name(self) -> str: ...
    @property
    def where(self) -> str: ...
    @property
    def description(self) -> str: ...
    def schema(self) -> dict[str, Any]: ...


class RouteSpec(Protocol):
    """What the document needs of a route (engine.web.api.Route)."""

    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def operation_id(self) -> str: ...
    @property
    def summary(self) -> str: ...
    @property
    def permission(self) -> str | None: ...
    @property
    def response(self) -> dict[str, Any]: ...
    @property
    def params(self) -> tuple[ParamSpec, ...]: ...
    @property
    def body(self) -> dict[str, Any] | None: ...
    @property
    def content_type(self) -> str: ...
    @property
    def statuses(self) -> tuple[int, ...]: ...


# Query parameters an operation cannot do without.
REQUIRED_QUERY: Final = {("closureReport", "start"), ("closureReport", "end")}


_STATUS_TEXT: Final = {
    200: "OK",
    400: "Bad request: a parameter or the body is invalid",
    401: "No or unknown bearer token",
    403: "The caller's role may not do this",
    404: "Not found",
    409: "Conflict with the current state",
    413: "The request body is over the HTTP body limit (1 MiB)",
    503: "Unavailable in this configuration",
}


def build_openapi(routes: Sequence[RouteSpec]) -> dict[str, Any]:
    """The OpenAPI 3.0 document of ``routes``."""
    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        responses: dict[str, Any] = {
            "200": {"description": "OK", "content": {r.content_type: {"schema": r.response}}}
        }
        too_large = (413,) if r.body is not None else ()
        for status in (400, 401, 403, *too_large, *r.statuses):
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
                    "required": p.where == "path" or (r.operation_id, p.name) in REQUIRED_QUERY,
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
