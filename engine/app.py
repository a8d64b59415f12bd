"""The engine: one object that owns every task and shuts them down in order.

Start: open the store, build the tracker (when routes.yaml has routes), start the inbox
writer and the processor, build the outbox channels and start the dispatcher, start the
HTTP server (with the webhooks), then the listeners (so readiness means "ACKing"). Stop:
stop accepting, drain in-flight messages within a bound, let the writer commit what is
queued, stop processing, let in-flight sends finish and record within the bound, close.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import CollectorRegistry

from engine.clock import Clock, WallClock
from engine.config import Config
from engine.config import load as load_config
from engine.errors import ConfigError
from engine.ingest.fhir import FhirPoller, SubscriptionHooks
from engine.ingest.listener import MllpServer
from engine.ingest.processor import Handler, Processor, no_routes
from engine.ingest.smart_auth import make_auth
from engine.metrics import Metrics
from engine.store import Database, Inbox, open_database
from engine.tracking.report import closure_ratios
from engine.web.auth import Auth
from engine.web.server import HttpServer

log = logging.getLogger(__name__)

HandlerFactory = Callable[[Config, Database], Handler]


def default_handler(
    config: Config,
    db: Database,
    *,
    clock: Clock | None = None,
    metrics: Metrics | None = None,
    tracker: Any = None,
) -> Handler:
    """The routes from routes.yaml, or "filtered: no routes" when there are none.
    Raises ConfigError when the routes do not compile."""
    if "routes" not in config.sections:
        return no_routes
    try:  # compiled routes arrive with the routes module
        routes = importlib.import_module("engine.routing.handler")
    except ModuleNotFoundError:
        return no_routes
    handler: Handler = routes.make_handler(config, db, tracker, clock=clock, metrics=metrics)
    return handler


@dataclass
class Engine:
    config: Config
    state_dir: Path
    clock: Clock = field(default_factory=WallClock)
    registry: CollectorRegistry | None = None
    handler_factory: HandlerFactory = default_handler
    drain_seconds: float = 10.0
    tracker: Any = (
        None  # engine.tracking.tracker.Tracker; None: built at start when there are routes
    )
    dispatch_sleep: Any = None  # the dispatcher's sleep (tests: one that moves a VirtualClock)
    background: bool = True  # False: timers and dispatch are driven by the caller (simulator)

    def __post_init__(self) -> None:
        self.metrics = Metrics(self.registry or CollectorRegistry())
        self.db: Database | None = None
        self.inbox: Inbox | None = None
        self.processor: Processor | None = None
        self.servers: list[MllpServer] = []
        self.http: HttpServer | None = None
        self.auth: Auth | None = None  # users, sessions and API tokens (engine.web.auth)
        self.pollers: dict[str, FhirPoller] = {}
        self._fhir_client: httpx.AsyncClient | None = None
        self._poller_tasks: list[asyncio.Task[None]] = []
        self.ready = False
        self.routes_config = self.config  # the routes.yaml the processor runs (reloads swap it)
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = asyncio.Event()
        self.dispatcher: Any = None  # engine.delivery.dispatch.Dispatcher
        self.hooks: Any = None  # engine.delivery.webhooks.Hooks
        self._http_client: httpx.AsyncClient | None = None  # shared by the outbox channels
        self._dispatch_task: asyncio.Task[None] | None = None
        self.timers: Any = None  # engine.timers.service.TimerService
        self._timer_task: asyncio.Task[None] | None = None
        self.direct_listeners: list[Any] = []  # (name, channels.direct.inbound.DirectListener)
        self.direct_pollers: list[Any] = []  # (name, channels.direct.inbound.ImapPoller)
        self.direct_flow: Any = None  # engine.delivery.direct_inbound.DirectFlow
        self._direct_stop = asyncio.Event()  # set on shutdown: the IMAP pollers finish
        self._direct_tasks: list[asyncio.Task[None]] = []

    @property
    def db_path(self) -> Path:
        return self.state_dir / self.config.store.file

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
        self.db = open_database(self.db_path, synchronous=self.config.store.synchronous)
        self.inbox = Inbox(self.db)
        self.metrics.inbox_rows.set(self.inbox.rows)
        inbox = self.inbox
        self.metrics.watch_inbox_commits(lambda: inbox.commits)
        db = self.db
        self.metrics.watch_closure_ratio(lambda now: closure_ratios(db.conn, now), self.clock.now)
        if self.tracker is None and "routes" in self.config.sections:
            self.tracker = self._make_tracker()
        handler = self._make_handler(self.config)
        self.processor = Processor(self.db, self.inbox, handler, self.clock, self.metrics)
        self._tasks.append(asyncio.create_task(self.inbox.run_writer(), name="inbox-writer"))
        self._tasks.append(asyncio.create_task(self.processor.run(), name="processor"))
        self._make_pollers()
        self._build_outbox()
        if self.tracker is not None:
            self._make_timers()
        if self.dispatcher is not None:  # every channel's gauges exist (0) before a scrape
            self.dispatcher.refresh_metrics()
        if self.dispatcher is not None and self.background:
            self._dispatch_task = asyncio.create_task(self.dispatcher.run(), name="dispatch")
        if self.dispatcher is not None:
            self.processor.after_commit = self._wake_dispatcher
        if self.config.http.enabled:
            self.auth = Auth(self.db, self.clock)
            self.http = HttpServer(
                self.config.http,
                self.metrics,
                lambda: self.ready,
                reload=self.reload,
                authenticate=self.auth.from_token,
            )
            self._mount_ui(self.http)
            SubscriptionHooks(self.pollers).register(self.http.app)
            if self.hooks is not None:
                mounted = self.hooks.register(self.http.app)
                log.info("http: webhooks %s", ", ".join(mounted) or "none (no http.public_url)")
            await self.http.start()
        for name, poller in self.pollers.items():
            self._poller_tasks.append(asyncio.create_task(poller.run(), name=f"fhir-{name}"))
        await self._start_direct()
        for source in self.config.sources:
            server = MllpServer(source, self.inbox, self.processor, self.clock, self.metrics)
            await server.start()
            self.servers.append(server)
        self.ready = True
        sd_notify("READY=1")
        self._tasks.append(asyncio.create_task(self._watchdog(), name="watchdog"))

    def _mount_ui(self, http: HttpServer) -> None:
        """The JSON API (engine.web.api) and the dashboard (engine.web.dashboard)."""
        from engine.web.api import Api, Service
        from engine.web.dashboard import Dashboard

        assert self.db is not None and self.auth is not None
        wake = self.dispatcher.wake if self.dispatcher is not None else None
        service = Service(self.db, self.clock, tracker=self.tracker, wake=wake)
        Api(service).register(http.app)
        Dashboard(
            service, self.auth, secure=self.config.http.public_url.startswith("https://")
        ).register(http.app)
        if not self.auth.users():
            log.warning(
                "http: no dashboard users yet; create the first admin with "
                "`refloop users add NAME --role admin`, then open /ui/"
            )

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

    def _wake_dispatcher(self) -> None:
        """After a processing commit: rows the tracker enqueued go out now, not at the
        dispatcher's next poll."""
        queued = self.tracker.take_enqueued() if self.tracker is not None else 0
        take = getattr(self.processor.handler if self.processor else None, "take_enqueued", None)
        queued += take() if take is not None else 0  # a route's send / forward
        if queued and self.dispatcher is not None:
            self.dispatcher.wake()

    def _write_back_channels(self) -> dict[str, Any]:
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

    def _make_tracker(self) -> Any:
        from engine.routing.compile import compile_config
        from engine.tracking.tracker import build_tracker

        assert self.db is not None
        return build_tracker(
            self.config,
            self.db,
            self.clock,
            policy=compile_config(self.config).escalation,
            registry=self.metrics.registry,
        )

    def _make_timers(self) -> None:
        """The escalation timer service, when there is a tracker to act through."""
        from engine.routing.compile import compile_config
        from engine.timers.service import TimerMetrics, TimerService

        assert self.db is not None
        self.timers = TimerService(
            self.db,
            self.tracker,
            compile_config(self.config).escalation,
            self.clock,
            metrics=TimerMetrics(self.metrics.registry, self.db),
        )
        loaded = self.timers.load()
        log.info("timers: %d due within the next hour", loaded)
        if self.background:
            self._timer_task = asyncio.create_task(self.timers.run(), name="timers")

    def _build_outbox(self) -> None:
        """The channels of routes.yaml, the dispatcher and the webhooks (engine.delivery.dispatch,
        engine.delivery.webhooks). Raises ConfigError when a channel's settings are unusable."""
        from engine.delivery.direct_inbound import DEFAULT_MDN_TIMEOUT, PacketEvents
        from engine.delivery.dispatch import Dispatcher, Renderer, RetryPolicy, Rotation
        from engine.delivery.factory import build_channels, webhook_secret
        from engine.delivery.packet import PacketBuilder
        from engine.delivery.task_queue import TaskQueue, builtin_channels
        from engine.delivery.webhooks import Hooks
        from engine.routing.compile import compile_config
        from engine.routing.table import ChannelSpec
        from engine.tracking.specialists import certificate_lookup

        assert self.db is not None
        table = compile_config(self.config)
        http, env = self.config.http, self.config.env
        self._http_client = httpx.AsyncClient()
        channels = build_channels(
            table.channels,
            http=self._http_client,
            clock=self.clock,
            public_url=http.public_url,
            env=env,
            certificate_for=certificate_lookup(self.db),
        )
        write_backs = self._write_back_channels()
        channels.update(write_backs)
        specs = {**table.channels, **{n: ChannelSpec(n, "fhir", {}, {}) for n in write_backs}}
        directs = {n: s for n, s in table.channels.items() if s.type == "direct"}
        packets = PacketBuilder(
            self.db,
            self.clock,
            confirm_key=http.confirm_key.encode(),
            public_url=http.public_url,
            attach_original=[n for n, s in directs.items() if s.settings.get("attach_original")],
        )
        renderer = Renderer(specs, table.practice, packets=packets)
        rotation = Rotation.from_channels(table.escalation, table.channels)
        extra: dict[str, Any] = {}
        if self.dispatch_sleep is not None:
            extra["sleep"] = self.dispatch_sleep
        local = {
            name: TaskQueue()
            for name in builtin_channels({n: s.type for n, s in table.channels.items()}, channels)
        }
        self.dispatcher = Dispatcher(
            self.db,
            channels,
            local=local,
            renderer=renderer,
            clock=self.clock,
            metrics=self.metrics,
            tracker=self.tracker,
            policies={n: RetryPolicy.from_settings(s.settings) for n, s in table.channels.items()},
            rotation=rotation,
            packet_events=PacketEvents(
                {
                    n: float(s.settings.get("mdn_timeout", DEFAULT_MDN_TIMEOUT))
                    for n, s in directs.items()
                },
                [n for n, s in table.channels.items() if s.type == "fax"],
            ),
            **extra,
        )
        sms = [n for n, s in table.channels.items() if s.type == "sms"]
        faxes = [n for n, s in table.channels.items() if s.type == "fax"]
        if len(sms) > 1:
            log.warning("outbox: %d sms channels; /hooks/twilio/* serve %s", len(sms), sms[0])
        self.hooks = Hooks(
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
            on_new_rows=self.dispatcher.wake,
            sms_advanced_opt_out=bool(
                sms and table.channels[sms[0]].settings.get("advanced_opt_out")
            ),
        )

    async def _start_direct(self) -> None:
        """Inbound Direct of each ``direct`` channel (engine.delivery.direct_inbound): the SMTP
        listener of an ``inbound:`` block, which the HISP delivers MDNs, DSNs and replies
        to, and a task polling the mailbox of an ``imap:`` block. Every one is built
        before any starts, so a ConfigError leaves nothing running."""
        from engine.delivery.direct_inbound import DirectFlow
        from engine.delivery.factory import build_direct_imap_poller, build_direct_listener
        from engine.routing.compile import compile_config

        table = compile_config(self.config)
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
        listeners: list[tuple[str, Any]] = []
        pollers: list[tuple[str, Any]] = []
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
        for name, poller in pollers:
            self.direct_pollers.append((name, poller))
            self._direct_tasks.append(
                asyncio.create_task(
                    poller.run(poller.settings.interval, self._direct_stop),
                    name=f"direct-imap-{name}",
                )
            )
            log.info(
                "direct %s: polling imap %s every %gs", name, poller.peer, poller.settings.interval
            )

    def _make_handler(self, config: Config) -> Handler:
        assert self.db is not None
        if self.handler_factory is default_handler:
            return default_handler(
                config, self.db, clock=self.clock, metrics=self.metrics, tracker=self.tracker
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
            handler = self._make_handler(config)
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
        self.processor.handler = handler  # one assignment: the next message sees it
        self.routes_config = config
        self.metrics.config_reloads.labels("ok").inc()
        log.info("reload: %s loaded", self.config.file)
        return []

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def stop(self) -> None:
        """Orderly shutdown; safe to call more than once."""
        if self._stopped.is_set():
            return
        self.ready = False
        sd_notify("STOPPING=1")
        self._direct_stop.set()  # IMAP pollers: no new message after the one in hand
        for _name, listener in self.direct_listeners:
            await listener.stop()  # the HISP keeps what it could not deliver and retries
        if self._direct_tasks:
            _, pending = await asyncio.wait(self._direct_tasks, timeout=self.drain_seconds)
            for task in pending:  # a fetch in flight: that message stays unseen, no loss
                task.cancel()
            await asyncio.gather(*self._direct_tasks, return_exceptions=True)
        await asyncio.gather(*(s.stop(self.drain_seconds) for s in self.servers))
        for poller in self.pollers.values():
            poller.stop()
        if self._poller_tasks:
            _, pending = await asyncio.wait(self._poller_tasks, timeout=self.drain_seconds)
            for task in pending:  # a request in flight: its page is not committed, no loss
                task.cancel()
            await asyncio.gather(*self._poller_tasks, return_exceptions=True)
        if self._fhir_client is not None:
            await self._fhir_client.aclose()
        if self.inbox is not None:
            self.inbox.close()
        if self.processor is not None:
            self.processor.stop()
        for task in self._tasks[:2]:  # writer drains, processor finishes its slice
            try:
                await asyncio.wait_for(task, timeout=self.drain_seconds)
            except (TimeoutError, asyncio.CancelledError):
                pass
        if self.timers is not None:
            self.timers.stop()  # a firing timer finishes its transaction
        if self._timer_task is not None:
            await asyncio.gather(self._timer_task, return_exceptions=True)
        if self.dispatcher is not None:
            self.dispatcher.stop()  # in-flight sends finish and are recorded
        if self._dispatch_task is not None:
            try:
                await asyncio.wait_for(self._dispatch_task, timeout=self.drain_seconds)
            except (TimeoutError, asyncio.CancelledError):
                pass  # cancelled mid-send: the row stays "sending" and is resent at start
            except Exception:
                log.exception("dispatch stopped with an error")
        for task in self._tasks[2:]:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.http is not None:
            await self.http.stop()
        if self._http_client is not None:
            await self._http_client.aclose()
        if self.db is not None:
            self.db.close()
        self._stopped.set()
        log.info("stopped")

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
        )
        if a != b
    ]
    for name in ("channels", "escalation", "practice"):
        a, b = running.sections.get(name), new.sections.get(name)
        if (a.data if a else None) != (b.data if b else None):
            out.append(name)
    return out
