"""routes.yaml compiled: which messages mean what, and what to do about them.

:func:`compile_config` turns the ``routes``, ``tables``, ``channels``, ``escalation`` and
``practice`` sections into a frozen :class:`RouteTable`, reporting every problem as
``file:line key.path: message``. :func:`decide` is the pure core: one parsed message in,
one :class:`~engine.model.Decision` out; no I/O, no clock, no database. :func:`make_handler`
wraps it for the processor: decode the stored bytes, decide, hand ``track`` events to
the tracker, record the decision (for replay) and count it.

The file format is documented in docs/routes.md.
"""

from __future__ import annotations

import base64
import dataclasses
import fnmatch
import hashlib
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from channels.direct.inbound import is_loopback
from channels.sms.templates import check_sms_template
from engine.canonical import canonical_json, event_fingerprint, legacy_event_fingerprint
from engine.clock import Clock, WallClock
from engine.config import Config, Doc, PathT, Reader, Section, file_ref
from engine.errors import ConfigError, MessageRejected
from engine.hl7v2.message import Message, TersePath
from engine.ingest.processor import Outcome
from engine.metrics import Metrics
from engine.model import (
    EVENT_TYPES,
    Action,
    Decision,
    Drop,
    Event,
    Forward,
    Identifiers,
    PatientContact,
    Provider,
    Send,
    StoredMessage,
    Track,
)
from engine.routing.expressions import (
    Compiled,
    CompileProblem,
    Compiler,
    PathFunction,
    RenderError,
    Scope,
    hl7_epoch,
    is_template,
    make_environment,
)
from engine.routing.fhirpath import (
    FhirPath,
    FhirResource,
    instant,
    is_fhir,
    path_all,
    path_first,
    path_refs,
)
from engine.store import Database, referrals
from engine.store.db import Conn
from engine.store.decisions import DecisionRow, Decisions
from engine.tracking.escalation import CHANNELS as ROTATION_SLOTS
from engine.tracking.escalation import Policy, policy_from_section

log = logging.getLogger(__name__)

_NAME: Final = re.compile(r"[a-z][a-z0-9_-]*")
_EXTRACT_NAME: Final = re.compile(r"_?[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)?")
_TYPE_PATTERN: Final = re.compile(r"[A-Z0-9*?\[\]!-]{1,8}(\^[A-Z0-9*?\[\]!-]{1,8})?")
_LOOKS_LIKE_PATH: Final = re.compile(r"[A-Z][A-Z0-9]{2}\b")
_DURATION: Final = re.compile(r"(\d+)\s*(m|h|d|w)")

ROUTE_KEYS: Final = ("name", "description", "from", "when", "extract", "then", "continue")
PREDICATE_OPS: Final = ("equals", "in", "matches", "exists", "not")
ACTIONS: Final = ("track", "send", "forward", "drop")
BUILTIN_NAMES: Final = ("message_type", "trigger", "source")
# FHIR routes also see the resource's own reference ("ServiceRequest/123") and version.
FHIR_BUILTIN_NAMES: Final = (*BUILTIN_NAMES, "resource_ref", "version_id")

CHANNEL_TYPES: Final[dict[str, tuple[str, ...]]] = {
    "mllp": ("host", "port", "tls", "timeout"),
    "direct": (
        "address",
        "hisp_host",
        "hisp_port",
        "hisp_ca",
        "username",
        "password",
        "cert",
        "key",
        "trust_anchors",
        "mdn_timeout",
        "attach_original",
        "inbound",
        "imap",
        "timeout",
    ),
    "fax": (
        "provider",
        "api_url",
        "api_key",
        "api_secret",
        "callback_token",
        "from_number",
        "timeout",
    ),
    "sms": (
        "provider",
        "account_sid",
        "auth_token",
        "from_number",
        "messaging_service_sid",
        "status_callback_url",
        "api_base",
        "max_chars",
        "timeout",
        "advanced_opt_out",
    ),
    # automated patient calls (channels.voice.twilio); templates under the SMS allow-list
    "voice": (
        "provider",
        "account_sid",
        "auth_token",
        "from_number",
        "status_callback_url",
        "api_base",
        "language",
        "voice",
        "max_chars",
        "timeout",
    ),
    "portal": ("api_url", "api_key", "timeout"),
    "task": ("api_url", "api_key", "queue", "timeout"),
    "webhook": ("url", "secret", "timeout"),
    "fhir": (
        "base_url",
        "client_id",
        "token_url",
        "key",
        "scope",
        "bearer_token",
        "sender_ref",
        "identifier_system",
        "resource",
        "timeout",
    ),
}
CHANNEL_COMMON: Final = ("type", "description", "enabled", "templates")
# Outbox dispatch settings every channel may carry (engine.delivery.dispatch.RetryPolicy).
CHANNEL_DISPATCH: Final = ("max_attempts", "retry_base", "retry_cap", "concurrency")
SECRET_KEYS: Final = (
    "password",
    "api_key",
    "api_secret",
    "auth_token",
    "bearer_token",
    "callback_token",
    "key",
    "secret",
)


# ---------------------------------------------------------------------------
# Path functions available in expressions


def _field(message: Message, path: TersePath) -> str:
    return message.get(path)


def _fields(message: Message, path: TersePath) -> list[str]:
    return message.get_all(path)


def _reps(path: TersePath) -> TersePath:
    return dataclasses.replace(path, repetition=-1, component=0, subcomponent=0)


def _ids(message: Message, path: TersePath) -> tuple[str, ...]:
    """CX repetitions (PID-3, MRG-1) as ``id^^^authority`` (CX.1 and CX.4's namespace).
    Whole repetitions read with ``^`` and ``&`` whatever the message's delimiters."""
    out = []
    for rep in message.get_all(path):
        parts = rep.split("^")
        ident = parts[0].strip()
        if not ident:
            continue
        auth = parts[3].split("&")[0].strip() if len(parts) > 3 else ""
        out.append(f"{ident}^^^{auth}" if auth else ident)
    return tuple(out)


TELECOM_KINDS: Final = ("phone", "mobile", "fax", "email")


def _telecom(message: Message, path: TersePath, kind: str = "phone") -> str:
    """The first XTN repetition of a kind (HL7 table 0201 use / 0202 equipment):
    ``email`` (NET or Internet: XTN.4), ``fax`` (FX), ``mobile`` (CP), ``phone`` (any
    telephone, not fax or e-mail). Numbers come from XTN.12, else XTN.6+XTN.7, else XTN.1."""
    for rep in message.get_all(path):
        c = rep.split("^") + [""] * 12
        use, equip = c[1].strip().upper(), c[2].strip().upper()
        is_email = use == "NET" or equip in ("INTERNET", "X.400")
        if kind == "email":
            if is_email and (c[3].strip() or c[0].strip()):
                return (c[3] or c[0]).strip()
            continue
        if is_email:
            continue
        if kind == "fax" and equip != "FX":
            continue
        if kind == "mobile" and equip != "CP":
            continue
        if kind == "phone" and equip == "FX":
            continue
        number = c[11].strip() or (c[5].strip() + c[6].strip()) or c[0].strip()
        if number:
            return number
    return ""


PATH_FUNCTIONS: Final[dict[str, PathFunction]] = {
    "field": PathFunction(_field),
    "fields": PathFunction(_fields),
    "ids": PathFunction(_ids, prepare=_reps),
    "telecom": PathFunction(_telecom, max_args=2, choices=(TELECOM_KINDS,), prepare=_reps),
}

# The path functions of FHIR routes (engine.routing.fhirpath; docs/routes.md "FHIR routes").
FHIR_PATH_FUNCTIONS: Final[dict[str, PathFunction]] = {
    "path": PathFunction(path_first),
    "paths": PathFunction(path_all),
    "refs": PathFunction(path_refs, max_args=2),
}


# ---------------------------------------------------------------------------
# Event fields: which extract names a ``track`` action can use, and their types

_IDS_FIELDS: Final = {f.name: str(f.type) for f in dataclasses.fields(Identifiers)}
_BASE_FIELDS: Final = ("ids", "occurred_at", "message_id", "kind")
_NESTED: Final[dict[str, type]] = {"Provider": Provider, "PatientContact": PatientContact}


def _nested_type(type_name: str) -> type | None:
    return _NESTED.get(type_name)


@dataclass(frozen=True, slots=True)
class _Target:
    """Where one extract name goes in an event: ``group`` "" (the event), "ids", or the
    name of a nested field (``specialist``)."""

    group: str
    name: str
    coerce: Callable[[Any], Any]


_EMPTY: Final = object()


def _to_str(value: Any) -> Any:
    if value is None:
        return _EMPTY
    if isinstance(value, (list, tuple)):
        value = next((v for v in value if v not in (None, "")), "")
    text = value if isinstance(value, str) else str(value)
    text = text.strip()
    return text if text else _EMPTY


def _to_strs(value: Any) -> Any:
    if value is None:
        return _EMPTY
    if isinstance(value, (list, tuple)):
        out = tuple(str(v).strip() for v in value if v not in (None, "") and str(v).strip())
    else:
        text = str(value).strip()
        out = (text,) if text else ()
    return out if out else _EMPTY


def _to_float(value: Any) -> Any:
    if value is None or value == "":
        return _EMPTY
    if isinstance(value, bool):
        raise RenderError("expected a time, not true/false")
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        if _ISO_DATE.match(text):  # FHIR dateTime / instant
            epoch = instant(text)
            if epoch is None:
                raise RenderError("not a valid ISO date/time") from None
            return epoch
        result = hl7_epoch(text)
        return _EMPTY if result == "" else result


_ISO_DATE: Final = re.compile(r"\d{4}-\d{2}")
_TRUE: Final = frozenset({"Y", "YES", "TRUE", "1", "T"})
_FALSE: Final = frozenset({"N", "NO", "FALSE", "0", "F"})


def _to_bool(value: Any) -> Any:
    if value is None or value == "":
        return _EMPTY
    if isinstance(value, bool):
        return value
    text = str(value).strip().upper()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise RenderError("expected a yes/no value")


_COERCE: Final[dict[str, Callable[[Any], Any]]] = {
    "str": _to_str,
    "tuple[str, ...]": _to_strs,
    "float": _to_float,
    "int": _to_float,
    "bool": _to_bool,
    "bool | None": _to_bool,
}


def _targets(cls: type[Event]) -> dict[str, tuple[_Target, ...]]:
    """Extract name → where it goes, for one event class."""
    out: dict[str, list[_Target]] = {}
    for name, type_name in _IDS_FIELDS.items():
        out.setdefault(name, []).append(_Target("ids", name, _COERCE[type_name]))
    out.setdefault("occurred_at", []).append(_Target("", "occurred_at", _to_float))
    for f in dataclasses.fields(cls):
        if f.name in _BASE_FIELDS:
            continue
        type_name = str(f.type)
        nested = _nested_type(type_name)
        if nested is not None:
            for sub in dataclasses.fields(nested):
                out.setdefault(f"{f.name}.{sub.name}", []).append(
                    _Target(f.name, sub.name, _COERCE[str(sub.type)])
                )
        else:
            out.setdefault(f.name, []).append(_Target("", f.name, _COERCE[type_name]))
    return {k: tuple(v) for k, v in out.items()}


EVENT_TARGETS: Final[dict[str, dict[str, tuple[_Target, ...]]]] = {
    kind: _targets(cls) for kind, cls in EVENT_TYPES.items()
}


# ---------------------------------------------------------------------------
# The compiled table


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
    targets: tuple[tuple[str, tuple[_Target, ...]], ...]  # (extract name, targets)


@dataclass(frozen=True, slots=True)
class ActionSpec:
    action: str  # track | send | forward | drop
    track: TrackSpec | None = None
    channel: str = ""
    template: str = ""
    to: Extract | None = None
    reason: str = ""


Predicate = Callable[[Any], bool]  # on a Message (HL7 routes) or a FhirResource (FHIR routes)


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


# ---------------------------------------------------------------------------
# Compiling


def compile_config(config: Config) -> RouteTable:
    """Compile the routing sections of ``config``; raises ConfigError listing every
    problem as ``file:line key.path: message``."""
    problems: list[str] = []
    sections = config.sections
    doc = _doc_of(config)
    env = config.env
    tables = _tables(sections.get("tables"), problems, env)
    practice = _practice(sections.get("practice"), problems, env)
    channels = _channels(sections.get("channels"), problems, env, practice)
    escalation = policy_from_section(sections.get("escalation"), problems, env, channels)
    _unserved_rotation(sections.get("escalation"), channels, problems)
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


def rotation_slots(channels: Mapping[str, ChannelSpec]) -> dict[str, str]:
    """Which channel serves each patient rotation slot (``sms``, ``portal``, ``voice``):
    the channel named like the slot, else the only channel of that type; a slot with
    neither is served by nothing (engine.delivery.dispatch.Rotation skips it)."""
    slots: dict[str, str] = {}
    for slot in ROTATION_SLOTS:
        typed = [n for n, s in channels.items() if s.type == slot]
        if slot in channels:
            slots[slot] = slot
        elif len(typed) == 1:
            slots[slot] = typed[0]
    return slots


def _unserved_rotation(
    section: Section | None, channels: Mapping[str, ChannelSpec], problems: list[str]
) -> None:
    """An ``escalation.rotation`` entry that no channel serves is an error: the timers
    would queue nudges there that nothing ever sends. (The staff channels ``task`` and
    ``coordinator`` are always served: engine.delivery.task_queue, the built-in task queue.)"""
    if section is None or not isinstance(section.data, dict):
        return
    rotation = section.data.get("rotation")
    if not isinstance(rotation, list):
        return
    served = rotation_slots(channels)
    for i, slot in enumerate(rotation):
        if slot in ROTATION_SLOTS and slot not in served:
            problems.append(
                f"{section.doc.where((*section.path, 'rotation', i))}: no channel serves "
                f"{slot!r}: define channels.{slot} (or a channel of type {slot}) or remove it"
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


def _mapping(section: Section, problems: list[str]) -> dict[str, Any] | None:
    data = section.data
    if data is None:
        return {}
    if not isinstance(data, dict):
        problems.append(f"{section.doc.where(section.path)}: must be a mapping")
        return None
    return data


def _tables(
    section: Section | None, problems: list[str], env: Mapping[str, str] | None
) -> Mapping[str, Mapping[str, str]]:
    if section is None:
        return MappingProxyType({})
    data = _mapping(section, problems)
    if data is None:
        return MappingProxyType({})
    doc = section.doc
    out: dict[str, Mapping[str, str]] = {}
    for name, table in data.items():
        path = (*section.path, name)
        if not _EXTRACT_NAME.fullmatch(str(name)) or "." in str(name):
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


def _channels(
    section: Section | None,
    problems: list[str],
    env: Mapping[str, str] | None,
    practice: PracticeSpec | None = None,
) -> dict[str, ChannelSpec]:
    if section is None:
        return {}
    data = _mapping(section, problems)
    if data is None:
        return {}
    doc = section.doc
    top = Reader(doc, section.path, problems, env)
    out: dict[str, ChannelSpec] = {}
    for name in data:
        top.raw(name)
        if not _NAME.fullmatch(str(name)):
            top.fail(name, "channel names are lower-case letters, digits, - and _")
            continue
        r = top.child(name)
        if not isinstance(data[name], dict):
            continue
        kind = r.choice("type", tuple(CHANNEL_TYPES), "")
        if not r.has("type"):
            r.fail("type", f"is required (one of {', '.join(CHANNEL_TYPES)})")
        r.text("description")
        r.flag("enabled", True)
        settings: dict[str, Any] = {}
        for key in CHANNEL_TYPES.get(kind, ()):
            if not r.has(key):
                r.raw(key)
                continue
            value = r.raw(key)
            if key in SECRET_KEYS and not (isinstance(value, str) and "${" in value):
                r.fail(key, "secrets never live in routes.yaml: use ${env:NAME} or ${file:/path}")
            settings[key] = value
        if kind == "mllp":
            r.text("host", required=True)
            r.integer("port", 0, required=True, lo=1, hi=65535)
        if kind == "direct":
            _direct_settings(r, settings)
        if r.has("max_attempts"):
            settings["max_attempts"] = r.integer("max_attempts", 8, lo=1, hi=1000)
        if r.has("concurrency"):
            settings["concurrency"] = r.integer("concurrency", 4, lo=1, hi=256)
        for key in ("retry_base", "retry_cap"):
            if r.has(key):
                settings[key] = _seconds(r, key)
        allow_specialty = practice.sms_may_name_specialty if practice else False
        templates = _channel_templates(r, kind, doc, allow_specialty)
        r.done(allowed=tuple(CHANNEL_TYPES.get(kind, ())))
        out[str(name)] = ChannelSpec(
            str(name), kind, MappingProxyType(templates), MappingProxyType(settings)
        )
    return out


# A Direct channel's inbound SMTP listener (engine.delivery.direct_inbound; docs/direct.md).
DIRECT_INBOUND_KEYS: Final = ("host", "port", "hostname", "tls_cert", "tls_key", "require_tls")
# Its IMAP mailbox, polled instead of or beside the listener
# (channels.direct.inbound.ImapPoller; docs/direct.md, "What comes back").
DIRECT_IMAP_KEYS: Final = (
    "host",
    "port",
    "username",
    "password",
    "mailbox",
    "interval",
    "tls",
    "ca_file",
)


def _direct_settings(r: Reader, settings: dict[str, Any]) -> None:
    """Checks a ``direct`` channel's typed settings (file:line on every problem)."""
    for key in ("address", "hisp_host", "cert", "key"):
        if not r.has(key):
            r.fail(key, "is required for a direct channel")
    if r.has("mdn_timeout"):
        settings["mdn_timeout"] = _seconds(r, "mdn_timeout")
    if r.has("attach_original"):
        settings["attach_original"] = r.flag("attach_original")
    if r.has("hisp_port"):
        settings["hisp_port"] = r.integer("hisp_port", 587, lo=1, hi=65535)
    if r.has("inbound"):
        _direct_inbound(r.child("inbound"))
    if r.has("imap"):
        _direct_imap(r.child("imap"))
    if (r.has("inbound") or r.has("imap")) and not r.has("trust_anchors"):
        r.fail("trust_anchors", "is required to accept inbound Direct mail")


def _direct_inbound(inbound: Reader) -> None:
    inbound.text("host", "127.0.0.1")
    inbound.integer("port", 2525, lo=0, hi=65535)
    inbound.text("hostname")
    require_tls = inbound.flag("require_tls", True)
    for key in ("tls_cert", "tls_key"):
        value = inbound.raw(key)
        if value is None:
            if require_tls:
                inbound.fail(key, "is required unless require_tls is false")
        elif not (isinstance(value, str) and value.strip().startswith("${file:")):
            inbound.fail(key, "must be a ${file:/path} reference")
    inbound.done()


def _direct_imap(imap: Reader) -> None:
    host = imap.text("host", required=True).strip()
    imap.integer("port", 993, lo=1, hi=65535)
    imap.text("username", required=True)
    password = imap.raw("password")
    if password is None:
        imap.fail("password", "is required")
    elif not (isinstance(password, str) and "${" in password):
        imap.fail("password", "secrets never live in routes.yaml: use ${env:NAME} or ${file:/path}")
    mailbox = imap.text("mailbox", "INBOX")
    if not mailbox.strip() or not mailbox.isascii():
        imap.fail("mailbox", "must be a non-empty ASCII mailbox name")
    imap.number("interval", 60.0, lo=1.0)
    # RFC 8314 §3.2 (implicit TLS); plaintext only for a test server on this machine.
    if not imap.flag("tls", True) and host and not is_loopback(host):
        imap.fail("tls", f"may be false only for a loopback host (127.0.0.1, ::1), not {host!r}")
    ca_file = imap.raw("ca_file")
    if ca_file is not None and file_ref(str(ca_file)) is None:
        imap.fail("ca_file", "must be a ${file:/path} reference")
    imap.done(allowed=DIRECT_IMAP_KEYS)


def _seconds(r: Reader, key: str) -> float:
    """A duration setting: seconds as a number, or ``90m``/``24h``/``7d``/``2w``."""
    raw = r.raw(key)
    if isinstance(raw, (int, float)) and not isinstance(raw, bool) and raw > 0:
        return float(raw)
    seconds = _duration(str(raw)) if isinstance(raw, str) else None
    if not seconds:
        r.fail(key, "must be a positive number of seconds or a duration like 30m, 6h")
        return 1.0
    return float(seconds)


def _channel_templates(
    r: Reader, kind: str, doc: Doc, allow_specialty: bool = False
) -> dict[str, str]:
    if not r.has("templates"):
        r.raw("templates")
        return {}
    data = r.raw("templates")
    path = (*r.path, "templates")
    if not isinstance(data, dict):
        r.fail("templates", "must be a mapping of template name: text or {file: path}")
        return {}
    env = make_environment()
    out: dict[str, str] = {}
    for name, value in data.items():
        where = doc.where((*path, name))
        if isinstance(value, dict):
            unknown = set(value) - {"file"}
            if unknown or "file" not in value:
                r.problems.append(f"{where}: a template is text or {{file: path}}")
                continue
            file = Path(str(value["file"]))
            if not file.is_absolute():
                file = Path(doc.file).parent / file
            try:
                text = file.read_text(encoding="utf-8")
            except OSError as exc:
                r.problems.append(f"{where}: cannot read template file: {exc.strerror}")
                continue
        elif isinstance(value, str):
            text = value
        else:
            r.problems.append(f"{where}: a template is text or {{file: path}}")
            continue
        try:
            env.parse(text)
        except Exception as exc:  # jinja2.TemplateSyntaxError
            r.problems.append(f"{where}: template syntax error: {getattr(exc, 'message', exc)}")
            continue
        if kind in ("sms", "voice"):
            # SMS and automated calls are not secure channels (DESIGN.md: PHI never
            # leaves through SMS): the template may use only the allow-list of
            # channels.sms.templates.
            sms_problems = check_sms_template(text, allow_specialty)
            if sms_problems:
                r.problems.extend(f"{where}: {p} (no PHI over SMS)" for p in sms_problems)
                continue
        out[str(name)] = text
    return out


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


def _duration(text: str) -> int | None:
    m = _DURATION.fullmatch(text.strip())
    if not m:
        return None
    return int(m[1]) * {"m": 60, "h": 3600, "d": 86400, "w": 604800}[m[2]]


def _send_target(r: Reader, channels: Mapping[str, ChannelSpec]) -> tuple[str, str]:
    channel = r.text("channel", required=True)
    template = r.text("template", "")
    if channel and channel not in channels:
        known = ", ".join(sorted(channels)) or "none are defined"
        r.fail("channel", f"unknown channel {channel!r} (channels: {known})")
    elif channel:
        spec = channels[channel]
        if not r.has("template"):
            r.fail("template", "is required")
        elif template not in spec.templates:
            known = ", ".join(sorted(spec.templates)) or "it has none"
            r.fail("template", f"unknown template {template!r} of channel {channel!r} ({known})")
    return channel, template


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
    if name and not _NAME.fullmatch(name):
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
        resources, predicate = _fhir_when(r, ("when",))
    elif when is not None:
        types, predicate = _when(r, ("when",))
    extracts, names = _extracts(r, compiler, fhir=fhir)
    actions = _actions(r, compiler, channels, names, extracts, fhir=fhir)
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
        type_names=() if fhir else _named_types(when),
    )


def _named_types(when: Any) -> tuple[str, ...]:
    """The ``type:`` patterns of a compiled (valid) HL7 ``when``, nested ``any`` included."""
    if not isinstance(when, dict):
        return ()
    value = when.get("type")
    values = value if isinstance(value, list) else [] if value is None else [value]
    nested = when.get("any")
    subs = [n for sub in (nested if isinstance(nested, list) else []) for n in _named_types(sub)]
    return tuple(str(v).strip().upper() for v in values) + tuple(subs)


# -- when ---------------------------------------------------------------------------


def _when(r: Reader, key: PathT) -> tuple[re.Pattern[str] | None, Predicate | None]:
    doc = r.doc
    path = (*r.path, *key)
    data: Any = r.data
    for k in key:
        data = data[k]
    if data is None:
        return None, None
    if not isinstance(data, dict):
        r.problems.append(f"{doc.where(path)}: must be a mapping (type: and field predicates)")
        return None, None
    types: re.Pattern[str] | None = None
    checks: list[Predicate] = []
    for k, value in data.items():
        kpath = (*path, k)
        if k == "type":
            types = _type_patterns(value, kpath, doc, r.problems)
        elif k == "any":
            if not isinstance(value, list) or not value:
                r.problems.append(f"{doc.where(kpath)}: must be a non-empty list of conditions")
                continue
            alternatives: list[Predicate] = []
            for j in range(len(value)):
                sub_types, sub_pred = _when(r, (*key, k, j))
                alternatives.append(_combine(sub_types, sub_pred))
            alts = tuple(alternatives)
            checks.append(_any_of(alts))
        elif _LOOKS_LIKE_PATH.match(str(k)):
            try:
                tp = TersePath.parse(str(k))
            except ValueError as exc:
                r.problems.append(f"{doc.where(kpath)}: {exc}")
                continue
            test = _predicate(value, kpath, doc, r.problems)
            if test is not None:
                checks.append(_field_check(tp, test))
        else:
            r.problems.append(
                f"{doc.where(kpath)}: unknown key (expected type, any, or a terse path "
                "like PID.3.1 or PRD(RT).7)"
            )
    if not checks:
        return types, None
    if len(checks) == 1:
        return types, checks[0]
    all_checks = tuple(checks)
    return types, lambda m: all(c(m) for c in all_checks)


def _fhir_when(r: Reader, key: PathT) -> tuple[frozenset[str] | None, Predicate | None]:
    """``when`` of a FHIR route: ``resource`` (a type, a list, or ``*``), FHIR paths as
    keys (``Appointment.status: booked``) with the same predicates as terse paths, and
    ``any``. Returns the resource types and the predicate."""
    doc = r.doc
    path = (*r.path, *key)
    data: Any = r.data
    for k in key:
        data = data[k]
    resources: frozenset[str] | None = None
    checks: list[Predicate] = []
    for k, value in data.items():
        kpath = (*path, k)
        if k == "resource" and len(key) == 1:
            items = value if isinstance(value, list) else [value]
            ok = [v for v in items if isinstance(v, str) and (v == "*" or FHIR_TYPE.fullmatch(v))]
            if not items or len(ok) != len(items):
                r.problems.append(
                    f"{doc.where(kpath)}: a FHIR resource type like ServiceRequest, a list of "
                    "them, or *"
                )
                continue
            resources = frozenset(ok)
        elif k == "any":
            if not isinstance(value, list) or not value:
                r.problems.append(f"{doc.where(kpath)}: must be a non-empty list of conditions")
                continue
            alternatives: list[Predicate] = []
            for j, alt in enumerate(value):
                if not isinstance(alt, dict):
                    r.problems.append(f"{doc.where((*kpath, j))}: must be a mapping of paths")
                    continue
                _, sub = _fhir_when(r, (*key, k, j))
                alternatives.append(sub if sub is not None else (lambda m: True))
            checks.append(_any_of(tuple(alternatives)))
        elif FHIR_TYPE.match(str(k)):
            try:
                fp = FhirPath.parse(str(k))
            except ValueError as exc:
                r.problems.append(f"{doc.where(kpath)}: {exc}")
                continue
            test = _predicate(value, kpath, doc, r.problems)
            if test is not None:
                checks.append(_fhir_check(fp, test))
        else:
            r.problems.append(
                f"{doc.where(kpath)}: unknown key (expected resource, any, or a FHIR path "
                "like Appointment.status)"
            )
    if not checks:
        return resources, None
    if len(checks) == 1:
        return resources, checks[0]
    all_checks = tuple(checks)
    return resources, lambda m: all(c(m) for c in all_checks)


FHIR_TYPE: Final = re.compile(r"[A-Z][A-Za-z]{1,63}")


def _fhir_check(path: FhirPath, test: ValueTest) -> Predicate:
    return lambda res: test(path.texts(res.data))


def _combine(types: re.Pattern[str] | None, pred: Predicate | None) -> Predicate:
    def check(m: Message) -> bool:
        if types is not None and not types.match(m.msh.message_type):
            return False
        return pred is None or pred(m)

    return check


def _type_patterns(
    value: Any, path: PathT, doc: Doc, problems: list[str]
) -> re.Pattern[str] | None:
    items = value if isinstance(value, list) else [value]
    regexes: list[str] = []
    for j, item in enumerate(items):
        where = doc.where((*path, j) if isinstance(value, list) else path)
        if not isinstance(item, str):
            problems.append(f"{where}: a message type is text like SIU^S12 or SIU^S1*")
            continue
        pattern = item.strip().upper()
        if not _TYPE_PATTERN.fullmatch(pattern):
            problems.append(
                f"{where}: bad message type pattern {item!r} (expected TYPE^TRIGGER, "
                "wildcards * ? [..] allowed)"
            )
            continue
        if "^" not in pattern:
            regexes.append(fnmatch.translate(pattern))
            pattern += "^*"
        regexes.append(fnmatch.translate(pattern))
    if not regexes:
        return None
    return re.compile("|".join(f"(?:{x})" for x in regexes))


ValueTest = Callable[[list[str]], bool]


def _codes(value: Any) -> str | None:
    if isinstance(value, bool) or value is None or isinstance(value, (dict, list)):
        return None
    return str(value).strip().upper()


def _predicate(value: Any, path: PathT, doc: Doc, problems: list[str]) -> ValueTest | None:
    """A predicate on the values at a path. Scalars compare equal, lists mean ``in``;
    comparisons ignore case and surrounding spaces (table 0278 has both Booked and BOOKED)."""
    where = doc.where(path)
    if isinstance(value, list):
        return _predicate({"in": value}, path, doc, problems)
    if not isinstance(value, dict):
        code = _codes(value)
        if code is None:
            problems.append(
                f"{where}: must be a code, a list of codes or a mapping of "
                f"{', '.join(PREDICATE_OPS)} (quote YES/NO/ON/OFF codes)"
            )
            return None
        return _equals(code)
    if not value:
        problems.append(f"{where}: an empty predicate")
        return None
    tests: list[ValueTest] = []
    for op, arg in value.items():
        opwhere = doc.where((*path, op))
        if op == "equals":
            code = _codes(arg)
            if code is None:
                problems.append(f"{opwhere}: must be a code (quote YES/NO/ON/OFF codes)")
                continue
            tests.append(_equals(code))
        elif op == "in":
            codes = [_codes(a) for a in arg] if isinstance(arg, list) else [None]
            if not codes or any(c is None for c in codes):
                problems.append(
                    f"{opwhere}: must be a non-empty list of codes (quote YES/NO/ON/OFF codes)"
                )
                continue
            allowed = frozenset(c for c in codes if c is not None)
            tests.append(_in(allowed))
        elif op == "matches":
            if not isinstance(arg, str):
                problems.append(f"{opwhere}: must be a regular expression (text)")
                continue
            try:
                rx = re.compile(arg)
            except re.error as exc:
                problems.append(f"{opwhere}: bad regular expression: {exc}")
                continue
            tests.append(_matches(rx))
        elif op == "exists":
            if not isinstance(arg, bool):
                problems.append(f"{opwhere}: must be true or false")
                continue
            tests.append(_exists(arg))
        elif op == "not":
            inner = _predicate(arg, (*path, op), doc, problems)
            if inner is not None:
                tests.append(_negate(inner))
        else:
            problems.append(f"{opwhere}: unknown predicate (one of {', '.join(PREDICATE_OPS)})")
    if not tests:
        return None
    if len(tests) == 1:
        return tests[0]
    all_tests = tuple(tests)
    return lambda vs: all(t(vs) for t in all_tests)


def _any_of(alternatives: tuple[Predicate, ...]) -> Predicate:
    return lambda m: any(a(m) for a in alternatives)


def _equals(code: str) -> ValueTest:
    return lambda vs: any(v.strip().upper() == code for v in vs)


def _in(allowed: frozenset[str]) -> ValueTest:
    return lambda vs: any(v.strip().upper() in allowed for v in vs)


def _matches(rx: re.Pattern[str]) -> ValueTest:
    return lambda vs: any(rx.search(v) for v in vs)


def _exists(want: bool) -> ValueTest:
    return lambda vs: any(v.strip() for v in vs) == want


def _negate(inner: ValueTest) -> ValueTest:
    return lambda vs: not inner(vs)


def _field_check(path: TersePath, test: ValueTest) -> Predicate:
    if path.repetition == -1:
        return lambda m: test(m.get_all(path))
    return lambda m: test([m.get(path)])


# -- extract ------------------------------------------------------------------------


def _extracts(
    r: Reader, compiler: Compiler, *, fhir: bool = False
) -> tuple[tuple[Extract, ...], list[str]]:
    doc = r.doc
    builtins = FHIR_BUILTIN_NAMES if fhir else BUILTIN_NAMES
    names: list[str] = []
    if not r.has("extract"):
        r.raw("extract")
        return (), names
    data = r.raw("extract")
    path = (*r.path, "extract")
    if not isinstance(data, dict):
        r.problems.append(f"{doc.where(path)}: must be a mapping of name: path or expression")
        return (), names
    out: list[Extract] = []
    for name, value in data.items():
        kpath = (*path, name)
        where = doc.where(kpath)
        if not _EXTRACT_NAME.fullmatch(str(name)):
            r.problems.append(
                f"{where}: extract names are lower-case words, optionally one dotted "
                "level (specialist.npi); a leading _ marks a helper"
            )
            continue
        ex = _value(str(name), value, where, compiler, [*builtins, *names], r.problems, fhir=fhir)
        if ex is not None:
            out.append(ex)
        names.append(str(name).split(".")[0])
        names.append(str(name))
    return tuple(out), names


def _value(
    name: str,
    value: Any,
    where: str,
    compiler: Compiler,
    visible: Iterable[str],
    problems: list[str],
    *,
    fhir: bool = False,
) -> Extract | None:
    """One value spec: "PID.3.1" (a path; in a FHIR route "Appointment.start"),
    "{{ expr }}" (an expression), {value: x} or a non-text scalar (a constant)."""
    if isinstance(value, str):
        if is_template(value):
            try:
                return Extract(name, expr=compiler.compile(value, visible))
            except CompileProblem as exc:
                problems.append(f"{where}: {exc}")
                return None
        if fhir:
            try:
                return Extract(name, fpath=FhirPath.parse(value))
            except ValueError as exc:
                problems.append(
                    f"{where}: {exc} (an expression must be inside {{{{ }}}}; a constant is "
                    "{value: ...})"
                )
                return None
        try:
            tp = TersePath.parse(value)
        except ValueError as exc:
            problems.append(
                f"{where}: {exc} (an expression must be inside {{{{ }}}}; a constant is "
                "{value: ...})"
            )
            return None
        return Extract(name, path=tp, many=tp.repetition == -1)
    if isinstance(value, dict):
        if set(value) != {"value"}:
            problems.append(f"{where}: a mapping here must be {{value: constant}}")
            return None
        return Extract(name, constant=value["value"])
    if value is None or isinstance(value, (bool, int, float)):
        return Extract(name, constant=value)
    problems.append(f"{where}: must be a terse path, an expression in {{{{ }}}} or a constant")
    return None


# -- then ---------------------------------------------------------------------------


def _actions(
    r: Reader,
    compiler: Compiler,
    channels: Mapping[str, ChannelSpec],
    names: list[str],
    extracts: tuple[Extract, ...],
    *,
    fhir: bool = False,
) -> tuple[ActionSpec, ...]:
    doc = r.doc
    path = (*r.path, "then")
    if not r.has("then"):
        r.fail("then", "is required (a list of actions: track, send, forward, drop)")
        return ()
    data = r.raw("then")
    if isinstance(data, dict):
        data = [data]
        items: list[tuple[PathT, Any]] = [(path, data[0])]
    elif isinstance(data, list) and data:
        items = [((*path, i), a) for i, a in enumerate(data)]
    else:
        r.fail("then", "must be a non-empty list of actions")
        return ()
    out: list[ActionSpec] = []
    for apath, item in items:
        where = doc.where(apath)
        if not isinstance(item, dict) or len(item) != 1:
            r.problems.append(f"{where}: each action is a mapping with one of {', '.join(ACTIONS)}")
            continue
        ((action, arg),) = item.items()
        kpath = (*apath, action)
        kwhere = doc.where(kpath)
        if action == "track":
            if not isinstance(arg, str) or arg not in EVENT_TYPES:
                r.problems.append(
                    f"{kwhere}: unknown event kind {arg!r} (one of {', '.join(EVENT_TYPES)})"
                )
                continue
            out.append(ActionSpec("track", track=_track_spec(arg, extracts)))
        elif action == "send":
            if not isinstance(arg, dict):
                r.problems.append(f"{kwhere}: must be a mapping of channel, template, to")
                continue
            sr = Reader(doc, kpath, r.problems, r.env)
            channel, template = _send_target(sr, channels)
            to: Extract | None = None
            if not sr.has("to"):
                sr.fail("to", "is required (a terse path or an expression)")
            else:
                to = _value(
                    "to",
                    sr.raw("to"),
                    doc.where((*kpath, "to")),
                    compiler,
                    [*(FHIR_BUILTIN_NAMES if fhir else BUILTIN_NAMES), *names],
                    r.problems,
                    fhir=fhir,
                )
            sr.done()
            out.append(ActionSpec("send", channel=channel, template=template, to=to))
        elif action == "forward":
            if fhir:
                r.problems.append(f"{kwhere}: a FHIR resource cannot be forwarded over MLLP")
                continue
            target: Any = arg.get("channel") if isinstance(arg, dict) else arg
            cwhere = doc.where((*kpath, "channel")) if isinstance(arg, dict) else kwhere
            if isinstance(arg, dict) and set(arg) - {"channel"}:
                r.problems.append(f"{kwhere}: forward takes only channel")
            if not isinstance(target, str) or target not in channels:
                known = ", ".join(sorted(channels)) or "none are defined"
                r.problems.append(f"{cwhere}: unknown channel {target!r} (channels: {known})")
                continue
            if channels[target].type != "mllp":
                r.problems.append(f"{cwhere}: forward needs an mllp channel, not {target!r}")
                continue
            out.append(ActionSpec("forward", channel=target))
        elif action == "drop":
            if not isinstance(arg, str) or not arg.strip():
                r.problems.append(f"{kwhere}: must be a reason (text)")
                continue
            out.append(ActionSpec("drop", reason=arg.strip()))
        else:
            r.problems.append(f"{kwhere}: unknown action (one of {', '.join(ACTIONS)})")
    if any(a.action == "drop" for a in out) and len(out) > 1:
        r.problems.append(f"{doc.where(path)}: drop cannot be combined with other actions")
    tracked = [a.track.kind for a in out if a.track is not None]
    if tracked:
        for ex in extracts:
            if ex.name.startswith("_"):
                continue
            if not any(ex.name in EVENT_TARGETS[k] for k in tracked):
                fields_ = sorted({n for k in tracked for n in EVENT_TARGETS[k]})
                r.problems.append(
                    f"{doc.where((*r.path, 'extract', ex.name))}: {ex.name!r} is not a field of "
                    f"{' or '.join(tracked)} (fields: {', '.join(fields_)}; prefix helpers with _)"
                )
    return tuple(out)


def _track_spec(kind: str, extracts: tuple[Extract, ...]) -> TrackSpec:
    targets = EVENT_TARGETS[kind]
    pairs = tuple((ex.name, targets[ex.name]) for ex in extracts if ex.name in targets)
    return TrackSpec(kind=kind, cls=EVENT_TYPES[kind], targets=pairs)


# ---------------------------------------------------------------------------
# Deciding: the pure core


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
    variables: dict[str, Any] = {
        "message_type": mt,
        "trigger": message.msh.trigger,
        "source": source,
    }
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
    variables: dict[str, Any] = {
        "message_type": rt,
        "trigger": "",
        "source": source,
        "resource_ref": resource.reference,
        "version_id": resource.version_id,
    }
    routes = [
        route
        for route in table.routes
        if route.resources is not None
        and ("*" in route.resources or rt in route.resources)
        and (route.sources is None or source in route.sources)
    ]
    when = instant(resource.last_updated) or received_at
    return _decide(routes, resource, variables, message_id, when, rt)


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


def _run(
    route: Route, message: Any, variables: dict[str, Any], message_id: int, when: float
) -> list[Action]:
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
    out: list[Action] = []
    for spec in route.actions:
        if spec.track is not None:
            out.append(Track(route.name, _build(spec.track, values, message_id, when)))
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


def _build(
    spec: TrackSpec,
    values: Mapping[str, Any],
    message_id: int,
    when: float,
) -> Event:
    """The event of one ``track`` action; ``when`` is the message's own time, used when
    the route extracts no ``occurred_at``."""
    kwargs: dict[str, Any] = {}
    ids: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for name, targets in spec.targets:
        raw = values.get(name)
        for t in targets:
            try:
                v = t.coerce(raw)
            except RenderError as exc:
                raise RenderError(f"extract {name}: {exc}") from None
            if v is _EMPTY:
                continue
            if t.group == "ids":
                ids[t.name] = v
            elif t.group:
                nested.setdefault(t.group, {})[t.name] = v
            else:
                kwargs[t.name] = v
    if not (ids.get("placer_number") or ids.get("filler_numbers") or ids.get("patient_ids")):
        raise RenderError(
            f"track {spec.kind}: no identifiers (placer_number, filler_numbers and "
            "patient_ids are all empty)"
        )
    for group, sub in nested.items():
        cls = _nested_type(str(spec.cls.__dataclass_fields__[group].type))
        if cls is not None:
            kwargs[group] = cls(**sub)
    if "occurred_at" not in kwargs:
        kwargs["occurred_at"] = when
    return spec.cls(ids=Identifiers(**ids), message_id=message_id, **kwargs)


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


# ---------------------------------------------------------------------------
# Applying decisions: the processor's handler


class Tracker(Protocol):
    """The referral tracker as the handler sees it (engine.tracking.tracker, another issue).
    ``apply`` runs inside the processing transaction and must not commit; applying the
    same event twice must change nothing."""

    def apply(self, event: Event, conn: Conn) -> object: ...


def fingerprint(event: Event) -> str:
    """A stable digest of a whole event (kind included): the tracker's too
    (:func:`engine.canonical.event_fingerprint`)."""
    return event_fingerprint(event)


def already_applied(event: Event, applied: frozenset[str]) -> bool:
    """Whether a decision that recorded the fingerprints ``applied`` handed this event to
    the tracker, in either the canonical or the pre-canonical digest form."""
    return event_fingerprint(event) in applied or legacy_event_fingerprint(event) in applied


_KEY_FIELDS: Final = (
    "appointment_id",
    "start",
    "report_id",
    "status",
    "surviving_id",
    "retired_id",
    "specialty_category",
    "priority",
)


def canonical_actions(
    actions: Iterable[Mapping[str, Any]], decision: Decision
) -> tuple[dict[str, Any], ...]:
    """Stored action summaries with the pre-canonical fingerprint of one of ``decision``'s
    events rewritten in the canonical form, so a replay compares like with like."""
    legacy = {legacy_event_fingerprint(e): event_fingerprint(e) for e in decision.events}
    return tuple(
        {**a, "fingerprint": legacy.get(str(a["fingerprint"]), a["fingerprint"])}
        if a.get("action") == "track"
        else dict(a)
        for a in actions
    )


def summarise(decision: Decision) -> list[dict[str, Any]]:
    """The decision's actions as JSON-able summaries (what the decisions table keeps).
    Free text (reasons, names, contact details, ``to``) is not kept, only fingerprinted."""
    out: list[dict[str, Any]] = []
    for a in decision.actions:
        if isinstance(a, Track):
            ev = a.event
            keys: dict[str, Any] = {
                k: v for k, v in dataclasses.asdict(ev.ids).items() if v not in ("", ())
            }
            for k in _KEY_FIELDS:
                v = getattr(ev, k, "")
                if v not in ("", None):
                    keys[k] = v
            out.append(
                {
                    "action": "track",
                    "route": a.route,
                    "kind": ev.kind,
                    "keys": keys,
                    "fingerprint": fingerprint(ev),
                }
            )
        elif isinstance(a, Send):
            digest = hashlib.sha256(a.to.encode()).hexdigest()[:16]
            out.append(
                {
                    "action": "send",
                    "route": a.route,
                    "channel": a.channel,
                    "template": a.template,
                    "to_digest": digest,
                }
            )
        elif isinstance(a, Forward):
            out.append({"action": "forward", "route": a.route, "channel": a.channel})
        else:
            out.append({"action": "drop", "route": a.route, "reason": a.reason})
    return out


def decide_stored(table: RouteTable, row: StoredMessage) -> Decision:
    """:func:`decide` for an inbox row: decode its bytes first (an undecodable message
    is an ``error`` decision, not an exception). FHIR resources go to :func:`decide_fhir`."""
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


class RouteHandler:
    """The processor's handler: decide, apply, record. ``table`` may be swapped (hot
    reload) between messages; a message is always handled by one table."""

    def __init__(
        self,
        table: RouteTable,
        db: Database,
        tracker: Tracker | None = None,
        *,
        clock: Clock | None = None,
        metrics: Metrics | None = None,
    ):
        self.table = table
        self.db = db
        self.decisions = Decisions(db)
        self.tracker = tracker
        self.clock = clock or WallClock()
        self.metrics = metrics
        self.enqueued = 0  # outbox rows queued by send/forward since take_enqueued()

    def __call__(self, row: StoredMessage, conn: Conn) -> Outcome:
        return self.process(row, conn)

    def process(
        self,
        row: StoredMessage,
        conn: Conn,
        *,
        replayed_by: str = "",
        decision: Decision | None = None,
        resend: bool = False,
    ) -> Outcome:
        """Decide (unless ``decision`` is given), hand new ``track`` events to the
        tracker, record the decision. Events whose fingerprint the message's previous
        decision already applied are not applied again (replay idempotence).

        ``send``/``forward`` actions become outbox rows in the same transaction (the
        dispatcher sends them after the commit): on first processing, and on a replay
        only with ``resend``. Keys are ``route:<message id>:<action index>`` (a resend
        adds the replay time), so processing a message again never queues it twice.
        """
        started = time.perf_counter()
        table = self.table
        if decision is None:
            decision = decide_stored(table, row)
        previous = self.decisions.get(row.id, conn)
        applied = previous.fingerprints if previous is not None else frozenset()
        summary = summarise(decision)
        if decision.status == "routed":
            send = resend or not replayed_by
            referral_id: int | None = None  # of the route's last track: its sends' referral
            route = ""
            for index, action in enumerate(decision.actions):
                if action.route != route:
                    route, referral_id = action.route, None
                if isinstance(action, Track) and self.tracker is not None:
                    if not already_applied(action.event, applied):
                        result = self.tracker.apply(action.event, conn)
                        ids = getattr(result, "referral_ids", ())
                        referral_id = ids[0] if ids else referral_id
                    elif send and action.event.ids.placer_number:  # a --resend replay
                        ids_ = action.event.ids
                        found = referrals.find_by_key(
                            conn, ids_.sending_facility, ids_.placer_number
                        )
                        referral_id = found if found is not None else referral_id
                elif isinstance(action, Send | Forward) and send:
                    self._enqueue(conn, row, index, action, referral_id, resend=resend)
        self.decisions.record(
            conn,
            row.id,
            status=decision.status,
            route=decision.route,
            reason=decision.reason,
            actions=summary,
            decided_at=self.clock.now(),
            replayed_by=replayed_by,
        )
        if self.metrics is not None:
            self._count(decision, time.perf_counter() - started)
        return Outcome(decision.status, decision.reason, decision.route)

    def _enqueue(
        self,
        conn: Conn,
        row: StoredMessage,
        index: int,
        action: Send | Forward,
        referral_id: int | None,
        *,
        resend: bool,
    ) -> None:
        """One outbox row for a route's ``send`` or ``forward``."""
        now = self.clock.now()
        key = f"route:{row.id}:{index}" + (f":resend:{now:.6f}" if resend else "")
        payload: dict[str, Any] = {"route": action.route, "message_id": row.id}
        if isinstance(action, Send):
            template = action.template
            payload["to"] = action.to
            payload["values"] = action.values
        else:
            template = "forward"
            payload["hl7_b64"] = base64.b64encode(row.raw).decode("ascii")
        body = canonical_json(payload)
        if referrals.enqueue_outbox(
            conn, referral_id, action.channel, template, body, key, now, now=now
        ):
            self.enqueued += 1

    def take_enqueued(self) -> int:
        """Outbox rows queued since the last call (the engine wakes the dispatcher)."""
        n, self.enqueued = self.enqueued, 0
        return n

    def _count(self, decision: Decision, seconds: float) -> None:
        m = self.metrics
        assert m is not None
        if decision.status == "error":
            for name in decision.routes[-1:]:
                m.route_errors.labels(name).inc()
        elif decision.routes:
            for name in decision.routes:
                m.route_matched.labels(name).inc()
        if not decision.routes:
            m.route_filtered.inc()
        m.route_seconds.labels(decision.routes[0] if decision.routes else "none").observe(seconds)


def make_handler(
    config: Config,
    db: Database,
    tracker: Tracker | None = None,
    *,
    clock: Clock | None = None,
    metrics: Metrics | None = None,
) -> RouteHandler:
    """Compile ``config``'s routes (ConfigError on problems) into a processor handler;
    ``metrics`` learns the message types they name (its bounded ``type`` label set)."""
    table = compile_config(config)
    if metrics is not None:
        metrics.name_message_types(table.message_types)
    return RouteHandler(table, db, tracker, clock=clock, metrics=metrics)


def previous_decision(db: Database, message_id: int) -> DecisionRow | None:
    """The recorded decision of a message, or None (also on a database without the table)."""
    decisions = Decisions(db)
    if not decisions.available():
        return None
    return decisions.get(message_id)
