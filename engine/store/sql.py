"""The connection, its transactions and the SQL helpers every store module shares.

The leaf of ``engine/store/``: it imports no other store module, so the table modules
(``decisions``, ``report``, ``inbox``, ...) import it, ``migrations`` imports the table
modules, and ``db`` (opening and migrating) imports ``migrations``: no cycle.

One connection, owned by the event loop's thread; every transaction is a synchronous
BEGIN … COMMIT with no await inside, so transactions never interleave.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterator
from typing import Final

import sqlite_utils

Migration = Callable[[sqlite_utils.Database], None]
Conn = (
    sqlite3.Connection
)  # the connection type other packages name (only the store imports sqlite3)
DatabaseError = sqlite3.Error  # what a failed statement raises

# SQLite's primary result codes (https://sqlite.org/rescode.html) a storage fault shows as
_FAULT_KINDS: Final = {13: "full", 10: "io", 5: "locked", 6: "locked"}  # FULL, IOERR, BUSY, LOCKED


def fault_kind(exc: BaseException) -> str:
    """What kind of storage fault a failed statement or COMMIT was: ``full`` (disk or
    quota full, SQLITE_FULL), ``io`` (an I/O error, SQLITE_IOERR), ``locked`` (another
    writer held the database past the busy timeout), or ``other``. The label of
    ``refloop_store_errors_total``; never carries the statement or its data."""
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return _FAULT_KINDS.get(code & 0xFF, "other")
    return "other"


@contextlib.contextmanager
def savepoint(conn: Conn, name: str) -> Iterator[None]:
    """A nested unit inside an open transaction: on an exception only its own writes are
    rolled back (and the exception goes on)."""
    conn.execute(f"SAVEPOINT {name}")
    try:
        yield
    except BaseException:
        conn.execute(f"ROLLBACK TO {name}")
        conn.execute(f"RELEASE {name}")
        raise
    conn.execute(f"RELEASE {name}")


def has_table(conn: Conn, name: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
    ).fetchone()
    return row is not None


def has_column(conn: Conn, table: str, column: str) -> bool:
    row = conn.execute(
        "SELECT count(*) FROM pragma_table_info(?) WHERE name = ?", (table, column)
    ).fetchone()
    return bool(row and row[0])


class Database:
    """The SQLite connection plus the helpers every store module uses."""

    def __init__(self, conn: sqlite3.Connection, path: str, synchronous: str = "full"):
        self.conn = conn
        self.path = path
        self.synchronous = synchronous
        self._level = synchronous

    def durability(self, *, durable: bool) -> None:
        """The level of the next commits outside :meth:`transaction` (a statement that
        runs in its own transaction: engine.store.retention's incremental vacuum)."""
        self._sync(durable)

    def _sync(self, durable: bool) -> None:
        level = self.synchronous if durable else "normal"
        if level != self._level:
            self.conn.execute(f"PRAGMA synchronous = {level.upper()}")
            self._level = level

    @contextlib.contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE … COMMIT, or ROLLBACK on any exception.

        ``durable=False`` commits without an fsync (WAL, ``synchronous=NORMAL``): the
        transaction survives a crash of the process but, on power loss, only once a later
        durable commit has fsync'd the WAL — which holds every earlier frame, so one fsync
        makes all the non-durable commits before it durable too. Processing uses it: its
        input is already durable in the inbox and it can be re-derived; anything that
        leaves the building (outbox sends) starts with a durable commit.
        """
        conn = self.conn
        self._sync(durable)
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # also when COMMIT itself failed (disk full, I/O error)
                conn.execute("ROLLBACK")
            raise

    def get_meta(self, key: str, default: str = "") -> str:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return str(row[0]) if row else default

    def set_meta(self, key: str, value: str) -> None:
        """Write a meta value; call inside a transaction."""
        self.conn.execute(
            "INSERT INTO meta(key, value) VALUES(?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def close(self) -> None:
        self.conn.close()
