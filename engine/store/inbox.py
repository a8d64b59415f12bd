"""The inbox: every message a source received, exactly as received, committed before ACK.

Writes from all connections go through one writer task that group-commits: each COMMIT
takes whatever is queued when the previous one returns (natural batching; a fixed wait
only adds latency — reference/performance-limits.md). Callers await their row's commit,
then ACK.

Dedupe (HL7 v2.5.1 §2.9.2 resends): the same sender (MSH-3/4) + MSH-10 + identical
bytes is not stored again; its original row's ``duplicates`` count goes up and the
caller ACKs again. The same control id with different bytes is stored and flagged
``control-id-reused``. The unique index ``messages_dedupe`` (sender, control id,
``dedupe_hash``) enforces it and one ``INSERT ... ON CONFLICT DO UPDATE ... RETURNING``
applies it, so two writers (two nodes receiving the same resend) end with one row and
both ACK it; there is no read-then-insert window.
``control-id-reused``.

A commit that fails (disk full, I/O error, the database locked past
:data:`WRITER_BUSY_MS`) fails the futures of that batch only, with :class:`StoreFault`:
the listener answers them AE/CE and the sender sends again. :attr:`Inbox.fault` then
names the fault (readiness turns 503) until a commit succeeds again; while nothing
arrives, the writer probes every :data:`PROBE_SECONDS` with a one-row write, so it
notices by itself when space returns.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final

from engine.errors import StoreError
from engine.model import Inbound, StoredMessage
from engine.store import notify, trace
from engine.store.checkpoint import CHECKPOINT_SECONDS, Checkpointer, no_autocheckpoint
from engine.store.message_filter import MessageFilter, where
from engine.store.sql import (
    Conn,
    Database,
    DatabaseError,
    fault_kind,
    for_update,
)

log = logging.getLogger(__name__)

MAX_BATCH: Final = 512
WRITER_BUSY_MS: Final = 10_000
# While another connection holds SQLite's write lock (the processing worker's slice, the
# dispatcher, the CLI), the writer tries BEGIN IMMEDIATE again this often, up to
# WRITER_BUSY_MS: SQLite's own busy handler sleeps 1, 2, 5, 10, 15 ms ... between tries,
# so a commit could wait 8 ms for a lock freed after 3; this gets it within 0.2 ms.
WRITER_SPIN: Final = 0.0002
MAX_BATCH_BYTES: Final = 8 * 1024 * 1024  # most bytes one group commit writes
ALONE_BYTES: Final = 256 * 1024  # a frame over this is committed alone
FAULT_LOG_SECONDS: Final = 60.0  # while a fault stands: one log line per this, with a count
PROBE_SECONDS: Final = 1.0  # after a failed commit: how often an idle writer tries a write
PROBE_KEY: Final = "store_probe_at"  # the meta row the probe writes

RAW_BATCH: Final = 1000  # rows whose bytes the migration moves per statement
ANY_BYTES: Final = b""  # dedupe_hash of a message deduplicated on its key alone (no MSH)

# The bytes live in their own table (message_raw), written in the same transaction as
# their messages row: SQLite rewrites a whole record on UPDATE, so a status or decision
# update of a row holding 15 MB of bytes rewrote (and fsync'd) those 15 MB each time.
_COLUMNS: Final = (
    "id, received_at, source, peer, sending_app, sending_facility, control_id, message_type, "
    "version, coalesce((SELECT raw FROM message_raw WHERE message_id = messages.id), x''), "
    "charset, status, ack_code, error, duplicates, flags, route, pruned_at, sha256"
)
# a message's size in bytes, as a column expression of a query on ``messages``
RAW_SIZE: Final = "(SELECT length(raw) FROM message_raw WHERE message_id = messages.id)"
_FROM: Final = " FROM messages"


@dataclass(frozen=True, slots=True)
class AddResult:
    """What the commit of one inbound message produced."""

    id: int
    duplicate: bool  # an identical resend: not stored again
    status: str  # the row's status (for a duplicate: the original's)
    ack_code: str  # for a duplicate: the code the original was answered with


class StoreFault(StoreError):
    """The commit that would have stored a message failed; it is not stored."""

    def __init__(self, kind: str):
        super().__init__(f"message could not be stored ({kind})")
        self.kind = kind


def _row(r: tuple[Any, ...]) -> StoredMessage:
    return StoredMessage(*r)


class Inbox:
    """Inbox reads and the group-commit writer. Create inside the event loop."""

    def __init__(self, db: Database):
        self.db = db
        self._queue: list[tuple[Inbound, str, asyncio.Future[AddResult]]] = []
        self._wake = asyncio.Event()
        self._closed = False
        # one SQLite writer at a time: the writer thread's commit and the processor's
        # transactions on the main connection take turns here instead of in busy_timeout
        self.lock = asyncio.Lock()
        self.commits = 0  # batches committed (for metrics and tests)
        self.rejected = 0  # rows stored ``rejected`` by this process (they are never claimed)
        self.rows = self._count()
        self.fault = ""  # the kind of the last failed commit, until one succeeds again
        self._fault_logged = 0.0  # monotonic time the last failed commit was logged
        self._fault_unlogged = 0  # failed commits since, not logged (no flood on a full disk)
        self.on_fault: Callable[[str], None] | None = None  # each failed commit (metrics)
        # each group commit: seconds it waited for the write lock (metrics)
        self.on_wait: Callable[[float], None] | None = None
        # called on the writer's thread (so: thread-safe) when a group commit finds the
        # write lock held: the engine asks the processing worker to step aside after the
        # message in hand (engine.supervisor, the yield pipe)
        self.on_busy: Callable[[], None] | None = None
        self._waited = 0.0  # the last commit's wait, set on the writer thread
        # how often the writer's checkpointer thread checkpoints the WAL (SQLite file)
        self.checkpoint_seconds = CHECKPOINT_SECONDS
        self._ended = 0.0  # when the last commit returned, on the writer thread
        # REFLOOP_TXN_TRACE: when each queued message was added (engine.store.trace)
        self._added: dict[int, float] | None = {} if trace.enabled() else None

    def _count(self) -> int:
        row = self.db.conn.execute("SELECT max(id) FROM messages").fetchone()
        return int(row[0] or 0)

    # -- writing ---------------------------------------------------------------

    def add(self, inbound: Inbound, ack_code: str) -> asyncio.Future[AddResult]:
        """Queue ``inbound`` for the next group commit; the future resolves after COMMIT.

        ``ack_code`` is the code the caller will answer with if the message is new
        (recorded with the row; AR rows get status ``rejected``).
        """
        if self._closed:
            raise StoreError("inbox is closed")
        fut: asyncio.Future[AddResult] = asyncio.get_running_loop().create_future()
        self._queue.append((inbound, ack_code, fut))
        if self._added is not None:
            self._added[id(fut)] = time.perf_counter()
        self._wake.set()
        return fut

    async def run_writer(self) -> None:
        """The writer task: commit whatever is queued, repeat. Returns after :meth:`close`
        once the queue is empty.

        The commit (INSERTs, COMMIT, fsync) runs on a dedicated thread with its own
        connection: sqlite3 releases the GIL while SQLite works, so a 15 MB frame's write
        no longer holds the event loop (other connections' frames are read, their ACKs
        written, meanwhile). Futures resolve on the loop after COMMIT returned: the ACK
        still waits for durability. :attr:`lock` is held for the commit, so the
        processor's transactions wait for it without blocking the loop."""
        loop = asyncio.get_running_loop()
        writer = _writer_database(self.db)
        executor = ThreadPoolExecutor(1, thread_name_prefix="inbox-writer")
        # checkpoints off the commit (engine.store.checkpoint); an in-memory database and
        # PostgreSQL have none
        checkpointer = None
        if writer is not self.db and writer.dialect == "sqlite":
            checkpointer = Checkpointer(writer.path, self.checkpoint_seconds).start()
        try:
            while True:
                if not self._queue:
                    if self._closed:
                        return
                    await self._idle(loop, executor, writer)
                    continue
                batch = self._take()
                taken = time.perf_counter()
                try:
                    async with self.lock:
                        results = await loop.run_in_executor(executor, self._commit, writer, batch)
                except DatabaseError as exc:
                    self._failed(exc, len(batch))
                    for _, _, fut in batch:
                        if not fut.done():
                            fut.set_exception(StoreFault(self.fault))
                    await asyncio.sleep(0.05)
                    continue
                self.commits += 1
                if self.on_wait is not None:
                    self.on_wait(self._waited)
                if self._added is not None:
                    back = time.perf_counter()
                    oldest = min(self._added.pop(id(f), taken) for _, _, f in batch)
                    # n, queued (oldest), lock wait, commit call, back on the loop after it
                    trace.record(
                        "inbox-batch", taken, len(batch), taken - oldest, self._waited,
                        self._ended - taken, back - self._ended,
                    )  # fmt: skip
                self.rows = max([self.rows, *(r.id for r in results)])
                self._recovered()
                for (_, _, fut), result in zip(batch, results, strict=True):
                    if not fut.done():
                        fut.set_result(result)
                # let the sockets that became readable during the commit queue their frames
                await asyncio.sleep(0)
        finally:
            executor.shutdown(wait=True)
            if writer is not self.db:
                writer.close()
            if checkpointer is not None:
                await asyncio.to_thread(checkpointer.stop)

    async def _idle(self, loop: asyncio.AbstractEventLoop, executor: Any, writer: Database) -> None:
        """Wait for work; while a fault stands, try a one-row write every
        :data:`PROBE_SECONDS` meanwhile (space may come back with no message arriving)."""
        self._wake.clear()
        if not self.fault:
            await self._wake.wait()
            return
        try:
            await asyncio.wait_for(self._wake.wait(), PROBE_SECONDS)
            return
        except TimeoutError:
            pass
        try:
            async with self.lock:
                await loop.run_in_executor(executor, _probe, writer)
        except DatabaseError as exc:
            self.fault = fault_kind(exc)
            return
        self._recovered()

    def _failed(self, exc: BaseException, count: int) -> None:
        kind = fault_kind(exc)
        now = time.monotonic()
        if kind != self.fault or now - self._fault_logged >= FAULT_LOG_SECONDS:
            # the SQLite message names the condition (e.g. "database or disk is full"),
            # never a statement's data
            more = f" ({self._fault_unlogged} more failed commits since the last line)"
            log.error(
                "inbox commit of %d messages failed (%s): %s%s",
                count, kind, exc, more if self._fault_unlogged else "",
            )  # fmt: skip
            self._fault_logged, self._fault_unlogged = now, 0
        else:
            self._fault_unlogged += 1
        self.fault = kind
        if self.on_fault is not None:
            self.on_fault(kind)

    def _recovered(self) -> None:
        if self.fault:
            log.warning(
                "inbox: the store takes writes again (after %s; %d failed commits not logged)",
                self.fault, self._fault_unlogged,
            )  # fmt: skip
            self.fault, self._fault_logged, self._fault_unlogged = "", 0.0, 0

    def _take(self) -> list[tuple[Inbound, str, asyncio.Future[AddResult]]]:
        """The next batch, up to MAX_BATCH messages and MAX_BATCH_BYTES.

        A frame over ALONE_BYTES is committed alone, and only once it heads the queue:
        until then the small frames of *other* connections queued behind it go first, so
        a probe's message never waits for a 15 MB write it arrived after the start of
        (it still waits for one already under way). Each connection's frames keep their
        order (the frames a connection sent after its large one wait with it)."""
        queue = self._queue
        if len(queue[0][0].raw) > ALONE_BYTES:
            return [queue.pop(0)]
        taken: list[int] = []
        held: set[tuple[str, str]] = set()  # connections with a large frame waiting
        size = 0
        for i, (inbound, _, _) in enumerate(queue):
            if len(taken) >= MAX_BATCH:
                break
            conn = (inbound.source, inbound.peer)
            if conn in held or len(inbound.raw) > ALONE_BYTES:
                held.add(conn)
                continue
            if taken and size + len(inbound.raw) > MAX_BATCH_BYTES:
                break
            size += len(inbound.raw)
            taken.append(i)
        batch = [queue[i] for i in taken]
        if len(taken) == taken[-1] + 1:  # the usual case: a run from the head
            del queue[: len(taken)]
        else:
            keep = set(range(len(queue))).difference(taken)
            self._queue = [queue[i] for i in sorted(keep)]
        return batch

    def close(self) -> None:
        """Stop accepting; the writer drains what is queued, then returns."""
        self._closed = True
        self._wake.set()

    def _commit(
        self, db: Database, batch: list[tuple[Inbound, str, asyncio.Future[AddResult]]]
    ) -> list[AddResult]:
        """One group commit on ``db`` (the writer thread's connection). Touches no
        asyncio object: the loop resolves the futures."""
        started = time.perf_counter()
        nudged = False
        while True:
            began = False
            try:
                with db.transaction() as conn:  # durable: the ACK waits for this fsync
                    began = True
                    self._waited = time.perf_counter() - started
                    results = [self._insert(conn, m, ack_code) for m, ack_code, _ in batch]
                self._ended = time.perf_counter()
                return results
            except DatabaseError as exc:
                # only BEGIN waits here (the writer's connection has no busy timeout on
                # SQLite); a statement failing once the transaction began is a fault
                if began or fault_kind(exc) != "locked":
                    raise
                if time.perf_counter() - started > WRITER_BUSY_MS / 1000:
                    raise
                if not nudged and self.on_busy is not None:
                    nudged = True
                    self.on_busy()  # once per commit: ask the lock's holder to step aside
                waited = time.perf_counter() - started
                time.sleep(WRITER_SPIN if waited < 0.02 else 10 * WRITER_SPIN)

    def _insert(self, conn: Conn, m: Inbound, ack_code: str) -> AddResult:
        digest = hashlib.sha256(m.raw).digest()
        msh = m.msh
        # what a resend must repeat to be the same message: the bytes (HL7), or nothing
        # more than the key (a FHIR resource version is immutable: the same type/id/version
        # is the same message whatever its serialisation, FHIR R4 §2.42 versionId; a
        # Direct message id likewise); None: no key, never deduplicated
        dedupe: bytes | None = None
        if msh is not None:
            dedupe = digest
        elif m.control_id:
            dedupe = ANY_BYTES
        status = "rejected" if m.reject is not None else "received"
        error = m.reject[3] if m.reject is not None else ""
        sending_app = msh.sending_app if msh else m.sender
        sending_facility = msh.sending_facility if msh else ""
        control_id = msh.control_id if msh else m.control_id
        r = conn.execute(
            "INSERT INTO messages (received_at, source, peer, sending_app, sending_facility, "
            "receiving_app, receiving_facility, control_id, message_type, version, charset, "
            "sha256, dedupe_hash, status, ack_code, error, batch_ref, flags) "
            "VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16,?17, "
            # the same key with other bytes: stored, flagged
            "CASE WHEN ?13 IS NOT NULL AND EXISTS (SELECT 1 FROM messages WHERE "
            "sending_app = ?4 AND sending_facility = ?5 AND control_id = ?8 "
            "AND dedupe_hash IS NOT NULL) THEN 'control-id-reused' ELSE '' END) "
            "ON CONFLICT (sending_app, sending_facility, control_id, dedupe_hash) "
            "DO UPDATE SET duplicates = messages.duplicates + 1 "
            "RETURNING id, status, ack_code, duplicates",
            (
                m.received_at,
                m.source,
                m.peer,
                sending_app,
                sending_facility,
                msh.receiving_app if msh else "",
                msh.receiving_facility if msh else "",
                control_id,
                msh.message_type if msh else m.message_type,
                msh.version if msh else "",
                m.text_encoding,
                digest,
                dedupe,
                status,
                ack_code,
                error,
                m.batch_ref,
            ),
        ).fetchone()
        row_id = int(r[0])
        if int(r[3]):  # the row was there: an identical resend, counted, not stored again
            return AddResult(row_id, True, str(r[1]), str(r[2]))
        conn.execute("INSERT INTO message_raw (message_id, raw) VALUES (?, ?)", (row_id, m.raw))
        if m.reject is None:
            notify.mark(conn, notify.RECEIVED)  # other nodes' processors, once per commit
        else:
            self.rejected += 1  # counted even if the commit then fails: only a gauge drifts
        return AddResult(row_id, False, status, ack_code)

    def add_in(self, conn: Conn, inbounds: list[Inbound], ack_code: str) -> list[AddResult]:
        """Store ``inbounds`` inside the caller's open transaction, beside writes that must
        commit with them (a FHIR poller's cursor). Same dedupe as :meth:`add`; the caller
        commits, then notifies the processor."""
        results = [self._insert(conn, m, ack_code) for m in inbounds]
        self.rows = max([self.rows, *(r.id for r in results)])
        return results

    # -- reading ---------------------------------------------------------------

    def get(self, message_id: int) -> StoredMessage | None:
        r = self.db.conn.execute(f"SELECT {_COLUMNS}{_FROM} WHERE id = ?", (message_id,)).fetchone()
        return _row(r) if r else None

    def get_many(self, conn: Conn, ids: list[int]) -> dict[int, StoredMessage]:
        """:meth:`get` of several rows in one statement (the processor reads a slice's
        small messages so; their sizes are bounded by the caller)."""
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = conn.execute(f"SELECT {_COLUMNS}{_FROM} WHERE id IN ({marks})", ids).fetchall()
        return {int(r[0]): _row(r) for r in rows}

    def claim(self, conn: Conn, limit: int) -> list[tuple[int, int]]:
        """(id, size of its bytes) of the first ``limit`` rows still ``received``, in id
        order, without their bytes (the processor loads them one message at a time: 16 rows
        of up to 16 MiB each were 256 MiB at once). Call inside the processing transaction.

        A claim by status, not by "id after the last one processed": on a shared database
        an id is handed out at insert and becomes visible at commit, so a row with a lower
        id can appear after a higher one; a high-water mark would skip it for ever. (On
        PostgreSQL this read is ``... FOR UPDATE SKIP LOCKED``; SQLite's BEGIN IMMEDIATE
        already excludes every other writer.) Served by ``messages_status (status, id)``."""
        rows = conn.execute(
            f"SELECT id, {RAW_SIZE} FROM messages WHERE status = 'received' ORDER BY id LIMIT ?"
            + for_update(conn, skip_locked=True),
            (limit,),
        ).fetchall()
        return [(int(r[0]), int(r[1] or 0)) for r in rows]

    def first_unprocessed(self) -> int | None:
        """The lowest id still ``received`` (None: every stored message is processed)."""
        row = self.db.conn.execute(
            "SELECT min(id) FROM messages WHERE status = 'received'"
        ).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def outcome(self, conn: Conn, message_id: int) -> tuple[str, str, str] | None:
        """(status, error, route) of row ``message_id`` without its bytes; None: no row."""
        r = conn.execute(
            "SELECT status, error, route FROM messages WHERE id = ?", (message_id,)
        ).fetchone()
        return None if r is None else (str(r[0]), str(r[1]), str(r[2]))

    async def load(self, message_id: int) -> StoredMessage | None:
        """:meth:`get` on a short-lived connection in a worker thread: reading a large
        message's bytes does not hold the event loop."""
        reader = self.db.another()
        if reader is self.db:  # an in-memory database has only its one connection
            return self.get(message_id)
        return await asyncio.to_thread(_load, reader, message_id)

    def list(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        message_type: str | None = None,
        status: str | None = None,
        source: str | None = None,
        ids: list[int] | None = None,
        limit: int = 50,
        newest_first: bool = True,
    ) -> Iterator[StoredMessage]:
        """Metadata search on indexed columns (engine.store.message_filter: ``*`` in
        ``message_type`` stands for any text). ``limit`` 0 means all."""
        flt = MessageFilter(
            message_type=message_type,
            status=status,
            source=source,
            since=since,
            until=until,
            ids=tuple(ids or ()),
        )
        clause, args = where(flt)
        sql = f"SELECT {_COLUMNS}{_FROM}{clause}"
        sql += " ORDER BY id " + ("DESC" if newest_first else "ASC")
        if limit:
            sql += " LIMIT ?"
            args.append(limit)
        for r in self.db.conn.execute(sql, args):
            yield _row(r)

    def mark(
        self, message_id: int, status: str, *, error: str = "", route: str = "", now: float
    ) -> None:
        """Record a processing outcome; call inside the transaction that applies its effects."""
        self.db.conn.execute(
            "UPDATE messages SET status = ?, error = ?, route = ?, processed_at = ? WHERE id = ?",
            (status, error, route, now, message_id),
        )
        # on-processed ACK waiters on other nodes: one NOTIFY with every id, at COMMIT
        notify.mark(self.db.conn, notify.PROCESSED, message_id)

    def mark_many(
        self, conn: Conn, marks: Sequence[tuple[int, str, str, str]], *, now: float
    ) -> None:
        """:meth:`mark` for several messages, (id, status, error, route) each, in one
        statement (a processing slice's)."""
        if not marks:
            return
        conn.executemany(
            "UPDATE messages SET status = ?, error = ?, route = ?, processed_at = ? WHERE id = ?",
            [(status, error, route, now, i) for i, status, error, route in marks],
        )
        for i, *_ in marks:
            notify.mark(conn, notify.PROCESSED, i)


def _load(reader: Database, message_id: int) -> StoredMessage | None:
    try:
        r = reader.conn.execute(f"SELECT {_COLUMNS}{_FROM} WHERE id = ?", (message_id,)).fetchone()
    finally:
        reader.close()
    return _row(r) if r else None


def raw_bytes(conn: Conn, message_id: int) -> bytes | None:
    """The exact bytes of inbox row ``message_id`` (every reader of raw bytes comes
    here), or None when there is no such row."""
    r = conn.execute("SELECT raw FROM message_raw WHERE message_id = ?", (message_id,)).fetchone()
    return bytes(r[0]) if r else None


def migrate_raw(db: Any) -> None:
    """Move every row's bytes out of ``messages`` into ``message_raw``, RAW_BATCH rows
    per statement (an existing inbox may hold gigabytes), then drop the column."""
    conn = db.conn
    conn.execute("CREATE TABLE message_raw (message_id INTEGER PRIMARY KEY, raw BLOB NOT NULL)")
    last = 0
    while True:
        ids = [
            int(r[0])
            for r in conn.execute(
                "SELECT id FROM messages WHERE id > ? ORDER BY id LIMIT ?", (last, RAW_BATCH)
            )
        ]
        if not ids:
            break
        conn.execute(
            "INSERT INTO message_raw (message_id, raw) "
            "SELECT id, raw FROM messages WHERE id BETWEEN ? AND ?",
            (ids[0], ids[-1]),
        )
        last = ids[-1]
    conn.execute("ALTER TABLE messages DROP COLUMN raw")


def migrate_dedupe(db: Any) -> None:
    """Dedupe by a unique index (issue 17): ``dedupe_hash`` is the bytes' SHA-256 for an
    HL7 row, ``x''`` for a row deduplicated on its key alone (a FHIR resource version, a
    Direct message), NULL for a row with no key. Existing rows: HL7 by their MSH bytes,
    version or TYPE^TRIGGER; of rows that would collide, the oldest keeps the key."""
    conn = db.conn
    conn.execute("ALTER TABLE messages ADD COLUMN dedupe_hash BLOB")
    conn.execute(
        "UPDATE messages SET dedupe_hash = CASE "
        "WHEN version != '' OR instr(message_type, '^') > 0 OR (SELECT substr(raw, 1, 3) "
        "FROM message_raw WHERE message_id = messages.id) = x'4d5348' THEN sha256 "
        "WHEN control_id != '' THEN x'' ELSE NULL END"
    )
    conn.execute(
        "UPDATE messages SET dedupe_hash = NULL WHERE id IN (SELECT id FROM (SELECT id, "
        "row_number() OVER (PARTITION BY sending_app, sending_facility, control_id, "
        "dedupe_hash ORDER BY id) AS n FROM messages WHERE dedupe_hash IS NOT NULL) AS ranked "
        "WHERE n > 1)"
    )
    conn.execute(
        "CREATE UNIQUE INDEX messages_dedupe ON messages "
        "(sending_app, sending_facility, control_id, dedupe_hash)"
    )


def _probe(db: Database) -> None:
    """A one-row durable write: does the store take writes again?"""
    with db.transaction() as conn:
        conn.execute(
            "INSERT INTO meta(key, value) VALUES(?, strftime('%s', 'now')) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (PROBE_KEY,),
        )


def _writer_database(db: Database) -> Database:
    """The writer thread's own connection to ``db`` (same durability setting); an
    in-memory database has only its one connection."""
    # the processor waits on Inbox.lock, not here; other writers (CLI, dispatcher) are
    # brief, and a failed commit is answered AR (the sender resends): nothing is lost
    # no busy timeout on SQLite: Inbox._commit tries BEGIN IMMEDIATE again itself, every
    # WRITER_SPIN seconds, so a lock freed between two of SQLite's sleeps is taken at once
    writer = db.another(busy_ms=0 if db.dialect == "sqlite" else WRITER_BUSY_MS)
    if writer is not db and writer.dialect == "sqlite":
        no_autocheckpoint(writer.conn)  # never a checkpoint inside the ACK's commit
    if writer is not db and isinstance(getattr(writer.conn, "label", None), str):
        writer.conn.label = "inbox-writer"  # REFLOOP_SQL_STATS: its counts apart
    return writer
