"""The engine: one object that owns every task and shuts them down in order.

Start: open the store, build the tracker (when routes.yaml has routes), start the inbox
writer and the processor, build the outbox channels and start the dispatcher, start the
HTTP server (with the webhooks), then the listeners (so readiness means "ACKing"). Stop:
stop accepting, drain in-flight messages within a bound, let the writer commit what is
queued, stop processing, let in-flight sends finish and record within the bound, close.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Final

import httpx
from prometheus_client import CollectorRegistry

from engine.clock import Clock, WallClock
from engine.cluster import SINGLETONS, Membership, routes_fingerprint
from engine.config import Config, RetentionConfig
from engine.config import load as load_config
from engine.errors import ConfigError
from engine.ingest.fhir import FhirPoller, SubscriptionHooks
from engine.ingest.listener import MllpServer
from engine.ingest.processor import (
    WORKER_BATCH,
    WORKER_CACHE_KIB,
    WORKER_SLICE,
    Handler,
    Processor,
    no_routes,
)
from engine.ingest.smart_auth import make_auth
from engine.metrics import Metrics
from engine.store import Database, Inbox, leases, open_database, trace
from engine.store.backup import StateLock
from engine.store.checkpoint import no_autocheckpoint
from engine.store.db import is_postgres_url
from engine.store.pruner import Pruner
from engine.store.retention import Tally
from engine.store.sql import set_cache_kib
from engine.supervisor import worker_state
from engine.tracking.report import closure_ratios
from engine.web.auth import Auth
from engine.web.server import HttpServer

if TYPE_CHECKING:  # built at start, imported there: a daemon without them never loads them
    from channels.base import Channel
    from channels.direct.inbound import DirectListener, ImapPoller
    from engine.delivery.direct_inbound import DirectFlow
    from engine.delivery.dispatch import Dispatcher, Renderer
    from engine.delivery.rotation import Rotation
    from engine.delivery.webhooks import Hooks
    from engine.ingest.status import Workbench
    from engine.routing.table import ChannelSpec, RouteTable
    from engine.store.notify import Listener
    from engine.timers.service import TimerService
    from engine.tracking.tracker import Tracker

log = logging.getLogger(__name__)

HandlerFactory = Callable[[Config, Database], Handler]
Sleep = Callable[[float], Awaitable[None]]

# The shutdown, step by step (Engine.stop runs ``Engine._stop_<step>`` in this order):
# stop the cluster heartbeat and the leased work (FHIR and IMAP pollers, timer wheel) and
# release the lease so another node takes over at once, stop taking work in (Direct,
# MLLP, FHIR), let what was accepted reach the database
# (inbox writer, processor), stop firing timers, let in-flight sends finish and be
# recorded (dispatch), then the side tasks, the HTTP server, the HTTP clients, the database.
STOP_ORDER: Final[tuple[str, ...]] = (
    "singletons",
    "direct",
    "mllp",
    "fhir",
    "processing",
    "timers",
    "dispatch",
    "side_tasks",
    "http",
    "clients",
    "database",
)


@dataclass
class Tasks:
    """Every background task the engine runs, by its role; :data:`STOP_ORDER` says in
    which order the roles stop."""

    writer: asyncio.Task[None] | None = None  # the inbox's group-commit writer
    processor: asyncio.Task[None] | None = None
    dispatch: asyncio.Task[None] | None = None
    timers: asyncio.Task[None] | None = None
    watchdog: asyncio.Task[None] | None = None
    pruner: asyncio.Task[None] | None = None  # retention (engine.store.pruner)
    listen: asyncio.Task[None] | None = None  # PostgreSQL LISTEN (engine.store.notify)
    fhir: list[asyncio.Task[None]] = field(default_factory=list)  # one per FHIR poller
    direct_imap: list[asyncio.Task[None]] = field(default_factory=list)  # one per mailbox

    def processing(self) -> list[asyncio.Task[None]]:
        return [t for t in (self.writer, self.processor) if t is not None]


async def _drain(tasks: Sequence[asyncio.Task[None]], seconds: float) -> None:
    """Wait up to ``seconds`` for ``tasks`` to finish on their own, then cancel the rest
    (what was in flight is not committed, so nothing is lost) and reap them all."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=seconds)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def default_handler(
    config: Config,
    db: Database,
    *,
    clock: Clock | None = None,
    metrics: Metrics | None = None,
    tracker: Tracker | None = None,
    table: RouteTable | None = None,
) -> Handler:
    """The routes from routes.yaml, or "filtered: no routes" when there are none.
    ``table`` is ``config`` already compiled (the engine compiles once per start and per
    reload); without it the routes are compiled here. Raises ConfigError when the routes
    do not compile."""
    if "routes" not in config.sections:
        return no_routes
    from engine.routing.compile import compile_config
    from engine.routing.handler import RouteHandler

    table = table or compile_config(config)
    if metrics is not None:  # its bounded ``type`` label set: the types the routes name
        metrics.name_message_types(table.message_types)
    return RouteHandler(table, db, tracker, clock=clock, metrics=metrics)


@dataclass
class Engine:
    config: Config
    state_dir: Path
    clock: Clock = field(default_factory=WallClock)
    registry: CollectorRegistry | None = None
    handler_factory: HandlerFactory = default_handler
    drain_seconds: float = 10.0
    tracker: Tracker | None = None  # None: built at start when there are routes
    dispatch_sleep: Sleep | None = None  # tests: one that moves a VirtualClock
    background: bool = True  # False: timers and dispatch are driven by the caller (simulator)
    table: RouteTable | None = None  # ``config`` compiled (refloop run has); else at start
    prune_first_run: float = 60.0  # seconds from start to the first retention run
    store: str = ""  # ``refloop run --store``: overrides routes.yaml's store.url
    # where processing runs (docs/architecture.md, "Processes"): ``all`` in this process
    # (tests, the simulator, ``processing.workers: 0``); ``listener`` starts and supervises
    # a worker process for it (``refloop run``); ``worker`` is that process
    # (engine.worker): processor, dispatcher and timers, no listeners, no HTTP.
    role: str = "all"

    def __post_init__(self) -> None:
        self.metrics = Metrics(self.registry or CollectorRegistry())
        self.db: Database | None = None
        self.state_lock: StateLock | None = None
        self.inbox: Inbox | None = None
        self.processor: Processor | None = None
        self.servers: list[MllpServer] = []
        self.http: HttpServer | None = None
        self.auth: Auth | None = None  # users, sessions and API tokens (engine.web.auth)
        self.pollers: dict[str, FhirPoller] = {}
        self._fhir_client: httpx.AsyncClient | None = None
        self.ready = False
        self._draining = False  # stop() has begun
        self.routes_config = self.config  # the routes.yaml the processor runs (reloads swap it)
        self.tasks = Tasks()
        self._stopped = asyncio.Event()
        self.dispatcher: Dispatcher | None = None
        self.hooks: Hooks | None = None
        self._http_client: httpx.AsyncClient | None = None  # shared by the outbox channels
        self.timers: TimerService | None = None
        self.direct_listeners: list[tuple[str, DirectListener]] = []
        self.direct_pollers: list[tuple[str, ImapPoller]] = []
        self.direct_flow: DirectFlow | None = None
        self._direct_stop = asyncio.Event()  # set on shutdown: the IMAP pollers finish
        self._imap_stop = asyncio.Event()  # set when this node loses the singletons lease
        self.membership: Membership | None = None  # None: not background (the simulator)
        self.pruner: Pruner | None = None
        self.listener: Listener | None = None  # PostgreSQL only (engine.store.notify)
        self.before_close: Callable[[], None] | None = None  # stop(): just before the store closes
        self._stalls: asyncio.Task[None] | None = None  # REFLOOP_TXN_TRACE's loop watch

    @property
    def db_path(self) -> str:
        """The store: a file path, or a ``postgresql://`` URL (docs/scale-out.md)."""
        return self.config.store.location(self.state_dir, self.store)

    def is_ready(self) -> bool:
        """``/readyz``: the listeners accept and the store takes the engine's commits (the
        inbox's, processing's and the outbox dispatcher's last ones succeeded; with a
        worker process, the faults it reports). The worker's being up is reported beside
        it (:meth:`ready_details`), not part of it: ACKs (``on-commit``) go on while it
        restarts, and the backlog waits ``received``."""
        return self.ready and not self._store_fault()

    def not_ready(self) -> str:
        """Why :meth:`is_ready` is False: ``store-error: full`` (``io``, ``locked``,
        ``other``) while the inbox cannot commit, ``store-error: locked (processing)`` or
        ``(dispatch)`` while those stages cannot, else ``starting`` or ``draining``."""
        return self._store_fault() or ("draining" if self._draining else "starting")

    def _store_fault(self) -> str:
        """The readiness sources: each stage's ``fault`` (the kind of its last failed
        commit, "" once one succeeds again)."""
        if self.inbox is not None and self.inbox.fault:
            return f"store-error: {self.inbox.fault}"
        dispatch = self.dispatcher.fault if self.dispatcher is not None else ""
        # with a worker process its dispatcher is the one that runs: the fault it reports
        dispatch = getattr(self.processor, "dispatch_fault", dispatch)
        processing = self.processor.fault if self.processor is not None else ""
        for stage, fault in (("processing", processing), ("dispatch", dispatch)):
            if fault:
                return f"store-error: {fault} ({stage})"
        return ""

    def ready_details(self) -> dict[str, str]:
        """``/readyz``'s ``worker``: ``up`` or ``down`` (starting, restarting, stopped)
        with a processing worker process; nothing when processing runs here."""
        state = worker_state(self.processor)
        return {"worker": state} if state else {}

    def ports(self) -> dict[str, int]:
        """Bound ports by source name, plus ``http``."""
        out = {s.source.name: s.port for s in self.servers}
        if self.http is not None:
            out["http"] = self.http.port
        for name, listener in self.direct_listeners:
            out[f"direct:{name}"] = listener.port
        return out

    async def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        cfg = self.config.store
        worker = self.role == "worker"
        if not is_postgres_url(self.db_path) and not worker:  # a restore replaces the file
            self.state_lock = StateLock(Path(self.db_path))
            self.state_lock.shared()
        self.db = open_database(
            self.db_path, synchronous=cfg.synchronous, pool=(cfg.pool_min, cfg.pool_max)
        )
        log.info("store: %s", self.db.location)
        if self.db.dialect == "sqlite" and self.db.path not in ("", ":memory:"):
            # the inbox writer's checkpointer thread checkpoints the WAL (the daemon's, or
            # for the worker its daemon's): never inside this process's commits
            no_autocheckpoint(self.db.conn)
        if self.background and not worker:
            self.membership = self._membership()
            self.membership.check_id()  # before anything listens
        self.inbox = Inbox(self.db)
        inbox = self.inbox
        if not worker:
            self.metrics.inbox_rows.set(self.inbox.rows)
            inbox.on_fault = lambda kind: self.metrics.store_errors.labels("inbox", kind).inc()
            inbox.on_wait = self.metrics.inbox_writer_wait.observe
            self.metrics.watch_inbox_commits(lambda: inbox.commits)
            db = self.db
            self.metrics.watch_closure_ratio(
                lambda now: closure_ratios(db.conn, now), self.clock.now
            )
        table = self._compiled(self.config)  # the one compile of this start
        if self.tracker is None and "routes" in self.config.sections:
            self.tracker = self._make_tracker(table)
        handler = self._make_handler(self.config, table)
        self.processor = self._make_processor(handler)
        if not worker:
            self.tasks.writer = asyncio.create_task(self.inbox.run_writer(), name="inbox-writer")
        self.tasks.processor = asyncio.create_task(self.processor.run(), name="processor")
        self._make_pollers()
        dispatcher = self._build_outbox(table)
        if self.tracker is not None and self.role != "listener":
            self._make_timers(table)
        if self.role != "listener":  # the worker's dispatcher keeps the outbox gauges
            dispatcher.refresh_metrics()  # every channel's gauges exist (0) before a scrape
        if not worker:
            self._watch_health(dispatcher)
        if self.background and self.role != "listener":
            self.tasks.dispatch = asyncio.create_task(dispatcher.run(), name="dispatch")
        self.processor.after_commit = self._wake_dispatcher
        self.processor.idle_poll = cfg.poll_seconds
        self.processor.waiter_poll = cfg.poll_seconds / 5
        if self.background and is_postgres_url(self.db_path):
            # each process LISTENs: the worker is woken by other nodes' received rows,
            # the listener's ACK waiters by other nodes' processed ones
            self._listen()
        if worker:
            return  # no listeners, no HTTP, no cluster membership: engine.worker talks
        if self.config.http.enabled:
            self.auth = Auth(self.db, self.clock)
            self.http = HttpServer(
                self.config.http,
                self.metrics,
                self.is_ready,
                reload=self.reload,
                authenticate=self.auth.from_token,
                not_ready=self.not_ready,
                ready_details=self.ready_details,
            )
            self._mount_ui(self.http)
            SubscriptionHooks(self.pollers).register(self.http.app)
            if self.hooks is not None:
                mounted = self.hooks.register(self.http.app)
                log.info("http: webhooks %s", ", ".join(mounted) or "none (no http.public_url)")
            await self.http.start()
        await self._start_direct(table)
        for source in self.config.sources:
            server = MllpServer(source, self.inbox, self.processor, self.clock, self.metrics)
            await server.start()
            self.servers.append(server)
        if self.background:
            self._join_cluster()
        else:
            self._start_singletons(0)
        self.ready = True
        sd_notify("READY=1")
        self.tasks.watchdog = asyncio.create_task(self._watchdog(), name="watchdog")
        if trace.enabled():
            self._stalls = asyncio.create_task(trace.watch_loop(), name="loop-stalls")

    def _make_processor(self, handler: Handler) -> Processor:
        """Processing here, or (``role`` listener) the supervisor of the worker process
        that runs it (engine.supervisor)."""
        assert self.db is not None and self.inbox is not None
        if self.role != "listener":
            processor = Processor(self.db, self.inbox, handler, self.clock, self.metrics)
            if self.role == "worker":  # a core of its own: step aside just long enough
                processor.pause_share = 0.0
                processor.batch, processor.slice = WORKER_BATCH, WORKER_SLICE
                # not ``nowait``: under a paced load the daemon's writer (which tries again
                # every 0.2 ms) won nearly every race for the lock against a BEGIN tried
                # after its "committed" line, and processing fell from 48 to 16 msgs/s
                # (docs/performance.md, "Processing in the worker"); the busy handler's
                # sleeps do better until the daemon hands the lock over itself
                if self.db.dialect == "sqlite":  # the pages a slice touches stay in hand
                    set_cache_kib(self.db.conn, WORKER_CACHE_KIB)
            return processor
        from engine.supervisor import RemoteProcessor, worker_command

        command = worker_command(
            self.config.file,
            self.state_dir,
            self.store,
            logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower(),
        )
        remote = RemoteProcessor(
            self.db,
            self.inbox,
            handler,
            self.clock,
            self.metrics,
            command,
            drain_seconds=self.drain_seconds,
        )
        self.metrics.before_scrape = remote.refresh
        self.inbox.on_busy = remote.step_aside
        return remote

    def _make_pruner(self) -> Pruner:
        """Retention in the daemon: the policy of the routes.yaml running (reloads apply
        from the next run), counted in the metrics."""
        assert self.db is not None and self.inbox is not None
        metrics = self.metrics

        def policy() -> RetentionConfig | None:
            r = self.routes_config.retention
            return r if r.enabled else None

        def counted(tally: Tally) -> None:
            for kind, rows in tally.rows.items():
                if rows:
                    metrics.pruned_rows.labels(kind).inc(rows)
                    metrics.pruned_bytes.labels(kind).inc(tally.bytes[kind])

        def ran(free: int) -> None:
            metrics.database_free_bytes.set(free)
            metrics.prune_last_run.set(self.clock.now())

        return Pruner(
            self.db,
            self.inbox.lock,
            policy,
            self.clock,
            on_step=counted,
            on_vacuum=metrics.vacuumed_bytes.inc,
            on_run=ran,
            first_run=self.prune_first_run,
        )

    def _watch_health(self, dispatcher: Dispatcher) -> None:
        """Disk space of the state directory and certificate expiry (docs/alerts.yml)."""
        from engine.ingest.certificates import certificate_expiries

        self.metrics.watch_disk(str(self.state_dir))
        for name, when in certificate_expiries(self.config.sources, dispatcher.channels).items():
            self.metrics.certificate_expiry.labels(name).set(when)

    def _compiled(self, config: Config) -> RouteTable:
        """``config``'s routes.yaml compiled (ConfigError on problems); the table given to
        the engine when it is ``config``'s."""
        from engine.routing.compile import compile_config

        if self.table is not None and config is self.config:
            return self.table
        return compile_config(config)

    def _mount_ui(self, http: HttpServer) -> None:
        """The JSON API (engine.web.api) and the dashboard (engine.web.dashboard)."""
        from engine.web.api import Api
        from engine.web.dashboard import Dashboard
        from engine.web.service import Service

        assert self.db is not None and self.auth is not None
        wake = self.dispatcher.wake if self.dispatcher is not None else None
        service = Service(
            self.db, self.clock, tracker=self.tracker, wake=wake, routes=self._route_handler
        )
        service.workbench = self._workbench()
        Api(service).register(http.app)
        Dashboard(
            service, self.auth, secure=self.config.http.public_url.startswith("https://")
        ).register(http.app)
        if not self.auth.users():
            log.warning(
                "http: no dashboard users yet; create the first admin with "
                "`refloop users add NAME --role admin`, then open /ui/"
            )

    def _workbench(self) -> Workbench:
        """The analyst's tools over this engine: its running routes (they follow
        reloads) for *Try a message*, its config and live figures for *Sources*."""
        from engine.ingest.status import Workbench

        def table() -> RouteTable | None:
            return getattr(self.processor.handler if self.processor else None, "table", None)

        return Workbench(lambda: self.routes_config, table, self.metrics, self.ports)

    def _route_handler(self) -> Handler | None:
        """The processor's current handler (a reload swaps it): what *Reprocess* runs."""
        return self.processor.handler if self.processor is not None else None

    def _make_pollers(self) -> None:
        """One poller per FHIR source, sharing one HTTP client (connection pool)."""
        if not self.config.fhir_sources:
            return
        assert self.db is not None and self.inbox is not None and self.processor is not None
        self._fhir_client = httpx.AsyncClient(
            timeout=httpx.Timeout(max(s.timeout for s in self.config.fhir_sources)),
            follow_redirects=False,
        )
        for source in self.config.fhir_sources:
            self.pollers[source.name] = FhirPoller(
                source,
                self.db,
                self.inbox,
                client=self._fhir_client,
                auth=make_auth(source.auth, clock=self.clock),
                clock=self.clock,
                notify=self.processor.notify,
                metrics=self.metrics,
            )

    def _listen(self) -> None:
        """The node's LISTEN connection: other nodes' commits wake this node's processor,
        ACK waiters and dispatcher (engine.store.notify; polling stays the fallback)."""
        from engine.store.notify import Listener

        assert self.processor is not None
        processor, metrics = self.processor, self.metrics

        def wake_dispatcher() -> None:
            if self.dispatcher is not None:
                self.dispatcher.wake()

        def state(up: bool) -> None:
            metrics.store_listening.set(1 if up else 0)
            if up:
                metrics.store_listen_connects.inc()

        self.listener = Listener(
            self.db_path,
            on_received=processor.notify,
            on_processed=processor.settle,
            on_outbox=wake_dispatcher,
            counted=lambda kind: metrics.store_notifications.labels(kind).inc(),
            on_state=state,
        )
        self.tasks.listen = asyncio.create_task(self.listener.run(), name="listen")

    def _wake_dispatcher(self) -> None:
        """After a processing commit: rows the tracker enqueued go out now, not at the
        dispatcher's next poll."""
        queued = self.tracker.take_enqueued() if self.tracker is not None else 0
        take = getattr(self.processor.handler if self.processor else None, "take_enqueued", None)
        queued += take() if take is not None else 0  # a route's send / forward
        if queued and self.dispatcher is not None:
            self.dispatcher.wake()

    def _write_back_channels(self) -> dict[str, Channel]:
        """An outbox channel ``fhir:<source>`` per FHIR source with ``write_back.task``
        (engine.ingest.fhir.WriteBackChannel), on its poller's client and token cache."""
        from engine.ingest.fhir import WriteBackChannel
        from engine.model import write_back_channel

        return {
            write_back_channel(name): WriteBackChannel(
                poller.source, client=poller.client, auth=poller.auth, clock=self.clock
            )
            for name, poller in self.pollers.items()
            if poller.source.write_back.task
        }

    def _make_tracker(self, table: RouteTable) -> Tracker:
        from engine.tracking.tracker import build_tracker

        assert self.db is not None
        return build_tracker(
            self.config,
            self.db,
            self.clock,
            policy=table.escalation,
            registry=self.metrics.registry,
        )

    def _make_timers(self, table: RouteTable) -> None:
        """The escalation timer service, when there is a tracker to act through."""
        from engine.timers.service import TimerMetrics, TimerService

        assert self.db is not None and self.tracker is not None
        self.timers = TimerService(
            self.db,
            self.tracker,
            table.escalation,
            self.clock,
            metrics=TimerMetrics(self.metrics.registry, self.db),
        )
        if self.membership is None:  # the simulator: driven by the caller, never leased
            self.timers.load()
        # else loaded when this node gains the singletons lease (_start_singletons): a
        # node that is not the holder must not mark the timers loaded, or the holder's
        # wheel would never read the rows written since its last look

    def _build_outbox(self, table: RouteTable) -> Dispatcher:
        """The channels of routes.yaml, the dispatcher and the webhooks (engine.delivery.dispatch,
        engine.delivery.webhooks). Raises ConfigError when a channel's settings are unusable."""
        from engine.delivery.rotation import Rotation

        channels, specs = self._outbox_channels(table)
        renderer = self._renderer(table, specs)
        rotation = Rotation.from_channels(table.escalation, table.channels)
        self.dispatcher = self._dispatcher(table, channels, renderer, rotation)
        if self.role == "listener":  # the worker sends: webhooks and the dashboard wake it
            from engine.supervisor import RemoteProcessor

            assert isinstance(self.processor, RemoteProcessor)
            self.dispatcher.wake = self.processor.wake_dispatcher  # type: ignore[method-assign]
        self.hooks = self._hooks(table, renderer, rotation, self.dispatcher)
        return self.dispatcher

    def _outbox_channels(
        self, table: RouteTable
    ) -> tuple[dict[str, Channel], dict[str, ChannelSpec]]:
        """Each routes.yaml channel built (engine.delivery.factory) plus a FHIR write-back
        channel per source that has one; and the spec the renderer reads for each."""
        from engine.delivery.factory import build_channels
        from engine.routing.table import ChannelSpec
        from engine.tracking.specialists import certificate_lookup

        assert self.db is not None
        self._http_client = httpx.AsyncClient()
        channels = build_channels(
            table.channels,
            http=self._http_client,
            clock=self.clock,
            public_url=self.config.http.public_url,
            env=self.config.env,
            certificate_for=certificate_lookup(self.db),
        )
        write_backs = self._write_back_channels()
        channels.update(write_backs)
        specs = {**table.channels, **{n: ChannelSpec(n, "fhir", {}, {}) for n in write_backs}}
        return channels, specs

    def _renderer(self, table: RouteTable, specs: dict[str, ChannelSpec]) -> Renderer:
        """Templates per channel, with the specialist packet builder for Direct and fax."""
        from engine.delivery.dispatch import Renderer
        from engine.delivery.packet import PacketBuilder

        assert self.db is not None
        http = self.config.http
        packets = PacketBuilder(
            self.db,
            self.clock,
            confirm_key=http.confirm_key.encode(),
            public_url=http.public_url,
            attach_original=[
                n
                for n, s in table.channels.items()
                if s.type == "direct" and s.settings.get("attach_original")
            ],
        )
        return Renderer(specs, table.practice, packets=packets)

    def _dispatcher(
        self,
        table: RouteTable,
        channels: dict[str, Channel],
        renderer: Renderer,
        rotation: Rotation,
    ) -> Dispatcher:
        """The dispatcher over ``channels``, the built-in task queues, each channel's
        retry policy, and the Direct MDN / fax delivery timeouts."""
        from engine.delivery.direct_inbound import DEFAULT_MDN_TIMEOUT, PacketEvents
        from engine.delivery.dispatch import Dispatcher, RetryPolicy
        from engine.delivery.task_queue import TaskQueue, builtin_channels, warn_unserved

        assert self.db is not None
        types = {n: s.type for n, s in table.channels.items()}
        local = {name: TaskQueue() for name in builtin_channels(types, channels)}
        mdn_timeouts = {
            n: float(s.settings.get("mdn_timeout", DEFAULT_MDN_TIMEOUT))
            for n, s in table.channels.items()
            if s.type == "direct"
        }
        warn_unserved(self.db.conn, table, {*channels, *local}, self.clock.now())
        return Dispatcher(
            self.db,
            channels,
            local=local,
            renderer=renderer,
            clock=self.clock,
            metrics=self.metrics,
            tracker=self.tracker,
            policies={n: RetryPolicy.from_settings(s.settings) for n, s in table.channels.items()},
            rotation=rotation,
            packet_events=PacketEvents(mdn_timeouts, [n for n, t in types.items() if t == "fax"]),
            sleep=self.dispatch_sleep or asyncio.sleep,
            node_id=self.config.store.node_id,
            lease_seconds=self.config.store.lease_seconds,
        )

    def _hooks(
        self, table: RouteTable, renderer: Renderer, rotation: Rotation, dispatcher: Dispatcher
    ) -> Hooks:
        """The provider webhooks (Twilio SMS status and replies, fax callbacks, patient
        confirmations): the first sms channel and every fax channel."""
        from engine.delivery.factory import webhook_secret
        from engine.delivery.webhooks import Hooks

        assert self.db is not None
        http, env = self.config.http, self.config.env
        sms = [n for n, s in table.channels.items() if s.type == "sms"]
        faxes = [n for n, s in table.channels.items() if s.type == "fax"]
        voices = [n for n, s in table.channels.items() if s.type == "voice"]
        voice_name = table.escalation.slot_channel("voice") or (voices[0] if voices else "")
        if voice_name not in voices:
            voice_name = voices[0] if voices else ""
        if len(sms) > 1:
            log.warning("outbox: %d sms channels; /hooks/twilio/* serve %s", len(sms), sms[0])
        return Hooks(
            self.db,
            clock=self.clock,
            public_url=http.public_url,
            renderer=renderer,
            rotation=rotation,
            tracker=self.tracker,
            metrics=self.metrics,
            sms_channel=sms[0] if sms else "",
            sms_auth_token=webhook_secret(table.channels[sms[0]], "auth_token", env) if sms else "",
            fax_channels=faxes,
            fax_token=(
                webhook_secret(table.channels[faxes[0]], "callback_token", env) if faxes else ""
            ),
            confirm_key=http.confirm_key.encode(),
            coordinator_channel="coordinator" if "coordinator" in table.channels else "task",
            on_new_rows=dispatcher.wake,
            sms_advanced_opt_out=bool(
                sms and table.channels[sms[0]].settings.get("advanced_opt_out")
            ),
            voice_channel=voice_name,
            voice_auth_token=(
                webhook_secret(table.channels[voice_name], "auth_token", env) if voice_name else ""
            ),
        )

    async def _start_direct(self, table: RouteTable) -> None:
        """Inbound Direct of each ``direct`` channel (engine.delivery.direct_inbound): the SMTP
        listener of an ``inbound:`` block, which the HISP delivers MDNs, DSNs and replies
        to, and a task polling the mailbox of an ``imap:`` block. Every one is built
        before any starts, so a ConfigError leaves nothing running."""
        from engine.delivery.direct_inbound import DirectFlow
        from engine.delivery.factory import build_direct_imap_poller, build_direct_listener

        names = [n for n, s in table.channels.items() if s.type == "direct"]
        if not names or self.tracker is None:
            return
        assert self.db is not None and self.inbox is not None and self.processor is not None
        self.direct_flow = DirectFlow(
            self.db,
            self.inbox,
            self.tracker,
            self.clock,
            direct_channels=names,
            notify=self.processor.notify,
            wake=self.dispatcher.wake if self.dispatcher is not None else None,
        )
        on_result, env = self.direct_flow.on_result, self.config.env
        listeners: list[tuple[str, DirectListener]] = []
        pollers: list[tuple[str, ImapPoller]] = []
        for name in names:
            spec = table.channels[name]
            listener = build_direct_listener(spec, on_result=on_result, clock=self.clock, env=env)
            if listener is not None:
                listeners.append((name, listener))
            poller = build_direct_imap_poller(spec, on_result=on_result, clock=self.clock, env=env)
            if poller is not None:
                pollers.append((name, poller))
        for name, listener in listeners:
            await listener.start()
            self.direct_listeners.append((name, listener))
        self.direct_pollers.extend(pollers)  # started with the singletons (lease holder)

    def _membership(self) -> Membership:
        """This node in the cluster (docs/scale-out.md); joined once everything listens."""
        from importlib.metadata import PackageNotFoundError, version

        from engine.delivery.dispatch import default_node_id

        assert self.db is not None
        try:
            running = version("refloop")
        except PackageNotFoundError:
            running = ""
        return Membership(
            self.db,
            self.config.store.node_id or default_node_id(),
            self.clock,
            lease_seconds=self.config.store.lease_seconds,
            version=running,
            on_gain=self._start_singletons,
            on_lose=self._stop_leased,
            metrics=self.metrics,
            config=routes_fingerprint(self.config.sections),
        )

    def _join_cluster(self) -> None:
        """Write this node's row and take part in the singletons lease: a lone node takes
        it here and starts the leased work at once."""
        assert self.membership is not None
        ports = self.ports()
        addresses = ",".join(
            [f"{s.source.host}:{s.port}" for s in self.servers]
            + ([f"{self.config.http.host}:{ports['http']}"] if "http" in ports else [])
        )
        self.membership.join(addresses)
        self.membership.start()

    def _start_singletons(self, token: int) -> None:
        """The work that runs once per installation, on the lease holder only: the FHIR
        pollers, the IMAP pollers, the escalation timer wheel and retention's pruner."""
        if self._stopped.is_set():
            return
        if self.background and self.tasks.pruner is None:
            self.pruner = self._make_pruner()  # a new one: a stopped pruner stays stopped
            self.tasks.pruner = asyncio.create_task(self.pruner.run(), name="pruner")
        for name, poller in self.pollers.items():
            poller.resume()
            self.tasks.fhir.append(asyncio.create_task(poller.run(), name=f"fhir-{name}"))
        self._imap_stop = asyncio.Event()
        for name, imap in self.direct_pollers:
            self.tasks.direct_imap.append(
                asyncio.create_task(
                    imap.run(imap.settings.interval, self._imap_stop),
                    name=f"direct-imap-{name}",
                )
            )
            log.info(
                "direct %s: polling imap %s every %gs", name, imap.peer, imap.settings.interval
            )
        if self.timers is not None and self.background:
            if self.membership is not None:
                # every timer transaction checks the lease still has this token (a stale
                # holder that has not noticed yet fires nothing); then rebuilt: another
                # node may have moved timers
                self.timers.fence = partial(
                    leases.holds, name=SINGLETONS, holder=self.membership.node_id, token=token
                )
                loaded = self.timers.resume()
                log.info("timers: %d due within the next hour", loaded)
            self.tasks.timers = asyncio.create_task(self.timers.run(), name="timers")
        set_timers = getattr(self.processor, "set_timers", None)
        if set_timers is not None:  # the worker process runs the timer wheel, fenced
            holder = self.membership.node_id if self.membership is not None else ""
            set_timers(True, (holder, token) if holder else None)

    async def _stop_leased(self) -> None:
        """This node lost (or gives up) the singletons lease: stop the leased work."""
        for poller in self.pollers.values():
            poller.stop()
        self._imap_stop.set()
        if self.timers is not None:
            self.timers.stop()  # a firing timer finishes its transaction
        set_timers = getattr(self.processor, "set_timers", None)
        if set_timers is not None:
            set_timers(False)
        if self.pruner is not None:
            self.pruner.stop()  # the step in hand commits; the new holder's pruner goes on
        if self.tasks.pruner is not None:
            await asyncio.gather(self.tasks.pruner, return_exceptions=True)
            self.tasks.pruner = None
        await _drain(self.tasks.fhir, self.drain_seconds)
        await _drain(self.tasks.direct_imap, self.drain_seconds)
        if self.tasks.timers is not None:
            await asyncio.gather(self.tasks.timers, return_exceptions=True)
        self.tasks.fhir.clear()
        self.tasks.direct_imap.clear()
        self.tasks.timers = None

    def _make_handler(self, config: Config, table: RouteTable) -> Handler:
        """The processor's handler for ``config``, compiled as ``table``."""
        assert self.db is not None
        if self.handler_factory is default_handler:
            return default_handler(
                config,
                self.db,
                clock=self.clock,
                metrics=self.metrics,
                tracker=self.tracker,
                table=table,
            )
        return self.handler_factory(config, self.db)

    def reload(self) -> list[str]:
        """Re-read and re-compile routes.yaml (SIGHUP, POST /admin/reload). On success the
        processor uses the new routes from its next message; on any problem the running
        routes stay and the problems are logged and returned (``file:line key: message``).

        Only ``routes`` and ``tables`` take effect: the other sections are built into
        listeners, pollers, channels and timers at start, so their changes need a restart
        (logged by name)."""
        if self.processor is None or self.db is None:
            return ["the engine is not running"]
        try:
            config = load_config(self.config.file, env=self.config.env)
            table = self._compiled(config)  # the one compile
            handler = self._make_handler(config, table)
        except ConfigError as exc:
            self.metrics.config_reloads.labels("invalid").inc()
            log.error(
                "reload: %s is invalid; keeping the running routes (%d problem(s))",
                self.config.file,
                len(exc.problems),
            )
            for problem in exc.problems:
                log.error("reload: %s", problem)
            return list(exc.problems)
        stale = _restart_sections(self.config, config)
        if stale:
            log.warning("reload: %s changes take effect on restart", ", ".join(stale))
            self._warn_unserved(table)
        self.processor.handler = handler  # one assignment: the next message sees it
        forward = getattr(self.processor, "reload", None)
        if forward is not None:  # the worker process reads and compiles it too
            forward()
        self.routes_config = config
        if self.membership is not None:
            self.membership.set_config(routes_fingerprint(config.sections))
        self.metrics.config_reloads.labels("ok").inc()
        log.info("reload: %s loaded", self.config.file)
        return []

    def _warn_unserved(self, table: RouteTable) -> None:
        """After a reload: the new routes may name a channel the running dispatcher does
        not have (``channels:`` changes need a restart); say so, once per channel."""
        from engine.delivery.task_queue import warn_unserved

        if self.dispatcher is not None and self.db is not None:
            warn_unserved(self.db.conn, table, self.dispatcher.names(), self.clock.now())

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def stop(self) -> None:
        """Orderly shutdown; safe to call more than once."""
        if self._stopped.is_set():
            return
        self.ready = False
        self._draining = True
        sd_notify("STOPPING=1")
        for step in STOP_ORDER:
            if step == "database" and self.before_close is not None:
                self.before_close()  # the worker's last metrics snapshot reads the store
            await getattr(self, f"_stop_{step}")()
        self._stopped.set()
        log.info("stopped")

    async def _stop_singletons(self) -> None:
        """Leave the cluster: stop the leased work, release the lease, mark this node
        stopped (another node takes over without waiting for the lease to run out)."""
        if self.membership is None:
            return
        self.membership.halt()
        await self._stop_leased()
        await self.membership.leave()

    async def _stop_direct(self) -> None:
        self._direct_stop.set()  # IMAP pollers: no new message after the one in hand
        self._imap_stop.set()
        for _name, listener in self.direct_listeners:
            await listener.stop()  # the HISP keeps what it could not deliver and retries
        # a fetch in flight is cancelled at the bound: that message stays unseen, no loss
        await _drain(self.tasks.direct_imap, self.drain_seconds)

    async def _stop_mllp(self) -> None:
        await asyncio.gather(*(s.stop(self.drain_seconds) for s in self.servers))

    async def _stop_fhir(self) -> None:
        for poller in self.pollers.values():
            poller.stop()
        # a request in flight is cancelled at the bound: its page is not committed, no loss
        await _drain(self.tasks.fhir, self.drain_seconds)
        if self._fhir_client is not None:
            await self._fhir_client.aclose()

    async def _stop_processing(self) -> None:
        """The writer commits what is queued, then the processor finishes its slice."""
        if self.inbox is not None:
            self.inbox.close()
        if self.processor is not None:
            self.processor.stop()
        for task in self.tasks.processing():
            try:
                await asyncio.wait_for(task, timeout=self.drain_seconds)
            except (TimeoutError, asyncio.CancelledError):
                pass

    async def _stop_timers(self) -> None:
        if self.timers is not None:
            self.timers.stop()  # a firing timer finishes its transaction
        if self.tasks.timers is not None:
            await asyncio.gather(self.tasks.timers, return_exceptions=True)

    async def _stop_dispatch(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.stop()  # in-flight sends finish and are recorded
        if self.tasks.dispatch is None:
            return
        try:
            await asyncio.wait_for(self.tasks.dispatch, timeout=self.drain_seconds)
        except (TimeoutError, asyncio.CancelledError):
            pass  # cancelled mid-send: the row stays "sending" and is resent at start
        except Exception:
            log.exception("dispatch stopped with an error")

    async def _stop_side_tasks(self) -> None:
        if self.listener is not None:
            await self.listener.stop()
        if self.tasks.listen is not None:
            await asyncio.gather(self.tasks.listen, return_exceptions=True)
        if self.pruner is not None:
            self.pruner.stop()  # the step in hand commits; the next run starts over
        if self.tasks.pruner is not None:
            await asyncio.gather(self.tasks.pruner, return_exceptions=True)
        if self._stalls is not None:
            self._stalls.cancel()
        if self.tasks.watchdog is not None:
            self.tasks.watchdog.cancel()
            await asyncio.gather(self.tasks.watchdog, return_exceptions=True)

    async def _stop_http(self) -> None:
        if self.http is not None:
            await self.http.stop()

    async def _stop_clients(self) -> None:
        if self._http_client is not None:
            await self._http_client.aclose()

    async def _stop_database(self) -> None:
        if self.db is not None:
            self.db.close()
        if self.state_lock is not None:
            self.state_lock.release()

    async def _watchdog(self) -> None:
        """systemd watchdog pings at half the configured interval, while the loop turns."""
        usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        if not usec:
            return
        while True:
            sd_notify("WATCHDOG=1")
            await asyncio.sleep(usec / 2_000_000)


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about readiness, stopping and watchdog pings."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("sd_notify failed: %s", exc)


def _restart_sections(running: Config, new: Config) -> list[str]:
    """The sections of ``new`` that differ from what the daemon started with and that a
    reload does not apply."""
    out = [
        name
        for name, a, b in (
            ("store", running.store, new.store),
            ("http", running.http, new.http),
            ("sources", (running.sources, running.fhir_sources), (new.sources, new.fhir_sources)),
            ("processing", running.processing, new.processing),
        )
        if a != b
    ]
    for name in ("channels", "escalation", "practice"):
        a, b = running.sections.get(name), new.sections.get(name)
        if (a.data if a else None) != (b.data if b else None):
            out.append(name)
    return out
