"""routes.yaml compiled: :func:`compile_config` turns the ``routes``, ``tables``,
``channels``, ``escalation`` and ``practice`` sections into a frozen
:class:`~engine.routing.table.RouteTable`, reporting every problem as
``file:line key.path: message`` in one :class:`~engine.errors.ConfigError`.

One route is compiled here from its parts: ``when`` (engine.routing.when), ``extract``
(engine.routing.extract), ``then`` (engine.routing.actions). The file format is
documented in docs/routes.md.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from types import MappingProxyType
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from engine.config import Config, Doc, Reader, Section
from engine.errors import ConfigError
from engine.hl7v2.message import TersePath
from engine.routing.actions import compile_actions
from engine.routing.channels import (
    compile_channels,
    rotation_slots,
    section_mapping,
    unserved_rotation,
)
from engine.routing.expressions import Compiler, make_environment
from engine.routing.extract import EXTRACT_NAME, compile_extracts
from engine.routing.fhirpath import FhirPath
from engine.routing.fields import FHIR_PATH_FUNCTIONS, PATH_FUNCTIONS
from engine.routing.table import NAME, ChannelSpec, PracticeSpec, Predicate, Route, RouteTable
from engine.routing.when import compile_fhir_when, compile_when, named_types
from engine.tracking.escalation import QUEUE_CHANNELS, policy_from_section


def compile_config(config: Config) -> RouteTable:
    """Compile the routing sections of ``config``; raises ConfigError listing every
    problem as ``file:line key.path: message``."""
    problems: list[str] = []
    sections = config.sections
    doc = _doc_of(config)
    env = config.env
    tables = _tables(sections.get("tables"), problems, env)
    practice = _practice(sections.get("practice"), problems, env)
    channels = compile_channels(sections.get("channels"), problems, env, practice)
    escalation = policy_from_section(sections.get("escalation"), problems, env, channels)
    unserved_rotation(sections.get("escalation"), channels, problems)
    # the timers and the tracker queue only on channels something serves
    served = frozenset(channels) | QUEUE_CHANNELS
    escalation = dataclasses.replace(escalation, slots=rotation_slots(channels), served=served)
    source_names = _source_names(doc)
    compiler = Compiler(PATH_FUNCTIONS, TersePath.parse, tables, make_environment())
    fhir_compiler = Compiler(FHIR_PATH_FUNCTIONS, FhirPath.parse, tables, make_environment())
    routes = _routes(
        sections.get("routes"), (compiler, fhir_compiler), source_names, channels, problems, env
    )
    if problems:
        raise ConfigError(problems)
    return RouteTable(
        file=config.file,
        routes=routes,
        tables=tables,
        channels=MappingProxyType(channels),
        escalation=escalation,
        practice=practice,
    )


def _doc_of(config: Config) -> Doc | None:
    for section in config.sections.values():
        return section.doc
    return None


def _source_names(doc: Doc | None) -> frozenset[str]:
    if doc is None or not isinstance(doc.data, dict):
        return frozenset()
    sources = doc.data.get("sources")
    return frozenset(str(k) for k in sources) if isinstance(sources, dict) else frozenset()


def _tables(
    section: Section | None, problems: list[str], env: Mapping[str, str] | None
) -> Mapping[str, Mapping[str, str]]:
    if section is None:
        return MappingProxyType({})
    data = section_mapping(section, problems)
    if data is None:
        return MappingProxyType({})
    doc = section.doc
    out: dict[str, Mapping[str, str]] = {}
    for name, table in data.items():
        path = (*section.path, name)
        if not EXTRACT_NAME.fullmatch(str(name)) or "." in str(name):
            problems.append(f"{doc.where(path)}: table names are lower-case letters, digits and _")
            continue
        if not isinstance(table, dict):
            problems.append(f"{doc.where(path)}: a table must be a mapping of code: value")
            continue
        entries: dict[str, str] = {}
        for code, value in table.items():
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                problems.append(
                    f"{doc.where((*path, code))}: table values must be text (quote yes/no/on/off)"
                )
                continue
            entries[str(code)] = str(value)
        out[str(name)] = MappingProxyType(entries)
    return MappingProxyType(out)


def _practice(
    section: Section | None, problems: list[str], env: Mapping[str, str] | None
) -> PracticeSpec:
    if section is None:
        return PracticeSpec()
    r = Reader(section.doc, section.path, problems, env)
    tz = r.text("time_zone", "")
    if tz:
        try:
            ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError):
            r.fail("time_zone", f"unknown time zone {tz!r} (use an IANA name like America/Chicago)")
    link = r.text("booking_link", "")
    if link and not link.startswith(("https://", "http://")):
        r.fail("booking_link", "must be an http(s) URL")
    spec = PracticeSpec(
        name=r.text("name", ""),
        phone=r.text("phone", ""),
        booking_link=link,
        time_zone=tz,
        sms_may_name_specialty=r.flag("sms_may_name_specialty", False),
    )
    r.done()
    return spec


def _routes(
    section: Section | None,
    compilers: tuple[Compiler, Compiler],
    source_names: frozenset[str],
    channels: Mapping[str, ChannelSpec],
    problems: list[str],
    env: Mapping[str, str] | None,
) -> tuple[Route, ...]:
    if section is None:
        return ()
    doc = section.doc
    data = section.data
    if data is None:
        return ()
    if not isinstance(data, list):
        problems.append(f"{doc.where(section.path)}: must be a list of routes")
        return ()
    out: list[Route] = []
    seen: dict[str, str] = {}
    for i, item in enumerate(data):
        path = (*section.path, i)
        if not isinstance(item, dict):
            problems.append(f"{doc.where(path)}: a route must be a mapping")
            continue
        route = _route(Reader(doc, path, problems, env), compilers, source_names, channels)
        if route is None:
            continue
        if route.name in seen:
            problems.append(
                f"{doc.where((*path, 'name'))}: duplicate route name {route.name!r} "
                f"(first at {seen[route.name]})"
            )
        seen[route.name] = route.where
        out.append(route)
    return tuple(out)


def _route(
    r: Reader,
    compilers: tuple[Compiler, Compiler],
    source_names: frozenset[str],
    channels: Mapping[str, ChannelSpec],
) -> Route | None:
    doc = r.doc
    before = len(r.problems)
    name = r.text("name", required=True)
    if name and not NAME.fullmatch(name):
        r.fail("name", "route names are lower-case letters, digits, - and _")
    r.text("description")
    sources: frozenset[str] | None = None
    if r.has("from"):
        values = r.texts("from")
        for j, s in enumerate(values):
            if s not in source_names:
                known = ", ".join(sorted(source_names)) or "none are defined"
                r.fail(
                    ("from", j) if isinstance(r.data["from"], list) else "from",
                    f"unknown source {s!r} (sources: {known})",
                )
        sources = frozenset(values)
    types: re.Pattern[str] | None = None
    predicate: Predicate | None = None
    resources: frozenset[str] | None = None
    when = r.raw("when")
    fhir = isinstance(when, dict) and "resource" in when
    compiler = compilers[1] if fhir else compilers[0]
    if fhir:
        resources, predicate = compile_fhir_when(r, ("when",))
    elif when is not None:
        types, predicate = compile_when(r, ("when",))
    extracts, names = compile_extracts(r, compiler, fhir=fhir)
    actions = compile_actions(r, compiler, channels, names, extracts, fhir=fhir)
    cont = r.flag("continue", False)
    r.done()
    if len(r.problems) > before:
        return None
    return Route(
        name=name,
        where=f"{doc.file}:{doc.line(r.path)}",
        sources=sources,
        types=types,
        predicate=predicate,
        extracts=extracts,
        actions=actions,
        cont=cont,
        resources=resources,
        type_names=() if fhir else named_types(when),
    )
