"""Opening the database (SQLite file, or PostgreSQL: ``engine.store.pg``) and migrating
its schema.

One connection, owned by the event loop's thread (``engine.store.sql.Database``); WAL mode
lets the CLI read while the daemon writes. The file is created 0600: it holds PHI. The
schema steps are ``engine.store.migrations.MIGRATIONS``.

The connection type and the SQL helpers are defined in ``engine.store.sql`` and named
here too, so the rest of the engine imports them from one place.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import sqlite_utils

from engine.errors import StoreError
from engine.store.migrations import MIGRATIONS
from engine.store.sql import (
    Conn,
    Database,
    DatabaseError,
    Migration,
    connection_factory,
    fault_kind,
    has_column,
    has_table,
    savepoint,
)

__all__ = [
    "MIGRATIONS",
    "Conn",
    "Database",
    "DatabaseError",
    "Migration",
    "fault_kind",
    "has_column",
    "has_table",
    "is_postgres_url",
    "open_database",
    "savepoint",
]

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(location: str | os.PathLike[str]) -> bool:
    """True for a ``postgresql://`` (or ``postgres://``) URL; a path or ``sqlite:///``
    URL is the file store."""
    return str(location).startswith(POSTGRES_SCHEMES)


def sqlite_path(location: str | os.PathLike[str]) -> Path:
    """The file of a bare path or a ``sqlite:///path`` URL (``sqlite:////abs/path`` or
    ``sqlite:///relative``)."""
    text = str(location)
    if text.startswith("sqlite://"):
        rest = text[len("sqlite://") :]
        if not rest.startswith("/"):
            raise StoreError(f"not a sqlite URL (sqlite:///path): {text}")
        return Path(rest[1:])
    return Path(text)


def open_database(
    path: str | os.PathLike[str],
    *,
    synchronous: str = "full",
    readonly: bool = False,
    migrations: list[Migration] | None = None,
    pool: tuple[int, int] = (1, 4),
) -> Database:
    """Open (creating 0600 if needed) and migrate the database at ``path``: a file path,
    a ``sqlite:///path`` URL, or a ``postgresql://`` URL (``pool`` is then the
    connection pool's min and max size).

    ``synchronous=full`` makes every COMMIT durable against power loss before it returns
    (an fsync of the WAL); ``normal`` survives a process crash but may lose the last
    transactions on power loss. See docs/listener.md.
    """
    steps = migrations if migrations is not None else MIGRATIONS
    if is_postgres_url(path):
        from engine.store.pg import open_postgres

        return open_postgres(
            str(path),
            synchronous=synchronous,
            readonly=readonly,
            migrations=steps,
            pool_min=pool[0],
            pool_max=pool[1],
        )
    p = sqlite_path(path)
    if readonly:
        if not p.exists():
            raise StoreError(f"no database at {p}")
        conn = sqlite3.connect(
            f"file:{p}?mode=ro", uri=True, isolation_level=None, factory=connection_factory()
        )
    else:
        p.parent.mkdir(parents=True, exist_ok=True)
        if not p.exists():
            fd = os.open(p, os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)
        conn = sqlite3.connect(
            str(p), isolation_level=None, check_same_thread=False, factory=connection_factory()
        )
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        if not readonly:
            # a new file returns the space pruning frees (engine.store.retention); an older
            # one needs one VACUUM for it (refloop prune --vacuum)
            if not conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone():
                conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {'FULL' if synchronous == 'full' else 'NORMAL'}")
            conn.execute("PRAGMA foreign_keys = ON")
            _migrate(conn, steps)
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise StoreError(f"cannot open database {p}: {exc}") from exc
    return Database(conn, str(p), synchronous)


def _migrate(conn: sqlite3.Connection, migrations: list[Migration]) -> None:
    current = conn.execute("PRAGMA user_version").fetchone()[0]
    if current > len(migrations):
        raise StoreError(
            f"database schema version {current} is newer than this refloop ({len(migrations)})"
        )
    db = sqlite_utils.Database(conn)
    for version in range(current, len(migrations)):
        conn.execute("BEGIN IMMEDIATE")
        try:
            migrations[version](db)
            conn.execute(f"PRAGMA user_version = {version + 1}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
