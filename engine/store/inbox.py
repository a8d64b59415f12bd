"""The inbox: every message a source received, exactly as received, committed before ACK.

Writes from all connections go through one writer task that group-commits: each COMMIT
takes whatever is queued when the previous one returns (natural batching; a fixed wait
only adds latency — reference/performance-limits.md). Callers await their row's commit,
then ACK.

Dedupe (HL7 v2.5.1 §2.9.2 resends): the same sender (MSH-3/4) + MSH-10 + identical
bytes is not stored again; its original row's ``duplicates`` count goes up and the
caller ACKs again. The same control id with different bytes is stored and flagged
``control-id-reused``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

from engine.errors import StoreError
from engine.model import Inbound, StoredMessage
from engine.store.message_filter import MessageFilter, where
from engine.store.sql import Database

log = logging.getLogger(__name__)

MAX_BATCH: Final = 512

_COLUMNS: Final = (
    "id, received_at, source, peer, sending_app, sending_facility, control_id, message_type, "
    "version, raw, charset, status, ack_code, error, duplicates, flags, route"
)


@dataclass(frozen=True, slots=True)
class AddResult:
    """What the commit of one inbound message produced."""

    id: int
    duplicate: bool  # an identical resend: not stored again
    status: str  # the row's status (for a duplicate: the original's)
    ack_code: str  # for a duplicate: the code the original was answered with


def _row(r: tuple[Any, ...]) -> StoredMessage:
    return StoredMessage(*r)


class Inbox:
    """Inbox reads and the group-commit writer. Create inside the event loop."""

    def __init__(self, db: Database):
        self.db = db
        self._queue: list[tuple[Inbound, str, asyncio.Future[AddResult]]] = []
        self._wake = asyncio.Event()
        self._closed = False
        self.commits = 0  # batches committed (for metrics and tests)
        self.rows = self._count()

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
        self._wake.set()
        return fut

    async def run_writer(self) -> None:
        """The writer task: commit whatever is queued, repeat. Returns after :meth:`close`
        once the queue is empty."""
        while True:
            if not self._queue:
                if self._closed:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = self._queue[:MAX_BATCH]
            del self._queue[: len(batch)]
            try:
                results = self._commit(batch)
            except sqlite3.Error as exc:
                log.error("inbox commit of %d messages failed: %s", len(batch), exc)
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_exception(StoreError("inbox write failed"))
                await asyncio.sleep(0.05)
                continue
            for (_, _, fut), result in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(result)
            # let the sockets that became readable during the commit queue their frames
            await asyncio.sleep(0)

    def close(self) -> None:
        """Stop accepting; the writer drains what is queued, then returns."""
        self._closed = True
        self._wake.set()

    def _commit(
        self, batch: list[tuple[Inbound, str, asyncio.Future[AddResult]]]
    ) -> list[AddResult]:
        results: list[AddResult] = []
        pending: dict[tuple[str, str, str], list[tuple[int, bytes, str, str]]] = {}
        with self.db.transaction() as conn:  # durable: the ACK waits for this fsync
            for inbound, ack_code, _ in batch:
                results.append(self._insert(conn, inbound, ack_code, pending))
        self.commits += 1
        return results

    def _insert(
        self,
        conn: sqlite3.Connection,
        m: Inbound,
        ack_code: str,
        pending: dict[tuple[str, str, str], list[tuple[int, bytes, str, str]]],
    ) -> AddResult:
        digest = hashlib.sha256(m.raw).digest()
        msh = m.msh
        flags = ""
        key: tuple[str, str, str] | None = None
        if msh is not None:
            key = (msh.sending_app, msh.sending_facility, msh.control_id)
        elif m.control_id:
            key = (m.sender, "", m.control_id)
        if key is not None:
            earlier = pending.get(key)
            if earlier is None:
                earlier = [
                    (int(r[0]), bytes(r[1]), str(r[2]), str(r[3]))
                    for r in conn.execute(
                        "SELECT id, sha256, status, ack_code FROM messages "
                        "WHERE control_id = ? AND sending_app = ? AND sending_facility = ?",
                        (key[2], key[0], key[1]),
                    )
                ]
                pending[key] = earlier
            for row_id, sha, status, code in earlier:
                # a FHIR resource version (no MSH) is immutable: the same type/id/version
                # is the same message whatever its serialisation (FHIR R4 §2.42 versionId)
                if sha == digest or msh is None:
                    conn.execute(
                        "UPDATE messages SET duplicates = duplicates + 1 WHERE id = ?", (row_id,)
                    )
                    return AddResult(row_id, True, status, code)
            if earlier:
                flags = "control-id-reused"
        status = "rejected" if m.reject is not None else "received"
        error = m.reject[3] if m.reject is not None else ""
        cur = conn.execute(
            "INSERT INTO messages (received_at, source, peer, sending_app, sending_facility, "
            "receiving_app, receiving_facility, control_id, message_type, version, charset, "
            "raw, sha256, status, ack_code, error, flags, batch_ref) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                m.received_at,
                m.source,
                m.peer,
                msh.sending_app if msh else m.sender,
                msh.sending_facility if msh else "",
                msh.receiving_app if msh else "",
                msh.receiving_facility if msh else "",
                msh.control_id if msh else m.control_id,
                msh.message_type if msh else m.message_type,
                msh.version if msh else "",
                m.text_encoding,
                m.raw,
                digest,
                status,
                ack_code,
                error,
                flags,
                m.batch_ref,
            ),
        )
        row_id = int(cur.lastrowid or 0)
        self.rows = max(self.rows, row_id)
        if key is not None:
            pending[key].append((row_id, digest, status, ack_code))
        return AddResult(row_id, False, status, ack_code)

    def add_in(
        self, conn: sqlite3.Connection, inbounds: list[Inbound], ack_code: str
    ) -> list[AddResult]:
        """Store ``inbounds`` inside the caller's open transaction, beside writes that must
        commit with them (a FHIR poller's cursor). Same dedupe as :meth:`add`; the caller
        commits, then notifies the processor."""
        pending: dict[tuple[str, str, str], list[tuple[int, bytes, str, str]]] = {}
        return [self._insert(conn, m, ack_code, pending) for m in inbounds]

    # -- reading ---------------------------------------------------------------

    def get(self, message_id: int) -> StoredMessage | None:
        r = self.db.conn.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE id = ?", (message_id,)
        ).fetchone()
        return _row(r) if r else None

    def after(self, cursor: int, limit: int = 256) -> list[StoredMessage]:
        """Stored messages with id > cursor, in arrival order (the processing feed)."""
        rows = self.db.conn.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE id > ? ORDER BY id LIMIT ?", (cursor, limit)
        ).fetchall()
        return [_row(r) for r in rows]

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
        sql = f"SELECT {_COLUMNS} FROM messages{clause}"
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
