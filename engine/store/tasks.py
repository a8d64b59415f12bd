"""The built-in coordinator task queue (docs/escalation.md, "Where tasks go").

A coordinator task is an outbox row on the ``task`` / ``coordinator`` channel; when no
external worklist serves that channel, ``engine.delivery.task_queue.TaskQueue`` delivers the row by
inserting a ``tasks`` row here in the same transaction that marks the outbox row sent.

Row lifecycle (``tasks.status``)::

    open ──done (coordinator)──► done
      └──a newer task for the same referral──► superseded (superseded_by = the newer id)

Invariants the schema holds: one task per outbox row (unique ``outbox_id``: delivering
the same row twice is a no-op) and at most one open task per referral (a partial unique
index). Times are epoch seconds (UTC). ``reason`` and ``note`` are free text a signed-in
coordinator may see; they never go to logs or the audit log.

Plain functions over an open connection, called inside the caller's transaction;
nothing here commits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final, Literal

from engine.canonical import canonical_json
from engine.store.referrals import Conn
from engine.store.sql import Schema

TaskStatus = Literal["open", "done", "superseded"]
TASK_STATUSES: Final[tuple[TaskStatus, ...]] = ("open", "done", "superseded")

_SCHEMA: Final = (
    """CREATE TABLE tasks (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        referral_id INTEGER,                -- NULL: a task about no one referral
        outbox_id INTEGER NOT NULL,         -- the outbox row it was delivered from
        kind TEXT NOT NULL,                 -- timer kind or effect (coordinator-task, ...)
        template TEXT NOT NULL,             -- what to do (coordinator-followup, ...)
        reason TEXT NOT NULL DEFAULT '',    -- plain words from the payload
        priority REAL NOT NULL DEFAULT 0,   -- the payload's priority_score, 0-100
        attempts TEXT NOT NULL DEFAULT '[]',  -- JSON [{"at": ISO, "what": text}]
        status TEXT NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'done', 'superseded')),
        assignee TEXT NOT NULL DEFAULT '',
        due_at REAL,
        snoozed_until REAL,
        note TEXT NOT NULL DEFAULT '',      -- the coordinator's closing note
        created_at REAL NOT NULL,
        done_at REAL,
        done_by TEXT NOT NULL DEFAULT '',
        superseded_by INTEGER
    )""",
    "CREATE UNIQUE INDEX tasks_outbox ON tasks (outbox_id)",
    "CREATE UNIQUE INDEX tasks_open_referral ON tasks (referral_id) WHERE status = 'open'",
    # the coordinator's list: open tasks most urgent first; the history by status,
    # newest first (each walks its index in order and stops at the LIMIT)
    "CREATE INDEX tasks_status_priority ON tasks (status, priority DESC, id)",
    "CREATE INDEX tasks_status ON tasks (status, id)",
)
# The work page's order (open tasks by when they are due: a snooze moves a task to its
# wake time, a task without a due date is due from when it opened) and a referral's tasks.
DUE: Final = "coalesce(snoozed_until, due_at, created_at)"
_SCHEMA_DUE: Final = (
    f"CREATE INDEX tasks_status_due ON tasks (status, {DUE}, id)",
    "CREATE INDEX tasks_referral ON tasks (referral_id, id)",
)
_COLUMNS: Final = (
    "id, referral_id, outbox_id, kind, template, reason, priority, attempts, status, "
    "assignee, due_at, snoozed_until, note, created_at, done_at, done_by, superseded_by"
)


def migrate(db: Schema) -> None:
    """Schema: appended to ``engine.store.migrations.MIGRATIONS``."""
    for statement in _SCHEMA:
        db.execute(statement)


def migrate_due(db: Schema) -> None:
    """The due-date order and the by-referral index (a later migration)."""
    for statement in _SCHEMA_DUE:
        db.execute(statement)


@dataclass(frozen=True, slots=True)
class TaskRow:
    id: int
    referral_id: int | None
    outbox_id: int
    kind: str
    template: str
    reason: str
    priority: float
    attempts: tuple[dict[str, Any], ...]
    status: TaskStatus
    assignee: str
    due_at: float | None
    snoozed_until: float | None
    note: str
    created_at: float
    done_at: float | None
    done_by: str
    superseded_by: int | None


@dataclass(frozen=True, slots=True)
class NewTask:
    """What a delivered outbox row says (``engine.delivery.task_queue.new_task`` reads the
    payload)."""

    outbox_id: int
    referral_id: int | None
    kind: str
    template: str
    reason: str = ""
    priority: float = 0.0
    attempts: tuple[dict[str, Any], ...] = ()
    due_at: float | None = None


def _row(r: tuple[Any, ...]) -> TaskRow:
    return TaskRow(
        id=int(r[0]),
        referral_id=None if r[1] is None else int(r[1]),
        outbox_id=int(r[2]),
        kind=str(r[3]),
        template=str(r[4]),
        reason=str(r[5]),
        priority=float(r[6]),
        attempts=tuple(json.loads(r[7])),
        status=r[8],
        assignee=str(r[9]),
        due_at=None if r[10] is None else float(r[10]),
        snoozed_until=None if r[11] is None else float(r[11]),
        note=str(r[12]),
        created_at=float(r[13]),
        done_at=None if r[14] is None else float(r[14]),
        done_by=str(r[15]),
        superseded_by=None if r[16] is None else int(r[16]),
    )


def get(conn: Conn, task_id: int) -> TaskRow | None:
    r = conn.execute(f"SELECT {_COLUMNS} FROM tasks WHERE id = ?", (task_id,)).fetchone()
    return None if r is None else _row(r)


def by_outbox(conn: Conn, outbox_id: int) -> TaskRow | None:
    r = conn.execute(f"SELECT {_COLUMNS} FROM tasks WHERE outbox_id = ?", (outbox_id,)).fetchone()
    return None if r is None else _row(r)


def open_task(conn: Conn, task: NewTask, now: float) -> tuple[int, bool]:
    """Insert the task of an outbox row; (id, True) when new, (existing id, False) when
    that outbox row was delivered before. A referral's older open task becomes
    ``superseded`` by the new one (never two open at once)."""
    existing = by_outbox(conn, task.outbox_id)
    if existing is not None:
        return existing.id, False
    older = None
    if task.referral_id is not None:
        r = conn.execute(
            "SELECT id FROM tasks WHERE referral_id = ? AND status = 'open'", (task.referral_id,)
        ).fetchone()
        older = None if r is None else int(r[0])
    if older is not None:  # before the insert: the partial unique index allows one open
        conn.execute("UPDATE tasks SET status = 'superseded' WHERE id = ?", (older,))
    cur = conn.execute(
        "INSERT INTO tasks (referral_id, outbox_id, kind, template, reason, priority, attempts, "
        "due_at, created_at) VALUES (?,?,?,?,?,?,?,?,?) RETURNING id",
        (
            task.referral_id,
            task.outbox_id,
            task.kind,
            task.template,
            task.reason,
            task.priority,
            canonical_json(list(task.attempts)),
            task.due_at,
            now,
        ),
    )
    new_id = int(cur.fetchone()[0])
    if older is not None:
        conn.execute("UPDATE tasks SET superseded_by = ? WHERE id = ?", (new_id, older))
    return new_id, True


def listing(conn: Conn, *, status: str = "open", limit: int = 100) -> list[TaskRow]:
    """Open tasks most urgent first (priority, then oldest); other statuses newest
    first; ``status=""`` is every task, newest first. ``limit`` 0 = all."""
    if status == "open":
        where, args, order = "WHERE status = ?", [status], "priority DESC, id"
    elif status:
        where, args, order = "WHERE status = ?", [status], "id DESC"
    else:
        where, args, order = "", [], "id DESC"
    tail = " LIMIT ?" if limit else ""
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM tasks {where} ORDER BY {order}{tail}",
        (*args, *([limit] if limit else [])),
    ).fetchall()
    return [_row(r) for r in rows]


def due_listing(
    conn: Conn, now: float, *, snoozed: bool = False, limit: int = 100
) -> list[TaskRow]:
    """Open tasks by when they are due, soonest first (:data:`DUE`): those awake at
    ``now`` (never snoozed, or their snooze has ended), or with ``snoozed`` those still
    asleep. ``limit`` 0 = all."""
    awake = "<=" if not snoozed else ">"
    tail = " LIMIT ?" if limit else ""
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM tasks WHERE status = 'open' "
        f"AND coalesce(snoozed_until, 0) {awake} ? ORDER BY {DUE}, id{tail}",
        (now, *([limit] if limit else [])),
    ).fetchall()
    return [_row(r) for r in rows]


def for_referral(conn: Conn, referral_id: int) -> list[TaskRow]:
    """A referral's tasks, oldest first."""
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM tasks WHERE referral_id = ? ORDER BY id", (referral_id,)
    ).fetchall()
    return [_row(r) for r in rows]


def finish(conn: Conn, task_id: int, *, note: str, by: str, now: float) -> bool:
    """``open → done``; False when the task is not open (nothing written)."""
    cur = conn.execute(
        "UPDATE tasks SET status = 'done', note = ?, done_by = ?, done_at = ? "
        "WHERE id = ? AND status = 'open'",
        (note, by, now, task_id),
    )
    return cur.rowcount == 1


def assign(conn: Conn, task_id: int, assignee: str) -> bool:
    """Set (or, with "", clear) an open task's assignee; False when it is not open."""
    cur = conn.execute(
        "UPDATE tasks SET assignee = ? WHERE id = ? AND status = 'open'", (assignee, task_id)
    )
    return cur.rowcount == 1


def snooze(conn: Conn, task_id: int, until: float | None) -> bool:
    """Hide an open task from the coordinator's list until ``until``; False when not open."""
    cur = conn.execute(
        "UPDATE tasks SET snoozed_until = ? WHERE id = ? AND status = 'open'", (until, task_id)
    )
    return cur.rowcount == 1
