"""FHIR resources for routes.yaml: a small, documented FHIRPath-like subset.

A path names a resource type and then element names, each step flattening lists
implicitly (FHIRPath §3, "collections"): ``ServiceRequest.category.coding.code`` is every
code of every coding of every category. One function is supported, ``where`` with one
equality on a (dotted) sub-path and a quoted literal::

    ServiceRequest.identifier.where(type.coding.code='PLAC').value
    Appointment.participant.actor.where(reference='Practitioner/9').display

That is all: no indexes, no other functions, no ``resolve()``; choice elements are named
as they are in JSON (``occurrenceDateTime``). A path on another resource type than the
one being routed yields nothing. docs/routes.md ("FHIR routes") is the user's reference.

:class:`FhirResource` is what FHIR routes evaluate against: the parsed JSON plus the
values routing needs (type, id, version, ``meta.lastUpdated``). Pure: no I/O.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from engine.errors import MessageRejected

_TYPE: Final = re.compile(r"[A-Z][A-Za-z]{1,63}")
_NAME: Final = re.compile(r"[a-z][A-Za-z0-9_]{0,63}")
_WHERE: Final = re.compile(
    r"where\(\s*(?P<path>[a-z][A-Za-z0-9_]*(?:\.[a-z][A-Za-z0-9_]*)*)\s*=\s*"
    r"'(?P<value>(?:[^'\\]|\\.)*)'\s*\)"
)
# A reference's "Type/id" (FHIR R4 §2.3.0, literal references), absolute or relative,
# with or without "/_history/<version>".
_REFERENCE: Final = re.compile(
    r"(?:^|/)(?P<type>[A-Z][A-Za-z]+)/(?P<id>[A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$"
)


@dataclass(frozen=True, slots=True)
class Where:
    path: tuple[str, ...]
    value: str


Step = str | Where


@dataclass(frozen=True, slots=True)
class FhirPath:
    """A parsed path. :meth:`parse` raises ValueError with a reason for the user."""

    text: str
    resource: str
    steps: tuple[Step, ...]

    @classmethod
    def parse(cls, text: str) -> FhirPath:
        src = text.strip()
        head, dot, rest = src.partition(".")
        if not _TYPE.fullmatch(head):
            raise ValueError(
                f"bad FHIR path {text!r}: it starts with a resource type, e.g. Appointment.status"
            )
        steps: list[Step] = []
        pos = 0
        while dot and pos <= len(rest):
            m = _WHERE.match(rest, pos)
            if m:
                value = re.sub(r"\\(.)", r"\1", m["value"])
                steps.append(Where(tuple(m["path"].split(".")), value))
                pos = m.end()
            else:
                end = rest.find(".", pos)
                end = len(rest) if end < 0 else end
                name = rest[pos:end]
                if not _NAME.fullmatch(name):
                    raise ValueError(
                        f"bad FHIR path {text!r}: {name!r} is not an element name "
                        "(lower-camel-case) or where(path='value')"
                    )
                steps.append(name)
                pos = end
            if pos == len(rest):
                break
            if rest[pos] != ".":
                raise ValueError(f"bad FHIR path {text!r}: expected '.' after step {len(steps)}")
            pos += 1
            if pos == len(rest):
                raise ValueError(f"bad FHIR path {text!r}: ends with '.'")
        return cls(src, head, tuple(steps))

    def evaluate(self, resource: Mapping[str, Any]) -> list[Any]:
        """Every value the path reaches in ``resource`` (objects or scalars), in order."""
        if resource.get("resourceType") != self.resource:
            return []
        return _walk([resource], self.steps)

    def texts(self, resource: Mapping[str, Any]) -> list[str]:
        """The scalar values as text (booleans as ``true``/``false``, as in JSON)."""
        return [_text(v) for v in self.evaluate(resource) if not isinstance(v, (dict, list))]


def _walk(nodes: list[Any], steps: tuple[Step, ...]) -> list[Any]:
    for step in steps:
        if isinstance(step, Where):
            nodes = [
                n
                for n in nodes
                if isinstance(n, dict)
                and any(
                    _text(v) == step.value
                    for v in _walk([n], step.path)
                    if not isinstance(v, (dict, list))
                )
            ]
            continue
        out: list[Any] = []
        for n in nodes:
            if not isinstance(n, dict):
                continue
            v = n.get(step)
            if v is None:
                continue
            if isinstance(v, list):
                out.extend(x for x in v if x is not None)
            else:
                out.append(v)
        nodes = out
    return nodes


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def reference_key(value: str) -> str:
    """``Type/id`` of a literal reference (``https://x/fhir/ServiceRequest/7/_history/2``
    → ``ServiceRequest/7``); ``""`` when it is not one (``#contained``, ``urn:uuid:``)."""
    m = _REFERENCE.search(value.strip())
    return f"{m['type']}/{m['id']}" if m else ""


def instant(text: str) -> float | None:
    """A FHIR ``instant`` / ``dateTime`` / ``date`` as epoch seconds (no zone: UTC)."""
    t = text.strip()
    if not t:
        return None
    try:
        dt = datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


@dataclass(frozen=True, slots=True)
class FhirResource:
    """One FHIR resource as routes see it. ``data`` is the parsed JSON (not copied:
    nothing may change it)."""

    data: Mapping[str, Any]

    @classmethod
    def from_bytes(cls, raw: bytes) -> FhirResource:
        """Parse stored JSON; MessageRejected (no content quoted) when it is not a
        resource."""
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise MessageRejected("not valid JSON") from None
        if not isinstance(data, dict) or not isinstance(data.get("resourceType"), str):
            raise MessageRejected("not a FHIR resource (no resourceType)")
        return cls(data)

    @property
    def resource_type(self) -> str:
        return str(self.data.get("resourceType", ""))

    @property
    def id(self) -> str:
        return str(self.data.get("id") or "")

    @property
    def reference(self) -> str:
        """``Type/id`` (how other resources refer to this one)."""
        return f"{self.resource_type}/{self.id}" if self.id else ""

    @property
    def meta(self) -> Mapping[str, Any]:
        meta = self.data.get("meta")
        return meta if isinstance(meta, dict) else {}

    @property
    def version_id(self) -> str:
        return str(self.meta.get("versionId") or "")

    @property
    def last_updated(self) -> str:
        return str(self.meta.get("lastUpdated") or "")


def is_fhir(raw: bytes, message_type: str) -> bool:
    """Whether a stored inbox row holds a FHIR resource (a JSON object, no MSH-9)."""
    return "^" not in message_type and raw.lstrip()[:1] == b"{"


# -- path functions for expressions (engine.routing.expressions.PathFunction) ---------------


def path_first(resource: FhirResource, path: FhirPath) -> str:
    """``path('Appointment.start')``: the first scalar value as text, or ``""``."""
    values = path.texts(resource.data)
    return values[0] if values else ""


def path_all(resource: FhirResource, path: FhirPath) -> list[str]:
    """``paths('ServiceRequest.identifier.value')``: every scalar value as text."""
    return path.texts(resource.data)


def path_refs(resource: FhirResource, path: FhirPath, target: str = "") -> list[str]:
    """``refs('Appointment.basedOn', 'ServiceRequest')``: the ``Type/id`` of every
    literal reference the path reaches (a Reference object or its ``reference`` text),
    only those to ``target`` when given."""
    out: list[str] = []
    for v in path.evaluate(resource.data):
        text = v.get("reference", "") if isinstance(v, dict) else v
        key = reference_key(str(text)) if isinstance(text, str) else ""
        if key and (not target or key.startswith(f"{target}/")):
            out.append(key)
    return out
