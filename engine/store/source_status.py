"""Per-source inbox figures for the Sources page and ``refloop sources status``: messages
since a time by status, each source's newest message, and its newest failed one.

Read-only and bounded (the daemon runs them on its event loop): the counts and the
newest message of a source seen today use the ``received_at`` index (one day of rows);
the newest message of the other sources takes one pass over the newest
:data:`LOOKBACK_ROWS` rows, and the newest failure walks the ``(status, id)`` index
within them, so a source silent for longer shows no last message rather than costing a
scan of the whole inbox (bench/sources.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from engine.store.sql import Conn

LOOKBACK_ROWS: Final = 100_000
FAILED: Final = ("error", "rejected")


@dataclass(frozen=True, slots=True)
class Failure:
    """The newest message of a source that ended ``error`` or ``rejected``."""

    message_id: int
    received_at: float
    status: str
    error: str  # the reason refloop recorded (never message content)


def counts_since(conn: Conn, since: float) -> dict[str, dict[str, int]]:
    """source → status → messages received at or after ``since``."""
    out: dict[str, dict[str, int]] = {}
    for source, status, n in conn.execute(
        "SELECT source, status, count(*) FROM messages WHERE received_at >= ? "
        "GROUP BY source, status",
        (since,),
    ):
        out.setdefault(str(source), {})[str(status)] = int(n)
    return out


def _floor_id(conn: Conn) -> int:
    row = conn.execute("SELECT max(id) FROM messages").fetchone()
    return max(0, int(row[0] or 0) - LOOKBACK_ROWS)


def last_received(conn: Conn, sources: Iterable[str], since: float) -> dict[str, float]:
    """source → when its newest message arrived: from the rows received since ``since``
    (today: the ``received_at`` index), and for a source with none of those, from one
    pass over the newest :data:`LOOKBACK_ROWS` rows (all such sources at once)."""
    wanted = set(sources)
    out: dict[str, float] = {
        str(source): float(at)
        for source, at in conn.execute(
            "SELECT source, max(received_at) FROM messages WHERE received_at >= ? GROUP BY source",
            (since,),
        )
        if source in wanted
    }
    if wanted - set(out):
        for source, newest in conn.execute(
            "SELECT source, max(id) FROM messages WHERE id > ? GROUP BY source",
            (_floor_id(conn),),
        ).fetchall():
            if source in wanted and source not in out:
                row = conn.execute(
                    "SELECT received_at FROM messages WHERE id = ?", (newest,)
                ).fetchone()
                out[str(source)] = float(row[0])
    return out


def last_failures(conn: Conn, sources: Iterable[str]) -> dict[str, Failure]:
    """source → its newest ``error`` or ``rejected`` message (within the look-back),
    found through the ``(status, id)`` index."""
    floor = _floor_id(conn)
    out: dict[str, Failure] = {}
    for source in sources:
        best: Failure | None = None
        for status in FAILED:
            row = conn.execute(
                "SELECT id, received_at, status, error FROM messages "
                "WHERE status = ? AND id > ? AND source = ? ORDER BY id DESC LIMIT 1",
                (status, floor, source),
            ).fetchone()
            if row is not None and (best is None or int(row[0]) > best.message_id):
                best = Failure(int(row[0]), float(row[1]), str(row[2]), str(row[3] or ""))
        if best is not None:
            out[source] = best
    return out
