"""``refloop backup DEST`` and ``refloop restore SRC`` (engine.store.backup; the drill is
in docs/operations.md)."""

from __future__ import annotations

import time
from pathlib import Path

import click

from engine.cli.common import (
    UsageFailure,
    database_path,
    errors,
    load_routes,
    routes_option,
    state_option,
)


def register(main: click.Group) -> None:
    """Add the ``backup`` and ``restore`` commands (defined below) to ``main``."""
    main.add_command(backup)
    main.add_command(restore)


@click.command("backup")
@click.argument("dest", type=click.Path())
@state_option
@routes_option
def backup(dest: str, state_dir: str, routes_path: str) -> None:
    """Copy the database to DEST, safely while the daemon runs, and verify the copy.

    DEST is a new file, or a directory (the copy is named refloop-<UTC time>.db). The
    copy is SQLite's online backup (a consistent snapshot; the daemon keeps taking
    messages), then PRAGMA integrity_check and the audit chain are checked on the copy.
    Exit 1 when a check fails.

    Example: refloop backup /var/backups/refloop/ --routes /etc/refloop/routes.yaml
    --state /var/lib/refloop
    """
    from engine.store.backup import backup as run_backup

    if not dest.strip():  # "$UNSET" in quotes: never a PHI copy in the current folder
        raise click.ClickException("DEST is empty: name a directory or a new file")
    if dest.endswith("/") and not Path(dest).is_dir():
        raise click.ClickException(f"no directory {dest}")
    with errors():
        source = _sqlite_file(database_path(state_dir, load_routes(routes_path)))
        started = time.monotonic()
        result = run_backup(source, Path(dest), now=time.time())
    click.echo(f"backup ok in {time.monotonic() - started:.1f}s: {result.summary()}")


@click.command("restore")
@click.argument("src", type=click.Path(path_type=Path))
@state_option
@routes_option
def restore(src: Path, state_dir: str, routes_path: str) -> None:
    """Replace the database with the backup SRC (the daemon must be stopped).

    SRC must pass PRAGMA integrity_check and the audit chain check first. Refused while
    refloop runs on this state directory (it holds refloop.db.lock). The database being
    replaced is kept beside it as refloop.db.pre-restore-<UTC time>.

    Example: refloop restore /backup/refloop-20260101T020000Z.db
    --routes /etc/refloop/routes.yaml --state /var/lib/refloop
    """
    from engine.store.backup import restore as run_restore

    with errors():
        target = _sqlite_file(database_path(state_dir, load_routes(routes_path)))
        result = run_restore(src, target, now=time.time())
    if result.kept is not None:
        click.echo(f"kept the previous database as {result.kept}")
    click.echo(f"restore ok: {result.target.summary()}")


def _sqlite_file(location: str) -> Path:
    """The SQLite file of ``store``; a PostgreSQL store is backed up by the server."""
    from engine.store.db import is_postgres_url, sqlite_path

    if is_postgres_url(location):
        raise UsageFailure(
            "backup and restore copy the SQLite file; a PostgreSQL store is backed up by "
            "the server (WAL archiving, pg_dump): docs/scale-out.md"
        )
    return sqlite_path(location)
