"""The one inbox message filter: ``refloop messages list``, ``refloop replay`` and
``GET /api/messages`` (through engine.store.worklist) select rows with the same SQL, so
the same filter gives the same rows everywhere.

A message type is matched whole (``SIU^S12``), or as a pattern where ``*`` stands for any
text, anywhere (``SIU^S1*``, ``SIU^*12``, ``*^A04``). Every other character stands for
itself: GLOB's ``?`` and ``[`` are escaped, so a type is never read as a character class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

# The largest code point: ``prefix <= t < prefix + TOP`` holds for every t starting with
# prefix (SQLite compares TEXT by bytes, and UTF-8 keeps code point order).
TOP: Final = "\U0010ffff"


@dataclass(frozen=True, slots=True)
class MessageFilter:
    """Which inbox rows; every condition given must hold. Times are epoch seconds (UTC)."""

    message_type: str | None = None
    control_id: str | None = None
    status: str | None = None
    source: str | None = None
    since: float | None = None  # received at or after
    until: float | None = None  # received before
    ids: tuple[int, ...] = ()
    before_id: int | None = None  # keyset paging, newest first


def glob_literal(text: str) -> str:
    """``text`` as a GLOB pattern that matches only itself, but for its ``*``."""
    return "".join(f"[{c}]" if c in "?[" else c for c in text)


def type_clause(pattern: str) -> tuple[str, list[Any]]:
    """SQL (and its arguments) for ``message_type`` matching ``pattern``."""
    if "*" not in pattern:
        return "message_type = ?", [pattern]
    if pattern.endswith("*") and "*" not in pattern[:-1]:
        # a prefix: a range on the (message_type, id) index
        prefix = pattern[:-1]
        return "message_type >= ? AND message_type < ?", [prefix, prefix + TOP]
    return "message_type GLOB ?", [glob_literal(pattern)]


def where(flt: MessageFilter) -> tuple[str, list[Any]]:
    """`` WHERE ...`` (or ``""``) and its arguments, for ``SELECT ... FROM messages``."""
    clauses: list[str] = []
    args: list[Any] = []
    if flt.message_type:
        sql, values = type_clause(flt.message_type)
        clauses.append(sql)
        args.extend(values)
    if flt.control_id:
        clauses.append("control_id = ?")
        args.append(flt.control_id)
    if flt.status:
        # through the (status, id) index only when nothing narrower is given: beside a
        # control id, a type, ids or a time window it would walk every row of that status
        narrower = (
            flt.message_type
            or flt.control_id
            or flt.ids
            or flt.since is not None
            or flt.until is not None
        )
        clauses.append("+status = ?" if narrower else "status = ?")
        args.append(flt.status)
    if flt.source:
        clauses.append("source = ?")
        args.append(flt.source)
    if flt.since is not None:
        clauses.append("received_at >= ?")
        args.append(flt.since)
    if flt.until is not None:
        clauses.append("received_at < ?")
        args.append(flt.until)
    if flt.ids:
        clauses.append(f"id IN ({','.join('?' * len(flt.ids))})")
        args.extend(flt.ids)
    if flt.before_id is not None:
        clauses.append("id < ?")
        args.append(flt.before_id)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), args
