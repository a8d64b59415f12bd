"""LISTEN/NOTIFY between nodes on PostgreSQL (docs/scale-out.md, "Waking other nodes").

Sending: store code marks what a transaction did (:func:`mark`: rows received, rows
processed with their ids, outbox rows enqueued); on PostgreSQL the connection collects
the marks and, just before COMMIT, sends them as **one** ``pg_notify`` per transaction
(``engine.store.pg.PgConn``), which PostgreSQL delivers only if the transaction commits.
One notification per batch, never per row. On SQLite :func:`mark` does nothing: one
process, one file, the in-process wake-ups suffice.

Receiving: one :class:`Listener` per node, a dedicated connection (psycopg async, outside
the pool) that runs ``LISTEN refloop`` and calls the same wake seams a node's own
commits call: ``received`` wakes the processor, ``processed`` resolves the on-processed
ACK waiters of those ids, ``outbox`` wakes the dispatcher. A lost connection is opened
again after :data:`RETRY_SECONDS`; meanwhile the processor's and dispatcher's polling
finds the work, and after each (re)connect every seam is called once (a notification sent
while nobody listened is lost).

Payload: ``<schema> <origin> <kinds> <ids>``: the sender's ``current_schema()`` (several
refloop schemas may share a database: a listener skips the others'), a token unique to the
sending process (a node skips its own: its commits woke it already), the kinds as letters
(``r`` received, ``p`` processed, ``o`` outbox) and the processed ids as compact ranges
(``5-9,12``). At most :data:`MAX_IDS` ranges; past that the payload says ``*`` (every
waiter checks its row).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from collections.abc import Callable, Iterable
from typing import Any, Final

from engine.store.sql import POSTGRESQL, dialect

log = logging.getLogger(__name__)

CHANNEL: Final = "refloop"
RECEIVED: Final = "r"
PROCESSED: Final = "p"
OUTBOX: Final = "o"
KINDS: Final = {RECEIVED: "received", PROCESSED: "processed", OUTBOX: "outbox"}
ORIGIN: Final = f"{os.getpid()}.{secrets.token_hex(4)}"  # this process, in payloads
MAX_IDS: Final = 200  # id ranges in one payload (PostgreSQL's limit is 8,000 bytes)
RETRY_SECONDS: Final = 1.0  # before opening a lost LISTEN connection again
CHECK_SECONDS: Final = 30.0  # idle this long, the listener checks its connection is alive
SQL: Final = "SELECT pg_notify('refloop', current_schema() || ' ' || ?)"


class Pending:
    """What the open transaction did, for its one NOTIFY at COMMIT."""

    __slots__ = ("ids", "kinds")

    def __init__(self) -> None:
        self.kinds: set[str] = set()
        self.ids: list[int] = []

    def __bool__(self) -> bool:
        return bool(self.kinds)

    def clear(self) -> None:
        self.kinds.clear()
        self.ids.clear()

    def payload(self) -> str:
        """``<origin> <kinds> <ids>`` (the SQL puts the schema in front)."""
        kinds = "".join(k for k in (RECEIVED, PROCESSED, OUTBOX) if k in self.kinds)
        return f"{ORIGIN} {kinds} {ranges(self.ids)}"


def mark(conn: Any, kind: str, message_id: int | None = None) -> None:
    """Note, inside a transaction on ``conn``, that it did ``kind`` (with a processed
    message's id); PostgreSQL only, a no-op on SQLite."""
    if dialect(conn) != POSTGRESQL:
        return
    pending: Pending = conn.pending
    pending.kinds.add(kind)
    if message_id is not None:
        pending.ids.append(message_id)


def ranges(ids: Iterable[int]) -> str:
    """``5-9,12``: sorted, runs joined; ``-`` for none, ``*`` past :data:`MAX_IDS` runs."""
    runs: list[list[int]] = []
    for i in sorted(set(ids)):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    if not runs:
        return "-"
    if len(runs) > MAX_IDS:
        return "*"
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def parse_ids(text: str) -> list[int] | None:
    """The ids of :func:`ranges`' text; None for ``*`` (any id)."""
    if text == "*":
        return None
    out: list[int] = []
    if text == "-":
        return out
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


class Listener:
    """The node's LISTEN connection, calling the wake seams (run as one task).

    ``on_received()``, ``on_processed(ids)`` (None: any id) and ``on_outbox()`` are
    called on the event loop; ``counted(kind)`` once per notification acted on, and
    ``on_state(listening)`` when the connection comes up or goes down (metrics)."""

    def __init__(
        self,
        url: str,
        *,
        on_received: Callable[[], None],
        on_processed: Callable[[list[int] | None], None],
        on_outbox: Callable[[], None],
        counted: Callable[[str], None] = lambda _kind: None,
        on_state: Callable[[bool], None] = lambda _up: None,
    ):
        self.url = url
        self.on_received = on_received
        self.on_processed = on_processed
        self.on_outbox = on_outbox
        self.counted = counted
        self.on_state = on_state
        self.connects = 0  # successful LISTENs (1 + reconnects)
        self._stop = asyncio.Event()
        self._conn: Any = None

    async def run(self) -> None:
        import psycopg

        while not self._stop.is_set():
            try:
                await self._listen(psycopg)
            except (psycopg.Error, OSError) as exc:
                if self._stop.is_set():
                    break
                log.warning(
                    "store: the LISTEN connection is lost (%s); polling meanwhile, retrying in %gs",
                    type(exc).__name__,
                    RETRY_SECONDS,
                )
            finally:
                self.on_state(False)
                await self._close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), RETRY_SECONDS)

    async def _listen(self, psycopg: Any) -> None:
        self._conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True)
        cur = await self._conn.execute("SELECT current_schema()")
        row = await cur.fetchone()
        schema = str(row[0]) if row else ""
        await self._conn.execute(f"LISTEN {CHANNEL}")
        self.connects += 1
        if self.connects > 1:
            log.info("store: LISTEN connection open again")
        self.on_state(True)
        # anything sent while nobody listened: every seam looks once
        self.on_received()
        self.on_processed(None)
        self.on_outbox()
        while not self._stop.is_set():
            async for note in self._conn.notifies(timeout=CHECK_SECONDS):
                self._handle(schema, note.payload)
            # a silently dead connection raises here (LISTEN again: a no-op, one round trip)
            await self._conn.execute(f"LISTEN {CHANNEL}")

    def _handle(self, schema: str, payload: str) -> None:
        parts = payload.split(" ")
        if len(parts) != 4 or parts[0] != schema or parts[1] == ORIGIN:
            return
        kinds, ids = parts[2], parts[3]
        if RECEIVED in kinds:
            self.counted(KINDS[RECEIVED])
            self.on_received()
        if PROCESSED in kinds:
            self.counted(KINDS[PROCESSED])
            try:
                parsed = parse_ids(ids)
            except ValueError:
                parsed = None
            self.on_processed(parsed)
        if OUTBOX in kinds:
            self.counted(KINDS[OUTBOX])
            self.on_outbox()

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def stop(self) -> None:
        """End the connection; :meth:`run` returns."""
        self._stop.set()
        await self._close()
