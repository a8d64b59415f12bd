"""The compiled routes.yaml: :class:`RouteTable` and the frozen types it is made of.

A :class:`RouteTable` is immutable and shared by the processor and replays (a hot reload
swaps the whole table). :class:`Route` holds one route's compiled ``from``, ``when``,
``extract`` and ``then``; :class:`ChannelSpec` and :class:`PracticeSpec` the ``channels``
and ``practice`` sections; the ``escalation`` section is an
:class:`engine.tracking.escalation.Policy`. Built by :mod:`engine.routing.compile`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from engine.hl7v2.message import TersePath
from engine.model import Event
from engine.routing.expressions import Compiled, Scope
from engine.routing.fhirpath import FhirPath
from engine.tracking.escalation import Policy

# route and channel names: lower-case letters, digits, - and _
NAME: Final = re.compile(r"[a-z][a-z0-9_-]*")

Predicate = Callable[[Any], bool]  # on a Message (HL7 routes) or a FhirResource (FHIR routes)


@dataclass(frozen=True, slots=True)
class Target:
    """Where one extract name goes in an event: ``group`` "" (the event), "ids", or the
    name of a nested field (``specialist``)."""

    group: str
    name: str
    coerce: Callable[[Any], Any]


@dataclass(frozen=True, slots=True)
class Extract:
    """One ``extract`` entry: a terse path, a constant or an expression."""

    name: str
    path: TersePath | None = None
    many: bool = False  # the path has [*]: a tuple of every value
    constant: Any = None
    expr: Compiled | None = None
    fpath: FhirPath | None = None  # FHIR routes: one value, a tuple of several, or ""

    def evaluate(self, message: Any, scope: Scope) -> Any:
        """``message`` is a :class:`Message` (HL7 routes) or a :class:`FhirResource`."""
        if self.fpath is not None:
            values = self.fpath.texts(message.data)
            return values[0] if len(values) == 1 else tuple(values) if values else ""
        if self.path is not None:
            if self.many:
                return tuple(message.get_all(self.path))
            return message.get(self.path)
        if self.expr is not None:
            return self.expr(scope)
        return self.constant


@dataclass(frozen=True, slots=True)
class TrackSpec:
    kind: str
    cls: type[Event]
    targets: tuple[tuple[str, tuple[Target, ...]], ...]  # (extract name, targets)


@dataclass(frozen=True, slots=True)
class ActionSpec:
    action: str  # track | send | forward | drop
    track: TrackSpec | None = None
    channel: str = ""
    template: str = ""
    to: Extract | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    where: str  # "routes.yaml:41" (for logs and docs)
    sources: frozenset[str] | None  # None: every source
    types: re.Pattern[str] | None  # None: every message type
    predicate: Predicate | None
    extracts: tuple[Extract, ...]
    actions: tuple[ActionSpec, ...]
    cont: bool = False
    # FHIR routes (``when: {resource: ...}``): the resource types they match ("*": any).
    # None: an HL7 route, which never sees a FHIR resource (and the other way round).
    resources: frozenset[str] | None = None
    # the message type patterns of ``when`` as written (upper case): metric label values
    type_names: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ChannelSpec:
    name: str
    type: str
    templates: Mapping[str, str]  # template name → source text
    settings: Mapping[str, Any]  # the rest, raw (its sender validates the details)


@dataclass(frozen=True, slots=True)
class PracticeSpec:
    name: str = ""
    phone: str = ""
    booking_link: str = ""
    time_zone: str = ""
    # An SMS may name the specialty category (channels.sms.templates); default no.
    sms_may_name_specialty: bool = False


@dataclass(frozen=True, slots=True)
class RouteTable:
    """routes.yaml compiled: immutable, shared by the processor and replays."""

    file: str
    routes: tuple[Route, ...]
    tables: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    channels: Mapping[str, ChannelSpec] = field(default_factory=dict)
    escalation: Policy = field(default_factory=Policy)
    practice: PracticeSpec = PracticeSpec()
    # (message type, source) -> the HL7 routes whose type and source filters admit it:
    # filled as types are seen, so decide() does not try 40 type patterns per message
    _candidates: dict[tuple[str, str], tuple[Route, ...]] = field(
        default_factory=dict, compare=False, repr=False
    )

    @property
    def message_types(self) -> frozenset[str]:
        """Every HL7 message type pattern the routes name (engine.metrics.TypeLabels)."""
        return frozenset(name for route in self.routes for name in route.type_names)

    def candidates(self, message_type: str, source: str) -> tuple[Route, ...]:
        key = (message_type, source)
        found = self._candidates.get(key)
        if found is None:
            found = tuple(
                route
                for route in self.routes
                if route.resources is None
                and (route.types is None or route.types.match(message_type))
                and (route.sources is None or source in route.sources)
            )
            if len(self._candidates) >= 4096:  # a sender inventing types: stay bounded
                self._candidates.clear()
            self._candidates[key] = found
        return found

    def route(self, name: str) -> Route:
        for r in self.routes:
            if r.name == name:
                return r
        raise KeyError(name)
