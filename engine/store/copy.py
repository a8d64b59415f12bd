"""``refloop store copy``: move an installation's SQLite file into PostgreSQL.

The target is migrated to the same schema version first (the one migration list) and
must hold no rows. Then, in one PostgreSQL transaction: the tables' own triggers are
switched off (the copied rows already hold what they maintain: the closure report's
rows, and the audit log's append-only guard has nothing to refuse in an INSERT), each
table goes over with COPY in foreign-key order, identity sequences continue after the
highest id, the triggers come back on, and the row counts and the audit chain are
verified on the target before COMMIT. Anything that does not hold rolls the whole copy
back: the target stays empty.

The source is read inside one SQLite read transaction, so a daemon still writing to it
does not tear the copy; stop it first anyway, or rows written after the snapshot are not
copied.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from engine.errors import StoreError
from engine.store import audit
from engine.store.migrations import MIGRATIONS
from engine.store.sql import POSTGRESQL, Database

# SQLite's own tables, and the PostgreSQL store's version counter (set by migrating)
_SKIP: Final = ("sqlite_sequence", "sqlite_stat1", "sqlite_stat4", "schema_version")
ROWS_PER_COPY_CHECK: Final = 10_000  # how often progress is reported


@dataclass
class CopyResult:
    """What was copied: rows per table (equal on both sides, or the copy failed), the
    audit chain's length as verified on the target, and how long it took."""

    tables: dict[str, int] = field(default_factory=dict)
    audit_rows: int = 0
    seconds: float = 0.0


def source_tables(source: Database) -> list[str]:
    """The source's tables, parents before the tables whose foreign keys name them."""
    names = [
        str(r[0])
        for r in source.conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
        ).fetchall()
        if str(r[0]) not in _SKIP and not str(r[0]).startswith("sqlite_")
    ]
    parents = {
        name: {
            str(r[0])
            for r in source.conn.execute(
                'SELECT DISTINCT "table" FROM pragma_foreign_key_list(?)', (name,)
            ).fetchall()
            if str(r[0]) != name
        }
        for name in names
    }
    ordered: list[str] = []
    while len(ordered) < len(names):
        ready = [n for n in names if n not in ordered and parents[n] <= set(ordered)]
        if not ready:  # a cycle: cannot happen with this schema; keep going in name order
            ready = [n for n in names if n not in ordered][:1]
        ordered.extend(ready)
    return ordered


def _columns(source: Database, table: str) -> list[str]:
    return [
        str(r[0])
        for r in source.conn.execute(
            "SELECT name FROM pragma_table_info(?) ORDER BY cid", (table,)
        ).fetchall()
    ]


def _version(source: Database) -> int:
    return int(source.conn.execute("PRAGMA user_version").fetchone()[0])


def copy_store(
    source: Database,
    target: Database,
    *,
    progress: Callable[[str, int], None] | None = None,
) -> CopyResult:
    """Copy every table of ``source`` (SQLite) into ``target`` (PostgreSQL, migrated,
    empty) and verify; raises StoreError (target unchanged) when anything does not hold."""
    if source.dialect == POSTGRESQL or target.dialect != POSTGRESQL:
        raise StoreError("store copy goes from a SQLite file to PostgreSQL")
    if _version(source) != len(MIGRATIONS):
        raise StoreError(
            f"the source's schema is version {_version(source)}, this refloop's is "
            f"{len(MIGRATIONS)}: open it once with this refloop (refloop run, or any "
            "writing command) so it is migrated, then copy"
        )
    started = time.monotonic()
    result = CopyResult()
    raw = target.conn.raw
    source.conn.execute("BEGIN")  # one snapshot of the source
    try:
        tables = source_tables(source)
        with target.transaction() as conn:
            for table in tables:
                if conn.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() is not None:
                    raise StoreError(
                        f"the target already holds rows (table {table}): copy "
                        "into an empty database or schema"
                    )
            for table in tables:
                conn.execute(f"ALTER TABLE {table} DISABLE TRIGGER USER")
            for table in tables:
                result.tables[table] = _copy_table(source, raw, table, progress)
            for table in tables:
                conn.execute(f"ALTER TABLE {table} ENABLE TRIGGER USER")
            _continue_identities(conn, tables)
            for table, count in result.tables.items():
                there = int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
                if there != count:
                    raise StoreError(f"{table}: {count} rows read, {there} on the target")
            verified = audit.verify(conn)
            if not verified.ok:
                raise StoreError(
                    f"the audit chain does not verify on the target: row {verified.bad_row}: "
                    f"{verified.problem}"
                )
            result.audit_rows = verified.rows
    finally:
        source.conn.execute("ROLLBACK")
    result.seconds = time.monotonic() - started
    return result


def _copy_table(
    source: Database, raw: Any, table: str, progress: Callable[[str, int], None] | None
) -> int:
    columns = _columns(source, table)
    count = 0
    with raw.cursor() as cur, cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as out:
        for row in _rows(source, table, columns):
            out.write_row(row)
            count += 1
            if progress is not None and count % ROWS_PER_COPY_CHECK == 0:
                progress(table, count)
    if progress is not None:
        progress(table, count)
    return count


def _rows(source: Database, table: str, columns: list[str]) -> Iterator[tuple[Any, ...]]:
    cur = source.conn.execute(f"SELECT {', '.join(columns)} FROM {table}")
    while batch := cur.fetchmany(1000):
        yield from batch


def _continue_identities(conn: Any, tables: list[str]) -> None:
    """Each identity column's sequence continues after the highest copied id."""
    for table in tables:
        row = conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = "
            "current_schema() AND table_name = ? AND is_identity = 'YES'",
            (table,),
        ).fetchone()
        if row is None:
            continue
        column = str(row[0])
        conn.execute(
            f"SELECT setval(pg_get_serial_sequence(?, ?), max({column})) FROM {table} "
            f"HAVING max({column}) IS NOT NULL",
            (table, column),
        )
