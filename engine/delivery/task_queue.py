"""The built-in coordinator task queue: tasks are rows a coordinator sees and completes,
with no external worklist system (docs/escalation.md, "Where tasks go").

The escalation timers, the SMS YES reply and the packet fallback queue coordinator tasks
as outbox rows on the ``task`` (or ``coordinator``) channel. When routes.yaml gives that
channel no external worklist (a ``url`` / ``api_url``), :class:`TaskQueue` serves it: the
dispatcher calls :meth:`TaskQueue.deliver` inside the transaction that marks the outbox
row ``sent``, so a task exists exactly when its row is sent (a crash in between leaves
neither, and the row is delivered again at start; the unique ``tasks.outbox_id`` makes a
second delivery a no-op).

Payload contract (JSON of the outbox row): ``referral_id``, ``kind`` (timer kind or
effect), ``task`` (template name), ``priority_score`` (number), optional ``reason`` (plain
words) and ``attempts`` (list of ``{"at": ISO-8601 UTC, "what": text}``). Whatever the
payload carries is stored; nothing here logs it.

Operator actions (``refloop tasks``, ``/api/tasks``, ``/ui/tasks``) each run in one short
durable transaction; completing a task writes a ``task-done`` entry on the referral's
timeline and in the audit log (codes only: the note stays in the task row).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping
from typing import Any, Final

from engine.clock import Clock, isoformat, parse_iso
from engine.delivery.direct_inbound import timeline_note
from engine.errors import StoreError
from engine.routing.table import RouteTable
from engine.store import audit as audit_store
from engine.store import outbox as outbox_store
from engine.store import tasks as store
from engine.store.db import Database
from engine.store.outbox import Item
from engine.store.referrals import Conn
from engine.store.worklist import TASK_CHANNELS  # the outbox channels a coordinator works

log = logging.getLogger(__name__)

PROVIDER_ID: Final = "builtin-task-queue"
MAX_ATTEMPTS_KEPT: Final = 50
MAX_TEXT: Final = 2000


def builtin_channels(types: Mapping[str, str], built: Collection[str]) -> list[str]:
    """The channels the built-in queue serves: ``task`` and ``coordinator``, and every
    ``type: task`` channel of routes.yaml (``types``: name → type), except those that
    got an adapter to an external worklist (``built``: names with one, e.g. a ``url``)."""
    wanted = [*TASK_CHANNELS, *(n for n, t in types.items() if t == "task")]
    return [n for n in dict.fromkeys(wanted) if n not in built]


def unserved_channels(table: RouteTable, served: Collection[str]) -> dict[str, list[str]]:
    """Channel → what names it (``route ref-new (routes.yaml:41)``, ``escalation.notify``,
    ``escalation.rotation``), for every channel a route ``send``/``forward``, the
    ``notify`` channel or a rotation slot names that nothing in ``served`` (the adapters
    and the built-in queue's channels) serves. ``refloop routes check`` refuses these;
    this is the daemon's second look at start (docs/escalation.md)."""
    named: list[tuple[str, str]] = [
        (a.channel, f"route {route.name} ({route.where})")
        for route in table.routes
        for a in route.actions
        if a.action in ("send", "forward") and a.channel
    ]
    policy = table.escalation
    if policy.notify:
        named.append((policy.notify, "escalation.notify"))
    for slot in policy.rotation:
        channel = policy.slot_channel(slot)
        if channel is not None:  # an unconfigured slot is skipped (voice: a task)
            named.append((channel, "escalation.rotation"))
    out: dict[str, list[str]] = {}
    for channel, who in named:
        if channel not in served:
            out.setdefault(channel, []).append(who)
    return out


def warn_unserved(conn: Conn, table: RouteTable, served: Collection[str], now: float) -> int:
    """Log a warning for each channel the routes or the escalation name that nothing
    serves, and for outbox rows already waiting on such a channel (queued by an older
    version or configuration: ``refloop outbox cancel`` them, or configure the channel).
    Codes and counts only. Returns the number of warnings."""
    warnings = 0
    for channel, who in unserved_channels(table, served).items():
        log.warning("channel %r is named by %s but nothing serves it", channel, ", ".join(who))
        warnings += 1
    for s in outbox_store.stats(conn, now):
        if s.depth and s.channel not in served:
            log.warning(
                "outbox: %d row(s) wait on channel %r that nothing serves (oldest %.0f s)",
                s.depth,
                s.channel,
                s.oldest_age,
            )
            warnings += 1
    return warnings


def new_task(item: Item) -> store.NewTask:
    """The task an outbox row asks for, from its payload (bad fields fall back)."""
    payload = item.payload_dict()
    try:
        priority = float(payload.get("priority_score") or 0.0)
    except (TypeError, ValueError):
        priority = 0.0
    due_at = None
    if payload.get("due_at"):
        try:
            due_at = parse_iso(str(payload["due_at"]))
        except ValueError:
            due_at = None
    return store.NewTask(
        outbox_id=item.id,
        referral_id=item.referral_id,
        kind=str(payload.get("kind") or payload.get("effect") or item.template)[:100],
        template=str(payload.get("task") or item.template)[:100],
        reason=str(payload.get("reason") or "")[:MAX_TEXT],
        priority=priority,
        attempts=_attempts(payload.get("attempts")),
        due_at=due_at,
    )


def _attempts(value: Any) -> tuple[dict[str, Any], ...]:
    """The payload's ``attempts`` as ``{"at", "what"}`` dicts; anything else is dropped."""
    if not isinstance(value, list):
        return ()
    out = [
        {"at": str(a.get("at") or "")[:40], "what": str(a.get("what") or "")[:200]}
        for a in value
        if isinstance(a, dict)
    ]
    return tuple(out[-MAX_ATTEMPTS_KEPT:])


class TaskQueue:
    """The built-in deliverer of the task channels (engine.delivery.dispatch.LocalChannel)."""

    def deliver(self, conn: Conn, item: Item, now: float) -> int:
        """Open the row's task (superseding the referral's older open task) inside the
        caller's transaction; returns the task id (the existing one on a redelivery)."""
        task_id, _new = store.open_task(conn, new_task(item), now)
        return task_id


# ---------------------------------------------------------------------------
# Operator actions


def task_dict(t: store.TaskRow, now: float | None = None) -> dict[str, Any]:
    """A task as the CLI and the API show it (times ISO-8601 UTC, or null)."""
    return {
        "id": t.id,
        "referral_id": t.referral_id,
        "outbox_id": t.outbox_id,
        "kind": t.kind,
        "template": t.template,
        "reason": t.reason,
        "priority": round(t.priority, 1),
        "attempts": [dict(a) for a in t.attempts],
        "status": t.status,
        "assignee": t.assignee,
        "due_at": _iso(t.due_at),
        "due": isoformat(_first(t.snoozed_until, t.due_at, t.created_at)),
        "snoozed_until": _iso(t.snoozed_until),
        "snoozed": bool(now is not None and t.snoozed_until and t.snoozed_until > now),
        "note": t.note,
        "created_at": isoformat(t.created_at),
        "done_at": _iso(t.done_at),
        "done_by": t.done_by,
        "superseded_by": t.superseded_by,
    }


def _first(*values: float | None) -> float:
    """The first value that is not None (SQL ``coalesce``; :data:`store.DUE`)."""
    return next(v for v in values if v is not None)


def _iso(value: float | None) -> str | None:
    return None if value is None else isoformat(value)


# What a task list can show: the work list (``due``: open tasks not snoozed, soonest due
# first), the ``snoozed`` ones, every ``open`` one most urgent first, the history by
# status, or ``all``.
LISTS: Final = ("due", "snoozed", "open", "done", "superseded", "all")


def list_tasks(
    db: Database, clock: Clock, *, status: str = "open", limit: int = 100
) -> list[dict[str, Any]]:
    """The tasks of one of :data:`LISTS` (``""`` is ``all``), as :func:`task_dict`."""
    status = "" if status == "all" else status
    if status and status not in LISTS:
        raise StoreError(f"status must be one of {', '.join(LISTS)}")
    now = clock.now()
    if status in ("due", "snoozed"):
        rows = store.due_listing(db.conn, now, snoozed=status == "snoozed", limit=limit)
    else:
        rows = store.listing(db.conn, status=status, limit=limit)
    return [task_dict(t, now) for t in rows]


def referral_tasks(db: Database, clock: Clock, referral_id: int) -> list[dict[str, Any]]:
    """A referral's tasks, oldest first, as :func:`task_dict`."""
    now = clock.now()
    return [task_dict(t, now) for t in store.for_referral(db.conn, referral_id)]


def get_task(db: Database, task_id: int) -> store.TaskRow:
    """Raises :class:`KeyError` when there is no such task."""
    row = store.get(db.conn, task_id)
    if row is None:
        raise KeyError(task_id)
    return row


def complete(db: Database, clock: Clock, task_id: int, *, note: str, by: str) -> dict[str, Any]:
    """``open → done`` with the coordinator's note; a ``task-done`` entry on the
    referral's timeline and in the audit log. Raises KeyError (no such task) or
    StoreError (the task is not open)."""

    def write(conn: Conn, now: float) -> bool:
        return store.finish(conn, task_id, note=note[:MAX_TEXT], by=by, now=now)

    return _act(db, clock, task_id, "task-done", by, write)


def assign(db: Database, clock: Clock, task_id: int, assignee: str, *, by: str) -> dict[str, Any]:
    """Give an open task to ``assignee`` ("" takes it back); audited."""

    def write(conn: Conn, _now: float) -> bool:
        return store.assign(conn, task_id, assignee[:100])

    return _act(db, clock, task_id, "task-assigned", by, write)


def snooze(
    db: Database, clock: Clock, task_id: int, until: float | None, *, by: str
) -> dict[str, Any]:
    """Hide an open task from the open list until ``until`` (None: wake it); audited."""

    def write(conn: Conn, _now: float) -> bool:
        return store.snooze(conn, task_id, until)

    return _act(db, clock, task_id, "task-snoozed", by, write)


def _act(
    db: Database,
    clock: Clock,
    task_id: int,
    action: str,
    by: str,
    write: Callable[[Conn, float], bool],
) -> dict[str, Any]:
    """One durable transaction: ``write``, then the audit row (and, for ``task-done``,
    the referral's timeline entry). Codes only: no note or reason in the audit log."""
    get_task(db, task_id)
    now = clock.now()
    with db.transaction() as conn:
        if not write(conn, now):
            row = store.get(conn, task_id)
            raise StoreError(f"task {task_id} is {row.status if row else 'gone'}, not open")
        row = store.get(conn, task_id)
        assert row is not None
        detail = {"task_id": row.id, "template": row.template, "outbox_id": row.outbox_id}
        if action == "task-done" and row.referral_id is not None:
            timeline_note(conn, row.referral_id, action, detail, by, now)
        else:
            audit_store.append(
                conn,
                at=isoformat(now),
                actor=by,
                action=action,
                referral_id=row.referral_id,
                message_id=None,
                detail=detail,
            )
    return task_dict(row, now)
