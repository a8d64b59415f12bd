"""Processing: claim the inbox rows still ``received``, in id order, apply each message
and mark it, in one transaction.

A row's new status is written in the same transaction as its effects, so a crash between
ACK and processing loses nothing and repeats nothing: on restart processing claims what
is still ``received``. Processing reads by status, not by an id cursor: on a shared
database an id becomes visible at commit, out of id order, and "after the last id seen"
would skip a row committed late (docs/architecture.md, "Claims and leases"). The
``processed_cursor`` meta row of earlier versions is no longer read or written.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from typing import Final

from engine.clock import Clock
from engine.metrics import Metrics
from engine.model import Outcome, StoredMessage
from engine.store import Database, Inbox
from engine.store.db import Conn, DatabaseError, fault_kind, savepoint
from engine.store.sql import set_busy_timeout

__all__ = ["Outcome", "Processor"]  # Outcome is defined in engine.model, below routing


class _Busy(Exception):
    """BEGIN was refused for :data:`BUSY_LIMIT` seconds (nowait): a ``locked`` fault."""


log = logging.getLogger(__name__)

BATCH: Final = 16  # most messages one processing transaction takes
SLICE: Final = 0.002  # seconds of processing before the loop goes back to the listeners
MIN_PAUSE: Final = 0.0005  # seconds the processor steps aside, at least, while messages arrive
# Idle, the processor looks for rows again this often even when no commit of its own woke
# it: rows another node stored (its processor stopped or died), and, more often while
# someone waits for an outcome, rows another node processed (docs/scale-out.md).
IDLE_POLL: Final = 1.0
WAITER_POLL: Final = 0.2
LARGE: Final = 1024 * 1024  # bytes: a message this big is read off the loop, processed alone
FAULT_PAUSE: Final = 1.0  # seconds before processing tries again after a failed commit
STORAGE_FAULTS: Final = frozenset({"full", "io", "locked"})
# The worker process (engine.worker) has a core of its own and never delays an ACK by
# holding its event loop, only by holding SQLite's write lock: its slices take more
# messages, bounded by WORKER_SLICE seconds of lock held (checked between messages).
WORKER_BATCH: Final = 64
# the worker's SQLite page cache (KiB; SQLite's default is 2,000): on a database of a
# few hundred thousand referrals the default made most index pages of a slice's inserts
# a read from the OS (docs/performance.md, "Processing in the worker")
WORKER_CACHE_KIB: Final = 65536
WORKER_SLICE: Final = 0.005
# ``Processor.nowait`` (SQLite; off in the worker, see engine.app): a slice's BEGIN is
# tried without SQLite's busy handler (which sleeps 1, 2, 5, 10 ms ... between tries),
# and while it is refused the processor waits for the daemon's next commit (it says so
# over the socket) or BUSY_RETRY seconds, its event loop free; after BUSY_LIMIT seconds
# of refusals the slice counts as a ``locked`` fault, as the busy timeout's expiry did.
# Measured under a paced load it lost the lock to the daemon's writer (which tries every
# 0.2 ms) far more often than the busy handler does (docs/performance.md).
BUSY_RETRY: Final = 0.002
BUSY_LIMIT: Final = 5.0
# rows (and their previous decisions) a slice reads per statement: about what a slice
# processes in WORKER_SLICE, so a slice cut short by its budget has read little in vain
READ_AHEAD: Final = 8
BUSY: Final = -2  # process_available: the write lock was held by another connection


# A handler applies one message's effects using the database connection it is given
# (inside the open transaction) and says what became of it. It must not commit.
Handler = Callable[[StoredMessage, Conn], Outcome]


def no_routes(message: StoredMessage, conn: Conn) -> Outcome:
    """The handler when no routes are configured."""
    return Outcome("filtered", "no routes are configured")


class Processor:
    """Processes the inbox. One per database; runs as one task."""

    def __init__(
        self, db: Database, inbox: Inbox, handler: Handler, clock: Clock, metrics: Metrics
    ):
        self.db = db
        self.inbox = inbox
        self.handler = handler
        self.clock = clock
        self.metrics = metrics
        # the highest id processed so far, every row below it processed (on one node):
        # the lag metric's reference and a test's progress mark, never a feed position
        first = inbox.first_unprocessed()
        self.cursor = inbox.rows if first is None else first - 1
        self._rejected = inbox.rejected  # rejected rows counted as processed so far
        self._wake = asyncio.Event()
        # how long an idle processor waits for a wake-up before it looks again (rows
        # another node stored, outcomes of rows another node processed): the fallback
        # of the wake-ups (own commits, and LISTEN/NOTIFY on PostgreSQL)
        self.idle_poll = IDLE_POLL
        self.waiter_poll = WAITER_POLL
        self._waiters: dict[int, list[asyncio.Future[Outcome]]] = {}
        self._stopping = False
        self._loaded: StoredMessage | None = None  # a large message read off the loop
        # the kind of the last failed processing commit (``full``, ``io``, ``locked``,
        # ``other``) until a slice commits again; "" when fine. /readyz asks it.
        self.fault = ""
        # called after each processing commit (the engine wakes the outbox dispatcher
        # when the batch enqueued rows)
        self.after_commit: Callable[[], None] | None = None
        # called after each processing commit with what it processed (the worker process
        # reports the outcomes to the daemon's ACK waiters: engine.worker)
        self.on_processed: Callable[[list[tuple[int, Outcome]]], None] | None = None
        # while messages arrive, the pause after a slice as a share of the slice: 1 in
        # the daemon (ACKs and processing share the loop evenly); the worker process
        # pauses MIN_PAUSE only: the inbox writer, in the other process, tries for the
        # write lock every 0.2 ms, so that gap is enough to let a waiting commit in
        self.pause_share = 1.0
        # the worker process (engine.app sets these): larger slices, and (SQLite) BEGIN
        # tried without the busy handler, see BUSY_RETRY
        self.batch = BATCH
        self.slice = SLICE
        self.nowait = False
        self.busy_ms = 5000  # the connection's busy timeout, restored after a nowait BEGIN
        # the worker process: True when the inbox writer waits for the write lock (the
        # yield pipe, engine.supervisor); a slice asks between two messages and commits
        # there when so
        self.should_yield: Callable[[], bool] | None = None

    def notify(self) -> None:
        """New rows were committed."""
        self._wake.set()

    def watch(self, message_id: int) -> asyncio.Future[Outcome]:
        """A future resolved with the message's outcome once it is processed."""
        fut: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        row = self.inbox.outcome(self.db.conn, message_id)
        if row is not None and row[0] != "received":  # processed already (in any order)
            fut.set_result(Outcome(*row))
        else:
            self._waiters.setdefault(message_id, []).append(fut)
            self._wake.set()
        return fut

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        """Process as messages arrive, in slices of about :data:`SLICE` seconds, so an
        ACK never waits behind more than one slice. While the inbox is still taking
        commits, each slice is followed by a pause as long as the slice (at least
        :data:`MIN_PAUSE`): under load listeners and processing share the loop about
        evenly, and processing catches up in the gaps
        (``refloop_processing_lag_messages`` shows how far behind it is)."""
        commits = self.inbox.commits
        refused: float | None = None  # when BEGIN was first refused (nowait), else None
        while True:
            self._wake.clear()
            started = time.perf_counter()
            try:
                async with self.inbox.lock:  # the inbox writer's commit runs on its own thread
                    done = self.process_available(self.batch, budget=self.slice)
                if done == BUSY:
                    refused = started if refused is None else refused
                    if started - refused < BUSY_LIMIT:
                        # the daemon's group commit holds the lock: go right after it
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._wake.wait(), BUSY_RETRY)
                        continue
                    refused = None
                    raise _Busy()
                refused = None
            except Exception as exc:  # disk full, I/O error, locked: nothing committed
                if not isinstance(exc, (_Busy, *DatabaseError)):
                    raise
                kind = self.fault = "locked" if isinstance(exc, _Busy) else fault_kind(exc)
                log.error("processing: commit failed (%s); trying again in %gs", kind, FAULT_PAUSE)
                self.metrics.store_errors.labels("processing", kind).inc()
                if self._stopping:
                    return
                # the rows wait after the cursor; stop() or a new commit cuts the pause short
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), FAULT_PAUSE)
                continue
            self.fault = ""
            if self._stopping:
                return  # the rest stays received for the next start: nothing is lost
            if done < 0:
                await self._preload()
            elif not done:
                self._settle_waiters()
                try:
                    await asyncio.wait_for(
                        self._wake.wait(), self.waiter_poll if self._waiters else self.idle_poll
                    )
                except TimeoutError:
                    pass
            elif self.inbox.commits != commits:
                # messages arrived since the last slice: let the listeners run
                commits = self.inbox.commits
                pause = (time.perf_counter() - started) * self.pause_share
                await asyncio.sleep(max(MIN_PAUSE, pause))
            else:
                await asyncio.sleep(0)

    def settle(self, ids: list[int] | None = None) -> None:
        """Another node processed ``ids`` (None: maybe any): resolve the waiters of
        those now, without waiting for the next poll (engine.store.notify)."""
        if ids is None:
            self._settle_waiters()
        elif self._waiters:
            self._settle_waiters([i for i in ids if i in self._waiters])

    def _settle_waiters(self, ids: list[int] | None = None) -> None:
        """Resolve the futures of messages processed meanwhile by another node (on a
        shared database it may claim a row this node stored and is waiting for)."""
        for message_id in list(self._waiters) if ids is None else ids:
            row = self.inbox.outcome(self.db.conn, message_id)
            if row is not None and row[0] != "received":
                for fut in self._waiters.pop(message_id, ()):
                    if not fut.done():
                        fut.set_result(Outcome(*row))

    async def _preload(self) -> None:
        """Read the next message (a large one) in a worker thread, for the next slice."""
        pending = self.inbox.claim(self.db.conn, 1)  # a read: the slice claims it again
        if pending:
            self._loaded = await self.inbox.load(pending[0][0])

    def process_available(self, limit: int = BATCH, *, budget: float | None = None) -> int:
        """Claim up to ``limit`` messages still ``received`` and process them in one
        transaction (each message in its own savepoint, so one failure rolls back only
        that message's effects), stopping early once ``budget`` seconds have gone; returns
        how many.

        Bytes are read one message at a time. A message over :data:`LARGE` bytes is
        processed alone in its transaction; with a ``budget`` (the daemon's slices) it
        must first be read off the loop: then nothing is processed and -1 is returned
        (the caller awaits :meth:`_preload` and calls again)."""
        loaded, self._loaded = self._loaded, None
        outcomes: list[Outcome] = []
        ids: list[int] = []
        now = self.clock.now()
        deadline = None if budget is None else time.perf_counter() + budget
        nowait = self.nowait and budget is not None
        began = False
        if nowait:
            set_busy_timeout(self.db.conn, 0)
        if self.should_yield is not None and budget is not None:
            self.should_yield()  # a request from before this slice is answered already
        try:
            # not fsync'd on its own (see Database.transaction): the next inbox commit or
            # any durable commit makes it durable; a crash before that only repeats
            # processing
            with self.db.transaction(durable=False) as conn:
                began = True
                if nowait:
                    nowait = False
                    set_busy_timeout(conn, self.busy_ms)
                done = self._slice(conn, limit, loaded, deadline, now, outcomes, ids)
        except DatabaseError as exc:
            if not began and self.nowait and budget is not None and fault_kind(exc) == "locked":
                self._loaded = loaded  # still in hand for the next try
                return BUSY
            raise
        finally:
            if nowait:  # BEGIN failed: the busy timeout back for everything else
                set_busy_timeout(self.db.conn, self.busy_ms)
        if done <= 0:
            return done
        if ids:
            self.cursor = max(self.cursor, ids[-1])
        if len(ids) == done < limit:  # the claim took every row left: none is behind
            self._caught_up()
        if self.after_commit is not None:
            self.after_commit()
        for message_id, outcome in zip(ids, outcomes, strict=True):
            self.metrics.processed.labels(outcome.status).inc()
            for fut in self._waiters.pop(message_id, ()):
                if not fut.done():
                    fut.set_result(outcome)
        self.metrics.processing_lag.set(max(0, self.inbox.rows - self.cursor))
        if self.on_processed is not None and ids:
            self.on_processed(list(zip(ids, outcomes, strict=True)))
        return max(1, len(ids))

    def _slice(
        self,
        conn: Conn,
        limit: int,
        loaded: StoredMessage | None,
        deadline: float | None,
        now: float,
        outcomes: list[Outcome],
        ids: list[int],
    ) -> int:
        """The body of :meth:`process_available`'s transaction: how many rows the claim
        took (0: none, the processor caught up; -1: a large one to read off the loop)."""
        pending = self.inbox.claim(conn, limit)
        if not pending:
            self._caught_up()
            return 0
        claimed = len(pending)
        if pending[0][1] > LARGE:
            pending = pending[:1]
            if deadline is not None and (loaded is None or loaded.id != pending[0][0]):
                return -1
        else:
            pending = list(itertools.takewhile(lambda p: p[1] <= LARGE, pending))
        prefetch = getattr(self.handler, "prefetch", None)
        rows: dict[int, StoredMessage] = {}
        marks: list[tuple[int, str, str, str]] = []
        try:
            for n, (message_id, _) in enumerate(pending):
                if message_id not in rows and (loaded is None or loaded.id != message_id):
                    # the next few small rows and their previous decisions, one read each
                    chunk = [i for i, _ in pending[n : n + READ_AHEAD]]
                    rows = self.inbox.get_many(conn, chunk)
                    if prefetch is not None:
                        prefetch(conn, chunk)
                row = loaded if loaded is not None and loaded.id == message_id else None
                row = row or rows.get(message_id)
                if row is None:  # not possible (rows are never deleted); skip, never stop
                    continue
                outcomes.append(self._process_one(row, conn, now, marks))
                ids.append(message_id)
                if deadline is not None and (
                    time.perf_counter() >= deadline
                    or (self.should_yield is not None and self.should_yield())
                ):
                    break
            # the slice's decisions and statuses, one statement each
            flush = getattr(self.handler, "flush", None)
            if flush is not None:
                flush(conn)
            self.inbox.mark_many(conn, marks, now=now)
        finally:
            forget = getattr(self.handler, "forget", None)
            if forget is not None:
                forget()
        return claimed

    def _caught_up(self) -> None:
        """Nothing is left ``received``: every stored row counts as processed, the rows
        rejected at the door included (they are stored with their outcome and never
        claimed; ``refloop_messages_processed_total{status="rejected"}`` counts them here,
        as it did when processing read every row)."""
        self.cursor = max(self.cursor, self.inbox.rows)
        rejected, self._rejected = self.inbox.rejected - self._rejected, self.inbox.rejected
        if rejected:
            self.metrics.processed.labels("rejected").inc(rejected)
        self.metrics.processing_lag.set(0)

    def _process_one(
        self,
        row: StoredMessage,
        conn: Conn,
        now: float,
        marks: list[tuple[int, str, str, str]] | None = None,
    ) -> Outcome:
        """One message in its savepoint. With ``marks`` its status row is not written
        here but appended there (the slice writes them all in one statement before its
        COMMIT: the same transaction)."""
        if row.status != "received":
            # rejected at the door, or already processed (a replay marks rows itself)
            return Outcome(row.status, row.error, row.route)
        try:
            with savepoint(conn, "message"):
                outcome = self.handler(row, conn)
                if marks is None:
                    self.inbox.mark(
                        row.id, outcome.status, error=outcome.error, route=outcome.route, now=now
                    )
        except DatabaseError as exc:
            if fault_kind(exc) in STORAGE_FAULTS:
                raise  # the store's fault, not the message's: the slice is tried again
            log.exception("message %d: processing failed", row.id)
            outcome = Outcome("error", f"internal error: {type(exc).__name__}")
            if marks is None:
                self.inbox.mark(row.id, "error", error=outcome.error, now=now)
        except Exception as exc:  # one message's failure must not stop the feed
            log.exception("message %d: processing failed", row.id)
            outcome = Outcome("error", f"internal error: {type(exc).__name__}")
            if marks is None:
                self.inbox.mark(row.id, "error", error=outcome.error, now=now)
        if marks is not None:
            marks.append((row.id, outcome.status, outcome.error, outcome.route))
        return outcome
