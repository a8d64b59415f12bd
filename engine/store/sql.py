"""The connection, its transactions and the SQL helpers every store module shares.

The leaf of ``engine/store/``: it imports no other store module, so the table modules
(``decisions``, ``report``, ``inbox``, ...) import it, ``migrations`` imports the table
modules, and ``db`` (opening and migrating) imports ``migrations``: no cycle.

One connection, owned by the event loop's thread; every transaction is a synchronous
BEGIN … COMMIT with no await inside, so transactions never interleave.

Two backends share the store's SQL: SQLite (the file store, the default) and PostgreSQL
(``engine.store.pg``, docs/scale-out.md). Store SQL is written in the subset both accept
(``?`` placeholders, ``ON CONFLICT … DO NOTHING``, ``RETURNING id``, ``CASE`` instead of
SQLite's two-argument ``min``/``max``); what differs is behind the helpers below
(:func:`dialect`, :func:`for_update`, :func:`has_table`, :func:`has_column`,
:func:`group_concat`, :func:`month_of`) or rewritten once per statement by
``engine.store.pg.translate``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final, Protocol

from engine.store import trace

SQLITE: Final = "sqlite"
POSTGRESQL: Final = "postgresql"


class Cursor(Protocol):
    """What a statement returns: sqlite3's cursor, or psycopg's behind ``engine.store.pg``."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Conn(Protocol):
    """The connection type other packages name (only the store imports a driver):
    ``sqlite3.Connection`` or ``engine.store.pg.PgConn``."""

    def execute(self, sql: str, parameters: Any = ..., /) -> Any: ...

    def executemany(self, sql: str, parameters: Iterable[Any], /) -> Any: ...

    @property
    def in_transaction(self) -> bool: ...


# What a migration step gets: a sqlite_utils.Database, or engine.store.pg.PgSchema (the
# part of sqlite_utils the steps use, writing PostgreSQL DDL)
Schema = Any
Migration = Callable[[Schema], None]


def _driver_errors() -> tuple[type[Exception], ...]:
    try:
        import psycopg
    except ImportError:  # pragma: no cover - psycopg is a dependency
        return (sqlite3.Error,)
    return (sqlite3.Error, psycopg.Error)


DatabaseError: Final = _driver_errors()  # what a failed statement raises, either backend


def dialect(conn: Any) -> str:
    """``sqlite`` or ``postgresql``: the SQL dialect ``conn`` (a connection, or the
    ``db`` a migration step gets) speaks."""
    return str(getattr(getattr(conn, "conn", conn), "dialect", SQLITE))


def for_update(conn: Any, *, skip_locked: bool = False) -> str:
    """`` FOR UPDATE`` on PostgreSQL (lock the rows read until COMMIT; with
    ``skip_locked``, pass over rows another transaction holds: a claim), ``""`` on SQLite,
    whose ``BEGIN IMMEDIATE`` already holds the one write lock."""
    if dialect(conn) != POSTGRESQL:
        return ""
    return " FOR UPDATE SKIP LOCKED" if skip_locked else " FOR UPDATE"


def group_concat(conn: Any, expr: str) -> str:
    """The aggregate joining ``expr``'s values with commas."""
    if dialect(conn) == POSTGRESQL:
        return f"string_agg(CAST({expr} AS TEXT), ',')"
    return f"group_concat({expr})"


def month_of(conn: Any, epoch: str) -> str:
    """``YYYY-MM`` (UTC) of an epoch-seconds column."""
    if dialect(conn) == POSTGRESQL:
        return f"to_char(to_timestamp({epoch}) AT TIME ZONE 'UTC', 'YYYY-MM')"
    return f"strftime('%Y-%m', {epoch}, 'unixepoch')"


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


# Set to a file name, every connection the store opens counts its statements and appends
# its counts to that file as one JSON line when it is closed (bench/ingest.py reads them).
STATS_ENV: Final = "REFLOOP_SQL_STATS"
_WRITES: Final = frozenset({"INSERT", "UPDATE", "DELETE", "REPLACE"})
_READS: Final = frozenset({"SELECT", "VALUES", "PRAGMA"})


def statement_kind(sql: str) -> str:
    """``read``, ``write`` or ``control`` (BEGIN, COMMIT, SAVEPOINT, DDL ...) by the
    statement's first keyword; a ``WITH`` statement is a write when it writes."""
    words = sql.lstrip().split(None, 1)
    first = words[0].upper() if words else ""
    if first == "WITH":
        upper = sql.upper()
        return "write" if any(f"{w} " in upper for w in _WRITES) else "read"
    if first in _WRITES:
        return "write"
    if first == "PRAGMA" and "=" in sql:  # setting one
        return "control"
    return "read" if first in _READS else "control"


class CountingConnection(sqlite3.Connection):
    """A connection that counts the statements it is asked to run, by
    :func:`statement_kind`: one per ``execute``, one per ``executemany`` (one statement
    prepared once, whatever its number of parameter rows, which ``rows`` counts), one per
    statement of an ``executescript``. Trigger bodies are not counted: they run inside
    the statement that fired them. Used by the statement-count test and, with
    ``REFLOOP_SQL_STATS``, by bench/ingest.py."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.counts: dict[str, int] = {"read": 0, "write": 0, "control": 0, "rows": 0}
        self.label = "main"  # the inbox writer's connection says so

    def _count(self, sql: str, rows: int = 1) -> None:
        self.counts[statement_kind(sql)] += 1
        self.counts["rows"] += rows

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        self._count(sql)
        return super().execute(sql, parameters)

    def executemany(self, sql: str, parameters: Iterable[Any], /) -> sqlite3.Cursor:
        rows = list(parameters)
        self._count(sql, len(rows))
        return super().executemany(sql, rows)

    def executescript(self, sql_script: str, /) -> sqlite3.Cursor:
        for statement in filter(str.strip, sql_script.split(";")):
            self._count(statement)
        return super().executescript(sql_script)

    def close(self) -> None:
        path = os.environ.get(STATS_ENV)
        if path:
            line = {"pid": os.getpid(), "label": self.label, **self.counts}
            with contextlib.suppress(OSError), open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
        super().close()


def connection_factory() -> type[sqlite3.Connection]:
    """The class the store's connections are made with: counting ones when
    ``REFLOOP_SQL_STATS`` names a file."""
    return CountingConnection if os.environ.get(STATS_ENV) else sqlite3.Connection


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


def set_busy_timeout(conn: Conn, ms: int) -> None:
    """SQLite: how long this connection's statements wait for a lock (0: fail at once)."""
    conn.execute(f"PRAGMA busy_timeout = {int(ms)}")


def set_cache_kib(conn: Conn, kib: int) -> None:
    """SQLite: this connection's page cache, in KiB (SQLite's default is 2 MB)."""
    conn.execute(f"PRAGMA cache_size = -{int(kib)}")


def has_table(conn: Conn, name: str) -> bool:
    if dialect(conn) == POSTGRESQL:
        row = conn.execute(
            "SELECT 1 FROM information_schema.tables "
            "WHERE table_schema = current_schema() AND table_name = ?",
            (name,),
        ).fetchone()
        return row is not None
    row = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
    ).fetchone()
    return row is not None


def has_column(conn: Conn, table: str, column: str) -> bool:
    if dialect(conn) == POSTGRESQL:
        row = conn.execute(
            "SELECT count(*) FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = ? AND column_name = ?",
            (table, column),
        ).fetchone()
        return bool(row and row[0])
    row = conn.execute(
        "SELECT count(*) FROM pragma_table_info(?) WHERE name = ?", (table, column)
    ).fetchone()
    return bool(row and row[0])


class Database:
    """The SQLite connection plus the helpers every store module uses
    (``engine.store.pg.PgDatabase`` is the PostgreSQL one)."""

    dialect: str = SQLITE

    def __init__(self, conn: Any, path: str, synchronous: str = "full"):
        self.conn: Any = conn  # sqlite3.Connection here, PgConn in PgDatabase
        self.path = path
        self.synchronous = synchronous
        self._level = synchronous

    def durability(self, *, durable: bool) -> None:
        """The level of the next commits outside :meth:`transaction` (a statement that
        runs in its own transaction: engine.store.retention's incremental vacuum)."""
        self._sync(durable)

    @property
    def location(self) -> str:
        """Where the data lives, for messages and logs (never a password)."""
        return self.path

    def another(self, *, busy_ms: int = 5000) -> Database:
        """A second connection to the same database with the same durability (the inbox
        writer thread's, a reader's); an in-memory database has only its one connection.
        Close it when done."""
        if self.path in ("", ":memory:"):
            return self
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, factory=connection_factory()
        )
        conn.execute(f"PRAGMA busy_timeout = {int(busy_ms)}")
        conn.execute(f"PRAGMA synchronous = {'FULL' if self.synchronous == 'full' else 'NORMAL'}")
        conn.execute("PRAGMA foreign_keys = ON")
        # the daemon's connections leave WAL checkpoints to the checkpointer thread
        # (engine.store.checkpoint): so does one opened from them
        for pragma in ("wal_autocheckpoint", "journal_size_limit"):
            value = int(self.conn.execute(f"PRAGMA {pragma}").fetchone()[0])
            conn.execute(f"PRAGMA {pragma} = {value}")
        return Database(conn, self.path, self.synchronous)

    def _sync(self, durable: bool) -> None:
        level = self.synchronous if durable else "normal"
        if level != self._level:
            self.conn.execute(f"PRAGMA synchronous = {level.upper()}")
            self._level = level

    @contextlib.contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[Any]:
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
        traced = trace.enabled()
        t0 = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        tb = time.perf_counter()
        try:
            yield conn
            if not traced:
                conn.execute("COMMIT")
            else:
                t1, before = time.perf_counter(), trace.db_stamp(self.path)
                conn.execute("COMMIT")
                t2 = time.perf_counter()
                label = getattr(conn, "label", "main")
                trace.record(
                    f"txn:{label}:{'durable' if durable else 'normal'}",
                    t0, tb - t0, t2 - tb, t2 - t1, float(trace.db_stamp(self.path) != before),
                )  # fmt: skip
        except BaseException:
            if conn.in_transaction:  # also when COMMIT itself failed (disk full, I/O error)
                conn.execute("ROLLBACK")
            raise

    @property
    def sync_apart(self) -> bool:
        """True when :meth:`sync` can make a non-durable commit durable after the fact,
        off the write lock (an SQLite file in WAL mode; not PostgreSQL, not in memory) and
        a durable commit would fsync at all (``synchronous: full``; with ``normal`` the
        operator chose no fsync per commit: nothing is synced apart either)."""
        return (
            self.dialect == SQLITE
            and self.path not in ("", ":memory:")
            and self.synchronous == "full"
        )

    def sync(self) -> None:
        """fsync the WAL: every transaction committed before this call (by any
        connection) is then durable, as if it had committed with ``synchronous=FULL``.

        A ``synchronous=FULL`` COMMIT in WAL mode is exactly an fsync of the WAL after its
        frames are written; this is the same fsync, taken after the write lock is released
        so no other writer (the inbox's group commit) waits behind it. Frames of ours
        that a checkpoint copied before this call are durable too: a checkpoint fsyncs
        the database file before it lets the WAL start over (https://sqlite.org/wal.html,
        synchronous=NORMAL/FULL). Call it off the event loop; a no-op when
        :attr:`sync_apart` is false."""
        if not self.sync_apart:
            return
        fd = os.open(self.path + "-wal", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

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
        trace.flush()
