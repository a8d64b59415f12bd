"""The decisions table: what the routes decided for each inbox message, so a replay can
show old against new and apply only what changed.

One row per message (the latest decision). ``actions`` is JSON: a list of action
summaries, each with the route, the action kind and, for ``track``, the event kind, its
key fields and a fingerprint of the whole event. The fingerprints of tracked events are
what keeps a replay from handing the tracker the same event twice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from engine.canonical import canonical_json
from engine.store.sql import Conn, Database, Schema, has_table


def migrate(db: Schema) -> None:
    """Schema: appended to ``engine.store.migrations.MIGRATIONS``."""
    db.table("decisions").create(
        {
            "message_id": int,
            "status": str,  # routed | filtered | error
            "route": str,  # matched route names, comma-separated
            "reason": str,  # why filtered / error; never PHI
            "actions": str,  # JSON list of action summaries
            "decided_at": float,
            "replayed_at": float,  # last replay that re-decided it (0: never)
            "replayed_by": str,  # the operator's login name
        },
        pk="message_id",
        not_null={"status", "decided_at"},
        defaults={
            "route": "",
            "reason": "",
            "actions": "[]",
            "replayed_at": 0.0,
            "replayed_by": "",
        },
    )


@dataclass(frozen=True, slots=True)
class DecisionRow:
    message_id: int
    status: str
    route: str
    reason: str
    actions: tuple[dict[str, Any], ...]
    decided_at: float
    replayed_at: float = 0.0
    replayed_by: str = ""

    @property
    def fingerprints(self) -> frozenset[str]:
        """Fingerprints of the events this decision handed the tracker."""
        return frozenset(str(a["fingerprint"]) for a in self.actions if a.get("action") == "track")


_COLUMNS = "message_id, status, route, reason, actions, decided_at, replayed_at, replayed_by"


def _row(r: tuple[Any, ...]) -> DecisionRow:
    return DecisionRow(
        message_id=int(r[0]),
        status=str(r[1]),
        route=str(r[2] or ""),
        reason=str(r[3] or ""),
        actions=tuple(json.loads(r[4] or "[]")),
        decided_at=float(r[5]),
        replayed_at=float(r[6] or 0.0),
        replayed_by=str(r[7] or ""),
    )


class Decisions:
    """Reads and writes of the decisions table."""

    def __init__(self, db: Database):
        self.db = db

    def available(self) -> bool:
        """False on a database from before the decisions table (opened read-only)."""
        return has_table(self.db.conn, "decisions")

    def get(self, message_id: int, conn: Conn | None = None) -> DecisionRow | None:
        c = conn or self.db.conn
        r = c.execute(f"SELECT {_COLUMNS} FROM decisions WHERE message_id = ?", (message_id,))
        row = r.fetchone()
        return _row(row) if row else None

    def get_many(self, conn: Conn, ids: list[int]) -> dict[int, DecisionRow]:
        """:meth:`get` of several messages in one statement (absent: no decision)."""
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM decisions WHERE message_id IN ({marks})", ids
        ).fetchall()
        return {int(r[0]): _row(r) for r in rows}

    def record(
        self,
        conn: Conn,
        message_id: int,
        *,
        status: str,
        route: str,
        reason: str,
        actions: list[dict[str, Any]],
        decided_at: float,
        replayed_by: str = "",
    ) -> None:
        """Write (or replace) a message's decision; call inside its processing transaction.
        A replay (``replayed_by`` given) keeps the first ``decided_at`` and stamps the replay."""
        body = canonical_json(actions)
        if replayed_by:
            conn.execute(
                "INSERT INTO decisions (message_id, status, route, reason, actions, decided_at, "
                "replayed_at, replayed_by) VALUES (?,?,?,?,?,?,?,?) "
                "ON CONFLICT(message_id) DO UPDATE SET status = excluded.status, "
                "route = excluded.route, reason = excluded.reason, actions = excluded.actions, "
                "replayed_at = excluded.replayed_at, replayed_by = excluded.replayed_by",
                (message_id, status, route, reason, body, decided_at, decided_at, replayed_by),
            )
        else:
            conn.execute(
                "INSERT INTO decisions (message_id, status, route, reason, actions, decided_at) "
                "VALUES (?,?,?,?,?,?) "
                "ON CONFLICT(message_id) DO UPDATE SET status = excluded.status, "
                "route = excluded.route, reason = excluded.reason, actions = excluded.actions, "
                "decided_at = excluded.decided_at",
                (message_id, status, route, reason, body, decided_at),
            )

    def record_many(
        self, conn: Conn, rows: list[tuple[int, str, str, str, list[dict[str, Any]], float]]
    ) -> None:
        """:meth:`record` (no replay) of several messages, (message id, status, route,
        reason, actions, decided_at) each, in one statement."""
        conn.executemany(
            "INSERT INTO decisions (message_id, status, route, reason, actions, decided_at) "
            "VALUES (?,?,?,?,?,?) "
            "ON CONFLICT(message_id) DO UPDATE SET status = excluded.status, "
            "route = excluded.route, reason = excluded.reason, actions = excluded.actions, "
            "decided_at = excluded.decided_at",
            [(i, st, rt, why, canonical_json(actions), at) for i, st, rt, why, actions, at in rows],
        )

    def count(self) -> int:
        return int(self.db.conn.execute("SELECT count(*) FROM decisions").fetchone()[0])
