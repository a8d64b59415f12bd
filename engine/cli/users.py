"""The ``users`` command group: dashboard and API users (engine.web.auth).

Each command opens the database (migrating it if needed; safe while the daemon
runs), does one thing in one short transaction and closes it.
"""

from __future__ import annotations

import json
import sys

import click

from engine.cli.common import open_store, opened_store, routes_option, state_option
from engine.clock import WallClock, isoformat
from engine.web.auth import ROLES, Auth


def register(main: click.Group) -> None:
    """Add the ``users`` group (defined below) to ``main``."""
    main.add_command(users)


def _password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    value: str = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    return value


@click.group("users")
def users() -> None:
    """Dashboard and API users: coordinator, analyst, admin.

    Example: refloop users list
    """


@users.command("add")
@click.argument("name")
@click.option("--role", required=True, type=click.Choice(ROLES), help="What they may do.")
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin (no prompt).")
@click.option("--token", "with_token", is_flag=True, help="Also print a new API token.")
@state_option
@routes_option
def users_add(
    name: str,
    role: str,
    password_stdin: bool,
    with_token: bool,
    state_dir: str,
    routes_path: str,
) -> None:
    """Add a user (asks for the password twice, at least 10 characters).

    The first admin is made this way; then log in at http://127.0.0.1:8575/ui/.

    Example: refloop users add alice --role admin
    """
    # the store first: a routes.yaml that does not load is reported before anyone types a
    # password twice
    with opened_store(open_store, state_dir, routes_path, readonly=False) as db:
        password = _password(password_stdin)
        auth = Auth(db, WallClock())
        user = auth.add_user(name, role, password)
        token = auth.new_token(user.name, "cli") if with_token else ""
    click.echo(f"user {user.name} added ({user.role})")
    if token:
        click.echo(f"API token (shown once): {token}")


@users.command("list")
@state_option
@routes_option
@click.option("--json", "as_json", is_flag=True, help="One JSON array.")
def users_list(state_dir: str, routes_path: str, as_json: bool) -> None:
    """List users with their role and whether they are disabled.

    Example: refloop users list --json
    """
    with opened_store(open_store, state_dir, routes_path, readonly=False) as db:
        rows = Auth(db, WallClock()).users()
    if as_json:
        items = [{**u.as_dict(), "created_at": isoformat(u.created_at)} for u in rows]
        click.echo(json.dumps(items, indent=1))
        return
    click.echo(f"{'NAME':<24} {'ROLE':<12} {'STATE':<9} CREATED (UTC)")
    for u in rows:
        state = "disabled" if u.disabled else "active"
        click.echo(f"{u.name:<24} {u.role:<12} {state:<9} {isoformat(u.created_at)[:19]}")


@users.command("disable")
@click.argument("name")
@state_option
@routes_option
def users_disable(name: str, state_dir: str, routes_path: str) -> None:
    """Disable a user: their sessions end and their API tokens stop working.

    Example: refloop users disable bob
    """
    with opened_store(open_store, state_dir, routes_path, readonly=False) as db:
        Auth(db, WallClock()).set_disabled(name, True)
    click.echo(f"user {name} disabled")


@users.command("token")
@click.argument("name")
@click.option("--label", default="", help="What the token is for (kept with it).")
@state_option
@routes_option
def users_token(name: str, label: str, state_dir: str, routes_path: str) -> None:
    """Create an API bearer token for a user; it is printed once, only its hash is kept.

    Example: refloop users token alice --label reporting-job
    """
    with opened_store(open_store, state_dir, routes_path, readonly=False) as db:
        token = Auth(db, WallClock()).new_token(name, label)
    click.echo(token)
