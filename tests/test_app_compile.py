"""routes.yaml is compiled once per start and once per reload (issue 16): the tracker,
the timers, the outbox, inbound Direct and the processor's handler share one table."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from test_reload import routes_text

from engine import config
from engine.app import Engine
from engine.routing import compile as routes_module
from engine.routing.table import RouteTable


def test_one_compile_per_start_and_per_reload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compiled: list[str] = []
    real = routes_module.compile_config

    def counting(cfg: config.Config) -> RouteTable:
        compiled.append(cfg.file)
        return real(cfg)  # the real compiler: only the calls are counted

    monkeypatch.setattr(routes_module, "compile_config", counting)
    path = tmp_path / "routes.yaml"
    path.write_text(routes_text("first"))

    async def go() -> None:
        engine = Engine(config.load(path), tmp_path / "state", registry=CollectorRegistry())
        await engine.start()
        try:
            assert engine.tracker is not None and engine.timers is not None  # all built
            assert engine.dispatcher is not None
            assert len(compiled) == 1
            path.write_text(routes_text("second"))
            assert engine.reload() == []
            assert len(compiled) == 2
        finally:
            await engine.stop()

    asyncio.run(go())


def test_a_table_given_to_the_engine_is_not_compiled_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``refloop run`` compiles to report problems before starting; the engine uses it."""
    path = tmp_path / "routes.yaml"
    path.write_text(routes_text("first"))
    cfg = config.load(path)
    table = routes_module.compile_config(cfg)
    compiled: list[str] = []
    real = routes_module.compile_config
    monkeypatch.setattr(routes_module, "compile_config", lambda c: compiled.append(c) or real(c))

    async def go() -> None:
        engine = Engine(cfg, tmp_path / "state", registry=CollectorRegistry(), table=table)
        await engine.start()
        await engine.stop()

    asyncio.run(go())
    assert compiled == []
