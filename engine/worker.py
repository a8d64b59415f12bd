"""The processing worker: ``python -m engine.worker`` (hidden; ``refloop run`` starts it).

A node without listeners (docs/architecture.md, "Processes"): an :class:`Engine` in the
``worker`` role on the daemon's database, running the processor (routes + tracker:
referral, timeline, audit, timer and outbox rows), the outbox dispatcher and, while the
daemon holds the singletons lease, the escalation timer wheel. It takes no input of its
own: it claims ``received`` rows by status, as a second node would.

It talks to the daemon over the socket given as ``--fd`` (engine.supervisor describes the
lines). It ignores SIGINT and SIGTERM: the daemon stops it in order, after the listeners
(``{"s": 1}``), or it stops by itself when the socket closes (the daemon died): in both
cases after the processing slice in hand, which commits or rolls back whole.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from engine.app import Engine
from engine.cluster import SINGLETONS
from engine.config import load as load_config
from engine.ingest.processor import Processor
from engine.model import Outcome
from engine.store import Inbox, leases
from engine.supervisor import LINE_LIMIT, snapshot

log = logging.getLogger("refloop.worker")

FAULT_REPORT = 0.25  # seconds between looks at the stages' storage faults
# Set to a path, the worker runs under cProfile and writes its stats to PATH.<pid> when
# it stops (a measuring aid: docs/performance.md, "Processing in the worker")
PROFILE_ENV = "REFLOOP_WORKER_PROFILE"


class WorkerSide:
    """The worker's end of the socket: commands in, outcomes and figures out."""

    def __init__(self, engine: Engine, writer: asyncio.StreamWriter):
        self.engine = engine
        self.writer = writer
        self._timers: asyncio.Task[None] | None = None

    def send(self, message: dict[str, Any]) -> None:
        if not self.writer.is_closing():
            self.writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    def processed(self, rows: list[tuple[int, Outcome]]) -> None:
        """After each processing commit: the outcomes (the daemon's ACK waiters) and the lag."""
        processor = self.engine.processor
        assert processor is not None
        lag = max(0, processor.inbox.rows - processor.cursor)
        self.send({"d": [[i, o.status, o.error, o.route] for i, o in rows], "lag": lag})

    async def serve(self, reader: asyncio.StreamReader) -> None:
        """Until ``{"s": 1}`` or the end of the socket."""
        engine = self.engine
        processor, inbox = engine.processor, engine.inbox
        assert processor is not None and inbox is not None
        while True:
            try:
                line = await reader.readline()
            except (OSError, ValueError):
                return
            if not line:
                log.warning("the daemon closed the socket; stopping")
                return
            message = json.loads(line)
            if "c" in message:  # the daemon committed rows: inbox.commits paces the slices
                inbox.rows = max(inbox.rows, int(message["c"]))
                inbox.commits += 1
                processor.notify()
            elif "w" in message:
                if engine.dispatcher is not None:
                    engine.dispatcher.wake()
            elif "t" in message:
                fence = (str(message["n"]), int(message["k"])) if "k" in message else None
                await self.timers(bool(message["t"]), fence)
            elif "m" in message:
                self.send({"m": snapshot(list(engine.metrics.registry.collect()))})
            elif "r" in message:
                engine.reload()
            elif "s" in message:
                return

    async def faults(self) -> None:
        """Report the processor's and the dispatcher's storage faults when they change
        (the daemon's /readyz turns 503 on them)."""
        engine, last = self.engine, ("", "")
        while True:
            now = (
                engine.processor.fault if engine.processor is not None else "",
                engine.dispatcher.fault if engine.dispatcher is not None else "",
            )
            if now != last:
                # the figures first: the failed commit's refloop_store_errors_total is
                # there by the time /readyz turns (a scrape cannot wait out a worker
                # stuck in a 5 s busy timeout)
                self.send({"m": snapshot(list(engine.metrics.registry.collect()))})
                self.send({"f": list(now)})
                last = now
            await asyncio.sleep(FAULT_REPORT)

    async def timers(self, on: bool, fence: tuple[str, int] | None = None) -> None:
        """Run the timer wheel while the daemon holds the singletons lease, each timer
        transaction fenced on the lease's holder and token when the daemon is a cluster
        member (``fence``)."""
        timers = self.engine.timers
        if timers is None:
            return
        if on and self._timers is None:
            if fence is not None:
                holder, token = fence
                timers.fence = partial(leases.holds, name=SINGLETONS, holder=holder, token=token)
            timers.resume()  # rebuilt: another node may have moved timers
            self._timers = asyncio.create_task(timers.run(), name="timers")
            self.engine.tasks.timers = self._timers
        elif not on and self._timers is not None:
            timers.stop()  # a firing timer finishes its transaction
            await asyncio.gather(self._timers, return_exceptions=True)
            self._timers = None
            self.engine.tasks.timers = None


def yield_reader(fd: int, inbox: Inbox) -> Callable[[], bool]:
    """The processor's ``should_yield`` on the yield pipe's read end (engine.supervisor):
    True when the inbox writer asked since the last look; the processor then pauses after
    the slice it commits, as after a commit of the daemon's."""
    os.set_blocking(fd, False)

    def asked() -> bool:
        try:
            if not os.read(fd, 64):
                return False  # the daemon is gone: the socket says so too
        except BlockingIOError:
            return False
        inbox.commits += 1
        return True

    return asked


async def serve(engine: Engine, sock: socket.socket, yield_fd: int | None = None) -> None:
    reader, writer = await asyncio.open_unix_connection(sock=sock, limit=LINE_LIMIT)
    side = WorkerSide(engine, writer)
    try:
        await engine.start()
        assert isinstance(engine.processor, Processor)
        engine.processor.on_processed = side.processed
        if yield_fd is not None:
            assert engine.inbox is not None
            engine.processor.should_yield = yield_reader(yield_fd, engine.inbox)
        side.send({"up": os.getpid()})
        faults = asyncio.create_task(side.faults(), name="fault-reports")
        try:
            await side.serve(reader)
        finally:
            faults.cancel()
            await asyncio.gather(faults, return_exceptions=True)
    finally:
        # what it counted since the last scrape (the daemon keeps it past this worker),
        # read before the store closes (collectors read it)
        engine.before_close = lambda: side.send(
            {"m": snapshot(list(engine.metrics.registry.collect()))}
        )
        await engine.stop()
        with contextlib.suppress(OSError):
            await writer.drain()
        writer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.worker", description=__doc__)
    parser.add_argument("--routes", required=True)
    parser.add_argument("--state", required=True)
    parser.add_argument("--store", default="")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--yield-fd", type=int, default=None)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s[worker]: %(message)s",
        stream=sys.stderr,
    )
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the process group
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the daemon stops the worker in order
    os.umask(0o077)
    sock = socket.socket(fileno=args.fd)
    config = load_config(args.routes)
    engine = Engine(config, Path(args.state), store=args.store, role="worker")
    profile = os.environ.get(PROFILE_ENV)
    profiler = None
    if profile:  # bench/ingest.py's profiling of processing: a cProfile of this process
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    try:
        import uvloop

        uvloop.run(serve(engine, sock, args.yield_fd))
    except ImportError:
        asyncio.run(serve(engine, sock, args.yield_fd))
    finally:
        if profiler is not None and profile:
            profiler.disable()
            profiler.dump_stats(f"{profile}.{os.getpid()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
