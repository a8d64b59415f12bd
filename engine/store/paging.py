"""Newest-first keyset paging for lists keyed by their id (the message browser, the
outbox): a page of rows before (older than) or after (newer than) an id, the total the
filter selects and where the page starts, so no list stops silently at a cap."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from engine.store.sql import Conn

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class IdPage(Generic[T]):
    """Rows newest first, ``total`` matching, ``start`` (1-based; 0 when empty)."""

    rows: list[T]
    ids: list[int]
    total: int
    start: int

    @property
    def end(self) -> int:
        return self.start + len(self.ids) - 1 if self.ids else 0

    @property
    def newer(self) -> int | None:
        """The ``after`` of the page before this one (newer rows), or None."""
        return self.ids[0] if self.ids and self.start > 1 else None

    @property
    def older(self) -> int | None:
        """The ``before`` of the page after this one (older rows), or None."""
        return self.ids[-1] if self.ids and self.end < self.total else None


def _and(where: str, condition: str) -> str:
    return f"{where} AND {condition}" if where else f" WHERE {condition}"


def newest_first(
    conn: Conn,
    table: str,
    columns: str,
    where: str,
    args: Sequence[Any],
    row: Callable[[Any], T],
    *,
    limit: int,
    before: int | None = None,
    after: int | None = None,
) -> IdPage[T]:
    """``limit`` rows of ``table`` that ``where`` (`` WHERE …`` or "") selects, newest
    first: the newest, those older than id ``before`` or those newer than id ``after``.
    ``columns`` starts with ``id``; ``row`` makes a value of each."""
    total = int(conn.execute(f"SELECT count(*) FROM {table}{where}", args).fetchone()[0])
    if after is not None:
        sql = f"SELECT {columns} FROM {table}{_and(where, 'id > ?')} ORDER BY id ASC LIMIT ?"
        found = conn.execute(sql, (*args, after, limit)).fetchall()[::-1]
    else:
        cond = _and(where, "id < ?") if before is not None else where
        extra = (before,) if before is not None else ()
        sql = f"SELECT {columns} FROM {table}{cond} ORDER BY id DESC LIMIT ?"
        found = conn.execute(sql, (*args, *extra, limit)).fetchall()
    ids = [int(r[0]) for r in found]
    if not ids:
        return IdPage([], [], total, 0)
    newer = conn.execute(f"SELECT count(*) FROM {table}{_and(where, 'id > ?')}", (*args, ids[0]))
    return IdPage([row(r) for r in found], ids, total, int(newer.fetchone()[0]) + 1)
