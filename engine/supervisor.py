"""The daemon's side of the processing worker (issue 18; docs/architecture.md, "Processes").

With ``processing.workers: 1`` (the default for ``refloop run``) the routes, the tracker,
the outbox dispatcher and the escalation timer wheel run in a child process
(``python -m engine.worker``, :mod:`engine.worker`) on the same database: a node without
listeners. The daemon's own event loop keeps framing, the MSH read, the group commit and
the ACKs, the HTTP server and the pollers.

:class:`RemoteProcessor` stands where the in-process :class:`Processor` stood: the
listener, the FHIR pollers and inbound Direct call :meth:`notify` after a commit and
:meth:`watch` for an outcome (``ack_when: on-processed``, enhanced-mode application
ACKs). Its :meth:`run` starts the worker, restarts it with backoff when it exits
unexpectedly, and carries the traffic of one Unix socket pair, one JSON object a line:

- daemon → worker: ``{"c": rows}`` rows were committed (``rows``: the highest inbox id),
  ``{"w": 1}`` wake the dispatcher (a webhook or the dashboard queued rows), ``{"t": 0|1,
  "n": node, "k": token}`` this node holds the singletons lease (run the timer wheel,
  every firing fenced on that holder and token) or not, ``{"r": 1}`` reload
  routes.yaml, ``{"m": 1}`` send a metrics snapshot, ``{"s": 1}`` stop.
- worker → daemon: ``{"up": pid}`` ready, ``{"d": [[id, status, error, route], ...],
  "lag": n}`` after each processing commit, ``{"m": [family, ...]}`` a metrics snapshot,
  ``{"f": [processing, dispatch]}`` the kinds of the worker's storage faults when they
  change (``""``: none; /readyz turns 503 on them as on the daemon's own).

Beside the socket, a pipe the worker inherits as ``--yield-fd``: the inbox writer's
thread writes a byte to it when a group commit finds SQLite's write lock held, and the
worker, which reads it (without blocking) between two messages of a slice, commits the
slice there and pauses, so the waiting commit takes the lock after one message's
processing rather than after the whole slice (issue 18: the ACK's tail).

Nothing depends on the socket for correctness: rows are claimed by status, so a lost
notification is only a later wake-up (the worker looks every second anyway), and a
waiter re-reads its row every :data:`WAITER_POLL` seconds (another node may process it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any, Final

from prometheus_client.core import Metric

from engine.clock import Clock
from engine.ingest.processor import WAITER_POLL, Handler, Processor
from engine.metrics import Metrics
from engine.model import Outcome
from engine.store import Database, Inbox
from engine.store.db import DatabaseError

log = logging.getLogger(__name__)

BACKOFF_MIN: Final = 0.5  # seconds before the first restart of a worker that exited
BACKOFF_MAX: Final = 30.0
HEALTHY_AFTER: Final = 30.0  # a worker that ran this long restarts at BACKOFF_MIN again
SNAPSHOT_WAIT: Final = 1.0  # seconds a scrape waits for the worker's figures
LINE_LIMIT: Final = 64 * 1024 * 1024  # the longest line on the socket (a metrics snapshot)
# families the daemon keeps itself (from the worker's reports), not from snapshots
OWN_FAMILIES: Final = frozenset({"refloop_processing_lag_messages"})

Key = tuple[str, tuple[tuple[str, str], ...]]  # sample name, sorted labels


def worker_command(routes: str, state_dir: Path, store: str, log_level: str) -> list[str]:
    """The worker's command line: this interpreter, the hidden entry point. ``-P``: not
    the working directory first on ``sys.path``, so the worker imports the daemon's own
    ``engine``, never an ``engine`` package in the directory the daemon was started in
    (another version's checkout, say)."""
    return [
        sys.executable,
        "-P",
        "-m",
        "engine.worker",
        "--routes",
        routes,
        "--state",
        str(state_dir),
        "--store",
        store,
        "--log-level",
        log_level,
    ]


class RemoteProcessor(Processor):
    """Processing in the worker process, seen from the daemon. Its :meth:`run` is the
    supervisor; ``handler`` is the daemon's copy of the routes (the dashboard's *Try* and
    *Reprocess* run it), never applied to inbox rows here."""

    def __init__(
        self,
        db: Database,
        inbox: Inbox,
        handler: Handler,
        clock: Clock,
        metrics: Metrics,
        command: list[str],
        *,
        drain_seconds: float = 10.0,
    ):
        super().__init__(db, inbox, handler, clock, metrics)
        self.command = command
        self.drain_seconds = drain_seconds
        self.up = False  # the worker is running and said it is ready
        self.pid = 0
        self.restarts = 0
        self.timers = False  # this node holds the singletons lease: the worker runs timers
        self.fence: tuple[str, int] | None = None  # the lease's (holder, token) when held
        self._proc: asyncio.subprocess.Process | None = None
        # the yield pipe (module docstring): one for the processor's life, every worker
        # inherits its read end; the write end is never blocking (a full pipe already
        # says "step aside")
        self._yield_read, self._yield_write = os.pipe()
        os.set_blocking(self._yield_write, False)
        self._writer: asyncio.StreamWriter | None = None
        self._notify_pending = False
        self._stop = asyncio.Event()
        self._snapshot: list[Any] = []  # the worker's families, as it last sent them
        self._snapshot_wait: asyncio.Future[None] | None = None
        self._retired: dict[str, tuple[str, str, str, dict[Key, float]]] = {}
        self._reported_rejected = inbox.rejected
        self.dispatch_fault = ""  # the worker's dispatcher's storage fault (its report)
        metrics.worker_up.set(0)
        metrics.merge = self.merge

    # -- the seams the listener, the pollers and Direct use --------------------------

    def notify(self) -> None:
        """Rows were committed: tell the worker (once per loop turn, however many)."""
        if self._notify_pending:
            return
        self._notify_pending = True
        asyncio.get_running_loop().call_soon(self._send_commit)

    def _send_commit(self) -> None:
        self._notify_pending = False
        self._send({"c": self.inbox.rows})

    def watch(self, message_id: int) -> asyncio.Future[Outcome]:
        """A future resolved with the message's outcome: from the database if it is
        processed already, else from the worker's report (or the re-read every
        :data:`WAITER_POLL`). A failed read (a PostgreSQL connection dropped by a restart
        or failover: the daemon's connection is not used for processing any more, so this
        read may be the first to find out) waits for those instead of failing the ACK."""
        try:
            return super().watch(message_id)
        except DatabaseError as exc:
            log.warning("processing: outcome of message %d not read (%s)", message_id, exc)
            fut: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(message_id, []).append(fut)
            return fut

    def step_aside(self) -> None:
        """The inbox writer found SQLite's write lock held (by the worker, as a rule):
        the worker commits its slice after the message in hand and pauses, so the
        waiting group commit takes the lock in that gap. Called on the writer's thread
        (a byte on the yield pipe: no event loop in between). Without it a worker that
        saw no commit since its last slice went straight on to the next one and the
        commit waited through several: 50-140 ms in bench/ingest.py runs; waiting for the
        whole slice instead of one message: p99 44 ms at 16 connections
        (docs/performance.md, issue 18)."""
        with contextlib.suppress(OSError):  # full (a byte is there) or closed (stopping)
            os.write(self._yield_write, b"y")

    def wake_dispatcher(self, channel: str | None = None) -> None:
        """Rows were queued in the outbox here (a webhook, the dashboard): the worker's
        dispatcher sends them now rather than at its next poll."""
        self._send({"w": 1})

    def set_timers(self, on: bool, fence: tuple[str, int] | None = None) -> None:
        """This node gained (True) or lost the singletons lease: the worker runs the
        timer wheel while it holds it (sent again to every new worker). ``fence`` is the
        lease's (holder, token): every timer transaction in the worker checks it, so a
        stale holder's worker fires nothing (docs/scale-out.md, "Timers fire once")."""
        self.timers = on
        self.fence = fence if on else None
        self._send(self._timers_message())

    def _timers_message(self) -> dict[str, Any]:
        message: dict[str, Any] = {"t": int(self.timers)}
        if self.fence is not None:
            message["n"], message["k"] = self.fence
        return message

    def reload(self) -> None:
        """routes.yaml changed and compiled here: the worker reloads it too."""
        self._send({"r": 1})

    def stop(self) -> None:
        self._stopping = True
        self._stop.set()
        self._send({"s": 1})

    async def refresh(self) -> None:
        """Before a scrape: ask the worker for its figures, wait up to
        :data:`SNAPSHOT_WAIT` (a busy or absent worker: the last snapshot)."""
        if self._writer is None:
            return
        if self._snapshot_wait is None or self._snapshot_wait.done():
            self._snapshot_wait = asyncio.get_running_loop().create_future()
            self._send({"m": 1})
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(self._snapshot_wait), SNAPSHOT_WAIT)

    def _send(self, message: dict[str, Any]) -> None:
        writer = self._writer
        if writer is None or writer.is_closing():
            return
        writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    # -- supervision ----------------------------------------------------------------

    async def run(self) -> None:
        """Start the worker; when it exits without being told to, start it again after a
        backoff (0.5 s doubling to 30 s; back to 0.5 s after it ran 30 s). Waiters are
        re-checked against the database meanwhile. Returns once stopped."""
        loop = asyncio.get_running_loop()
        settle = asyncio.create_task(self._settle_loop(), name="processing-waiters")
        backoff = BACKOFF_MIN
        try:
            while not self._stopping:
                started = loop.time()
                code = await self._run_once()
                if self._stopping:
                    break
                self.restarts += 1
                self.metrics.worker_restarts.inc()
                if loop.time() - started >= HEALTHY_AFTER:
                    backoff = BACKOFF_MIN
                log.error("processing worker exited (%s); starting it again in %gs", code, backoff)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
        except asyncio.CancelledError:  # the engine's drain bound ran out: no more waiting
            self._kill()
            raise
        finally:
            settle.cancel()
            await asyncio.gather(settle, return_exceptions=True)
            await self._reap()
            # the inbox writer, which writes to it, stopped before processing (Engine.stop)
            os.close(self._yield_read)
            os.close(self._yield_write)

    async def _run_once(self) -> str:
        """One worker's life: spawn, serve its socket until it closes, reap; returns how
        it ended (for the log)."""
        ours, theirs = socket.socketpair()
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self.command,
                "--fd",
                str(theirs.fileno()),
                "--yield-fd",
                str(self._yield_read),
                pass_fds=(theirs.fileno(), self._yield_read),
                stdin=asyncio.subprocess.DEVNULL,
                env=env,
            )
        except OSError as exc:
            ours.close()
            return f"could not start: {exc.strerror or exc}"
        finally:
            theirs.close()
        self.pid = self._proc.pid
        log.info("processing worker started (pid %d)", self.pid)
        reader, self._writer = await asyncio.open_unix_connection(sock=ours, limit=LINE_LIMIT)
        if self._stopping:  # stop() came while it was starting
            self._send({"s": 1})
        if self.timers:
            self._send(self._timers_message())
        self._send({"c": self.inbox.rows})  # rows may have arrived while none listened
        try:
            await self._serve(reader)
        finally:
            self._down()
        code = await self._proc.wait()
        if code < 0:
            return f"killed by signal {-code}"
        return f"exit status {code}"

    async def _serve(self, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await reader.readline()
            except (OSError, ValueError):  # reset, or a line over LINE_LIMIT
                return
            if not line:
                return
            try:
                message = json.loads(line)
            except ValueError:
                log.error("processing worker: unreadable line on its socket")
                return
            if "d" in message:
                self._processed(message["d"], int(message.get("lag", 0)))
            elif "m" in message:
                self._snapshot = message["m"]
                if self._snapshot_wait is not None and not self._snapshot_wait.done():
                    self._snapshot_wait.set_result(None)
            elif "f" in message:
                self.fault, self.dispatch_fault = (str(k) for k in message["f"])
            elif "up" in message:
                self.up = True
                self.metrics.worker_up.set(1)

    def _processed(self, rows: list[list[Any]], lag: int) -> None:
        """A processing commit in the worker: resolve the waiters of its messages."""
        for message_id, status, error, route in rows:
            self.cursor = max(self.cursor, int(message_id))
            for fut in self._waiters.pop(int(message_id), ()):
                if not fut.done():
                    fut.set_result(Outcome(str(status), str(error), str(route)))
        self.metrics.processing_lag.set(lag)
        # rows stored ``rejected`` at the door are never claimed; counted as processed
        # here, as the in-process processor counts them when it catches up
        rejected, self._reported_rejected = (
            self.inbox.rejected - self._reported_rejected,
            self.inbox.rejected,
        )
        if rejected:
            self.metrics.processed.labels("rejected").inc(rejected)

    def _down(self) -> None:
        """The worker's socket closed: it is down; what it counted stays counted."""
        if self.up:
            log.info("processing worker (pid %d) disconnected", self.pid)
        self.up = False
        self.metrics.worker_up.set(0)
        self.fault = self.dispatch_fault = ""  # a new worker reports its own
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        for name, kind, doc, unit, samples in self._snapshot:
            if kind == "gauge":
                continue
            _, _, _, into = self._retired.setdefault(name, (kind, doc, unit, {}))
            for sample, labels, value in samples:
                key = (sample, tuple(sorted(labels.items())))
                into[key] = into.get(key, 0.0) + float(value)
        self._snapshot = []

    def _kill(self) -> None:
        proc = self._proc
        if proc is not None and proc.returncode is None:
            log.error("processing worker (pid %d) killed at the drain bound", proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGKILL)

    async def _reap(self) -> None:
        """After a stop: give the worker the drain time to finish, then kill it."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        try:
            await asyncio.wait_for(proc.wait(), self.drain_seconds)
        except TimeoutError:
            log.error("processing worker did not stop within %gs; killing it", self.drain_seconds)
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGKILL)
            await proc.wait()

    async def _settle_loop(self) -> None:
        """The slow fallback: while someone waits for an outcome, re-read the rows every
        :data:`WAITER_POLL` seconds (another node, or a worker that died after its commit
        and before its report)."""
        while True:
            await asyncio.sleep(WAITER_POLL)
            if self._waiters:
                try:
                    self._settle_waiters()
                except DatabaseError as exc:  # a dropped connection: the next round retries
                    log.warning("processing: waiters not re-read (%s)", exc)

    # -- metrics ----------------------------------------------------------------------

    def merge(self, families: list[Metric]) -> list[Metric]:
        """This process's families with the worker's folded in: counters, histograms and
        summaries add up (with what earlier workers counted before they exited), a gauge
        takes the larger value (the smaller for :data:`LOWER_GAUGES`); families only the
        worker has are appended."""
        worker: dict[str, tuple[str, str, str, dict[Key, float]]] = {
            name: (kind, doc, unit, dict(samples))
            for name, (kind, doc, unit, samples) in self._retired.items()
        }
        for name, kind, doc, unit, samples in self._snapshot:
            _, _, _, into = worker.setdefault(name, (kind, doc, unit, {}))
            for sample, labels, value in samples:
                key = (sample, tuple(sorted(labels.items())))
                into[key] = into.get(key, 0.0) + float(value)
        out: list[Metric] = []
        for family in families:
            theirs = worker.pop(family.name, None)
            if theirs is None:
                out.append(family)
                continue
            values: dict[Key, float] = {}
            for s in family.samples:
                values[(s.name, tuple(sorted(s.labels.items())))] = s.value
            for key, value in theirs[3].items():
                if key not in values:
                    values[key] = value
                elif family.type == "gauge":
                    pick = min if family.name in LOWER_GAUGES else max
                    values[key] = pick(values[key], value)
                else:
                    values[key] += value
            out.append(_family(family.name, family.type, family.documentation, "", values))
        for name, (kind, doc, unit, samples) in worker.items():
            out.append(_family(name, kind, doc, unit, samples))
        return out


# Gauges that are 1 while something is fine in every process: the node's figure is the
# smaller one, so one process that lost it shows (the daemon and its worker each hold a
# LISTEN connection on PostgreSQL).
LOWER_GAUGES: Final = frozenset({"refloop_store_listening"})


def _family(name: str, kind: str, doc: str, unit: str, values: dict[Key, float]) -> Metric:
    metric = Metric(name, doc, kind, unit)
    for (sample, labels), value in values.items():
        metric.add_sample(sample, dict(labels), value)
    return metric


def snapshot(families: list[Metric]) -> list[Any]:
    """A registry's families as the worker sends them: no ``_created`` samples (a
    timestamp does not add up), not the families the daemon keeps itself."""
    return [
        [
            f.name,
            f.type,
            f.documentation,
            f.unit,
            [[s.name, s.labels, s.value] for s in f.samples if not s.name.endswith("_created")],
        ]
        for f in families
        if f.name not in OWN_FAMILIES
    ]


def worker_state(processor: Processor | None) -> str:
    """``up`` or ``down`` with a processing worker process; "" when processing runs in
    the daemon itself."""
    if isinstance(processor, RemoteProcessor):
        return "up" if processor.up else "down"
    return ""
