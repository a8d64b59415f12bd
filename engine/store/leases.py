"""The ``leases`` table: work that runs once per installation, on one node at a time.

A lease is a row ``(name, holder, until, token)``. Rules (tests/test_leases.py):

- **acquire**: a node takes the lease when nobody holds it, when the holder's ``until``
  has passed, or when it already holds it. A takeover (another holder, or the same one
  after its lease ran out) increments ``token``, the fencing token: work done under a
  lease can carry it so a stale holder's writes are refused.
- **renew**: only the holder, with its token, before ``until``; else it fails and the
  node must stop the leased work at once (it lost the lease).
- **release**: the holder ends its lease now (clean stop), so another node takes over
  without waiting for ``until``; the row and its token stay.

One ``INSERT … ON CONFLICT … DO UPDATE … WHERE`` (SQLite and PostgreSQL alike) decides
acquire atomically: two nodes racing get one winner. Leases live in rows, never in a
session advisory lock (a pooled or reset connection silently drops those).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlite_utils

from engine.store.sql import POSTGRESQL, Conn, dialect


@dataclass(frozen=True, slots=True)
class Lease:
    name: str
    holder: str
    until: float
    token: int


def migrate(db: sqlite_utils.Database) -> None:
    # DOUBLE PRECISION: epoch seconds need 8 bytes (PostgreSQL's REAL has 4)
    db.execute(
        "CREATE TABLE leases ("
        " name TEXT PRIMARY KEY,"
        " holder TEXT NOT NULL,"
        " until DOUBLE PRECISION NOT NULL,"
        " token INTEGER NOT NULL,"
        " acquired DOUBLE PRECISION NOT NULL)"
    )


def acquire(
    conn: Conn, name: str, holder: str, now: float, seconds: float, *, dead: str = ""
) -> Lease | None:
    """Take or keep ``name`` until ``now + seconds``; None when another node holds it.
    ``dead``: a holder known to be gone (same host, process not running) whose lease may
    be taken before it expires."""
    row = conn.execute(
        "INSERT INTO leases (name, holder, until, token, acquired) VALUES (?, ?, ?, 1, ?)"
        " ON CONFLICT (name) DO UPDATE SET"
        " token = CASE WHEN leases.holder = excluded.holder AND leases.until >= ?"
        "   THEN leases.token ELSE leases.token + 1 END,"
        " acquired = CASE WHEN leases.holder = excluded.holder AND leases.until >= ?"
        "   THEN leases.acquired ELSE excluded.acquired END,"
        " holder = excluded.holder, until = excluded.until"
        " WHERE leases.holder = excluded.holder OR leases.until < ? OR leases.holder = ?"
        " RETURNING holder, until, token",
        (name, holder, now + seconds, now, now, now, now, dead),  # "": no holder is ""
    ).fetchone()
    return Lease(name, row[0], row[1], row[2]) if row else None


def renew(conn: Conn, lease: Lease, now: float, seconds: float) -> Lease | None:
    """Extend a lease still held; None when it was lost (expired or taken over)."""
    cur = conn.execute(
        "UPDATE leases SET until = ? WHERE name = ? AND holder = ? AND token = ? AND until >= ?",
        (now + seconds, lease.name, lease.holder, lease.token, now),
    )
    if cur.rowcount != 1:
        return None
    return Lease(lease.name, lease.holder, now + seconds, lease.token)


def release(conn: Conn, lease: Lease, now: float) -> bool:
    """End a held lease now (the next acquire by anyone is a takeover)."""
    cur = conn.execute(
        "UPDATE leases SET until = ? WHERE name = ? AND holder = ? AND token = ?",
        (now - 1e-6, lease.name, lease.holder, lease.token),
    )
    return cur.rowcount == 1


def holds(conn: Conn, name: str, holder: str, token: int) -> bool:
    """The fence, inside the caller's transaction: whether ``holder`` still holds
    ``name`` with ``token`` (a takeover changes the holder or the token). On PostgreSQL
    the row is then locked ``FOR SHARE`` until the transaction ends, so a takeover
    (an UPDATE of the row) waits for the fenced work to commit, and fenced work that
    starts after a takeover sees it; SQLite's writers are serialised anyway. The lease's
    end is not compared: one that ran out and was not taken over is still exclusive."""
    sql = "SELECT 1 FROM leases WHERE name = ? AND holder = ? AND token = ?"
    if dialect(conn) == POSTGRESQL:
        sql += " FOR SHARE"
    return conn.execute(sql, (name, holder, token)).fetchone() is not None


def get(conn: Conn, name: str) -> Lease | None:
    row = conn.execute("SELECT holder, until, token FROM leases WHERE name = ?", (name,)).fetchone()
    return Lease(name, row[0], row[1], row[2]) if row else None


def list_leases(conn: Conn) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT name, holder, until, token, acquired FROM leases ORDER BY name"
    ).fetchall()
    return [
        {"name": r[0], "holder": r[1], "until": r[2], "token": r[3], "acquired": r[4]} for r in rows
    ]
