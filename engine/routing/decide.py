"""The pure core of routing: one parsed message in, one :class:`~engine.model.Decision`
out; no I/O, no clock, no database.

:func:`decide` (HL7 v2), :func:`decide_fhir` (FHIR resources) and :func:`decide_stored`
(an inbox row, decoded first). Routes are tried in file order; the first that matches
wins unless it says ``continue: true``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

from engine.errors import MessageRejected
from engine.hl7v2.message import Message, TersePath
from engine.model import Action, Decision, Drop, Forward, Send, StoredMessage, Track
from engine.routing.events import build_event
from engine.routing.expressions import RenderError, Scope, hl7_epoch
from engine.routing.fhirpath import FhirResource, instant, is_fhir
from engine.routing.table import Route, RouteTable


def decide(
    table: RouteTable,
    message: Message,
    source: str,
    *,
    message_id: int = 0,
    received_at: float = 0.0,
) -> Decision:
    """What ``message`` (from ``source``) means under ``table``. Pure: no I/O, no clock.

    Routes are tried in file order; the first whose ``from`` and ``when`` match wins,
    unless it says ``continue: true``. ``received_at`` is the fallback event time for a
    message that states none (EVN-2, then MSH-7); ``message_id`` is copied into events.
    """
    mt = message.msh.message_type
    variables = hl7_variables(message, source)
    routes = table.candidates(mt, source)
    when = _message_time(message, received_at)
    return _decide(routes, message, variables, message_id, when, mt or "a message without MSH-9")


def decide_fhir(
    table: RouteTable,
    resource: FhirResource,
    source: str,
    *,
    message_id: int = 0,
    received_at: float = 0.0,
) -> Decision:
    """:func:`decide` for a FHIR resource: only FHIR routes (``when: {resource: ...}``)
    are tried. The event time defaults to ``meta.lastUpdated``, else ``received_at``."""
    rt = resource.resource_type
    variables = fhir_variables(resource, source)
    routes = fhir_candidates(table, rt, source)
    when = instant(resource.last_updated) or received_at
    return _decide(routes, resource, variables, message_id, when, rt)


def fhir_candidates(table: RouteTable, resource_type: str, source: str) -> list[Route]:
    """The FHIR routes (``when: {resource: ...}``) that may see this resource type from
    ``source``, in file order."""
    return [
        route
        for route in table.routes
        if route.resources is not None
        and ("*" in route.resources or resource_type in route.resources)
        and (route.sources is None or source in route.sources)
    ]


def _decide(
    routes: Iterable[Route],
    message: Any,
    variables: dict[str, Any],
    message_id: int,
    when: float,
    what: str,
) -> Decision:
    matched: list[str] = []
    actions: list[Action] = []
    for route in routes:
        if route.predicate is not None and not route.predicate(message):
            continue
        matched.append(route.name)
        try:
            actions.extend(_run(route, message, dict(variables), message_id, when))
        except RenderError as exc:
            return Decision("error", tuple(matched), (), f"route {route.name}: {exc}")
        if not route.cont:
            break
    if not matched:
        return Decision("filtered", (), (), f"no route matched {what}")
    if all(isinstance(a, Drop) for a in actions):
        drop = actions[0]
        reason = drop.reason if isinstance(drop, Drop) else ""
        return Decision("filtered", tuple(matched), tuple(actions), reason)
    return Decision("routed", tuple(matched), tuple(actions), "")


def hl7_variables(message: Message, source: str) -> dict[str, Any]:
    """The variables every HL7 v2 route's expressions start with."""
    return {"message_type": message.msh.message_type, "trigger": message.msh.trigger,
            "source": source}  # fmt: skip


def fhir_variables(resource: FhirResource, source: str) -> dict[str, Any]:
    """The variables every FHIR route's expressions start with."""
    return {
        "message_type": resource.resource_type,
        "trigger": "",
        "source": source,
        "resource_ref": resource.reference,
        "version_id": resource.version_id,
    }


def extract(route: Route, message: Any, variables: dict[str, Any]) -> tuple[dict[str, Any], Scope]:
    """``route``'s ``extract:`` values for ``message`` (what its actions see), and the
    scope its ``then:`` expressions render in; ``variables`` gains the values. Raises
    RenderError naming the extract that failed. (``refloop routes test`` shows them.)"""
    values: dict[str, Any] = {}
    scope = Scope(message, variables)
    for ex in route.extracts:
        try:
            value = ex.evaluate(message, scope)
        except RenderError as exc:
            raise RenderError(f"extract {ex.name}: {exc}") from None
        values[ex.name] = value
        if "." in ex.name:
            head, _, tail = ex.name.partition(".")
            group = variables.get(head)
            if not isinstance(group, dict):
                group = variables[head] = {}
            group[tail] = value
        else:
            variables[ex.name] = value
    return values, scope


def _run(
    route: Route, message: Any, variables: dict[str, Any], message_id: int, when: float
) -> list[Action]:
    values, scope = extract(route, message, variables)
    out: list[Action] = []
    for spec in route.actions:
        if spec.track is not None:
            out.append(Track(route.name, build_event(spec.track, values, message_id, when)))
        elif spec.action == "send":
            to = ""
            if spec.to is not None:
                try:
                    to = str(spec.to.evaluate(message, scope) or "")
                except RenderError as exc:
                    raise RenderError(f"send to: {exc}") from None
            out.append(Send(route.name, spec.channel, spec.template, to, dict(values)))
        elif spec.action == "forward":
            out.append(Forward(route.name, spec.channel))
        else:
            out.append(Drop(route.name, spec.reason))
    return out


_EVN2: Final = TersePath.parse("EVN.2.1")
_MSH7: Final = TersePath.parse("MSH.7.1")


def _message_time(message: Message, received_at: float) -> float:
    """The message's own event time: EVN-2, else MSH-7, else when it was received."""
    for path in (_EVN2, _MSH7):
        text = message.get(path)
        if text:
            try:
                value = hl7_epoch(text)
            except RenderError:
                continue
            if isinstance(value, float):
                return value
    return received_at


def decide_stored(
    table: RouteTable, row: StoredMessage, message: Message | None = None
) -> Decision:
    """:func:`decide` for an inbox row: decode its bytes first (an undecodable message
    is an ``error`` decision, not an exception), unless the caller read them already
    (``message``, an HL7 v2 row). FHIR resources go to :func:`decide_fhir`."""
    if message is not None:
        return decide(table, message, row.source, message_id=row.id, received_at=row.received_at)
    if is_fhir(row.raw, row.message_type):
        try:
            resource = FhirResource.from_bytes(row.raw)
        except MessageRejected as exc:
            return Decision("error", (), (), f"cannot read resource: {exc.reason}")
        return decide_fhir(
            table, resource, row.source, message_id=row.id, received_at=row.received_at
        )
    try:
        message = Message(row.raw)
    except MessageRejected as exc:
        return Decision("error", (), (), f"cannot read message: {exc.reason}")
    return decide(table, message, row.source, message_id=row.id, received_at=row.received_at)
