"""Fixtures shared by the ingest tests; the helpers themselves live in helpers.py."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helpers
import pytest
from helpers import ROUTING, Daemon, Pki, drop_pg_store, make_pg_store, make_pki, store_for

from engine.config import StoreConfig
from engine.store.db import Database, open_database


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, a server certificate and client certificates, made once per run."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A not-yet-started ``refloop run`` on a tmp state dir; killed at teardown if
    still running."""
    d = Daemon(state_dir=tmp_path / "state", log_path=tmp_path / "daemon.log")
    try:
        yield d
    finally:
        d.kill()


# -- the store under test: SQLite (default) or PostgreSQL ---------------------------------
#
# REFLOOP_TEST_STORE=postgresql://postgres@127.0.0.1:5432/test runs the tests that take
# ``store_url`` (or ``store``) against PostgreSQL, each in a schema of its own (created
# here, dropped at teardown); unset, they get a SQLite file in tmp_path as before.
# ``make test`` runs the suite on SQLite, then ``-m store`` again on PostgreSQL.

TEST_STORE = os.environ.get("REFLOOP_TEST_STORE", "")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if {"store_url", "store", "module_store_url", "daemon"} & set(
            getattr(item, "fixturenames", ())
        ):
            item.add_marker(pytest.mark.store)
        sqlite_file = item.get_closest_marker("sqlite_file")
        if TEST_STORE and sqlite_file is not None:
            why = sqlite_file.args[0] if sqlite_file.args else "a SQLite file"
            item.add_marker(pytest.mark.skip(reason=f"SQLite file behaviour: {why}"))


# -- the rest of the suite on PostgreSQL: the store a test names by a file ---------------
#
# With REFLOOP_TEST_STORE, each test not marked ``sqlite_file`` runs with routing on
# (helpers.store_for): a SQLite file it names that does not exist yet is a PostgreSQL
# schema of its own, for the engine in this process (StoreConfig.location), the test's
# own open_database(path), the daemon and the CLI (helpers.Daemon, helpers.refloop) and
# helpers.query. A test that used it and is not marked ``store`` is listed at the end,
# so ``make test-pg`` (``-m store``) misses none.

_LOCATION = StoreConfig.location
_OPEN = open_database
_UNMARKED: list[str] = []


def _routed_location(self: StoreConfig, state_dir: Any, override: str = "") -> str:
    where = _LOCATION(self, state_dir, override)
    return where if override or self.url else store_for(where)


def _routed_open(path: Any, **kwargs: Any) -> Database:
    return _OPEN(store_for(path), **kwargs)


@pytest.fixture(autouse=True)
def _store_routing(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    if not TEST_STORE or request.node.get_closest_marker("sqlite_file") is not None:
        yield
        return
    monkeypatch.setattr(StoreConfig, "location", _routed_location)
    tests = str(Path(__file__).parent)
    for module in list(sys.modules.values()):
        where = getattr(module, "__file__", None) or ""
        if where.startswith(tests) and getattr(module, "open_database", None) is _OPEN:
            monkeypatch.setattr(module, "open_database", _routed_open)
    ROUTING.on = True
    ROUTING.empty = request.node.get_closest_marker("empty_store") is not None
    try:
        yield
    finally:
        if ROUTING.schemas and request.node.get_closest_marker("store") is None:
            _UNMARKED.append(request.node.nodeid)
        helpers.stop_routing()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _UNMARKED:
        terminalreporter.write_line(
            f"{len(_UNMARKED)} tests used the store without the store marker:"
        )
        for nodeid in _UNMARKED:
            terminalreporter.write_line(f"  {nodeid}")


@pytest.fixture
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Where this test's database lives: a SQLite file in tmp_path, or (with
    REFLOOP_TEST_STORE) a fresh PostgreSQL store (helpers.make_pg_store), migrated unless
    the test is marked ``empty_store``."""
    if not TEST_STORE:
        yield str(tmp_path / "refloop.db")
        return
    empty = request.node.get_closest_marker("empty_store") is not None
    url, name = make_pg_store(TEST_STORE, migrated=not empty)
    try:
        yield url
    finally:
        drop_pg_store(TEST_STORE, name)


@pytest.fixture(scope="module")
def module_store_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``store_url`` shared by a module's tests (a fixture built once, then read)."""
    if not TEST_STORE:
        yield str(tmp_path_factory.mktemp("store") / "refloop.db")
        return
    url, name = make_pg_store(TEST_STORE)
    try:
        yield url
    finally:
        drop_pg_store(TEST_STORE, name)


@pytest.fixture
def store(store_url: str) -> Iterator[Database]:
    """An opened, migrated store at ``store_url``; closed at teardown."""
    db = open_database(store_url)
    try:
        yield db
    finally:
        db.close()
