"""``refloop store``: the database itself (docs/scale-out.md): ``copy`` moves an
installation's SQLite file into PostgreSQL."""

from __future__ import annotations

import json
from urllib.parse import urlsplit

import click

from engine.cli.common import UsageFailure, errors
from engine.store.copy import copy_store
from engine.store.db import is_postgres_url, open_database
from engine.store.pg import grant_runtime_role


def register(main: click.Group) -> None:
    """Add the ``store`` group (defined below) to ``main``."""
    main.add_command(store)


@click.group("store")
def store() -> None:
    """The database: copy a SQLite installation into PostgreSQL.

    Example: refloop store copy --from state/refloop.db --to postgresql://refloop@db1/refloop
    """


def _pg_url(option: str, url: str) -> str:
    if not is_postgres_url(url):
        raise UsageFailure(f"{option}: a postgresql:// URL")
    if urlsplit(url).password is not None:
        raise UsageFailure(
            f"{option}: no password on the command line (every user can read it): "
            "put it in ~/.pgpass (PGPASSFILE) or a libpq service file"
        )
    return url


@store.command("copy")
@click.option(
    "--from",
    "source",
    required=True,
    help="The SQLite database: a path (state/refloop.db) or sqlite:///path.",
)
@click.option(
    "--to",
    "target",
    required=True,
    help="postgresql://user@host/db (password from ~/.pgpass or a service file, never here).",
)
@click.option("--json", "as_json", is_flag=True, help="The counts as one JSON object.")
def store_copy(source: str, target: str, as_json: bool) -> None:
    """Copy every table of a SQLite database into an empty PostgreSQL database (or
    schema), then verify row counts and the audit chain there; on any mismatch nothing
    is kept. Stop the daemon first. The target is migrated to this refloop's schema.

    Example: refloop store copy --from state/refloop.db --to postgresql://refloop@db1/refloop
    """
    _pg_url("--to", target)
    if is_postgres_url(source):
        raise UsageFailure("--from: the SQLite database (a path or sqlite:///path)")

    def progress(table: str, rows: int) -> None:
        if not as_json:
            click.echo(f"  {table}: {rows} rows", err=True)

    with errors():
        src = open_database(source, readonly=True)
        try:
            dst = open_database(target)
            try:
                result = copy_store(src, dst, progress=progress)
                where = dst.location
            finally:
                dst.close()
        finally:
            src.close()
    total = sum(result.tables.values())
    if as_json:
        click.echo(
            json.dumps(
                {
                    "tables": result.tables,
                    "rows": total,
                    "audit_rows": result.audit_rows,
                    "seconds": round(result.seconds, 3),
                },
                sort_keys=True,
            )
        )
        return
    click.echo(
        f"copied {total} rows in {len(result.tables)} tables to {where} "
        f"in {result.seconds:.1f} s; counts match; audit chain verified ({result.audit_rows} rows)"
    )


@store.command("grant")
@click.option(
    "--to",
    "target",
    required=True,
    help="postgresql://owner@host/db: the schema's owner (who migrated it) connects.",
)
@click.option("--role", required=True, help="The daemon's role, e.g. refloop (must exist).")
def store_grant(target: str, role: str) -> None:
    """Let ROLE run refloop on the PostgreSQL schema and no more: read and write every
    table, but never UPDATE, DELETE or TRUNCATE the audit log. Run it as the schema's
    owner after the first start (or store copy), and again after an upgrade that adds
    tables; then start the daemon as ROLE.

    Example: refloop store grant --to postgresql://refloop_owner@db1/refloop --role refloop
    """
    _pg_url("--to", target)
    with errors():
        db = open_database(target)
        try:
            grant_runtime_role(db.conn, role)
            where = db.location
        finally:
            db.close()
    click.echo(f"granted {role} on {where}: tables read/write, audit insert-only")
