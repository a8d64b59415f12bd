"""``refloop tasks``: the built-in coordinator task queue (engine.delivery.task_queue).

``list`` opens the database read-only (safe while the daemon runs); ``done``, ``assign``
and ``snooze`` each write one short, audited transaction.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

from engine.cli.common import login_name, open_store, opened_store, routes_option, state_option
from engine.clock import WallClock, parse_iso
from engine.delivery import task_queue as service
from engine.errors import StoreError
from engine.store.db import Database, has_table

STATUSES = service.LISTS


def register(main: click.Group) -> None:
    """Add the ``tasks`` group (defined below) to ``main``."""
    main.add_command(tasks)


def _open(state_dir: str, routes_path: str, *, readonly: bool) -> Database:
    """The store through the CLI's one opener, which must hold the tasks table."""
    db = open_store(state_dir, routes_path, readonly=readonly)
    if not has_table(db.conn, "tasks"):
        db.close()
        raise StoreError("this database has no tasks table yet (start refloop run once)")
    return db


def _who(by: str | None) -> str:
    return f"operator:{by or login_name()}"


def _line(t: dict[str, Any]) -> str:
    ref = t["referral_id"] if t["referral_id"] is not None else "-"
    extra = f" snoozed until {t['snoozed_until']}" if t["snoozed"] else ""
    return (
        f"{t['id']:>6} {ref!s:>8} {t['status']:<10} {t['priority']:>5} "
        f"{t['template']:<28} {t['assignee'] or '-':<12} {t['created_at']}{extra}"
    )


@click.group("tasks")
def tasks() -> None:
    """Coordinator tasks of the built-in queue: list, done, assign, snooze.

    Example: refloop tasks list
    """


@tasks.command("list")
@click.option(
    "--status", type=click.Choice(STATUSES), default="open", show_default=True,
    help="Which tasks: due (open, not snoozed, soonest due first), snoozed, open (most "
    "urgent first), done, superseded or all (newest first).",
)  # fmt: skip
@click.option("--limit", default=100, show_default=True, help="Rows to show; 0 = all.")
@click.option("--json", "as_json", is_flag=True, help="One JSON array.")
@state_option
@routes_option
def tasks_list(status: str, limit: int, as_json: bool, state_dir: str, routes_path: str) -> None:
    """List coordinator tasks: id, referral, status, priority, task, assignee, opened.

    Example: refloop tasks list --status all --json
    """
    with opened_store(_open, state_dir, routes_path, readonly=True) as db:
        rows = service.list_tasks(db, WallClock(), status=status, limit=limit)
    if as_json:
        click.echo(json.dumps(rows, ensure_ascii=False, indent=2))
        return
    click.echo(f"{'id':>6} {'referral':>8} {'status':<10} {'prio':>5} {'task':<28} "
               f"{'assignee':<12} opened")  # fmt: skip
    for t in rows:
        click.echo(_line(t))


def _act(state_dir: str, routes_path: str, do: Callable[[Database], dict[str, Any]]) -> None:
    """Run one task action (``do``, a ``KeyError`` for an unknown task) in a writable
    store and print the task's new status."""
    with opened_store(_open, state_dir, routes_path, readonly=False) as db:
        try:
            t = do(db)
        except KeyError as exc:
            raise click.ClickException(f"no task {exc.args[0]}") from None
    click.echo(f"task {t['id']}: {t['status']}" + (f", {t['assignee']}" if t["assignee"] else ""))


@tasks.command("done")
@click.argument("task_id", type=int)
@click.option("--note", required=True, help="What was done (kept with the task).")
@click.option("--by", default=None, help="Who did it (default: your login name).")
@state_option
@routes_option
def tasks_done(task_id: int, note: str, by: str | None, state_dir: str, routes_path: str) -> None:
    """Complete an open task; its referral's timeline and the audit log record it.

    Example: refloop tasks done 12 --note "called the office, booked 3 Feb"
    """
    clock = WallClock()
    _act(state_dir, routes_path, lambda db: service.complete(
        db, clock, task_id, note=note, by=_who(by)
    ))  # fmt: skip


@tasks.command("assign")
@click.argument("task_id", type=int)
@click.argument("user")
@click.option("--by", default=None, help="Who is acting (default: your login name).")
@state_option
@routes_option
def tasks_assign(task_id: int, user: str, by: str | None, state_dir: str, routes_path: str) -> None:
    """Give an open task to USER ("" takes it back). Audited.

    Example: refloop tasks assign 12 casey
    """
    clock = WallClock()
    _act(state_dir, routes_path, lambda db: service.assign(
        db, clock, task_id, user, by=_who(by)
    ))  # fmt: skip


@tasks.command("snooze")
@click.argument("task_id", type=int)
@click.argument("until")
@click.option("--by", default=None, help="Who is acting (default: your login name).")
@state_option
@routes_option
def tasks_snooze(
    task_id: int, until: str, by: str | None, state_dir: str, routes_path: str
) -> None:
    """Mark an open task snoozed until UNTIL (ISO date or time, UTC). Audited.

    Example: refloop tasks snooze 12 2026-12-10T09:00:00Z
    """
    try:
        when = parse_iso(until)
    except ValueError:
        raise click.BadParameter(f"not an ISO date or time: {until!r}") from None
    clock = WallClock()
    _act(state_dir, routes_path, lambda db: service.snooze(
        db, clock, task_id, when, by=_who(by)
    ))  # fmt: skip
