"""The analyst's view of the sources and the routes: the Sources page, ``GET
/api/sources`` and ``refloop sources status`` (one function, :func:`source_status`, for
all three), and *Try a message* over the daemon's running routes (:class:`Workbench`).

Figures per source (an MLLP listener, a FHIR source, inbound Direct mail):

- from the database: messages received today (UTC) by status, the newest message, the
  newest ``error``/``rejected`` message and its reason (engine.store.source_status);
- live, from the daemon's metrics: open connections (``refloop_connections_open``) and
  its newest problem (``refloop_source_last_error_timestamp_seconds{source,kind}``: a
  framing error, a refused connection, a failed FHIR poll). The daemon reads its own
  metrics objects; the CLI reads the same series from ``GET /metrics``.

No figure carries message content.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from engine.clock import isoformat
from engine.config import Config
from engine.errors import MessageRejected
from engine.metrics import Metrics
from engine.routing.table import RouteTable
from engine.routing.trial import MAX_SAMPLES, read_samples, try_samples
from engine.store import source_status as store
from engine.store.sql import Conn

DAY: Final = 86400.0
STATUSES: Final = ("received", "routed", "filtered", "error", "rejected")
# refloop_source_last_error_timestamp_seconds' kind label, in words
PROBLEMS: Final[dict[str, str]] = {
    "oversize": "a frame over max_frame_bytes (connection closed)",
    "garbage": "bytes that are not MLLP framing (connection closed)",
    "timeout": "a frame not finished within frame_timeout (connection closed)",
    "stray": "too many bytes outside any frame (connection closed)",
    "unread": "the peer left its ACKs unread (connection closed)",
    "refused-limit": "connection refused: max_connections reached",
    "refused-per-peer": "connection refused: max_connections_per_peer reached",
    "refused-allowlist": "connection refused: address not in allow",
    "refused-subject": "connection refused: client certificate subject not allowed",
    "poll": "FHIR poll failed (see the daemon's log)",
}
Sample = tuple[str, Mapping[str, str], float]  # (series name, labels, value)


@dataclass(frozen=True, slots=True)
class Source:
    name: str
    kind: str  # mllp, fhir, direct
    address: str


def configured_sources(config: Config, ports: Mapping[str, int] | None = None) -> list[Source]:
    """The sources routes.yaml configures, in file order: MLLP, FHIR, then ``direct``
    when a channel of type direct exists (its inbound mail is stored as source
    ``direct``). ``ports``: the ports the daemon's listeners are bound to (port 0 in
    routes.yaml asks the system for one)."""
    bound = ports or {}
    out = [
        Source(
            s.name, "mllp", f"{s.host}:{bound.get(s.name, s.port)}" + (" (TLS)" if s.tls else "")
        )
        for s in config.sources
    ]
    out += [Source(s.name, "fhir", s.base_url) for s in config.fhir_sources]
    section = config.sections.get("channels")
    data = section.data if section is not None else None
    if isinstance(data, Mapping):
        direct = [
            str(v.get("address", name))
            for name, v in data.items()
            if isinstance(v, Mapping) and v.get("type") == "direct"
        ]
        if direct:
            out.append(Source("direct", "direct", ", ".join(direct)))
    return out


def live_from_samples(samples: Iterable[Sample]) -> dict[str, dict[str, Any]]:
    """source → ``connections_open`` and newest problem (``error_at``, ``error_kind``)
    from metric samples."""
    out: dict[str, dict[str, Any]] = {}
    for name, labels, value in samples:
        source = labels.get("source", "")
        if not source:
            continue
        entry = out.setdefault(source, {})
        if name == "refloop_connections_open":
            entry["connections_open"] = int(value)
        elif name == "refloop_source_last_error_timestamp_seconds" and value > entry.get(
            "error_at", 0.0
        ):
            entry["error_at"] = value
            entry["error_kind"] = labels.get("kind", "")
    return out


def metrics_samples(metrics: Metrics) -> list[Sample]:
    """The live series of :func:`live_from_samples` from the daemon's own metrics."""
    return [
        (s.name, s.labels, s.value)
        for metric in (metrics.connections, metrics.source_error_at)
        for family in metric.collect()
        for s in family.samples
    ]


def exposition_samples(text: str) -> list[Sample]:
    """The same series from a ``GET /metrics`` body (what the CLI reads)."""
    from prometheus_client.parser import text_string_to_metric_families

    return [
        (s.name, s.labels, s.value)
        for family in text_string_to_metric_families(text)
        if family.name
        in ("refloop_connections_open", "refloop_source_last_error_timestamp_seconds")
        for s in family.samples
    ]


def source_status(
    conn: Conn,
    config: Config,
    now: float,
    live: Mapping[str, Mapping[str, Any]] | None,
    ports: Mapping[str, int] | None = None,
) -> list[dict[str, Any]]:
    """One dict per configured source (and any other source with messages today):
    ``name``, ``kind``, ``address``, ``connections_open`` (MLLP, when ``live`` is known;
    else null), ``last_message_at``, ``today`` (status → count, every status),
    ``today_total``, ``last_error_at``, ``last_error``. Times are ISO 8601 UTC or null.
    ``live`` None: the daemon's figures are unknown (not running, or not reachable)."""
    day = now - now % DAY
    counts = store.counts_since(conn, day)
    sources = configured_sources(config, ports)
    known = {s.name for s in sources}
    sources += [Source(n, "other", "") for n in sorted(counts) if n not in known]
    names = [s.name for s in sources]
    last = store.last_received(conn, names, day)
    failures = store.last_failures(conn, names)
    out: list[dict[str, Any]] = []
    for s in sources:
        today = {status: counts.get(s.name, {}).get(status, 0) for status in STATUSES}
        mine = (live or {}).get(s.name, {})
        error_at: float | None = None
        error = ""
        failure = failures.get(s.name)
        if failure is not None:
            error_at = failure.received_at
            error = f"message {failure.message_id} {failure.status}: {failure.error}".rstrip(": ")
        if mine.get("error_at") and (error_at is None or mine["error_at"] > error_at):
            error_at = float(mine["error_at"])
            kind = str(mine.get("error_kind", ""))
            error = PROBLEMS.get(kind, kind)
        connections: int | None = None
        if live is not None and s.kind == "mllp":
            connections = int(mine.get("connections_open", 0))
        out.append(
            {
                "name": s.name,
                "kind": s.kind,
                "address": s.address,
                "connections_open": connections,
                "last_message_at": isoformat(last[s.name]) if s.name in last else None,
                "today": today,
                "today_total": sum(today.values()),
                "last_error_at": isoformat(error_at) if error_at is not None else None,
                "last_error": error,
            }
        )
    return out


@dataclass
class Workbench:
    """The daemon's side of the analyst's tools: ``config()`` and ``table()`` are the
    running routes.yaml and its compiled routes (None: no routes), which follow reloads."""

    config: Callable[[], Config]
    table: Callable[[], RouteTable | None]
    metrics: Metrics
    ports: Callable[[], Mapping[str, int]] = dict  # the listeners' bound ports

    def sources(self, conn: Conn, now: float) -> list[dict[str, Any]]:
        live = live_from_samples(metrics_samples(self.metrics))
        return source_status(conn, self.config(), now, live, self.ports())

    def source_names(self) -> list[str]:
        return [s.name for s in configured_sources(self.config())]

    def try_messages(self, data: bytes, source: str = "") -> dict[str, Any]:
        """What the running routes would do with the messages in ``data``; stores and
        sends nothing. Raises MessageRejected when ``data`` holds no message."""
        table = self.table()
        if table is None:
            raise MessageRejected("routes.yaml has no routes section")
        cfg = self.config()
        samples = read_samples(data)
        mllp = source or (cfg.sources[0].name if cfg.sources else "test")
        fhir = source or (cfg.fhir_sources[0].name if cfg.fhir_sources else mllp)
        items = try_samples(table, samples, mllp, fhir)
        return {"items": items, "not_tried": max(0, len(samples) - MAX_SAMPLES)}
