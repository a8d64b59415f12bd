"""The daemon's pruning task: a retention run (engine.store.retention) every
``retention.every_minutes``, off the ACK path.

Each step is one transaction of a few milliseconds on the loop's connection, taken under
``Inbox.lock`` like the processor's slices: the inbox writer's group commit waits for at
most one step, and after each step the task steps aside as long as the step took, so the
listeners and the processor share the loop with it. After the run, with
``auto_vacuum=INCREMENTAL``, the free pages go back to the filesystem the same way
(``incremental_vacuum`` in small steps). A file made before refloop set that mode keeps
its free pages for reuse; the task logs once how to convert it (``refloop prune
--vacuum``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Final

from engine.clock import Clock
from engine.store import retention
from engine.store.retention import Cursor, RetentionConfig, Tally
from engine.store.sql import Database, DatabaseError

log = logging.getLogger(__name__)

FIRST_RUN: Final = 60.0  # seconds after start: the first run waits for the start-up to settle
MIN_PAUSE: Final = 0.001
PAUSE: Final = 1.0  # after a step, step aside this many times as long as it took
MIN_PAGES: Final = 4
MAX_PAGES: Final = 256  # 1 MiB at 4 KiB pages: a step that would take long stays short
CHECKPOINT_EVERY: Final = 4  # steps between the pruner's own checkpoints (< 1000 WAL pages)


class Pruner:
    """Runs retention in the daemon. ``policy()`` is read at each run (a reload of
    routes.yaml applies from the next one); ``on_step(tally)`` and ``on_vacuum(bytes)``
    count what was done (the engine's metrics); ``on_run(free_bytes)`` after each run."""

    def __init__(
        self,
        db: Database,
        lock: asyncio.Lock,
        policy: Callable[[], RetentionConfig | None],
        clock: Clock,
        *,
        on_step: Callable[[Tally], None] = lambda _t: None,
        on_vacuum: Callable[[int], None] = lambda _n: None,
        on_run: Callable[[int], None] = lambda _n: None,
        first_run: float = FIRST_RUN,
    ):
        self.db = db
        self.lock = lock
        self.policy = policy
        self.clock = clock
        self.on_step = on_step
        self.on_vacuum = on_vacuum
        self.on_run = on_run
        self.first_run = first_run
        self.runs = 0
        self._stop = asyncio.Event()
        self._warned = False
        self._steps = 0

    def stop(self) -> None:
        """End after the step in hand."""
        self._stop.set()

    async def run(self) -> None:
        delay = self.first_run
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), delay)
                return
            except TimeoutError:
                pass
            policy = self.policy()
            if policy is None:  # retention: enabled: false
                delay = 3600.0
                continue
            try:
                await self.run_once(policy)
            except DatabaseError as exc:  # the next run starts over; nothing half-done
                log.error("retention: pruning failed: %s", exc)
            delay = policy.every_minutes * 60.0

    async def run_once(self, policy: RetentionConfig) -> Tally:
        """One run: prune everything due now, in steps, then return the free space."""
        now = self.clock.now()
        cursor = Cursor()
        total = Tally()
        while not cursor.finished and not self._stop.is_set():
            started = time.perf_counter()
            async with self.lock:
                step = retention.prune_step(self.db, policy, now, cursor)
            total.merge(step)
            self.on_step(step)
            await self._pause(started)
        async with self.lock:
            retention.record(self.db, total, now, actor="system")
        if total.total_rows:
            log.info(
                "retention: pruned %d rows, %d bytes (%s)",
                total.total_rows,
                sum(total.bytes.values()),
                ", ".join(f"{k} {n}" for k, n in total.rows.items() if n),
            )
        await self._vacuum()
        self.runs += 1
        self.on_run(retention.free_bytes(self.db))
        return total

    async def _vacuum(self) -> None:
        if retention.auto_vacuum(self.db) != "incremental":
            free = retention.free_bytes(self.db)
            if free and not self._warned:
                self._warned = True
                log.warning(
                    "retention: %d MiB of free pages stay in the file (it predates "
                    "auto_vacuum=INCREMENTAL): stop the daemon and run "
                    "'refloop prune --vacuum' once to return them",
                    free // (1024 * 1024),
                )
            return
        page = retention.page_size(self.db)
        pages = retention.VACUUM_PAGES
        left = int(self.db.conn.execute("PRAGMA freelist_count").fetchone()[0])
        while left and not self._stop.is_set():
            started = time.perf_counter()
            async with self.lock:
                held = time.perf_counter()
                now_left = retention.vacuum_step(self.db, pages)
                elapsed = time.perf_counter() - held
            if now_left >= left:
                return
            self.on_vacuum((left - now_left) * page)
            left = now_left
            # as many pages as fit in a step's time, judged by the last one
            scale = retention.STEP_SECONDS / max(elapsed, 1e-6)
            pages = int(min(MAX_PAGES, max(MIN_PAGES, pages * min(scale, 1.5))))
            await self._pause(started)
        await asyncio.to_thread(retention.checkpoint, self.db.path)

    async def _pause(self, started: float) -> None:
        """After a step: every few steps, checkpoint what they wrote in a worker thread
        (before the WAL reaches SQLite's autocheckpoint, which the inbox writer would run
        in its commit, the ACK waiting), and step aside at least as long as the step."""
        step = time.perf_counter() - started
        self._steps += 1
        if self._steps % CHECKPOINT_EVERY == 0:
            await asyncio.to_thread(retention.checkpoint, self.db.path)
        rest = started + step * (1 + PAUSE) - time.perf_counter()
        await asyncio.sleep(max(MIN_PAUSE, rest))
