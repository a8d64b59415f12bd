"""``refloop timers``: what is pending, and when it falls due."""

from __future__ import annotations

import json
from typing import Any

import click

from engine.cli.common import open_referral_store, opened_store, routes_option, state_option
from engine.clock import isoformat, parse_iso
from engine.store import timers as store


def register(main: click.Group) -> None:
    """Add the ``timers`` group (defined below) to ``main``."""
    main.add_command(timers)


@click.group("timers")
def timers() -> None:
    """Pending escalation timers.

    Example: refloop timers list --due-before 2026-12-01
    """


@timers.command("list")
@state_option
@routes_option
@click.option("--due-before", help="Only timers due before this ISO date or time (UTC).")
@click.option("--limit", default=50, show_default=True, help="Rows to show; 0 = all.")
@click.option("--json", "as_json", is_flag=True, help="One JSON array.")
def timers_list(
    state_dir: str, routes_path: str, due_before: str | None, limit: int, as_json: bool
) -> None:
    """List pending timers, soonest first: referral, kind, due time, attempt.

    Example: refloop timers list --due-before 2026-12-01 --json
    """
    before = None
    if due_before:
        try:
            before = parse_iso(due_before)
        except ValueError:
            raise click.BadParameter(f"not an ISO date or time: {due_before!r}") from None
    with opened_store(open_referral_store, state_dir, routes_path, readonly=True) as db:
        rows = store.listing(db.conn, due_before=before, limit=limit)
    items: list[dict[str, Any]] = [
        {
            "id": t.id,
            "referral_id": t.referral_id,
            "placer_number": t.placer_number,
            "kind": t.kind,
            "due": isoformat(t.due),
            "attempt": t.attempt,
        }
        for t in rows
    ]
    if as_json:
        click.echo(json.dumps(items, indent=1))
        return
    click.echo(f"{'ID':>7}  {'REFERRAL':>8}  {'PLACER':<20} {'KIND':<20} {'DUE (UTC)':<20} TRY")
    for i in items:
        click.echo(
            f"{i['id']:>7}  {i['referral_id']:>8}  {i['placer_number'][:20]:<20} "
            f"{i['kind']:<20} {i['due'][:19]:<20} {i['attempt']}"
        )
