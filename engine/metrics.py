"""Prometheus metrics. One object built with the registry it registers in (tests pass a
fresh ``CollectorRegistry()``); modules receive it instead of using globals.

Label values are bounded, never PHI, and never chosen by a peer: source, route and
channel names come from routes.yaml; a message's ``type`` label is one of the message
types the routes name (:class:`TypeLabels`), else ``other``; every other label is a
fixed vocabulary of refloop's own (ACK codes, results, reasons, kinds).

The exposition (``GET /metrics``) is generated in a worker thread
(:meth:`Metrics.exposition`), not on the event loop that writes ACKs; collectors that
read the store (:class:`StoreCollector`) run their queries back on the loop's thread,
which owns the connection.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import fnmatch
import logging
import os
import re
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Final

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

_TYPE = re.compile(r"[A-Z0-9]{3}(\^[A-Z0-9]{3})?")
LATENCY_BUCKETS: Final = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip


OTHER: Final = "other"
LABEL_CACHE: Final = 4096  # codes remembered by TypeLabels (a spray of codes: cleared)
STORE_READ_SECONDS: Final = 5.0  # how long a scrape's worker waits for a store read


class _Merged:
    """A registry's families passed through ``merge`` at collect time (for
    ``generate_latest``, which only calls ``collect``)."""

    def __init__(self, registry: CollectorRegistry, merge: Callable[[list[Metric]], list[Metric]]):
        self.registry = registry
        self.merge = merge

    def collect(self) -> Iterable[Metric]:
        return self.merge(list(self.registry.collect()))


class TypeLabels:
    """MSH-9 codes → a bounded set of label values. A code a route names exactly
    (``REF^I12``) is its own label; a code only wildcard patterns admit is labelled with
    the most specific of them as written (most literal characters: ``RRI^I13`` is
    ``RRI^I1[2-5]`` rather than ``RRI^*``); any other code, however well-formed, is
    ``other``: a sender inventing 50,000 codes makes no new series."""

    def __init__(self, names: Iterable[str] = ()):
        literal: set[str] = set()
        patterns: list[tuple[str, re.Pattern[str]]] = []
        for name in sorted(set(names)):
            if _TYPE.fullmatch(name):
                literal.add(name)
            else:  # routes read a bare ``ADT`` as ``ADT`` or ``ADT^*`` (engine.routing.when)
                forms = (name,) if "^" in name else (name, f"{name}^*")
                regex = "|".join(fnmatch.translate(f) for f in forms)
                patterns.append((name, re.compile(regex)))
        self.literal = frozenset(literal)
        self.patterns = tuple(sorted(patterns, key=lambda p: (-_literal_chars(p[0]), p[0])))
        self._cache: dict[str, str] = {}

    def __call__(self, code: str) -> str:
        label = self._cache.get(code)
        if label is None:
            label = self._label(code)
            if len(self._cache) >= LABEL_CACHE:
                self._cache.clear()
            self._cache[code] = label
        return label

    def _label(self, code: str) -> str:
        if not _TYPE.fullmatch(code):
            return OTHER
        if code in self.literal:
            return code
        return next((name for name, regex in self.patterns if regex.match(code)), OTHER)


def _literal_chars(pattern: str) -> int:
    return len(re.sub(r"\[[^\]]*\]|[*?]", "", pattern))


# The running loop of the scrape in hand, seen by StoreCollector in the worker thread
# (asyncio.to_thread copies the caller's context into the thread).
_SCRAPE_LOOP: contextvars.ContextVar[asyncio.AbstractEventLoop | None] = contextvars.ContextVar(
    "refloop_scrape_loop", default=None
)


class StoreCollector(Collector):
    """A collector that reads the store at scrape time: subclasses implement
    :meth:`read`. The store's connection belongs to the event loop's thread, so when
    :meth:`Metrics.exposition` formats in a worker thread, ``read`` is scheduled on the
    loop (``call_soon_threadsafe``) and the worker waits for its result; the loop spends
    the few queries, never the formatting. Called outside a scrape (a test's
    ``generate_latest``), ``read`` runs in place. A read that fails or does not come back
    within :data:`STORE_READ_SECONDS` leaves its samples out of that scrape."""

    def read(self) -> Iterable[Metric]:
        raise NotImplementedError

    def collect(self) -> Iterator[Metric]:
        loop = _SCRAPE_LOOP.get()
        if loop is None or _running_loop() is loop:
            return iter(list(self.read()))
        done: concurrent.futures.Future[list[Metric]] = concurrent.futures.Future()

        def on_loop() -> None:
            try:
                done.set_result(list(self.read()))
            except Exception as exc:  # delivered to the waiting worker
                done.set_exception(exc)

        try:
            loop.call_soon_threadsafe(on_loop)
            return iter(done.result(timeout=STORE_READ_SECONDS))
        except Exception:  # a scrape must not fail because the loop is busy or stopping
            log.warning("metrics: %s: cannot read the store", type(self).__name__)
            return iter(())


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class Metrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY):
        self.registry = registry
        self.type_labels = TypeLabels()  # until the routes name their types: all "other"
        self._scrape = asyncio.Lock()  # one exposition at a time, however many scrapers
        # the processing worker's figures folded into the exposition (engine.supervisor):
        # this process's families in, the merged families out
        self.merge: Callable[[list[Metric]], list[Metric]] | None = None
        self.before_scrape: Callable[[], Awaitable[None]] | None = None  # fetch them first
        self.messages_received = Counter(
            "refloop_messages_received_total",
            "Messages received and stored, by source and message type.",
            ["source", "type"],
            registry=registry,
        )
        self.duplicates = Counter(
            "refloop_messages_duplicate_total",
            "Identical resends ACKed again and not stored again.",
            ["source"],
            registry=registry,
        )
        self.acks = Counter(
            "refloop_acks_total",
            "ACKs sent, by source and code.",
            ["source", "code"],
            registry=registry,
        )
        self.ack_latency = Histogram(
            "refloop_ack_latency_seconds",
            "From a frame's last byte read to its ACK written.",
            ["source"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.connections = Gauge(
            "refloop_connections_open", "Open MLLP connections.", ["source"], registry=registry
        )
        self.connections_refused = Counter(
            "refloop_connections_refused_total",
            "Connections refused (limit, allowlist, client certificate).",
            ["source", "reason"],
            registry=registry,
        )
        self.frame_errors = Counter(
            "refloop_frame_errors_total",
            "MLLP framing problems, by kind (oversize, garbage, timeout, idle).",
            ["source", "kind"],
            registry=registry,
        )
        self.store_errors = Counter(
            "refloop_store_errors_total",
            "Failed database commits, by stage (inbox, processing, dispatch) and kind "
            "(full, io, locked, other).",
            ["stage", "kind"],
            registry=registry,
        )
        self.inbox_rows = Gauge(
            "refloop_inbox_rows", "Rows in the inbox (highest message id).", registry=registry
        )
        self.processing_lag = Gauge(
            "refloop_processing_lag_messages",
            "Stored messages not yet processed.",
            registry=registry,
        )
        self.worker_up = Gauge(
            "refloop_worker_up",
            "1 while the processing worker process is running and connected (0: down or "
            "restarting; absent with processing.workers 0).",
            registry=registry,
        )
        self.worker_restarts = Counter(
            "refloop_worker_restarts_total",
            "Times the processing worker process exited unexpectedly and was started again.",
            registry=registry,
        )
        self.inbox_writer_wait = Histogram(
            "refloop_inbox_writer_wait_seconds",
            "How long each inbox group commit waited for SQLite's write lock (held by "
            "processing, the dispatcher or another process).",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.processed = Counter(
            "refloop_messages_processed_total",
            "Messages processed, by outcome status.",
            ["status"],
            registry=registry,
        )
        # Routing (engine.routing.handler): labels are route names from routes.yaml, never content.
        self.route_matched = Counter(
            "refloop_route_matched_total",
            "Messages a route matched and routed (or dropped on purpose).",
            ["route"],
            registry=registry,
        )
        self.route_filtered = Counter(
            "refloop_route_filtered_total",
            "Messages no route matched.",
            registry=registry,
        )
        self.route_errors = Counter(
            "refloop_route_errors_total",
            "Messages a matching route failed on (an expression, missing identifiers).",
            ["route"],
            registry=registry,
        )
        self.route_seconds = Histogram(
            "refloop_route_seconds",
            "Time to decide and apply one message, by the first matching route ('none').",
            ["route"],
            buckets=(0.00001, 0.00002, 0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.005, 0.02),
            registry=registry,
        )
        self.config_reloads = Counter(
            "refloop_config_reloads_total",
            "routes.yaml reloads (SIGHUP or POST /admin/reload), by result (ok, invalid).",
            ["result"],
            registry=registry,
        )
        # Outbox dispatch (engine.delivery.dispatch): labels are channel names from routes.yaml.
        self.outbox_depth = Gauge(
            "refloop_outbox_depth",
            "Outbox rows pending or being sent, by channel.",
            ["channel"],
            registry=registry,
        )
        self.outbox_oldest = Gauge(
            "refloop_outbox_oldest_seconds",
            "Age of the oldest pending or sending outbox row, by channel (0: none).",
            ["channel"],
            registry=registry,
        )
        self.outbox_dead = Gauge(
            "refloop_outbox_dead",
            "Dead-lettered outbox rows waiting for an operator, by channel (alert on > 0).",
            ["channel"],
            registry=registry,
        )
        self.outbox_sends = Counter(
            "refloop_outbox_sends_total",
            "Send attempts by channel and result (sent, retry, dead, skipped).",
            ["channel", "result"],
            registry=registry,
        )
        self.outbox_lease_expired = Counter(
            "refloop_outbox_lease_expired_total",
            "Rows found sending past their lease and returned to pending (their node died "
            "or stalled mid-send; they go again with the same idempotency key), by channel.",
            ["channel"],
            registry=registry,
        )
        self.outbox_lease_lost = Counter(
            "refloop_outbox_lease_lost_total",
            "Send results not recorded because this node's claim on the row had expired "
            "and the row was claimed again, by channel.",
            ["channel"],
            registry=registry,
        )
        self.cluster_lease_held = Gauge(
            "refloop_cluster_lease_held",
            "1 while this node holds the lease (the once-per-installation work runs here), "
            "else 0; summed over the nodes it should be exactly 1.",
            ["lease"],
            registry=registry,
        )
        self.cluster_lease_lost = Counter(
            "refloop_cluster_lease_lost_total",
            "Times this node found its lease gone (renewal refused or not done in time) "
            "and stopped the leased work.",
            ["lease"],
            registry=registry,
        )
        self.store_notifications = Counter(
            "refloop_store_notifications_total",
            "PostgreSQL notifications from other nodes this node acted on, by kind "
            "(received: woke processing; processed: resolved ACK waiters; outbox: woke "
            "the dispatcher).",
            ["kind"],
            registry=registry,
        )
        self.store_listening = Gauge(
            "refloop_store_listening",
            "1 while this node's LISTEN connection to PostgreSQL is open (0: lost, "
            "polling meanwhile; not exported on SQLite).",
            registry=registry,
        )
        self.store_listen_connects = Counter(
            "refloop_store_listen_connects_total",
            "Times this node opened its LISTEN connection (1 at start, then one per "
            "reconnect after a loss).",
            registry=registry,
        )
        self.outbox_send_seconds = Histogram(
            "refloop_outbox_send_seconds",
            "Time a channel took to accept or refuse one send, by channel.",
            ["channel"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
            registry=registry,
        )
        # Sources (the Sources page, `refloop sources status`, docs/alerts.yml)
        self.source_error_at = Gauge(
            "refloop_source_last_error_timestamp_seconds",
            "When a source last had a problem, by source and kind (a framing error, a "
            "refused connection, a failed FHIR poll): Unix time.",
            ["source", "kind"],
            registry=registry,
        )
        self.fhir_poll_failures = Counter(
            "refloop_fhir_poll_failures_total",
            "FHIR poll cycles that failed (server error, timeout, auth), by source.",
            ["source"],
            registry=registry,
        )
        self.certificate_expiry = Gauge(
            "refloop_certificate_expiry_timestamp_seconds",
            "When a certificate the daemon loaded at start stops being valid (notAfter), "
            "by certificate: mllp:<source> (TLS), direct:<channel> (S/MIME): Unix time.",
            ["certificate"],
            registry=registry,
        )
        self.webhooks = Counter(
            "refloop_webhooks_total",
            "Inbound provider webhooks by hook and result (ok, forbidden, bad-request, error).",
            ["hook", "result"],
            registry=registry,
        )
        # Retention (engine.store.pruner): ``kind`` is one of engine.store.retention.KINDS.
        self.pruned_rows = Counter(
            "refloop_pruned_rows_total",
            "Rows whose PHI retention pruned (message bytes, outbox payloads and recipients, "
            "parked events, SMS replies).",
            ["kind"],
            registry=registry,
        )
        self.pruned_bytes = Counter(
            "refloop_pruned_bytes_total",
            "Bytes of PHI retention pruned, by kind.",
            ["kind"],
            registry=registry,
        )
        self.vacuumed_bytes = Counter(
            "refloop_vacuumed_bytes_total",
            "Bytes of free pages returned to the filesystem (incremental vacuum).",
            registry=registry,
        )
        self.database_free_bytes = Gauge(
            "refloop_database_free_bytes",
            "Free pages in the database file after the last pruning run, in bytes.",
            registry=registry,
        )
        self.prune_last_run = Gauge(
            "refloop_prune_last_run_timestamp_seconds",
            "When the last pruning run finished (Unix time; 0: none yet).",
            registry=registry,
        )

    def name_message_types(self, names: Iterable[str]) -> None:
        """The message type patterns the routes name (engine.routing.handler.make_handler, at
        start and on each reload): the ``type`` label's values."""
        self.type_labels = TypeLabels(names)

    def type_label(self, code: str) -> str:
        """The ``type`` label of an MSH-9 code (see :class:`TypeLabels`)."""
        return self.type_labels(code)

    async def exposition(self) -> bytes:
        """The Prometheus text exposition, generated in a worker thread so that a scrape
        does not hold up ACKs; scrapes take turns (one thread at a time)."""
        async with self._scrape:
            if self.before_scrape is not None:
                await self.before_scrape()
            _SCRAPE_LOOP.set(asyncio.get_running_loop())
            source = self.registry if self.merge is None else _Merged(self.registry, self.merge)
            return await asyncio.to_thread(generate_latest, source)

    def watch_inbox_commits(self, commits: Callable[[], int]) -> None:
        """Export ``refloop_inbox_commits_total`` from ``commits()`` (the inbox writer's
        count of group commits), read at scrape time."""
        self.registry.register(_Reading("refloop_inbox_commits", "Inbox group commits.", commits))

    def watch_disk(self, path: str) -> None:
        """Export ``refloop_state_disk_free_bytes`` and ``refloop_state_disk_size_bytes``
        of the file system holding ``path`` (the state directory), read at scrape time."""
        self.registry.register(DiskSpace(path))

    def watch_closure_ratio(
        self,
        ratios: Callable[[float], Mapping[str, float | None]],
        now: Callable[[], float],
        *,
        interval: float = 300.0,
    ) -> None:
        """Export ``refloop_closure_ratio{window}`` from ``ratios(now)`` (the daemon
        passes engine.tracking.report.closure_ratios bound to its connection)."""
        self.registry.register(ClosureRatio(ratios, now, interval=interval))


class ClosureRatio(StoreCollector):
    """``refloop_closure_ratio{window}``: of the referrals opened in each trailing window
    (``30d``, ``90d``, ``365d``), the share closed by a specialist report. Read at scrape
    time, but at most once per ``interval`` seconds (a scrape in between gets the cached
    values), so frequent scrapes cost one range scan every few minutes. A window with no
    referrals has no sample."""

    NAME: Final = "refloop_closure_ratio"
    HELP: Final = (
        "Of the referrals opened in the trailing window, the share closed by a "
        "specialist report (final or corrected)."
    )

    def __init__(
        self,
        ratios: Callable[[float], Mapping[str, float | None]],
        now: Callable[[], float],
        *,
        interval: float = 300.0,
    ):
        self.ratios = ratios
        self.now = now
        self.interval = interval
        self._at: float | None = None
        self._values: Mapping[str, float | None] = {}

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(self.NAME, self.HELP, labels=["window"])

    def read(self) -> Iterator[GaugeMetricFamily]:
        now = self.now()
        if self._at is None or not 0 <= now - self._at < self.interval:
            try:
                self._values = self.ratios(now)
                self._at = now
            except Exception:  # a scrape must not fail because the database is busy or closed
                log.warning("metrics: cannot read the closure ratio")
        g = GaugeMetricFamily(self.NAME, self.HELP, labels=["window"])
        for window, value in self._values.items():
            if value is not None:
                g.add_metric([window], value)
        yield g


class _Reading(Collector):
    """A counter whose value is read from the code that keeps it, at scrape time."""

    def __init__(self, name: str, help_text: str, read: Callable[[], int]):
        self.name, self.help_text, self.read = name, help_text, read

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.help_text)

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.help_text, value=self.read())


class DiskSpace(Collector):
    """Free and total bytes of the file system holding the state directory (the
    database, its WAL): ``os.statvfs`` at scrape time, a system call, no I/O wait. Free
    is what an unprivileged writer may use (``f_bavail``)."""

    FREE: Final = "refloop_state_disk_free_bytes"
    SIZE: Final = "refloop_state_disk_size_bytes"

    def __init__(self, path: str):
        self.path = path

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(self.FREE, "Bytes free for refloop on the state directory's disk.")
        yield GaugeMetricFamily(self.SIZE, "Size in bytes of the state directory's disk.")

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            st = os.statvfs(self.path)
        except OSError:
            log.warning("metrics: cannot read the state directory's disk space")
            return
        yield GaugeMetricFamily(
            self.FREE, "Bytes free for refloop on the state directory's disk.",
            value=st.f_bavail * st.f_frsize,
        )  # fmt: skip
        yield GaugeMetricFamily(
            self.SIZE, "Size in bytes of the state directory's disk.",
            value=st.f_blocks * st.f_frsize,
        )  # fmt: skip
