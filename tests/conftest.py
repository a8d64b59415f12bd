"""Fixtures shared by the ingest tests; the helpers themselves live in helpers.py."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import Daemon, Pki, drop_pg_schema, make_pg_schema, make_pki

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
        if {"store_url", "store", "module_store_url"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.store)


@pytest.fixture
def store_url(tmp_path: Path) -> Iterator[str]:
    """Where this test's database lives: a SQLite file in tmp_path, or (with
    REFLOOP_TEST_STORE) a fresh PostgreSQL schema, named by ``search_path`` in the URL."""
    if not TEST_STORE:
        yield str(tmp_path / "refloop.db")
        return
    url, schema = make_pg_schema(TEST_STORE)
    try:
        yield url
    finally:
        drop_pg_schema(TEST_STORE, schema)


@pytest.fixture(scope="module")
def module_store_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``store_url`` shared by a module's tests (a fixture built once, then read)."""
    if not TEST_STORE:
        yield str(tmp_path_factory.mktemp("store") / "refloop.db")
        return
    url, schema = make_pg_schema(TEST_STORE)
    try:
        yield url
    finally:
        drop_pg_schema(TEST_STORE, schema)


@pytest.fixture
def store(store_url: str) -> Iterator[Database]:
    """An opened, migrated store at ``store_url``; closed at teardown."""
    db = open_database(store_url)
    try:
        yield db
    finally:
        db.close()
