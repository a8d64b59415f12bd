"""Try messages against the routes without storing or sending anything: what
``refloop routes test FILE`` prints and the dashboard's *Try a message* page shows.

:func:`read_samples` cuts a file (or pasted text) into messages the way the daemon would
receive them: HL7 v2 text holding one or many messages, with LF, CRLF or CR segment
ends, FHS/BHS batches included (each message on its own, segment ends normalised to CR,
as ``refloop send`` sends them); or FHIR JSON: one resource, a Bundle (each entry's
resource), or a JSON array of resources. :func:`try_samples` runs each through the pure
:func:`engine.routing.decide.decide` / ``decide_fhir`` and reports the decision, the
matching routes' extracted values, the events and the actions. Pure: no database, no
clock, no network; a problem with one message is that message's ``error`` result.

The results show message content (extracted names, phone numbers): they are for the
analyst who holds the file, printed or rendered to them only, never logged.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from engine.clock import isoformat
from engine.errors import MessageRejected
from engine.hl7v2.client import normalise
from engine.hl7v2.message import Message, split_messages
from engine.model import Decision, Drop, Event, Forward, Send, Track
from engine.routing.decide import (
    decide,
    decide_fhir,
    extract,
    fhir_candidates,
    fhir_variables,
    hl7_variables,
)
from engine.routing.expressions import RenderError
from engine.routing.fhirpath import FhirResource
from engine.routing.table import Route, RouteTable

MAX_SAMPLES: Final = 1000  # messages tried from one file; the rest are counted, not run
Kind = Literal["hl7v2", "fhir"]


@dataclass(frozen=True, slots=True)
class Sample:
    """One message read from a file: its position (1-based), kind and bytes."""

    index: int
    kind: Kind
    raw: bytes


def read_samples(data: bytes) -> list[Sample]:
    """The messages in ``data``: FHIR JSON when it starts with ``{`` or ``[``, else
    HL7 v2 (see the module docstring). Raises ``MessageRejected`` when ``data`` holds
    no message at all, or is JSON that cannot be read."""
    body = data.lstrip(b"\xef\xbb\xbf \t\r\n")
    if body[:1] in (b"{", b"["):
        return _fhir_samples(body)
    batch = split_messages(data)
    if not batch.messages:
        raise MessageRejected("no HL7 v2 message (no MSH segment) and no FHIR JSON")
    return [Sample(i, "hl7v2", normalise(m)) for i, m in enumerate(batch.messages, 1)]


def _fhir_samples(body: bytes) -> list[Sample]:
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise MessageRejected(f"not valid JSON: {exc}") from None
    if isinstance(doc, dict) and doc.get("resourceType") == "Bundle":
        entries = doc.get("entry") or []
        items = [e.get("resource") for e in entries if isinstance(e, dict)]
    elif isinstance(doc, list):
        items = doc
    else:
        items = [doc]
    out = [
        Sample(i, "fhir", json.dumps(item, ensure_ascii=False).encode("utf-8"))
        for i, item in enumerate(items, 1)
    ]
    if not out:
        raise MessageRejected("the JSON holds no resource")
    return out


def try_samples(
    table: RouteTable, samples: list[Sample], source: str, fhir_source: str = ""
) -> list[dict[str, Any]]:
    """Each sample's decision as a JSON-able dict (see :func:`try_one`); at most
    :data:`MAX_SAMPLES`."""
    return [
        try_one(table, s, fhir_source or source if s.kind == "fhir" else source)
        for s in samples[:MAX_SAMPLES]
    ]


def try_one(table: RouteTable, sample: Sample, source: str) -> dict[str, Any]:
    """One message's decision: ``index``, ``kind``, ``type``, ``control_id``,
    ``source``, ``status`` (routed, filtered, error), ``routes``, ``reason``,
    ``extracted`` (route → name → value), ``events`` and ``actions``."""
    out: dict[str, Any] = {
        "index": sample.index,
        "kind": sample.kind,
        "type": "",
        "control_id": "",
        "source": source,
    }
    try:
        if sample.kind == "fhir":
            resource = FhirResource.from_bytes(sample.raw)
            out["type"] = resource.resource_type
            out["control_id"] = resource.reference
            decision = decide_fhir(table, resource, source)
            extracted = _extracted(
                fhir_candidates(table, resource.resource_type, source),
                decision,
                resource,
                fhir_variables(resource, source),
            )
        else:
            message = Message(sample.raw)
            out["type"] = message.msh.message_type
            out["control_id"] = message.msh.control_id
            decision = decide(table, message, source)
            routes = table.candidates(message.msh.message_type, source)
            extracted = _extracted(routes, decision, message, hl7_variables(message, source))
    except MessageRejected as exc:
        decision, extracted = Decision("error", (), (), f"cannot read message: {exc.reason}"), {}
    out.update(
        status=decision.status,
        routes=list(decision.routes),
        reason=decision.reason,
        extracted=extracted,
        events=[event_dict(a.route, a.event) for a in decision.actions if isinstance(a, Track)],
        actions=[action_dict(a) for a in decision.actions],
    )
    return out


def _extracted(
    candidates: Any, decision: Decision, message: Any, variables: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """The extract values of each route the decision matched (a route that failed
    shows the values it got before the failure, none)."""
    by_name: dict[str, Route] = {r.name: r for r in candidates}
    out: dict[str, dict[str, Any]] = {}
    for name in decision.routes:
        route = by_name.get(name)
        if route is None:
            continue
        try:
            values, _scope = extract(route, message, dict(variables))
        except RenderError:
            continue  # the decision's reason says which extract failed
        out[name] = {k: jsonable(v) for k, v in values.items()}
    return out


def event_dict(route: str, event: Event) -> dict[str, Any]:
    """An event with its non-empty fields; times as ISO 8601 UTC."""
    fields = {
        f.name: jsonable(getattr(event, f.name), time=f.name.endswith("_at"))
        for f in dataclasses.fields(event)
        if f.name not in ("kind", "message_id")
    }
    return {"route": route, "kind": event.kind, **_non_empty(fields)}


def action_dict(action: Track | Send | Forward | Drop) -> dict[str, Any]:
    if isinstance(action, Track):
        return {"action": "track", "route": action.route, "kind": action.event.kind}
    if isinstance(action, Send):
        return {
            "action": "send",
            "route": action.route,
            "channel": action.channel,
            "template": action.template,
            "to": action.to,
        }
    if isinstance(action, Forward):
        return {"action": "forward", "route": action.route, "channel": action.channel}
    return {"action": "drop", "route": action.route, "reason": action.reason}


def jsonable(value: Any, *, time: bool = False) -> Any:
    """A value as JSON can hold it: dataclasses as objects, tuples as lists; a float
    named as a time (``*_at``) as ISO 8601 UTC with a Z."""
    if time and isinstance(value, int | float) and not isinstance(value, bool) and value:
        return isoformat(float(value))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: jsonable(getattr(value, f.name), time=f.name.endswith("_at"))
            for f in dataclasses.fields(value)
        }
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def _non_empty(values: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            value = _non_empty(value)
        if value not in ("", None, [], {}, False):
            out[key] = value
    return out


def text_lines(result: Mapping[str, Any]) -> Iterator[str]:
    """One result as the lines ``refloop routes test`` prints."""
    what = " ".join(x for x in (result["type"] or "?", result["control_id"]) if x)
    routes = ",".join(result["routes"]) or "-"
    head = f"#{result['index']} {what}: {result['status']}, route {routes}"
    yield head + (f" ({result['reason']})" if result["reason"] else "")
    for route, values in result["extracted"].items():
        if not values:
            continue
        yield f"  extracted by {route}:"
        for key, value in values.items():
            yield f"    {key} = {json.dumps(value, ensure_ascii=False)}"
    for event in result["events"]:
        rest = {k: v for k, v in event.items() if k not in ("route", "kind")}
        yield f"  event {event['kind']}: {json.dumps(rest, ensure_ascii=False, sort_keys=True)}"
    for action in result["actions"]:
        args = " ".join(f"{k}={v}" for k, v in action.items() if k not in ("action", "route"))
        yield f"  action {action['action']} ({action['route']}) {args}".rstrip()
