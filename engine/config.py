"""routes.yaml: loaded once, validated loudly, frozen.

Every error names ``file:line`` and the key path (``routes.yaml:41 routes[3].then[0].channel:
unknown channel 'faxx'``); all errors in a file are reported together. Values may reference
``${env:NAME}``, ``${env:NAME:-default}``, ``${NAME:-default}`` and ``${file:/path}`` so no
secret sits in the file. This is the only module that reads the environment.

This module parses the sections the engine core needs (``store``, ``http``, ``sources``)
and keeps the others as located raw trees (:class:`Section`) for the modules that compile
them (``engine.routing.compile`` for ``routes`` and ``tables``).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, TypeVar, cast
from urllib.parse import urlsplit

import yaml

from engine.errors import ConfigError

PathT = tuple[str | int, ...]
T = TypeVar("T")

TOP_LEVEL: Final = (
    "version",
    "store",
    "http",
    "sources",
    "routes",
    "tables",
    "channels",
    "escalation",
    "practice",
    "retention",
    "processing",
)

_SUBST = re.compile(r"\$\{(?:(env|file):)?([^}:]+?)(?::-([^}]*))?\}")


def format_path(path: PathT) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top)"


# ---------------------------------------------------------------------------
# Loading YAML with line numbers


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (a silent override is a config bug)."""


_SCALARS: Final = yaml.constructor.SafeConstructor()


@dataclass
class Doc:
    """A YAML document as plain Python values plus the line of every node."""

    file: str
    data: Any
    lines: dict[PathT, int] = field(default_factory=dict)

    def line(self, path: PathT) -> int:
        """The line of ``path``, or of its nearest ancestor that has one."""
        p = tuple(path)
        while p:
            if p in self.lines:
                return self.lines[p]
            p = p[:-1]
        return self.lines.get((), 1)

    def where(self, path: PathT) -> str:
        return f"{self.file}:{self.line(path)} {format_path(path)}"


def parse_yaml(text: str, file: str) -> Doc:
    """Parse YAML text into a :class:`Doc`; syntax errors become ConfigError with the line."""
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise ConfigError(f"{file}:{line} (yaml): {exc.problem or exc}") from None
    doc = Doc(file=file, data=None)
    problems: list[str] = []
    if node is None:
        doc.data = {}
        return doc
    doc.data = _convert(node, (), doc, problems)
    if problems:
        raise ConfigError(problems)
    return doc


def _convert(node: yaml.Node, path: PathT, doc: Doc, problems: list[str]) -> Any:
    doc.lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            if not isinstance(key_node, yaml.ScalarNode):
                problems.append(f"{doc.file}:{key_node.start_mark.line + 1}: keys must be text")
                continue
            if key == "<<":
                problems.append(
                    f"{doc.file}:{key_node.start_mark.line + 1}: merge keys are not supported"
                )
                continue
            if key in out:
                problems.append(
                    f"{doc.file}:{key_node.start_mark.line + 1} {format_path((*path, key))}: "
                    "duplicate key"
                )
                continue
            doc.lines[(*path, key)] = key_node.start_mark.line + 1
            out[key] = _convert(value_node, (*path, key), doc, problems)
            if isinstance(value_node, (yaml.MappingNode, yaml.SequenceNode)):
                # point errors about the whole value at its key's line
                doc.lines[(*path, key)] = key_node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_convert(v, (*path, i), doc, problems) for i, v in enumerate(node.value)]
    return _SCALARS.construct_object(node)  # SafeLoader's ints, bools, nulls


# ---------------------------------------------------------------------------
# Substitution


def substitute(value: str, *, env: Mapping[str, str] | None = None) -> str:
    """Replace ``${env:NAME}``, ``${env:NAME:-default}``, ``${NAME:-default}`` and
    ``${file:/path}`` in ``value``. Raises ValueError naming what is missing (never the
    value of anything)."""
    environ = os.environ if env is None else env

    def repl(m: re.Match[str]) -> str:
        kind, name, default = m.group(1) or "env", m.group(2).strip(), m.group(3)
        if kind == "file":
            try:
                return Path(name).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ValueError(f"cannot read ${{file:{name}}}: {exc.strerror}") from None
        if name in environ and environ[name] != "":
            return environ[name]
        if default is not None:
            return default
        raise ValueError(f"environment variable {name} is not set and has no default")

    return _SUBST.sub(repl, value)


def file_ref(value: str) -> str | None:
    """The path of a bare ``${file:/path}`` reference (for certificates and keys, which
    are passed to libraries as paths), else None."""
    m = _SUBST.fullmatch(value.strip())
    if m and m.group(1) == "file":
        return m.group(2).strip()
    return None


# ---------------------------------------------------------------------------
# A small reader for typed sections


class Reader:
    """Reads one mapping of a :class:`Doc`, collecting problems instead of stopping at
    the first. Call :meth:`done` to report keys nobody asked for.
    """

    def __init__(
        self,
        doc: Doc,
        path: PathT,
        problems: list[str],
        env: Mapping[str, str] | None = None,
    ):
        self.doc = doc
        self.path = path
        self.problems = problems
        self.env = env
        value = doc.data
        for part in path:
            value = value[part]
        if value is None:
            value = {}
        if not isinstance(value, dict):
            self.fail((), f"must be a mapping, not {type(value).__name__}")
            value = {}
        self.data: dict[str, Any] = value
        self._seen: set[str] = set()

    def fail(self, key: str | int | PathT, message: str) -> None:
        sub: PathT = key if isinstance(key, tuple) else (key,)
        self.problems.append(f"{self.doc.where((*self.path, *sub))}: {message}")

    def child(self, key: str) -> Reader:
        self._seen.add(key)
        return Reader(self.doc, (*self.path, key), self.problems, self.env)

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str, default: Any = None) -> Any:
        self._seen.add(key)
        return self.data.get(key, default)

    def _scalar(self, key: str, default: Any, required: bool) -> Any:
        self._seen.add(key)
        if key not in self.data or self.data[key] is None:
            if required:
                self.fail(key, "is required")
            return default
        value = self.data[key]
        if isinstance(value, str) and "${" in value:
            try:
                value = substitute(value, env=self.env)
            except ValueError as exc:
                self.fail(key, str(exc))
                return default
        return value

    def text(self, key: str, default: str = "", *, required: bool = False) -> str:
        value = self._scalar(key, default, required)
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            self.fail(key, f"must be text, not {type(value).__name__}")
            return default
        return str(value)

    def integer(
        self,
        key: str,
        default: int = 0,
        *,
        required: bool = False,
        lo: int | None = None,
        hi: int | None = None,
    ) -> int:
        value = self._scalar(key, default, required)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, f"must be a whole number, not {value!r}")
            return default
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            self.fail(key, f"must be between {lo} and {hi}, not {value}")
            return default
        return value

    def number(self, key: str, default: float = 0.0, *, lo: float = 0.0) -> float:
        value = self._scalar(key, default, False)
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(key, f"must be a number, not {value!r}")
            return default
        if value < lo:
            self.fail(key, f"must be at least {lo}, not {value}")
            return default
        return float(value)

    def flag(self, key: str, default: bool = False) -> bool:
        value = self._scalar(key, default, False)
        if isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        if not isinstance(value, bool):
            self.fail(key, f"must be true or false, not {value!r}")
            return default
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.text(key, default)
        if value not in choices:
            self.fail(key, f"must be one of {', '.join(choices)}, not {value!r}")
            return default
        return value

    def texts(self, key: str) -> tuple[str, ...]:
        self._seen.add(key)
        value = self.data.get(key)
        if value is None:
            return ()
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, (str, int)) for v in value):
            self.fail(key, "must be a list of text values")
            return ()
        return tuple(str(v) for v in value)

    def items(self, key: str) -> Iterator[tuple[int, Reader]]:
        """Each entry of a list of mappings, as a Reader."""
        self._seen.add(key)
        value = self.data.get(key)
        if value is None:
            return
        if not isinstance(value, list):
            self.fail(key, "must be a list")
            return
        for i, _ in enumerate(value):
            yield i, Reader(self.doc, (*self.path, key, i), self.problems, self.env)

    def done(self, allowed: tuple[str, ...] = ()) -> None:
        for key in self.data:
            if key not in self._seen and key not in allowed:
                self.fail(key, "unknown key")


# ---------------------------------------------------------------------------
# The sections the core needs

AckMode = Literal["original", "enhanced"]
AckWhen = Literal["on-commit", "on-processed"]
Synchronous = Literal["full", "normal"]


@dataclass(frozen=True, slots=True)
class TlsConfig:
    cert_file: str
    key_file: str
    ca_file: str = ""  # trusted CAs for client certificates
    require_client_cert: bool = False
    allowed_subjects: tuple[str, ...] = ()  # client certificate subject CNs allowed


@dataclass(frozen=True, slots=True)
class MllpSource:
    name: str
    host: str = "127.0.0.1"
    port: int = 2575
    ack_mode: AckMode = "original"
    ack_when: AckWhen = "on-commit"
    max_frame_bytes: int = 16 * 1024 * 1024
    idle_timeout: float = 300.0
    frame_timeout: float = 60.0  # a started frame must finish within this (slowloris)
    max_connections: int = 256
    max_connections_per_peer: int = 64  # per peer IP address (docs/listener.md)
    max_batch_messages: int = 2000  # messages in one frame; more: the frame is rejected AR
    max_stray_bytes: int = 4096  # bytes outside a frame since the last frame, then closed
    write_timeout: float = 60.0  # ACKs left unread by the peer this long: connection closed
    allow_peers: tuple[str, ...] = ()  # CIDRs; empty = any
    tls: TlsConfig | None = None
    kind: str = "mllp"
    proxy_trusted: tuple[str, ...] = ()  # load balancers that send PROXY v2 (scale-out.md)

    def peer_allowed(self, host: str) -> bool:
        if not self.allow_peers:
            return True
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(addr in ipaddress.ip_network(net, strict=False) for net in self.allow_peers)


FhirAuthType = Literal["smart", "bearer", "none"]
JwtAlg = Literal["RS384", "ES384"]
# FHIR R4 resource types the poller searches by default (docs/fhir.md).
FHIR_DEFAULT_RESOURCES: Final = (
    "ServiceRequest",
    "Appointment",
    "DiagnosticReport",
    "DocumentReference",
    "Task",
)


@dataclass(frozen=True, slots=True)
class FhirAuth:
    """How a FHIR source authenticates. ``key`` (PEM) and ``token`` are secrets: never
    in a repr, a log line or an error."""

    type: FhirAuthType = "none"
    client_id: str = ""
    token_url: str = ""
    key: str = field(default="", repr=False)
    key_id: str = ""  # JWT header "kid" (the key's id in the registered JWK Set)
    alg: JwtAlg = "RS384"
    scope: str = "system/*.read"
    token: str = field(default="", repr=False)


@dataclass(frozen=True, slots=True)
class FhirQuery:
    """One search the poller repeats: ``GET [base]/<type>?<params>&_lastUpdated=gt..``."""

    type: str
    params: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class FhirWriteBack:
    task: bool = False
    communication: bool = False


@dataclass(frozen=True, slots=True)
class FhirSource:
    """A ``sources.<name>`` of ``type: fhir`` (engine.ingest.fhir)."""

    name: str
    base_url: str
    auth: FhirAuth = FhirAuth()
    resources: tuple[FhirQuery, ...] = tuple(FhirQuery(t) for t in FHIR_DEFAULT_RESOURCES)
    poll_interval: float = 60.0  # seconds between searches (0: subscriptions only)
    page_size: int = 100  # _count
    overlap: float = 300.0  # seconds searched again behind the cursor
    timeout: float = 30.0  # per HTTP request
    max_retries: int = 5  # per request, on 429 / 5xx / transport errors
    subscription_secret: str = field(default="", repr=False)  # "" = no /hooks/fhir/<name>
    subscription_header: str = "Authorization"
    write_back: FhirWriteBack = FhirWriteBack()
    kind: str = "fhir"


@dataclass(frozen=True, slots=True)
class HttpConfig:
    host: str = "127.0.0.1"
    port: int = 8575
    enabled: bool = True
    admin_token: str = ""  # bearer token for /api/ and /admin/ (loopback-only admin if empty)
    # The URL providers call us at, as configured with them (Twilio signs it): scheme, host,
    # optional port and path prefix, e.g. https://refloop.example.org. "" = no /hooks/.
    public_url: str = ""
    # HMAC key (>= 32 bytes, ${file:}) of the /confirm/<token> links; "" = not mounted.
    confirm_key: str = field(default="", repr=False)
    # Host header values (host names, no port) the server answers; () = the default list
    # (engine.web.server.allowed_hosts: the bind address, localhost, loopback, public_url's host).
    allowed_hosts: tuple[str, ...] = ()


STORE_SCHEMES: Final = ("postgresql://", "postgres://", "sqlite://")


@dataclass(frozen=True, slots=True)
class StoreConfig:
    file: str = "refloop.db"  # relative to the state directory
    synchronous: Synchronous = "full"
    # postgresql://… (docs/scale-out.md), sqlite:///path or a bare path; "" = <state>/<file>
    url: str = field(default="", repr=False)
    pool_min: int = 2  # PostgreSQL connection pool per process
    pool_max: int = 8
    node_id: str = ""  # this node in outbox claims ("" = hostname:pid)
    lease_seconds: float = 30.0  # how long an outbox claim holds without renewal
    # idle processing looks for other nodes' rows this often when nothing woke it (the
    # fallback of LISTEN/NOTIFY on PostgreSQL); ACK waiters every fifth of it
    poll_seconds: float = 1.0

    def location(self, state_dir: str | os.PathLike[str], override: str = "") -> str:
        """Where the store is: ``override`` (``refloop run --store``), else ``url``, else
        ``<state_dir>/<file>``."""
        return override or self.url or str(Path(state_dir) / self.file)


@dataclass(frozen=True, slots=True)
class RetentionConfig:
    """``retention:``: how long PHI is kept (docs/operations.md, "Retention"). Each period
    is in days; None keeps that kind forever (``forever`` in routes.yaml)."""

    enabled: bool = True
    closed_referral_days: int | None = 400  # message bytes, after the referral closed
    unreferred_days: int | None = 30  # message bytes of no referral, after receipt
    error_days: int | None = 400  # bytes of messages processing failed on, after receipt
    quarantine_days: int | None = 90  # quarantined Direct mail, after receipt
    outbox_days: int | None = 90  # payloads of sent or cancelled outbox rows
    parked_days: int | None = 180  # parked events never linked: their data, after parking
    sms_reply_days: int | None = 90  # a patient's SMS reply: its text and number, after receipt
    every_minutes: int = 60  # between runs of the daemon's pruner
    batch: int = 200  # most rows one pruning transaction touches


@dataclass(frozen=True, slots=True)
class ProcessingConfig:
    """``processing:``: where routes and the tracker run (docs/architecture.md,
    "Processes"). ``workers: 1`` (the default) runs them in a worker process that
    ``refloop run`` starts and supervises; ``0`` in the daemon's own event loop."""

    workers: int = 1


RETENTION_PERIODS: Final = (
    "closed_referral_days",
    "unreferred_days",
    "error_days",
    "quarantine_days",
    "outbox_days",
    "parked_days",
    "sms_reply_days",
)


@dataclass(frozen=True, slots=True)
class Section:
    """A located raw section for a later compiler (routes, tables, channels, ...)."""

    doc: Doc
    path: PathT

    @property
    def data(self) -> Any:
        value = self.doc.data
        for part in self.path:
            value = value[part]
        return value


@dataclass(frozen=True)
class Config:
    file: str
    store: StoreConfig
    http: HttpConfig
    sources: tuple[MllpSource, ...]
    sections: Mapping[str, Section]
    env: Mapping[str, str] | None = None
    fhir_sources: tuple[FhirSource, ...] = ()
    retention: RetentionConfig = RetentionConfig()
    processing: ProcessingConfig = ProcessingConfig()

    def source(self, name: str) -> MllpSource:
        for s in self.sources:
            if s.name == name:
                return s
        raise KeyError(name)


def load(path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None) -> Config:
    """Load and validate the core of a routes.yaml. Raises ConfigError with every problem."""
    file = str(path)
    try:
        text = Path(file).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read: {exc.strerror}") from None
    return loads(text, file=file, env=env)


def loads(text: str, *, file: str = "routes.yaml", env: Mapping[str, str] | None = None) -> Config:
    doc = parse_yaml(text, file)
    problems: list[str] = []
    top = Reader(doc, (), problems, env)
    if top.problems:
        raise ConfigError(problems)
    version = top.integer("version", 1)
    if version != 1:
        top.fail("version", f"this refloop reads version 1 files, not {version}")
    store = _store(top.child("store")) if top.has("store") else StoreConfig()
    http = _http(top.child("http")) if top.has("http") else HttpConfig()
    retention = _retention(top.child("retention")) if top.has("retention") else RetentionConfig()
    processing = (
        _processing(top.child("processing")) if top.has("processing") else ProcessingConfig()
    )
    sources, fhir_sources = _sources(top, problems)
    sections: dict[str, Section] = {}
    for name in ("routes", "tables", "channels", "escalation", "practice"):
        top.raw(name)
        if name in top.data:
            sections[name] = Section(doc, (name,))
    top.done()
    if problems:
        raise ConfigError(problems)
    return Config(
        file=file,
        store=store,
        http=http,
        sources=sources,
        sections=sections,
        env=env,
        fhir_sources=fhir_sources,
        retention=retention,
        processing=processing,
    )


def _processing(r: Reader) -> ProcessingConfig:
    cfg = ProcessingConfig(workers=r.integer("workers", 1, lo=0, hi=1))
    r.done()
    return cfg


def _retention(r: Reader) -> RetentionConfig:
    defaults = RetentionConfig()
    periods: dict[str, int | None] = {}
    for key in RETENTION_PERIODS:
        value = r.raw(key)
        if value == "forever":
            periods[key] = None
        elif isinstance(value, str) and not value.strip().isdigit():
            r.fail(key, f"must be a number of days or forever, not {value!r}")
            periods[key] = getattr(defaults, key)
        else:
            periods[key] = r.integer(key, getattr(defaults, key), lo=1, hi=36500)
    cfg = RetentionConfig(
        enabled=r.flag("enabled", True),
        every_minutes=r.integer("every_minutes", defaults.every_minutes, lo=1, hi=10080),
        batch=r.integer("batch", defaults.batch, lo=1, hi=10000),
        **periods,
    )
    r.done()
    return cfg


def _store(r: Reader) -> StoreConfig:
    url = r.text("url", "").strip()
    if "://" in url and not url.startswith(STORE_SCHEMES):
        r.fail("url", "must be postgresql://…, sqlite:///path or a file path")
    pool_min, pool_max = 2, 8
    if r.has("pool"):
        p = r.child("pool")
        pool_min = p.integer("min", pool_min, lo=1, hi=200)
        pool_max = p.integer("max", max(pool_max, pool_min), lo=1, hi=200)
        if pool_max < pool_min:
            p.fail("max", f"must be at least min ({pool_min}), not {pool_max}")
        p.done()
    cfg = StoreConfig(
        file=r.text("file", "refloop.db"),
        synchronous=cast(Synchronous, r.choice("synchronous", ("full", "normal"), "full")),
        url=url,
        pool_min=pool_min,
        pool_max=pool_max,
        node_id=r.text("node_id", ""),
        lease_seconds=r.number("lease_seconds", 30.0, lo=1.0),
        poll_seconds=r.number("poll_seconds", 1.0, lo=0.05),
    )
    r.done()
    return cfg


def _http(r: Reader) -> HttpConfig:
    cfg = HttpConfig(
        host=r.text("host", "127.0.0.1"),
        port=r.integer("port", 8575, lo=0, hi=65535),
        enabled=r.flag("enabled", True),
        admin_token=r.text("admin_token", ""),
        public_url=r.text("public_url", "").rstrip("/"),
        confirm_key=r.text("confirm_key", ""),
        allowed_hosts=tuple(h.strip().lower() for h in r.texts("allowed_hosts")),
    )
    if any(not h or "/" in h or " " in h for h in cfg.allowed_hosts):
        r.fail("allowed_hosts", "must be host names or addresses (no scheme, path or spaces)")
    if cfg.public_url:
        url = urlsplit(cfg.public_url)
        loopback = url.hostname in ("127.0.0.1", "::1", "localhost")
        if url.scheme != "https" and not (url.scheme == "http" and loopback):
            r.fail("public_url", "must be an https:// URL (http only for a loopback test host)")
        elif not url.hostname or url.query or url.fragment:
            r.fail("public_url", "must be scheme://host[:port][/prefix], no query or fragment")
    if cfg.confirm_key and len(cfg.confirm_key.encode()) < 32:
        r.fail("confirm_key", "must be at least 32 bytes (use ${file:/path})")
    r.done()
    return cfg


def _sources(
    top: Reader, problems: list[str]
) -> tuple[tuple[MllpSource, ...], tuple[FhirSource, ...]]:
    if not top.has("sources"):
        top.raw("sources")
        return (), ()
    sources_reader = top.child("sources")
    out: list[MllpSource] = []
    fhir: list[FhirSource] = []
    for name, value in sources_reader.data.items():
        sources_reader.raw(name)
        if not re.fullmatch(r"[a-z][a-z0-9_-]*", str(name)):
            sources_reader.fail(name, "source names are lower-case letters, digits, - and _")
        r = sources_reader.child(name)
        if not isinstance(value, dict):
            continue
        kind = r.choice("type", ("mllp", "fhir"), "mllp")
        if kind == "fhir":
            fhir.append(_fhir_source(str(name), r))
            continue
        tls = _tls(r.child("tls")) if r.has("tls") else None
        out.append(
            MllpSource(
                name=str(name),
                host=r.text("host", "127.0.0.1"),
                port=r.integer("port", 2575, lo=0, hi=65535),
                ack_mode=cast(AckMode, r.choice("ack_mode", ("original", "enhanced"), "original")),
                ack_when=cast(
                    AckWhen, r.choice("ack_when", ("on-commit", "on-processed"), "on-commit")
                ),
                max_frame_bytes=r.integer("max_frame_bytes", 16 * 1024 * 1024, lo=1024),
                idle_timeout=r.number("idle_timeout", 300.0),
                frame_timeout=r.number("frame_timeout", 60.0),
                max_connections=r.integer("max_connections", 256, lo=1),
                max_connections_per_peer=r.integer("max_connections_per_peer", 64, lo=1),
                max_batch_messages=r.integer("max_batch_messages", 2000, lo=1),
                max_stray_bytes=r.integer("max_stray_bytes", 4096, lo=16),
                write_timeout=r.number("write_timeout", 60.0),
                allow_peers=_cidrs(r, "allow_peers"),
                tls=tls,
                proxy_trusted=_proxy_protocol(r, tls is not None),
            )
        )
        r.done()
    return tuple(out), tuple(fhir)


def _proxy_protocol(r: Reader, tls: bool) -> tuple[str, ...]:
    """``proxy_protocol: {trusted: [CIDR, ...]}`` on an MLLP source."""
    if not r.has("proxy_protocol"):
        return ()
    pr = r.child("proxy_protocol")
    trusted = _cidrs(pr, "trusted")
    if not trusted:
        pr.fail("trusted", "list the load balancers' addresses (CIDRs) that send PROXY v2")
    if tls:
        r.fail("proxy_protocol", "not yet supported together with tls (terminate TLS first)")
    pr.done()
    return trusted


_FHIR_TYPE: Final = re.compile(r"[A-Z][A-Za-z]{1,63}")


def _secret(r: Reader, key: str, *, required: bool) -> str:
    """A secret value: it must be a ${env:...} or ${file:...} reference."""
    raw = r.data.get(key)
    if raw is not None and not (isinstance(raw, str) and "${" in raw):
        r._seen.add(key)
        r.fail(key, "secrets never live in routes.yaml: use ${env:NAME} or ${file:/path}")
        return ""
    return r.text(key, "", required=required)


def _fhir_source(name: str, r: Reader) -> FhirSource:
    base_url = r.text("base_url", required=True).rstrip("/")
    if base_url and not re.match(r"https?://[^/]+", base_url):
        r.fail("base_url", "must be an http(s) URL")
    auth = _fhir_auth(r.child("auth")) if r.has("auth") else FhirAuth()
    queries: list[FhirQuery] = []
    if r.has("resources"):
        raw = r.raw("resources")
        if not isinstance(raw, list) or not raw:
            r.fail("resources", "must be a non-empty list of resource types or {type, params}")
        else:
            for i, item in enumerate(raw):
                if isinstance(item, str):
                    q = FhirQuery(item)
                elif isinstance(item, dict):
                    qr = Reader(r.doc, (*r.path, "resources", i), r.problems, r.env)
                    params = qr.raw("params") or {}
                    if not isinstance(params, dict) or not all(
                        isinstance(v, (str, int)) and not isinstance(v, bool)
                        for v in params.values()
                    ):
                        qr.fail("params", "must be a mapping of search parameter: value")
                        params = {}
                    q = FhirQuery(
                        qr.text("type", required=True),
                        tuple((str(k), str(v)) for k, v in params.items()),
                    )
                    for k, _ in q.params:
                        if k in ("_lastUpdated", "_count", "_sort"):
                            qr.fail(("params", k), "is set by the poller")
                    qr.done()
                else:
                    r.fail(("resources", i), "must be a resource type or {type, params}")
                    continue
                if not _FHIR_TYPE.fullmatch(q.type):
                    r.fail(("resources", i), f"not a FHIR resource type: {q.type!r}")
                    continue
                queries.append(q)
    sub_secret, sub_header = "", "Authorization"
    if r.has("subscription"):
        sr = r.child("subscription")
        sub_secret = _secret(sr, "secret", required=True)
        sub_header = sr.text("header", "Authorization")
        sr.done()
    write_back = FhirWriteBack()
    if r.has("write_back"):
        wr = r.child("write_back")
        write_back = FhirWriteBack(wr.flag("task", False), wr.flag("communication", False))
        wr.done()
    source = FhirSource(
        name=name,
        base_url=base_url,
        auth=auth,
        resources=tuple(queries) or tuple(FhirQuery(t) for t in FHIR_DEFAULT_RESOURCES),
        poll_interval=r.number("poll_interval", 60.0),
        page_size=r.integer("page_size", 100, lo=1, hi=1000),
        overlap=r.number("overlap", 300.0),
        timeout=r.number("timeout", 30.0, lo=0.1),
        max_retries=r.integer("max_retries", 5, lo=0, hi=20),
        subscription_secret=sub_secret,
        subscription_header=sub_header,
        write_back=write_back,
    )
    r.done()
    return source


def _fhir_auth(r: Reader) -> FhirAuth:
    kind = cast(FhirAuthType, r.choice("type", ("smart", "bearer", "none"), "none"))
    if not r.has("type"):
        r.fail("type", "is required (smart, bearer or none)")
    if kind == "bearer":
        auth = FhirAuth(type="bearer", token=_secret(r, "token", required=True))
    elif kind == "smart":
        alg = cast(JwtAlg, r.choice("alg", ("RS384", "ES384"), "RS384"))
        token_url = r.text("token_url", required=True)
        if token_url and not re.match(r"https?://[^/]+", token_url):
            r.fail("token_url", "must be an http(s) URL")
        key = _secret(r, "key", required=True)
        if key:
            problem = _check_private_key(key, alg)
            if problem:
                r.fail("key", problem)
        auth = FhirAuth(
            type="smart",
            client_id=r.text("client_id", required=True),
            token_url=token_url,
            key=key,
            key_id=r.text("key_id", ""),
            alg=alg,
            scope=r.text("scope", "system/*.read"),
        )
    else:
        auth = FhirAuth()
    r.done()
    return auth


def _check_private_key(pem: str, alg: str) -> str:
    """Why ``pem`` cannot sign ``alg`` JWTs, or "" (never quotes the key)."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError):
        return "not an unencrypted PEM private key"
    if alg == "RS384" and not isinstance(key, rsa.RSAPrivateKey):
        return "RS384 needs an RSA private key"
    if alg == "ES384" and not (
        isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    ):
        return "ES384 needs an EC P-384 private key"
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size < 2048:
        return "RSA keys must be at least 2048 bits"
    return ""


def _cidrs(r: Reader, key: str) -> tuple[str, ...]:
    values = r.texts(key)
    for i, v in enumerate(values):
        try:
            ipaddress.ip_network(v, strict=False)
        except ValueError:
            r.fail((key, i), f"not an IP address or network: {v!r}")
    return values


def _tls(r: Reader) -> TlsConfig:
    def path_of(key: str, required: bool) -> str:
        r._seen.add(key)
        raw = r.data.get(key)
        if raw is None:
            if required:
                r.fail(key, "is required")
            return ""
        ref = file_ref(str(raw))
        if ref is None:
            r.fail(key, "must be a ${file:/path} reference")
            return ""
        if not Path(ref).is_file():
            r.fail(key, f"file not found: {ref}")
        return ref

    cfg = TlsConfig(
        cert_file=path_of("cert", True),
        key_file=path_of("key", True),
        ca_file=path_of("ca", False),
        require_client_cert=r.flag("require_client_cert", False),
        allowed_subjects=r.texts("allowed_subjects"),
    )
    if (cfg.require_client_cert or cfg.allowed_subjects) and not cfg.ca_file:
        r.fail("ca", "is required when client certificates are required or allowed_subjects is set")
    r.done()
    return cfg


def check_all(loaders: list[Callable[[], object]]) -> list[str]:
    """Run several validation steps, collecting every ConfigError's problems."""
    problems: list[str] = []
    for step in loaders:
        try:
            step()
        except ConfigError as exc:
            problems.extend(exc.problems)
    return problems
