"""``refloop prune``: apply the retention policy now (engine.store.retention), see what it
would prune (``--dry-run``), or convert an older database file so that pruning returns
space to the filesystem (``--vacuum``, once, with the daemon stopped).
"""

from __future__ import annotations

import json
import os
from typing import Any

import click

from engine.cli.common import (
    database_path,
    load_routes,
    login_name,
    opened_store,
    routes_option,
    state_option,
)
from engine.clock import WallClock
from engine.errors import StoreError
from engine.store import retention
from engine.store.db import Database, has_column, open_database

PERIODS = {
    "closed-referral": "closed_referral_days",
    "unreferred": "unreferred_days",
    "error": "error_days",
    "quarantine": "quarantine_days",
    "outbox": "outbox_days",
    "parked": "parked_days",
    "sms-reply": "sms_reply_days",
}
SINCE = {
    "closed-referral": "after the referral closed",
    "outbox": "after it finished",
    "parked": "after parking",
}


def register(main: click.Group) -> None:
    """Add the ``prune`` command (defined below) to ``main``."""
    main.add_command(prune)


def _size(path: str) -> int:
    """The database file plus its WAL, in bytes."""
    return sum(os.path.getsize(p) for p in (path, f"{path}-wal") if os.path.exists(p))


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"


def _open(state_dir: str, routes_path: str, *, readonly: bool) -> Database:
    path = database_path(state_dir, load_routes(routes_path))
    db = open_database(path, readonly=readonly)
    if not (
        has_column(db.conn, "messages", "pruned_at")
        and has_column(db.conn, "sms_replies", "pruned_at")
    ):
        db.close()
        raise StoreError(
            "this database predates retention: run 'refloop prune' (without --dry-run) "
            "or start the daemon once to upgrade it"
        )
    return db


def _table(tally: retention.Tally, policy: Any, verb: str) -> None:
    click.echo(f"{'KIND':<16} {'KEPT FOR':<32} {'ROWS':>9} {'BYTES':>13}")
    for kind in retention.KINDS:
        days = getattr(policy, PERIODS[kind])
        kept = "forever" if days is None else f"{days} days {SINCE.get(kind, 'after receipt')}"
        click.echo(f"{kind:<16} {kept:<32} {tally.rows[kind]:>9} {tally.bytes[kind]:>13}")
    total_bytes = sum(tally.bytes.values())
    click.echo(f"{tally.total_rows} rows, {_mib(total_bytes)} {verb}")


def _daemon_answers(routes_path: str) -> str:
    """The health URL of a daemon running with this routes.yaml, if one answers."""
    import httpx

    http = load_routes(routes_path).http
    if not http.enabled or not http.port:
        return ""
    url = f"http://{http.host}:{http.port}/healthz"
    try:
        httpx.get(url, timeout=1.0)
    except httpx.HTTPError:
        return ""
    return url


@click.command("prune")
@state_option
@routes_option
@click.option("--dry-run", is_flag=True, help="Print what would be pruned; change nothing.")
@click.option(
    "--vacuum",
    is_flag=True,
    help="Also rewrite the file once so that pruning returns space (stop the daemon first).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def prune(state_dir: str, routes_path: str, dry_run: bool, vacuum: bool, as_json: bool) -> None:
    """Prune PHI past its retention period now (routes.yaml ``retention:``).

    Deletes the bytes of messages past their period (the row, its metadata and the
    SHA-256 of the bytes stay), the payloads and recipients of old sent or cancelled
    outbox rows, the data of parked events never linked and the text and number of old SMS
    replies; one audit row records the counts. The daemon does
    the same every ``retention.every_minutes``; this runs it now, beside a running daemon
    or not (in short transactions). Prints rows and bytes per kind. ``--vacuum`` also
    switches a database made before retention existed to ``auto_vacuum=INCREMENTAL`` with a
    VACUUM (needs the daemon stopped and free disk about the file's size), after which
    pruning gives the space back to the filesystem.

    Example: refloop prune --dry-run
    """
    if dry_run and vacuum:
        raise click.UsageError("--dry-run and --vacuum do not go together")
    policy = load_routes(routes_path).retention
    now = WallClock().now()
    if vacuum:
        running = _daemon_answers(routes_path)
        if running:
            raise click.ClickException(
                f"the daemon is running ({running} answers): stop it before --vacuum"
            )
    with opened_store(_open, state_dir, routes_path, readonly=dry_run) as db:
        size_before = _size(db.path)
        if dry_run:
            tally = retention.plan(db, policy, now)
        else:
            tally = retention.prune_now(db, policy, now, actor=f"operator:{login_name()}")
        mode = retention.auto_vacuum(db)
        converted = False
        if not dry_run:
            if vacuum and mode != "incremental":
                retention.vacuum_full(db)
                converted = True
            else:
                retention.vacuum_all(db)
            mode = retention.auto_vacuum(db)
        free = retention.free_bytes(db)
        size_after = _size(db.path)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "dry_run": dry_run,
                    "kinds": tally.as_dict(),
                    "auto_vacuum": mode,
                    "free_bytes": free,
                    "size_before": size_before,
                    "size_after": size_after,
                },
                indent=1,
            )
        )
        return
    _table(tally, policy, "would be pruned" if dry_run else "pruned")
    if converted:
        click.echo(f"vacuumed: {_mib(size_before)} -> {_mib(size_after)}; auto_vacuum={mode}")
    elif not dry_run:
        click.echo(f"database: {_mib(size_before)} -> {_mib(size_after)}")
    if mode != "incremental":
        click.echo(
            f"auto_vacuum={mode}: {_mib(free)} of free pages stay in the file; "
            "run 'refloop prune --vacuum' once with the daemon stopped to return them"
        )
