"""The layering rules of STYLE.md ("Layers"), checked on the source: data flows one way.

The checker is a set of functions over a root directory (``violations(root)``), so the
self-test at the bottom can plant each kind of violation in a temporary tree and see the
check fail, and see a clean tree pass. What counts as an import: ``import x``,
``from x import y`` (also read as ``x.y``, so ``from engine import store`` is an import
of ``engine.store``), relative imports resolved against the file's package, imports
inside functions, and ``importlib.import_module("x")`` / ``__import__("x")`` with a
literal name (a non-literal one is a violation: the checker cannot read it).

The allowed dependencies are one data table, :data:`RULES`: change it (not the checker)
when packages move.
"""

from __future__ import annotations

import ast
import fnmatch
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("engine", "channels")  # the trees the rules are about


@dataclass(frozen=True)
class Rule:
    """Modules matching ``who`` (fnmatch over dotted names), minus those matching
    ``unless``, import nothing equal to or under a name in ``forbid``, except what is
    equal to or under a name in ``allow``."""

    why: str
    who: tuple[str, ...]
    forbid: tuple[str, ...]
    allow: tuple[str, ...] = ()
    unless: tuple[str, ...] = ()


LOW = (
    "engine.model",
    "engine.errors",
    "engine.config",
    "engine.clock",
    "engine.hl7v2.mllp",
    "engine.hl7v2.message",
    "engine.timers.wheel",
    "engine.tracking.states",
    "engine.tracking.escalation",
)
TOP = ("engine.app", "engine.cli", "engine.cli.*", "engine.sim", "engine.sim.*")

RULES: tuple[Rule, ...] = (
    Rule(
        "channels import only the engine's model and errors (and each other, their SDKs)",
        who=("channels.*",),
        forbid=("engine",),
        allow=("engine.model", "engine.errors"),
    ),
    Rule(
        "only engine/store/ talks to SQLite",
        who=("engine.*", "channels.*"),
        forbid=("sqlite3", "sqlite_utils"),
        unless=("engine.store.*",),
    ),
    Rule(
        "low layers do not reach up",
        who=LOW,
        forbid=(
            *TOP,
            "engine.store",
            "engine.ingest.processor",
            "engine.tracking.tracker",
            "engine.routing.handler",
        ),
    ),
    Rule(
        "only the composition root and the CLI import the composition root and the CLI",
        who=("engine.*",),
        forbid=TOP,
        unless=TOP,
    ),
    Rule(
        "the store stores; it does not import what decides or serves",
        who=("engine.store.*",),
        forbid=(
            *TOP,
            "engine.ingest.processor",
            "engine.tracking.tracker",
            "engine.routing.handler",
            "engine.delivery.dispatch",
            "engine.ingest.listener",
            "engine.web.server",
            "engine.web.api",
            "engine.web.dashboard",
        ),
    ),
    Rule(
        "MLLP is engine/hl7v2/mllp.py and engine/ingest/listener.py, not python-hl7's",
        who=("engine.*", "channels.*"),
        forbid=("hl7.mllp",),
    ),
)
# Calls that run SQL: sqlite3's cursor methods (also taken as a value: ``run =
# conn.execute``, ``getattr(conn, "execute")``) and sqlite_utils' query methods.
SQL_METHODS = frozenset({"execute", "executemany", "executescript"})
SQLITE_UTILS_CALLS = frozenset(
    {"query", "execute_returning_dicts", "rows_where", "pks_and_rows_where", "count_where",
     "delete_where", "insert_all", "upsert_all", "create_table", "create_view", "enable_fts"}
)  # fmt: skip
# sqlite_utils table writes on ``db["table"]`` (a subscript with a literal table name)
SQLITE_UTILS_TABLE_CALLS = frozenset({"insert", "upsert", "update", "delete", "lookup", "get"})
HL7_USERS_MAX = 1  # at most one module reads messages with python-hl7
DYNAMIC = "<dynamic import>"


# -- the checker ---------------------------------------------------------------


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name → file, for every ``.py`` under the :data:`PACKAGES` of ``root``."""
    out: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imports(name: str, path: Path) -> set[str]:
    """Every module ``name`` (at ``path``) imports, as dotted names (see the module doc)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node.module, node.level, package)
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Call) and _is_dynamic_import(node.func):
            arg = node.args[0] if node.args else None
            literal = isinstance(arg, ast.Constant) and isinstance(arg.value, str)
            out.add(arg.value if literal else DYNAMIC)  # type: ignore[union-attr]
    return out


def _absolute(module: str | None, level: int, package: str) -> str:
    if level == 0:
        return module or ""
    parts = package.split(".")
    base = parts[: len(parts) - (level - 1)]
    return ".".join([*base, module] if module else base)


def _is_dynamic_import(func: ast.expr) -> bool:
    if isinstance(func, ast.Name):
        return func.id in ("__import__", "import_module")
    return isinstance(func, ast.Attribute) and func.attr == "import_module"


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or name.startswith(f"{p}.") for p in prefixes)


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def rule_violations(root: Path) -> Iterator[str]:
    """One line per import that a rule of :data:`RULES` forbids (and per dynamic import
    the checker cannot read)."""
    for name, path in modules(root).items():
        found = imports(name, path)
        if DYNAMIC in found:
            yield f"{name}: a dynamic import with a computed name (use a literal)"
        for rule in RULES:
            if not _matches(name, rule.who) or _matches(name, rule.unless):
                continue
            for target in sorted(found):
                if _under(target, rule.forbid) and not _under(target, rule.allow):
                    yield f"{name} imports {target}: {rule.why}"


def sql_violations(root: Path) -> Iterator[str]:
    """SQL run (or a SQL method taken) outside ``engine/store/``."""
    for name, path in modules(root).items():
        if _matches(name, ("engine.store", "engine.store.*")):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            what = _sql_use(node)
            if what:
                yield f"{name}:{getattr(node, 'lineno', 0)}: {what}: move it into engine/store/"


def _sql_use(node: ast.AST) -> str | None:
    if isinstance(node, ast.Attribute) and node.attr in SQL_METHODS:
        return f".{node.attr}"
    if not isinstance(node, ast.Call):
        return None
    func = node.func
    if (
        isinstance(func, ast.Name)
        and func.id == "getattr"
        and len(node.args) >= 2
        and isinstance(node.args[1], ast.Constant)
        and node.args[1].value in SQL_METHODS | SQLITE_UTILS_CALLS
    ):
        return f"getattr(..., {node.args[1].value!r})"
    if isinstance(func, ast.Attribute) and func.attr in SQLITE_UTILS_CALLS:
        return f".{func.attr}() (sqlite_utils)"
    if (
        isinstance(func, ast.Attribute)
        and func.attr in SQLITE_UTILS_TABLE_CALLS
        and isinstance(func.value, ast.Subscript)
        and isinstance(func.value.slice, ast.Constant)
        and isinstance(func.value.slice.value, str)
        and isinstance(func.value.value, ast.Name | ast.Attribute)
        and _names_a_database(func.value.value)
    ):
        return f"[{func.value.slice.value!r}].{func.attr}() (sqlite_utils)"
    return None


def _names_a_database(node: ast.expr) -> bool:
    """``db``, ``self.db``, ``database``: the receiver of a ``db["table"]`` write."""
    name = node.id if isinstance(node, ast.Name) else node.attr  # type: ignore[attr-defined]
    return name.lower() in ("db", "database", "sdb", "sqlite_db")


def hl7_violations(root: Path) -> Iterator[str]:
    users = [
        name
        for name, path in modules(root).items()
        if any(m == "hl7" or m.startswith("hl7.") for m in imports(name, path))
    ]
    if len(users) > HL7_USERS_MAX:
        yield f"python-hl7 is imported by {users} (at most {HL7_USERS_MAX} module)"


def violations(root: Path) -> list[str]:
    """Every layering violation under ``root`` (empty: the tree keeps the rules)."""
    return [*rule_violations(root), *sql_violations(root), *hl7_violations(root)]


# -- the repository ------------------------------------------------------------


def test_the_repository_keeps_the_layering_rules() -> None:
    assert violations(ROOT) == []


def test_the_checker_sees_the_repository() -> None:
    """A checker that reads nothing passes everything: make sure it reads the real tree."""
    found = modules(ROOT)
    assert {"engine.app", "engine.store.db", "channels.sms.twilio", "engine.metrics"} <= set(found)
    assert "engine.routing.handler" in imports("engine.app", found["engine.app"])  # importlib
    assert "engine.app" in imports("engine.cli.main", found["engine.cli.main"])  # a local import


# -- the self-test: each planted violation fails the check -----------------------

CLEAN = {
    "engine/__init__.py": "",
    "engine/model.py": "from __future__ import annotations\nX = 1\n",
    "engine/errors.py": "class EngineError(Exception):\n    pass\n",
    "engine/store/__init__.py": "from engine.store.db import open_database\n",
    "engine/store/db.py": (
        "import sqlite3\nimport sqlite_utils\n\n"
        "def open_database(p):\n    c = sqlite3.connect(p)\n    c.execute('select 1')\n"
        "    sqlite_utils.Database(c).query('select 1')\n    return c\n"
    ),
    "engine/ingest/__init__.py": "",
    "engine/ingest/processor.py": (
        "from engine.store import open_database\nfrom engine import model\n"
    ),
    "engine/app.py": (
        "import importlib\nfrom engine.ingest import processor\n\n"
        "def load():\n    return importlib.import_module('engine.ingest.processor')\n"
    ),
    "engine/cli/__init__.py": "",
    "engine/cli/main.py": "def main():\n    from engine.app import load\n    return load()\n",
    "engine/hl7v2/__init__.py": "",
    "engine/hl7v2/message.py": "import hl7\n",
    "channels/__init__.py": "",
    "channels/base.py": "from engine.errors import EngineError\nfrom engine.model import X\n",
    "channels/sms/__init__.py": "",
    "channels/sms/twilio.py": "from channels.base import EngineError\n",
}

PLANTED = {
    "sqlite_utils-query": ("engine/ingest/processor.py", "def f(db):\n    db.query('select 1')\n"),
    "sqlite_utils-table": (
        "engine/ingest/processor.py",
        "def f(db):\n    db['t'].insert({'a': 1})\n",
    ),
    "sqlite_utils-import": ("engine/ingest/processor.py", "import sqlite_utils\n"),
    "aliased-execute": (
        "engine/ingest/processor.py",
        "def f(conn):\n    run = conn.execute\n    run('delete from t')\n",
    ),
    "getattr-execute": (
        "engine/ingest/processor.py",
        "def f(conn):\n    getattr(conn, 'execute')('delete from t')\n",
    ),
    "from-engine-import-store": ("engine/model.py", "from engine import store\n"),
    "relative-import-store": ("engine/model.py", "from . import store\n"),
    "channel-from-engine-import": (
        "channels/sms/twilio.py",
        "from engine.ingest import processor\n",
    ),
    "channel-local-import": (
        "channels/sms/twilio.py",
        "def f():\n    from engine.store import db\n    return db\n",
    ),
    "importlib-literal": (
        "channels/sms/twilio.py",
        "import importlib\nstore = importlib.import_module('engine.store')\n",
    ),
    "importlib-computed": (
        "engine/ingest/processor.py",
        "import importlib\nname = 'sqlite' + '3'\nm = importlib.import_module(name)\n",
    ),
    "dunder-import": ("engine/ingest/processor.py", "m = __import__('sqlite3')\n"),
    "hl7-mllp": ("engine/ingest/processor.py", "from hl7.mllp import open_hl7_connection\n"),
    "second-hl7-user": ("channels/sms/twilio.py", "import hl7.client\n"),
    "middle-imports-app": (
        "engine/ingest/processor.py",
        "def f():\n    from engine.app import load\n",
    ),
    "middle-imports-app-from": ("engine/ingest/processor.py", "from engine import app\n"),
    "store-imports-pipeline": ("engine/store/db.py", "from engine.ingest import processor\n"),
}


def _tree(root: Path, plant: tuple[str, str] | None = None) -> Path:
    for rel, text in CLEAN.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    if plant is not None:
        rel, extra = plant
        path = root / rel
        path.write_text(path.read_text(encoding="utf-8") + "\n" + extra, encoding="utf-8")
    return root


def test_a_clean_tree_passes(tmp_path: Path) -> None:
    assert violations(_tree(tmp_path)) == []


@pytest.mark.parametrize("kind", sorted(PLANTED))
def test_each_planted_violation_fails_the_check(tmp_path: Path, kind: str) -> None:
    found = violations(_tree(tmp_path, PLANTED[kind]))
    assert found, f"the checker passed a planted {kind}"
