"""Keyset pages: :class:`Page` (ids, where the page starts, the total the filter selects,
so no list stops silently at a cap), shared by the referral worklist (pages in any sort
order, engine.store.referral_search) and the newest-first lists keyed by their id (the
message browser, the outbox: :class:`IdPage`, a page of rows before (older than) or after
(newer than) an id)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from engine.store.sql import Conn

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Page:
    """One page of ids in list order, where it starts (1-based; 0 when empty) and how
    many rows match in all."""

    ids: list[int]
    total: int
    start: int

    @property
    def end(self) -> int:
        return self.start + len(self.ids) - 1 if self.ids else 0

    @property
    def has_prev(self) -> bool:
        return self.start > 1

    @property
    def has_next(self) -> bool:
        return bool(self.ids) and self.end < self.total


@dataclass(frozen=True, slots=True)
class IdPage(Page, Generic[T]):
    """A :class:`Page` of a newest-first list keyed by id, with its rows."""

    rows: list[T]

    @property
    def newer(self) -> int | None:
        """The ``after`` of the page before this one (newer rows), or None."""
        return self.ids[0] if self.has_prev else None

    @property
    def older(self) -> int | None:
        """The ``before`` of the page after this one (older rows), or None."""
        return self.ids[-1] if self.has_next else None


def and_where(where: str, condition: str) -> str:
    """``where`` (`` WHERE …`` or "") with ``condition`` added."""
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
        sql = f"SELECT {columns} FROM {table}{and_where(where, 'id > ?')} ORDER BY id ASC LIMIT ?"
        found = conn.execute(sql, (*args, after, limit)).fetchall()[::-1]
    else:
        cond = and_where(where, "id < ?") if before is not None else where
        extra = (before,) if before is not None else ()
        sql = f"SELECT {columns} FROM {table}{cond} ORDER BY id DESC LIMIT ?"
        found = conn.execute(sql, (*args, *extra, limit)).fetchall()
    ids = [int(r[0]) for r in found]
    if not ids:
        return IdPage([], total, 0, [])
    newer = conn.execute(
        f"SELECT count(*) FROM {table}{and_where(where, 'id > ?')}", (*args, ids[0])
    )
    return IdPage(ids, total, int(newer.fetchone()[0]) + 1, [row(r) for r in found])
