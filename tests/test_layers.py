"""The layering rules of STYLE.md, checked on the source: data flows one way."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


CHANNELS = sorted((ROOT / "channels").glob("*.py"))
ENGINE = sorted((ROOT / "engine").rglob("*.py"))


@pytest.mark.parametrize("path", CHANNELS, ids=lambda p: p.name)
def test_channels_import_only_the_model_and_errors_of_the_engine(path: Path) -> None:
    engine = {m for m in _imports(path) if m == "engine" or m.startswith("engine.")}
    assert engine <= {"engine.model", "engine.errors"}, f"{path.name} imports {engine}"


@pytest.mark.parametrize("path", ENGINE, ids=lambda p: str(p.relative_to(ROOT)))
def test_only_the_store_talks_to_sqlite(path: Path) -> None:
    if path.parent.name == "store":
        return
    assert "sqlite3" not in _imports(path), f"{path.name} imports sqlite3"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    calls = [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in ("execute", "executemany", "executescript")
    ]
    assert not calls, f"{path.name} runs SQL at lines {calls}: move it into engine/store/"


def test_only_one_module_uses_python_hl7() -> None:
    users = [p.name for p in ENGINE + CHANNELS if "hl7" in _imports(p)]
    assert len(users) <= 1, users


LOW = (
    "engine.model",
    "engine.errors",
    "engine.config",
    "engine.clock",
    "engine.mllp",
    "engine.hl7msg",
    "engine.wheel",
    "engine.states",
    "engine.escalation",
)
HIGH = ("engine.app", "engine.cli", "engine.simulate")


@pytest.mark.parametrize("module", LOW)
def test_low_layers_do_not_reach_up(module: str) -> None:
    path = ROOT / (module.replace(".", "/") + ".py")
    reached = {
        m
        for m in _imports(path)
        if m.startswith(HIGH)
        or m.startswith("engine.store")
        or m.startswith("engine.pipeline")
        or m.startswith("engine.tracker")
    }
    assert not reached, f"{module} imports {reached}"
