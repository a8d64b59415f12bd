"""What every ``refloop`` command shares: the ``--routes``/``--state`` options, the error
mapper, the one way to find and open the database, and one-line usage errors.

Every command module imports this one and ``engine.cli.main`` imports the command
modules: imports only run downward (tests/test_layers.py checks there is no cycle).

The database is ``<state>/<store.file>``, and only routes.yaml names ``store.file``. A
routes.yaml that does not load is therefore an error (one line, exit 1), never a guess:
falling back to a default name would open, or create, a different and empty database.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Final, TypeVar
from urllib.parse import urlsplit

import click

from engine.errors import ConfigError, EngineError, StoreError

if TYPE_CHECKING:  # imported where used: `refloop --help` and `--version` load neither
    from engine.config import Config
    from engine.store.db import Database

DEFAULT_ROUTES = "routes.yaml"
DEFAULT_STATE = "state"
F = TypeVar("F", bound=Callable[..., Any])


@contextmanager
def errors() -> Iterator[None]:
    """Map engine errors to click's clean exits."""
    try:
        yield
    except ConfigError as exc:
        for line in exc.problems:
            click.echo(line, err=True)
        raise SystemExit(2) from None
    except EngineError as exc:
        raise click.ClickException(str(exc)) from None


routes_option = click.option(
    "--routes",
    "routes_path",
    envvar="REFLOOP_ROUTES",
    default=DEFAULT_ROUTES,
    show_default=True,
    type=click.Path(dir_okay=False),
    help="routes.yaml to use (env REFLOOP_ROUTES).",
)
_state = click.option(
    "--state",
    "state_dir",
    envvar="REFLOOP_STATE",
    default=DEFAULT_STATE,
    show_default=True,
    type=click.Path(file_okay=False),
    help="State directory holding the SQLite database (env REFLOOP_STATE).",
)
STORE_META: Final = "refloop.store"  # where --store leaves its URL in the click context


def _take_store(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """``--store``: refused with a password in it (argv is readable by every user), else
    kept in the context for :func:`database_path`."""
    if not value:
        return
    if urlsplit(value).password is not None:
        raise click.BadParameter(
            "no password on the command line (every user can read it): "
            "put it in ~/.pgpass (PGPASSFILE) or a libpq service file"
        )
    ctx.meta[STORE_META] = value


_store = click.option(
    "--store",
    default="",
    expose_value=False,
    callback=_take_store,
    help="The database: postgresql://user@host/db (password from ~/.pgpass or a service "
    "file, never here), sqlite:///path or a path. Overrides routes.yaml's store.url "
    "and --state.",
)


def state_option(command: F) -> F:
    """``--state DIR`` and ``--store URL``: every command that opens the database takes
    both, so one command line reaches a PostgreSQL store as ``refloop run --store`` does."""
    return _state(_store(command))


def store_override() -> str:
    """The ``--store`` given to the command running now ("" when none)."""
    ctx = click.get_current_context(silent=True)
    return str(ctx.meta.get(STORE_META, "")) if ctx is not None else ""


def login_name() -> str:
    """The operator's login name, for audit rows (the uid when it has no name)."""
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def load_routes(routes_path: str) -> Config:
    """routes.yaml, loaded and validated; a file that does not load raises
    ``click.ClickException`` with its first problem (``routes.yaml:LINE key: message``)
    on one line, and how many more there are (``refloop routes check`` lists them)."""
    from engine.config import load as load_config

    try:
        return load_config(routes_path)
    except ConfigError as exc:
        first, *rest = exc.problems or [f"{routes_path}: invalid"]
        more = f" (and {len(rest)} more: refloop routes check {routes_path})" if rest else ""
        raise click.ClickException(first.replace("\n", " ") + more) from None


def database_path(state_dir: str, config: Config) -> str:
    """Where the daemon run with this config keeps its database: routes.yaml's
    ``store.url`` (a ``postgresql://`` URL or a file), else ``<state>/<store.file>``;
    the command's ``--store`` overrides both."""
    return config.store.location(state_dir, store_override())


def open_store(state_dir: str, routes_path: str, *, readonly: bool = True) -> Database:
    """Open the database the daemon started with ``--state``/``--routes`` uses.

    ``readonly`` opens never create or migrate a file (``StoreError`` "no database at
    PATH" when it is missing); writable opens create and migrate it, as the daemon does.
    Raises ``click.ClickException`` (one line, exit 1) when routes.yaml does not load.
    """
    from engine.store.db import open_database

    return open_database(database_path(state_dir, load_routes(routes_path)), readonly=readonly)


class UsageFailure(click.ClickException):
    """A usage error as docs/cli.md promises it: one line on stderr, exit status 1."""

    exit_code = 1


@contextmanager
def _one_line_usage(ctx: click.Context | None) -> Iterator[None]:
    try:
        yield
    except click.exceptions.NoArgsIsHelpError:
        raise  # a bare group prints its help: nothing went wrong
    except click.UsageError as exc:
        at = exc.ctx or ctx
        where = at.command_path if at is not None else "refloop"
        message = " ".join(exc.format_message().split())
        raise UsageFailure(f"{where}: {message} (see {where} --help)") from None


class Group(click.Group):
    """The ``refloop`` group: click's usage errors (unknown option or command, missing
    argument, bad value), raised while parsing any subcommand or from a command's body,
    become :class:`UsageFailure` (click prints them as three lines and exits 2)."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        with _one_line_usage(parent):
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        with _one_line_usage(ctx):
            return super().invoke(ctx)


def open_referral_store(state_dir: str, routes_path: str, *, readonly: bool) -> Database:
    """The store (:func:`open_store`), which must hold the referral tables."""
    from engine.store.referrals import referral_tables_exist

    db = open_store(state_dir, routes_path, readonly=readonly)
    if not referral_tables_exist(db.conn):
        db.close()
        raise StoreError("this database has no referral tables yet (start refloop run once)")
    return db


@dataclass(frozen=True)
class LazyGroup:
    """A command group (or command) of ``refloop`` whose module is imported only when it
    is used: ``load`` imports the module (a literal name, so the layering test sees the
    import) and its ``register(main)`` adds it (and its siblings from the same module) to
    the main group; ``summary`` is its help's first paragraph, for ``refloop --help``
    (tests/test_cli_start.py checks it against the loaded group)."""

    name: str
    summary: str
    load: Callable[[], ModuleType]


class MainGroup(Group):
    """The ``refloop`` group: the commands it holds, plus :class:`LazyGroup` entries
    loaded on first use (``lazy``, set once the group exists)."""

    lazy: Mapping[str, LazyGroup] = {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in self.lazy:
            self.lazy[cmd_name].load().register(self)
        return self.commands.get(cmd_name)

    def all_commands(self, ctx: click.Context) -> dict[str, click.Command]:
        """Every command, lazy groups loaded (what the docs tests walk)."""
        return {
            name: cmd for name in self.list_commands(ctx) if (cmd := self.get_command(ctx, name))
        }

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """click's listing, with a group not yet loaded shown by its ``summary`` (so
        ``refloop --help`` imports none of them)."""
        names = self.list_commands(ctx)
        if not names:
            return
        limit = formatter.width - 6 - max(len(n) for n in names)
        rows: list[tuple[str, str]] = []
        for name in names:
            cmd = self.commands.get(name)
            if cmd is None:
                stand_in = click.Command(name, help=self.lazy[name].summary)  # click's cut
                rows.append((name, stand_in.get_short_help_str(limit)))
            elif not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@contextmanager
def opened_store(
    opener: Callable[..., Database], state_dir: str, routes_path: str, *, readonly: bool
) -> Iterator[Database]:
    """``opener(state_dir, routes_path, readonly=readonly)`` (:func:`open_store` or a
    checking wrapper of it) inside :func:`errors`, closed when the block ends: engine
    errors raised while opening or inside the block become clean exits."""
    with errors():
        db = opener(state_dir, routes_path, readonly=readonly)
        try:
            yield db
        finally:
            db.close()
