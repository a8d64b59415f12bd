"""Jinja2 for routes.yaml: expressions in ``extract`` and ``send.to``, and (later) the
SMS / packet templates of the channels.

One sandboxed environment with :class:`~jinja2.StrictUndefined`, so a misspelt name is an
error, never an empty string. Everything is checked when the file is compiled: syntax,
filter and test names, undefined variables, table names and the terse paths passed to the
path functions (``field('PID.3.1')``), which must be quoted literals so they can be parsed
once.

Speed: rendering a Jinja template costs 5-15 µs even for ``{{ x }}`` (a new context per
call), too much for a per-message budget of 50 µs with a dozen transforms. So
:class:`Compiler` turns the common subset of expressions (names, constants, path
functions, filters, ``or``/``and``/``not``, ``a if b else c``, comparisons, ``~``, table
look-ups) into plain Python closures, and falls back to the sandboxed Jinja render for
anything else. Both paths share the same validation and the same filters.

Errors raised while evaluating are :class:`RenderError` with a reason that never quotes a
value from the message (PHI); the caller adds the route and the extract name.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Final

from jinja2 import StrictUndefined, TemplateSyntaxError, meta, nodes, pass_context
from jinja2.exceptions import TemplateError
from jinja2.runtime import Context
from jinja2.sandbox import SandboxedEnvironment

from engine.errors import EngineError


class RenderError(EngineError):
    """An expression failed on one message. The reason names the filter or the kind of
    failure, never a value."""


# ---------------------------------------------------------------------------
# Filters (pure text transforms; also usable from channel templates)

# HL7 v2.5.1 §2.A.22 DTM: YYYY[MM[DD[HH[MM[SS[.S[S[S[S]]]]]]]]][+/-ZZZZ]
_DTM: Final = re.compile(
    r"^(?P<y>\d{4})(?P<mo>\d{2})?(?P<d>\d{2})?(?P<h>\d{2})?(?P<mi>\d{2})?(?P<s>\d{2})?"
    r"(?:\.(?P<frac>\d{1,4}))?(?P<tz>[+-]\d{4})?$"
)


def _parse_dtm(value: Any, name: str) -> tuple[re.Match[str], timezone | None] | None:
    text = "" if value is None else str(value).strip()
    if not text:
        return None
    m = _DTM.match(text)
    if not m:
        raise RenderError(f"{name}: not an HL7 date/time")
    tz = None
    if m["tz"]:
        sign = 1 if m["tz"][0] == "+" else -1
        hours, minutes = int(m["tz"][1:3]), int(m["tz"][3:5])
        if hours > 14 or minutes > 59:
            raise RenderError(f"{name}: bad time zone offset")
        tz = timezone(sign * timedelta(hours=hours, minutes=minutes))
    return m, tz


def _datetime(m: re.Match[str], tz: timezone | None, name: str) -> datetime:
    try:
        return datetime(
            int(m["y"]),
            int(m["mo"] or 1),
            int(m["d"] or 1),
            int(m["h"] or 0),
            int(m["mi"] or 0),
            int(m["s"] or 0),
            int((m["frac"] or "0").ljust(6, "0")[:6]),
            tzinfo=tz,
        )
    except ValueError:
        raise RenderError(f"{name}: not a valid date/time") from None


def hl7_date(value: Any) -> str:
    """HL7 DT/DTM → ISO date (``20250303101500`` → ``2025-03-03``); ``""`` stays ``""``.
    A value with only a year or year and month gives ``2025`` / ``2025-03``."""
    parsed = _parse_dtm(value, "hl7_date")
    if parsed is None:
        return ""
    m, tz = parsed
    dt = _datetime(m, tz, "hl7_date")
    if not m["mo"]:
        return f"{dt.year:04d}"
    if not m["d"]:
        return f"{dt.year:04d}-{dt.month:02d}"
    return dt.date().isoformat()


def hl7_datetime(value: Any) -> str:
    """HL7 DTM → ISO date-time (``202503211400-0500`` → ``2025-03-21T14:00:00-05:00``).
    Without an offset the result has none either (the sender's local time)."""
    parsed = _parse_dtm(value, "hl7_datetime")
    if parsed is None:
        return ""
    m, tz = parsed
    return _datetime(m, tz, "hl7_datetime").isoformat(timespec="seconds")


def hl7_epoch(value: Any) -> float | str:
    """HL7 DTM → seconds since the epoch; a value without an offset is taken as UTC.
    ``""`` stays ``""`` (so ``or`` can supply a fallback)."""
    parsed = _parse_dtm(value, "hl7_epoch")
    if parsed is None:
        return ""
    m, tz = parsed
    return _datetime(m, tz or UTC, "hl7_epoch").timestamp()


def hl7_name(value: Any, skip: int = 0) -> str:
    """An XPN name (``Family^Given^Middle^Suffix^Prefix^Degree``) → ``"Given Middle Family"``.
    For an XCN (ORC-12, OBR-16: the id comes first) pass ``skip=1``. Components are split
    on ``^`` and sub-components (``Family&Prefix``) on ``&``."""
    if value is None:
        return ""
    parts = str(value).split("^")[skip:]
    family = parts[0].split("&")[0].strip() if parts else ""
    given = parts[1].strip() if len(parts) > 1 else ""
    middle = parts[2].strip() if len(parts) > 2 else ""
    return " ".join(p for p in (given, middle, family) if p)


def digits(value: Any) -> str:
    """Only the digits of a value (phone numbers, NPIs)."""
    return "" if value is None else "".join(ch for ch in str(value) if ch.isdigit())


def _default(value: Any, default_value: Any = "", boolean: bool = False) -> Any:
    # Jinja's ``default``: values here are never undefined, so only ``boolean=True`` acts.
    if boolean and not value:
        return default_value
    return value


def _first(value: Any) -> Any:
    if isinstance(value, (list, tuple, str)):
        return value[0] if value else ""
    raise RenderError("first: not a list")


def _last(value: Any) -> Any:
    if isinstance(value, (list, tuple, str)):
        return value[-1] if value else ""
    raise RenderError("last: not a list")


def _join(value: Any, sep: str = "") -> str:
    if isinstance(value, (list, tuple)):
        return str(sep).join(str(v) for v in value)
    return str(value)


def _text(fn: Callable[[str], str]) -> Callable[[Any], str]:
    def f(value: Any) -> str:
        return fn("" if value is None else str(value))

    return f


FILTERS: Final[dict[str, Callable[..., Any]]] = {
    "hl7_date": hl7_date,
    "hl7_datetime": hl7_datetime,
    "hl7_epoch": hl7_epoch,
    "hl7_name": hl7_name,
    "digits": digits,
}

# Jinja built-ins the fast path evaluates itself (same meaning as Jinja's).
_FAST_BUILTINS: Final[dict[str, Callable[..., Any]]] = {
    "default": _default,
    "d": _default,
    "upper": _text(str.upper),
    "lower": _text(str.lower),
    "trim": _text(str.strip),
    "title": _text(str.title),
    "string": lambda v: "" if v is None else str(v),
    "first": _first,
    "last": _last,
    "join": _join,
    "length": len,
    "replace": lambda v, old, new: str(v).replace(str(old), str(new)),
}


@pass_context
def _lookup_filter(ctx: Context, value: Any, table: str, default: Any = "") -> Any:
    tables = ctx.get("tables") or {}
    t = tables.get(table)
    if t is None:
        raise RenderError("lookup: unknown table")
    return _lookup(t, value, default)


def _lookup(table: Mapping[str, Any], value: Any, default: Any) -> Any:
    key = "" if value is None else str(value).strip()
    if key in table:
        return table[key]
    upper = key.upper()
    if upper in table:
        return table[upper]
    return default


def make_environment() -> SandboxedEnvironment:
    """The one Jinja environment: sandboxed, StrictUndefined, no autoescape (the output
    is data and plain text, not HTML), the refloop filters."""
    env = SandboxedEnvironment(
        undefined=StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
    )
    env.filters.update(FILTERS)
    env.filters["lookup"] = _lookup_filter
    return env


# ---------------------------------------------------------------------------
# Compiling expressions


class Scope:
    """What one evaluation sees: the message (for path functions) and the variables."""

    __slots__ = ("message", "vars")

    def __init__(self, message: Any, variables: dict[str, Any]):
        self.message = message
        self.vars = variables


Evaluator = Callable[[Scope], Any]


@dataclass(frozen=True, slots=True)
class PathFunction:
    """A function whose first argument is a quoted terse path, e.g. ``field('PID.3.1')``.

    ``fn(message, parsed_path, *args)``; ``choices`` lists allowed constant values for
    the extra arguments (empty: anything)."""

    fn: Callable[..., Any]
    max_args: int = 1
    choices: tuple[tuple[str, ...], ...] = ()
    prepare: Callable[[Any], Any] | None = None  # applied to the parsed path once


class CompileProblem(Exception):
    """One problem in one expression (the caller adds file:line and the key path)."""


@dataclass(frozen=True, slots=True)
class Compiled:
    """A compiled expression or template; call it with a :class:`Scope`."""

    source: str
    fast: Evaluator | None
    template: Any  # jinja2.Template for the fallback, or None
    names: frozenset[str]  # the variables it reads

    def __call__(self, scope: Scope) -> Any:
        if self.fast is not None:
            try:
                return self.fast(scope)
            except RenderError:
                raise
            except (KeyError, IndexError):
                raise RenderError("undefined value") from None
            except (TypeError, ValueError, AttributeError, ArithmeticError) as exc:
                raise RenderError(f"{type(exc).__name__} in expression") from None
        try:
            return self.template.render({**scope.vars, "_scope": scope})
        except RenderError:
            raise
        except TemplateError as exc:
            raise RenderError(f"{type(exc).__name__} in expression") from None
        except (
            TypeError,
            ValueError,
            KeyError,
            IndexError,
            AttributeError,
            ArithmeticError,
        ) as exc:
            raise RenderError(f"{type(exc).__name__} in expression") from None


def is_template(text: str) -> bool:
    return "{{" in text or "{%" in text


class Compiler:
    """Compiles the expressions of one routes.yaml against its tables and path functions."""

    def __init__(
        self,
        functions: Mapping[str, PathFunction],
        parse_path: Callable[[str], Any],
        tables: Mapping[str, Mapping[str, Any]],
        env: SandboxedEnvironment | None = None,
    ):
        self.env = env or make_environment()
        self.functions = dict(functions)
        self.parse_path = parse_path
        self.tables = tables
        self.paths: dict[tuple[str, str], Any] = {}  # (function, quoted path) → parsed path
        for name, pf in self.functions.items():
            self.env.globals[name] = self._jinja_function(name, pf)

    def _jinja_function(self, name: str, pf: PathFunction) -> Callable[..., Any]:
        paths = self.paths

        @pass_context
        def call(ctx: Context, path: str, *args: Any) -> Any:
            return pf.fn(ctx["_scope"].message, paths[(name, path)], *args)

        return call

    def compile(self, source: str, names: Iterable[str]) -> Compiled:
        """Compile ``source`` (text containing ``{{ }}``) that may read ``names``.
        Raises :class:`CompileProblem` (one, the first found)."""
        try:
            ast = self.env.parse(source)
        except TemplateSyntaxError as exc:
            raise CompileProblem(f"template syntax error: {exc.message}") from None
        self._check(ast)
        allowed = set(names) | {"tables"}
        try:
            undeclared = meta.find_undeclared_variables(ast) - set(self.env.globals)
        except TemplateError as exc:
            raise CompileProblem(f"template error: {exc}") from None
        for name in sorted(undeclared):
            if name not in allowed:
                raise CompileProblem(f"undefined name {name!r}")
        try:
            template = self.env.from_string(ast)
        except TemplateError as exc:  # pragma: no cover - _check catches what we know of
            raise CompileProblem(f"template error: {exc}") from None
        fast = self._fast_template(ast)
        return Compiled(source, fast, None if fast else template, frozenset(undeclared))

    # -- validation ---------------------------------------------------------------

    def _check(self, ast: nodes.Template) -> None:
        for f in ast.find_all(nodes.Filter):
            if f.name not in self.env.filters:
                raise CompileProblem(f"unknown filter {f.name!r}")
            if f.name == "lookup":
                if not f.args or not isinstance(f.args[0], nodes.Const):
                    raise CompileProblem("lookup needs a quoted table name: lookup('name')")
                if f.args[0].value not in self.tables:
                    raise CompileProblem(f"unknown table {f.args[0].value!r}")
        for t in ast.find_all(nodes.Test):
            if t.name not in self.env.tests:
                raise CompileProblem(f"unknown test {t.name!r}")
        for g in ast.find_all(nodes.Getattr):
            if (
                isinstance(g.node, nodes.Name)
                and g.node.name == "tables"
                and g.attr not in self.tables
            ):
                raise CompileProblem(f"unknown table {g.attr!r}")
        for c in ast.find_all(nodes.Call):
            if not (isinstance(c.node, nodes.Name) and c.node.name in self.functions):
                continue
            name = c.node.name
            pf = self.functions[name]
            if c.kwargs or c.dyn_args or c.dyn_kwargs:
                raise CompileProblem(f"{name}() takes positional arguments only")
            if not c.args or not isinstance(c.args[0], nodes.Const):
                raise CompileProblem(f"{name}() needs a quoted terse path, e.g. {name}('PID.3.1')")
            if len(c.args) > pf.max_args:
                raise CompileProblem(f"{name}() takes at most {pf.max_args} argument(s)")
            text = c.args[0].value
            if not isinstance(text, str):
                raise CompileProblem(f"{name}() needs a quoted terse path")
            try:
                parsed = self.parse_path(text)
            except ValueError as exc:
                raise CompileProblem(str(exc)) from None
            self.paths[(name, text)] = pf.prepare(parsed) if pf.prepare else parsed
            for i, arg in enumerate(c.args[1:]):
                allowed = pf.choices[i] if i < len(pf.choices) else ()
                if allowed and (not isinstance(arg, nodes.Const) or arg.value not in allowed):
                    raise CompileProblem(
                        f"{name}() argument {i + 2} must be one of {', '.join(allowed)}"
                    )

    # -- the fast path --------------------------------------------------------------

    def _fast_template(self, ast: nodes.Template) -> Evaluator | None:
        parts: list[Evaluator] = []
        if not all(isinstance(n, nodes.Output) for n in ast.body):
            return None
        items = [item for out in ast.body for item in out.nodes]  # type: ignore[attr-defined]
        exprs = [i for i in items if not isinstance(i, nodes.TemplateData)]
        if len(items) == 1 and len(exprs) == 1:
            return self._fast(exprs[0])  # a lone {{ expr }} keeps its type
        for item in items:
            if isinstance(item, nodes.TemplateData):
                parts.append(_const(item.data))
            else:
                ev = self._fast(item)
                if ev is None:
                    return None
                parts.append(ev)

        def concat(s: Scope) -> str:
            return "".join(_str(p(s)) for p in parts)

        return concat

    def _fast(self, node: nodes.Node) -> Evaluator | None:
        if isinstance(node, nodes.Const):
            return _const(node.value)
        if isinstance(node, nodes.Name) and node.ctx == "load":
            name = node.name
            if name == "tables":
                tables = self.tables
                return lambda s: tables
            return lambda s: s.vars[name]
        if isinstance(node, (nodes.List, nodes.Tuple)):
            items = [self._fast(i) for i in node.items]
            if any(i is None for i in items):
                return None
            evs = tuple(i for i in items if i is not None)
            if isinstance(node, nodes.List):
                return lambda s: [e(s) for e in evs]
            return lambda s: tuple(e(s) for e in evs)
        if isinstance(node, nodes.Getattr) and node.ctx == "load":
            target = self._fast(node.node)
            return None if target is None else _getattr(target, node.attr)
        if isinstance(node, nodes.Getitem) and node.ctx == "load":
            container, key = self._fast(node.node), self._fast(node.arg)
            if container is None or key is None:
                return None
            return _getitem(container, key)
        if isinstance(node, nodes.Call):
            return self._fast_call(node)
        if isinstance(node, nodes.Filter):
            return self._fast_filter(node)
        if isinstance(node, nodes.Or):
            left, right = self._fast(node.left), self._fast(node.right)
            if left is None or right is None:
                return None
            return _or(left, right)
        if isinstance(node, nodes.And):
            left, right = self._fast(node.left), self._fast(node.right)
            if left is None or right is None:
                return None
            return _and(left, right)
        if isinstance(node, nodes.Not):
            inner = self._fast(node.node)
            if inner is None:
                return None
            return _not(inner)
        if isinstance(node, nodes.CondExpr) and node.expr2 is not None:
            test, a, b = self._fast(node.test), self._fast(node.expr1), self._fast(node.expr2)
            if test is None or a is None or b is None:
                return None
            return _cond(test, a, b)
        if isinstance(node, nodes.Concat):
            pieces = [self._fast(n) for n in node.nodes]
            if any(p is None for p in pieces):
                return None
            return _concat(tuple(p for p in pieces if p is not None))
        if isinstance(node, nodes.Add):
            left, right = self._fast(node.left), self._fast(node.right)
            if left is None or right is None:
                return None
            return _add(left, right)
        if isinstance(node, nodes.Compare) and len(node.ops) == 1:
            return self._fast_compare(node)
        return None

    def _fast_call(self, node: nodes.Call) -> Evaluator | None:
        if not (isinstance(node.node, nodes.Name) and node.node.name in self.functions):
            return None
        name = node.node.name
        pf = self.functions[name]
        path = self.paths[(name, node.args[0].value)]  # type: ignore[attr-defined]
        extra = [self._fast(a) for a in node.args[1:]]
        if any(e is None for e in extra):
            return None
        fn = pf.fn
        if not extra:
            return lambda s: fn(s.message, path)
        evs = tuple(e for e in extra if e is not None)
        return lambda s: fn(s.message, path, *(e(s) for e in evs))

    def _fast_filter(self, node: nodes.Filter) -> Evaluator | None:
        if node.kwargs or node.dyn_args or node.dyn_kwargs or node.node is None:
            return None
        value = self._fast(node.node)
        if value is None:
            return None
        if node.name == "lookup":
            table = self.tables[node.args[0].value]  # type: ignore[attr-defined]
            default = self._fast(node.args[1]) if len(node.args) > 1 else (lambda s: "")
            if default is None or len(node.args) > 2:
                return None
            return lambda s: _lookup(table, value(s), default(s))
        fn = FILTERS.get(node.name) or _FAST_BUILTINS.get(node.name)
        if fn is None:
            return None
        args = [self._fast(a) for a in node.args]
        if any(a is None for a in args):
            return None
        evs = tuple(a for a in args if a is not None)
        if not evs:
            return lambda s: fn(value(s))
        return lambda s: fn(value(s), *(e(s) for e in evs))

    def _fast_compare(self, node: nodes.Compare) -> Evaluator | None:
        left = self._fast(node.expr)
        op = node.ops[0]
        right = self._fast(op.expr)
        if left is None or right is None:
            return None
        if op.op == "eq":
            return lambda s: left(s) == right(s)
        if op.op == "ne":
            return lambda s: left(s) != right(s)
        if op.op == "in":
            return lambda s: left(s) in right(s)
        if op.op == "notin":
            return lambda s: left(s) not in right(s)
        return None


def _getattr(target: Evaluator, attr: str) -> Evaluator:
    def getattr_(s: Scope) -> Any:
        o = target(s)
        if isinstance(o, Mapping):
            return o[attr]
        raise RenderError("attribute of a value that is not a mapping")

    return getattr_


def _getitem(container: Evaluator, key: Evaluator) -> Evaluator:
    def getitem(s: Scope) -> Any:
        o = container(s)
        k = key(s)
        if isinstance(o, Mapping):
            return o[k if isinstance(k, str) else str(k)]
        if isinstance(o, (list, tuple, str)) and isinstance(k, int):
            return o[k]
        raise RenderError("subscript of a value that is not a mapping or list")

    return getitem


def _concat(parts: tuple[Evaluator, ...]) -> Evaluator:
    return lambda s: "".join(_str(p(s)) for p in parts)


def _add(left: Evaluator, right: Evaluator) -> Evaluator:
    return lambda s: left(s) + right(s)


def _const(value: Any) -> Evaluator:
    return lambda s: value


def _or(left: Evaluator, right: Evaluator) -> Evaluator:
    return lambda s: left(s) or right(s)


def _and(left: Evaluator, right: Evaluator) -> Evaluator:
    return lambda s: left(s) and right(s)


def _not(inner: Evaluator) -> Evaluator:
    return lambda s: not inner(s)


def _cond(test: Evaluator, a: Evaluator, b: Evaluator) -> Evaluator:
    return lambda s: a(s) if test(s) else b(s)


def _str(value: Any) -> str:
    return value if isinstance(value, str) else str(value)
