"""The ``nodes`` table: every refloop daemon sharing this store, and its heartbeat.

A node writes its row at start (``register``), refreshes ``heartbeat`` every few seconds
(``beat``) and stamps ``stopped`` on a clean stop. ``refloop cluster status`` reads the
rows: a node whose heartbeat is older than its lease time is *stale* (crashed, hung or cut
off). Rows are never deleted by the daemon (a node id comes back after a restart when
``store.node_id`` is set; else ``hostname:pid`` makes a new row per run, kept as history
until ``forget_stopped``). Plain SQL that PostgreSQL runs too.
"""

from __future__ import annotations

from typing import Any

import sqlite_utils

from engine.store.sql import Conn

COLUMNS = "node_id, host, pid, version, addresses, config, started, heartbeat, stopped"


def migrate(db: sqlite_utils.Database) -> None:
    # DOUBLE PRECISION: epoch seconds need 8 bytes (PostgreSQL's REAL has 4)
    db.execute(
        "CREATE TABLE nodes ("
        " node_id TEXT PRIMARY KEY,"
        " host TEXT NOT NULL DEFAULT '',"
        " pid INTEGER NOT NULL DEFAULT 0,"
        " version TEXT NOT NULL DEFAULT '',"
        " addresses TEXT NOT NULL DEFAULT '',"  # listening endpoints, comma-separated
        " config TEXT NOT NULL DEFAULT '',"  # fingerprint of the shared routes.yaml sections
        " started DOUBLE PRECISION NOT NULL,"
        " heartbeat DOUBLE PRECISION NOT NULL,"
        " stopped DOUBLE PRECISION)"
    )


def register(
    conn: Conn,
    node_id: str,
    *,
    host: str,
    pid: int,
    version: str,
    addresses: str,
    now: float,
    config: str = "",
) -> None:
    """This node's row, as of its start (a reused node id starts over)."""
    conn.execute(
        "INSERT INTO nodes"
        " (node_id, host, pid, version, addresses, config, started, heartbeat, stopped)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL)"
        " ON CONFLICT (node_id) DO UPDATE SET host = excluded.host, pid = excluded.pid,"
        " version = excluded.version, addresses = excluded.addresses,"
        " config = excluded.config,"
        " started = excluded.started, heartbeat = excluded.heartbeat, stopped = NULL",
        (node_id, host, pid, version, addresses, config, now, now),
    )


def set_config(conn: Conn, node_id: str, config: str) -> None:
    """The fingerprint of the routes this node runs now (after a reload)."""
    conn.execute("UPDATE nodes SET config = ? WHERE node_id = ?", (config, node_id))


def set_addresses(conn: Conn, node_id: str, addresses: str) -> None:
    conn.execute("UPDATE nodes SET addresses = ? WHERE node_id = ?", (addresses, node_id))


def beat(conn: Conn, node_id: str, now: float) -> bool:
    """Refresh the heartbeat; False when the row is gone (then register again)."""
    cur = conn.execute(
        "UPDATE nodes SET heartbeat = ?, stopped = NULL WHERE node_id = ?", (now, node_id)
    )
    return cur.rowcount == 1


def mark_stopped(conn: Conn, node_id: str, now: float) -> None:
    conn.execute(
        "UPDATE nodes SET stopped = ?, heartbeat = ? WHERE node_id = ?", (now, now, node_id)
    )


def get(conn: Conn, node_id: str) -> dict[str, Any] | None:
    row = conn.execute(f"SELECT {COLUMNS} FROM nodes WHERE node_id = ?", (node_id,)).fetchone()
    return dict(zip(COLUMNS.split(", "), row, strict=True)) if row else None


def list_nodes(conn: Conn) -> list[dict[str, Any]]:
    """Every node, most recent heartbeat first."""
    rows = conn.execute(f"SELECT {COLUMNS} FROM nodes ORDER BY heartbeat DESC, node_id").fetchall()
    return [dict(zip(COLUMNS.split(", "), r, strict=True)) for r in rows]


def forget_stopped(conn: Conn, before: float) -> int:
    """Delete rows of nodes stopped (or silent) since before ``before``."""
    cur = conn.execute("DELETE FROM nodes WHERE heartbeat < ?", (before,))
    return cur.rowcount


def processing_lag(conn: Conn) -> tuple[int, float | None]:
    """Inbox rows not yet processed (``received``) and when the oldest arrived."""
    row = conn.execute(
        "SELECT count(*), min(received_at) FROM messages WHERE status = 'received'"
    ).fetchone()
    return int(row[0]), row[1]


def in_flight_by_node(conn: Conn) -> list[tuple[str, int, float | None]]:
    """Outbox rows being sent, per claiming node: (node, rows, earliest lease end)."""
    rows = conn.execute(
        "SELECT claimed_by, count(*), min(lease_until) FROM outbox WHERE status = 'sending'"
        " GROUP BY claimed_by ORDER BY claimed_by"
    ).fetchall()
    return [(str(r[0]), int(r[1]), r[2]) for r in rows]
