"""The layering rules of STYLE.md ("Layers"), checked on the source: data flows one way.

The checker is a set of functions over a root directory (``violations(root)``), so the
self-test at the bottom can plant each kind of violation in a temporary tree and see the
check fail, and see a clean tree pass. What counts as an import: ``import x``,
``from x import y`` (also read as ``x.y``, so ``from engine import store`` is an import
of ``engine.store``), relative imports resolved against the file's package, imports
inside functions, and ``importlib.import_module("x")`` / ``__import__("x")`` with a
literal name (a non-literal one is a violation: the checker cannot read it).

The allowed dependencies are data: :data:`STAGES` orders the packages of the data flow
(a module imports only its own stage or lower ones), :data:`RULES` adds the rules that
are not about order (channels, SQLite, MLLP). Change the tables, not the checker, when
packages move. On top of the tables: no import cycle among the modules of ``engine/``
and ``channels/`` (function-local imports included), only ``engine/store/`` runs SQL, and
python-hl7 is imported by one named module only (:data:`HL7_MODULE`), if by any.
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


# The stages of the data flow (docs/architecture.md), lowest first. A module imports only
# modules of its own stage or of a lower one; a module of ``engine/`` outside every stage
# is itself a violation (place it here when it is added). The timer *service* fires
# timers through delivery (Direct fallback, packet resend), so it sits with delivery;
# the wheel is a pure core beside routing and tracking.
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "shared",
        ("engine", "engine.model", "engine.errors", "engine.clock", "engine.config",
         "engine.canonical", "engine.metrics"),
    ),
    ("hl7v2", ("engine.hl7v2", "engine.hl7v2.*")),
    ("store", ("engine.store", "engine.store.*")),
    (
        "routing, tracking, timers",
        ("engine.routing", "engine.routing.*", "engine.tracking", "engine.tracking.*",
         "engine.timers", "engine.timers.wheel"),
    ),
    (
        "ingest, delivery",
        ("engine.ingest", "engine.ingest.*", "engine.delivery", "engine.delivery.*",
         "engine.timers.service"),
    ),
    ("web", ("engine.web", "engine.web.*")),
    ("app", ("engine.app", "engine.cluster", "engine.supervisor", "engine.worker")),
    ("cli, sim", ("engine.cli", "engine.cli.*", "engine.sim", "engine.sim.*")),
)  # fmt: skip

RULES: tuple[Rule, ...] = (
    Rule(
        "channels import only the engine's model and errors (and each other, their SDKs)",
        who=("channels", "channels.*"),
        forbid=("engine",),
        allow=("engine.model", "engine.errors"),
    ),
    Rule(
        "only engine/store/ talks to SQLite or PostgreSQL",
        who=("engine", "engine.*", "channels", "channels.*"),
        forbid=("sqlite3", "sqlite_utils", "psycopg", "psycopg_pool"),
        unless=("engine.store", "engine.store.*"),
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
# The one module that may read messages with python-hl7 (off the hot path: a full parse
# costs ~2 ms, reference/performance-limits.md): the message view's tree builder, which
# only the dashboard and the API call, on demand. The hot path's reader
# (engine.hl7v2.message) splits by hand. Naming the module (not counting importers)
# keeps a second importer elsewhere from passing.
HL7_MODULE = "engine.hl7v2.tree"
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


def _stage(name: str) -> int | None:
    """The index in :data:`STAGES` of the stage ``name`` belongs to (None: no stage)."""
    for index, (_, patterns) in enumerate(STAGES):
        if _matches(name, patterns):
            return index
    return None


def _resolve(target: str, known: dict[str, Path]) -> str | None:
    """The module of the tree an import target names: ``engine.store.db.Database`` is
    ``engine.store.db``; ``click`` is None (not ours)."""
    while target and target not in known:
        target = target.rpartition(".")[0]
    return target or None


def graph(root: Path) -> dict[str, set[str]]:
    """Module → the modules of the tree it imports (also inside functions). An import of
    the module's own package (``from engine.store import audit`` in ``engine.store.x``) is
    no edge to that package: Python has begun initialising it before the module runs."""
    known = modules(root)
    out: dict[str, set[str]] = {}
    for name, path in known.items():
        edges = {_resolve(target, known) for target in imports(name, path)}
        out[name] = {
            e for e in edges if e is not None and e != name and not name.startswith(f"{e}.")
        }
    return out


def stage_violations(root: Path) -> Iterator[str]:
    """An engine module importing a higher stage of :data:`STAGES`, or in no stage."""
    for name, targets in graph(root).items():
        if not _matches(name, ("engine", "engine.*")):
            continue
        own = _stage(name)
        if own is None:
            yield f"{name}: in no stage of STAGES (add it where it belongs)"
            continue
        for target in sorted(targets):
            theirs = _stage(target)
            if theirs is not None and theirs > own:
                yield (
                    f"{name} ({STAGES[own][0]}) imports {target} ({STAGES[theirs][0]}): "
                    "a lower stage never imports a higher one"
                )


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(found)


def cycle_violations(root: Path) -> Iterator[str]:
    """Every import cycle among the tree's modules, function-local imports included."""
    edges = graph(root)
    for component in cycles(edges):
        links = [f"{a} -> {b}" for a in component for b in sorted(edges[a]) if b in component]
        yield f"import cycle among {component}: {'; '.join(links)}"


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
    for name in users:
        if name != HL7_MODULE:
            yield f"{name} imports python-hl7 (only {HL7_MODULE} may)"


def violations(root: Path) -> list[str]:
    """Every layering violation under ``root`` (empty: the tree keeps the rules)."""
    return [
        *rule_violations(root),
        *stage_violations(root),
        *cycle_violations(root),
        *sql_violations(root),
        *hl7_violations(root),
    ]


# -- the repository ------------------------------------------------------------


def test_the_repository_keeps_the_layering_rules() -> None:
    assert violations(ROOT) == []


def test_the_checker_sees_the_repository() -> None:
    """A checker that reads nothing passes everything: make sure it reads the real tree."""
    found = modules(ROOT)
    assert {"engine.app", "engine.store.db", "channels.sms.twilio", "engine.metrics"} <= set(found)
    assert "engine.routing.compile" in imports("engine.app", found["engine.app"])  # a local import
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
    "engine/store/inbox.py": "from engine.store.db import open_database\n",
    "engine/tracking/__init__.py": "",
    "engine/tracking/states.py": "from engine.model import X\n",
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
    "engine/hl7v2/message.py": "X = 1\n",
    "engine/hl7v2/tree.py": "import hl7\n",
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
    "hl7v2-imports-store": ("engine/hl7v2/message.py", "from engine.store import db\n"),
    "store-imports-tracking": ("engine/store/inbox.py", "from engine.tracking import states\n"),
    "a-module-in-no-stage": ("engine/helpers.py", "X = 1\n"),
    "cycle-at-import": ("engine/store/db.py", "from engine.store.inbox import open_database\n"),
    "cycle-function-local": (
        "engine/store/db.py",
        "def f():\n    from engine.store import inbox\n    return inbox\n",
    ),
    "cycle-through-three": (
        "engine/ingest/processor.py",
        "def f():\n    import engine.app\n",
    ),
}
# what the check must say for the plants only one of its parts catches
EXPECTED = {
    "hl7v2-imports-store": "a lower stage never imports a higher one",
    "store-imports-tracking": "a lower stage never imports a higher one",
    "a-module-in-no-stage": "in no stage",
    "cycle-at-import": "import cycle among ['engine.store.db', 'engine.store.inbox']",
    "cycle-function-local": "import cycle among ['engine.store.db', 'engine.store.inbox']",
    "cycle-through-three": "import cycle among ['engine.app', 'engine.ingest.processor']",
}


def _tree(root: Path, plant: tuple[str, str] | None = None) -> Path:
    for rel, text in CLEAN.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    if plant is not None:
        rel, extra = plant
        path = root / rel
        before = path.read_text(encoding="utf-8") if path.exists() else ""
        path.write_text(before + "\n" + extra, encoding="utf-8")
    return root


def test_a_clean_tree_passes(tmp_path: Path) -> None:
    assert violations(_tree(tmp_path)) == []


def test_the_first_python_hl7_user_must_be_the_named_module(tmp_path: Path) -> None:
    """An importer of python-hl7 anywhere but HL7_MODULE fails (a count of importers
    would let a second one pass)."""
    root = _tree(tmp_path)
    assert violations(root) == []
    (root / "engine/ingest/processor.py").write_text(
        "def f(raw):\n    import hl7\n    return hl7.parse(raw)\n", encoding="utf-8"
    )
    assert any("engine.ingest.processor imports python-hl7" in v for v in violations(root))


@pytest.mark.parametrize("kind", sorted(PLANTED))
def test_each_planted_violation_fails_the_check(tmp_path: Path, kind: str) -> None:
    found = violations(_tree(tmp_path, PLANTED[kind]))
    assert found, f"the checker passed a planted {kind}"
    if kind in EXPECTED:
        assert any(EXPECTED[kind] in line for line in found), found


def test_the_cycle_finder_on_a_hand_drawn_graph() -> None:
    """a → b → c → a is one cycle; d → a hangs off it; e → e is no cycle of modules."""
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(edges) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
