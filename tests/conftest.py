"""Fixtures shared by the ingest tests; the helpers themselves live in helpers.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import Daemon, Pki, make_pki


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
