"""The ``outbox`` command group: list, retry and cancel outbox rows.

``list`` opens the database read-only (safe while the daemon runs); ``retry``
and ``cancel`` write one short, audited transaction, which the running daemon's
dispatcher picks up on its next poll.
"""

from __future__ import annotations

import json

import click

from engine.cli.common import login_name, open_store, opened_store, routes_option, state_option
from engine.clock import WallClock, isoformat
from engine.delivery.dispatch import cancel_item, list_outbox, retry_dead, retry_item
from engine.errors import StoreError
from engine.store.db import Database, has_column
from engine.store.outbox import OUTBOX_STATUSES


def register(main: click.Group) -> None:
    """Add the ``outbox`` group (defined below) to ``main``."""
    main.add_command(outbox)


def _open(state_dir: str, routes_path: str, *, readonly: bool) -> Database:
    """The store (engine.cli.common.open_store), which must hold the outbox."""
    db = open_store(state_dir, routes_path, readonly=readonly)
    if not has_column(db.conn, "outbox", "last_error"):
        db.close()
        raise StoreError("this database has no outbox yet (start refloop run once)")
    return db


def _time(value: float | None) -> str:
    return isoformat(value)[:19] + "Z" if value else "-"


@click.group("outbox")
def outbox() -> None:
    """Outbound messages: see what is queued, sent or dead; retry or cancel.

    Example: refloop outbox list --status dead
    """


@outbox.command("list")
@state_option
@routes_option
@click.option("--status", type=click.Choice(OUTBOX_STATUSES), help="Only this status.")
@click.option("--channel", help="Only this channel (its routes.yaml name).")
@click.option("--limit", default=50, show_default=True, help="Rows to show; 0 = all.")
@click.option("--json", "as_json", is_flag=True, help="One JSON array.")
def outbox_list(
    state_dir: str,
    routes_path: str,
    status: str | None,
    channel: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """List outbox rows, newest first: id, referral, channel, template, status,
    attempts, due time and the last error. Recipients and payloads are not shown.

    Example: refloop outbox list --status dead --channel sms
    """
    with opened_store(_open, state_dir, routes_path, readonly=True) as db:
        rows = list_outbox(db, status=status or "", channel=channel or "", limit=limit)
    if as_json:
        times = ("due", "created_at", "updated_at", "sent_at", "dead_at")
        items = [
            {k: isoformat(v) if k in times and v is not None else v for k, v in row.items()}
            for row in rows
        ]
        click.echo(json.dumps(items, indent=2))
        return
    if not rows:
        click.echo("no outbox rows")
        return
    click.echo(
        f"{'id':>6} {'referral':>8} {'channel':<12} {'template':<22} {'status':<9} "
        f"{'tries':>5} {'due':<20} last error"
    )
    for r in rows:
        click.echo(
            f"{r['id']:>6} {r['referral_id'] if r['referral_id'] is not None else '-':>8} "
            f"{r['channel']:<12} {r['template']:<22} {r['status']:<9} {r['attempts']:>5} "
            f"{_time(r['due'] if r['status'] == 'pending' else None):<20} {r['last_error']}"
        )


@outbox.command("retry")
@click.argument("outbox_id", required=False, type=int)
@click.option("--dead", "all_dead", is_flag=True, help="Retry every dead row.")
@click.option("--channel", help="With --dead: only this channel's dead rows.")
@click.option("--actor", default=None, help="Who is acting (default: your login name).")
@state_option
@routes_option
def outbox_retry(
    outbox_id: int | None,
    all_dead: bool,
    channel: str | None,
    actor: str | None,
    state_dir: str,
    routes_path: str,
) -> None:
    """Send a dead (or waiting) row again now, with a fresh attempt budget; or, with
    --dead, every dead row. The same idempotency key is used, so a provider that
    dedupes sees one message. Audited.

    Example: refloop outbox retry 42    (or: refloop outbox retry --dead --channel fax)
    """
    if (outbox_id is None) == (not all_dead):
        raise click.UsageError("give one outbox ID or --dead")
    who = actor or login_name()
    with opened_store(_open, state_dir, routes_path, readonly=False) as db:
        if all_dead:
            ids = retry_dead(db, WallClock(), who, channel or "")
            click.echo(f"{len(ids)} dead row(s) queued again" + (f": {ids}" if ids else ""))
        else:
            assert outbox_id is not None
            item = retry_item(db, outbox_id, WallClock(), who)
            click.echo(f"outbox {item['id']}: queued again ({item['channel']})")


@outbox.command("cancel")
@click.argument("outbox_id", type=int)
@click.option("--actor", default=None, help="Who is acting (default: your login name).")
@state_option
@routes_option
def outbox_cancel(outbox_id: int, actor: str | None, state_dir: str, routes_path: str) -> None:
    """Cancel a pending or dead row: it will never be sent. A row being sent right now
    cannot be cancelled (wait for its result). Audited.

    Example: refloop outbox cancel 42
    """
    with opened_store(_open, state_dir, routes_path, readonly=False) as db:
        item = cancel_item(db, outbox_id, WallClock(), actor or login_name())
    click.echo(f"outbox {item['id']}: cancelled")
