"""``refloop specialists``: the specialist directory (import, set, list, show).

The import checks the whole file before writing anything; problems are printed one per
line as ``FILE:LINE: column: message`` and the command exits 2 (engine.cli.common
``errors``).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from engine.cli.common import login_name, open_store, opened_store, routes_option, state_option
from engine.clock import WallClock
from engine.errors import StoreError
from engine.tracking import specialists as lib


def register(main: click.Group) -> None:
    """Add the ``specialists`` group (defined below) to ``main``."""
    main.add_command(specialists)


@click.group("specialists")
def specialists() -> None:
    """The specialist directory: Direct addresses, certificates, fax numbers.

    Example: refloop specialists list
    """


@specialists.command("import")
@state_option
@routes_option
@click.argument("csv_file", type=click.Path(exists=True, dir_okay=False))
def specialists_import(state_dir: str, routes_path: str, csv_file: str) -> None:
    """Import specialists from a CSV file (all rows or none).

    Columns: npi, local_id, name, organisation, specialty, direct_address, fax,
    phone, preferred_channel (auto|direct|fax), certificate (a PEM file path,
    relative to the CSV, or inline PEM). Rows update the specialist with the same
    NPI (or local_id).

    Example: refloop specialists import /etc/refloop/specialists.csv
    """
    with opened_store(open_store, state_dir, routes_path, readonly=False) as db:
        summary = lib.import_csv(db, Path(csv_file), WallClock(), actor=login_name())
    click.echo(
        f"{summary.rows} row(s): {summary.added} added, {summary.updated} updated, "
        f"{summary.unchanged} unchanged"
    )


@specialists.command("set")
@state_option
@routes_option
@click.argument("key")
@click.option("--fax", default="", help="Fax number (E.164, or a 10-digit US number).")
@click.option("--direct-address", "direct_address", default="", help="Direct address.")
@click.option("--name", default="", help="Name (required for a specialist not on file).")
@click.option("--organisation", default="", help="Practice or organisation.")
@click.option("--specialty", default="", help="Specialty.")
@click.option("--phone", default="", help="Office phone.")
@click.option(
    "--preferred-channel",
    "preferred_channel",
    default="",
    type=click.Choice(["", "auto", "direct", "fax"]),
    help="auto, direct or fax.",
)
@click.option("--json", "as_json", is_flag=True, help="The entry as JSON.")
def specialists_set(
    state_dir: str,
    routes_path: str,
    key: str,
    fax: str,
    direct_address: str,
    name: str,
    organisation: str,
    specialty: str,
    phone: str,
    preferred_channel: str,
    as_json: bool,
) -> None:
    """Record one office's fax, Direct address, name ... by NPI or local id (the
    specialist is added when not on file). For the number a coordinator found when
    faxing a packet by hand: the next referral to that office goes by itself.

    Example: refloop specialists set 1234567893 --fax "(555) 020-0107"
    """
    values = {
        "fax": fax,
        "direct_address": direct_address,
        "name": name,
        "organisation": organisation,
        "specialty": specialty,
        "phone": phone,
        "preferred_channel": preferred_channel,
    }
    with opened_store(open_store, state_dir, routes_path, readonly=False) as db:
        entry = lib.set_specialist(db, key, values, WallClock(), actor=login_name())
    if as_json:
        click.echo(json.dumps(entry, indent=1))
        return
    reach = [r for r in ("direct_address", "fax") if entry[r]]
    click.echo(
        f"{entry['npi'] or entry['local_id']}: {entry['name']} "
        f"({', '.join(f'{r} {entry[r]}' for r in reach) or 'no address'})"
    )


@specialists.command("list")
@state_option
@routes_option
@click.option("--json", "as_json", is_flag=True, help="One JSON array.")
def specialists_list(state_dir: str, routes_path: str, as_json: bool) -> None:
    """List the directory: NPI, name, specialty, how each office is reached.

    Example: refloop specialists list --json
    """
    with opened_store(open_store, state_dir, routes_path, readonly=True) as db:
        rows = lib.list_specialists(db)
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    click.echo(f"{'NPI':<10}  {'LOCAL ID':<12} {'NAME':<28} {'SPECIALTY':<16} REACH")
    for r in rows:
        reach = []
        if r["direct_address"]:
            reach.append("direct" + ("" if r["has_certificate"] else " (no certificate)"))
        if r["fax"]:
            reach.append("fax")
        click.echo(
            f"{r['npi']:<10}  {r['local_id'][:12]:<12} {r['name'][:28]:<28} "
            f"{r['specialty'][:16]:<16} {', '.join(reach) or '-'}"
        )


@specialists.command("show")
@state_option
@routes_option
@click.argument("key")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of text.")
def specialists_show(state_dir: str, routes_path: str, key: str, as_json: bool) -> None:
    """Show one specialist by NPI, local id or Direct address, with the certificate's
    subject, expiry and fingerprint.

    Example: refloop specialists show 1234567893 --json
    """
    with opened_store(open_store, state_dir, routes_path, readonly=True) as db:
        found = lib.show_specialist(db, key)
        if found is None:
            raise StoreError(f"no specialist {key!r} in the directory")
    if as_json:
        click.echo(json.dumps(found, indent=1))
        return
    for name, value in found.items():
        if isinstance(value, dict):
            for k, v in value.items():
                click.echo(f"{name}.{k}: {v}")
        else:
            click.echo(f"{name}: {'' if value is None else value}")
