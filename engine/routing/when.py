"""A route's ``when:`` compiled into a predicate.

HL7 routes: ``type`` patterns (``SIU^S12``, wildcards), terse paths as keys
(``PID.8: F``) and ``any``; FHIR routes: ``resource`` and FHIR paths as keys. Values are
codes, lists of codes (``in``) or ``equals``/``in``/``matches``/``exists``/``not``;
comparisons ignore case and surrounding spaces. docs/routes.md "when".
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from typing import Any, Final

from engine.config import Doc, PathT, Reader
from engine.hl7v2.message import Message, TersePath
from engine.routing.fhirpath import FhirPath
from engine.routing.table import Predicate

_TYPE_PATTERN: Final = re.compile(r"[A-Z0-9*?\[\]!-]{1,8}(\^[A-Z0-9*?\[\]!-]{1,8})?")
_LOOKS_LIKE_PATH: Final = re.compile(r"[A-Z][A-Z0-9]{2}\b")
PREDICATE_OPS: Final = ("equals", "in", "matches", "exists", "not")
FHIR_TYPE: Final = re.compile(r"[A-Z][A-Za-z]{1,63}")

ValueTest = Callable[[list[str]], bool]  # on the values found at one path


def named_types(when: Any) -> tuple[str, ...]:
    """The ``type:`` patterns of a compiled (valid) HL7 ``when``, nested ``any`` included."""
    if not isinstance(when, dict):
        return ()
    value = when.get("type")
    values = value if isinstance(value, list) else [] if value is None else [value]
    nested = when.get("any")
    subs = [n for sub in (nested if isinstance(nested, list) else []) for n in named_types(sub)]
    return tuple(str(v).strip().upper() for v in values) + tuple(subs)


def compile_when(r: Reader, key: PathT) -> tuple[re.Pattern[str] | None, Predicate | None]:
    """``when`` of an HL7 route (``key`` inside the route: nested ``any`` entries recurse):
    its message type patterns (None: any type) and its field predicate (None: always)."""
    doc = r.doc
    path = (*r.path, *key)
    data: Any = r.data
    for k in key:
        data = data[k]
    if data is None:
        return None, None
    if not isinstance(data, dict):
        r.problems.append(f"{doc.where(path)}: must be a mapping (type: and field predicates)")
        return None, None
    types: re.Pattern[str] | None = None
    checks: list[Predicate] = []
    for k, value in data.items():
        kpath = (*path, k)
        if k == "type":
            types = _type_patterns(value, kpath, doc, r.problems)
        elif k == "any":
            if not isinstance(value, list) or not value:
                r.problems.append(f"{doc.where(kpath)}: must be a non-empty list of conditions")
                continue
            alternatives: list[Predicate] = []
            for j in range(len(value)):
                sub_types, sub_pred = compile_when(r, (*key, k, j))
                alternatives.append(_combine(sub_types, sub_pred))
            alts = tuple(alternatives)
            checks.append(_any_of(alts))
        elif _LOOKS_LIKE_PATH.match(str(k)):
            try:
                tp = TersePath.parse(str(k))
            except ValueError as exc:
                r.problems.append(f"{doc.where(kpath)}: {exc}")
                continue
            test = _predicate(value, kpath, doc, r.problems)
            if test is not None:
                checks.append(_field_check(tp, test))
        else:
            r.problems.append(
                f"{doc.where(kpath)}: unknown key (expected type, any, or a terse path "
                "like PID.3.1 or PRD(RT).7)"
            )
    return types, _all_of(checks)


def compile_fhir_when(r: Reader, key: PathT) -> tuple[frozenset[str] | None, Predicate | None]:
    """``when`` of a FHIR route: ``resource`` (a type, a list, or ``*``), FHIR paths as
    keys (``Appointment.status: booked``) with the same predicates as terse paths, and
    ``any``. Returns the resource types and the predicate."""
    doc = r.doc
    path = (*r.path, *key)
    data: Any = r.data
    for k in key:
        data = data[k]
    resources: frozenset[str] | None = None
    checks: list[Predicate] = []
    for k, value in data.items():
        kpath = (*path, k)
        if k == "resource" and len(key) == 1:
            items = value if isinstance(value, list) else [value]
            ok = [v for v in items if isinstance(v, str) and (v == "*" or FHIR_TYPE.fullmatch(v))]
            if not items or len(ok) != len(items):
                r.problems.append(
                    f"{doc.where(kpath)}: a FHIR resource type like ServiceRequest, a list of "
                    "them, or *"
                )
                continue
            resources = frozenset(ok)
        elif k == "any":
            if not isinstance(value, list) or not value:
                r.problems.append(f"{doc.where(kpath)}: must be a non-empty list of conditions")
                continue
            alternatives: list[Predicate] = []
            for j, alt in enumerate(value):
                if not isinstance(alt, dict):
                    r.problems.append(f"{doc.where((*kpath, j))}: must be a mapping of paths")
                    continue
                _, sub = compile_fhir_when(r, (*key, k, j))
                alternatives.append(sub if sub is not None else (lambda m: True))
            checks.append(_any_of(tuple(alternatives)))
        elif FHIR_TYPE.match(str(k)):
            try:
                fp = FhirPath.parse(str(k))
            except ValueError as exc:
                r.problems.append(f"{doc.where(kpath)}: {exc}")
                continue
            test = _predicate(value, kpath, doc, r.problems)
            if test is not None:
                checks.append(_fhir_check(fp, test))
        else:
            r.problems.append(
                f"{doc.where(kpath)}: unknown key (expected resource, any, or a FHIR path "
                "like Appointment.status)"
            )
    return resources, _all_of(checks)


def _all_of(checks: list[Predicate]) -> Predicate | None:
    """Every check must hold (None: there are none)."""
    if not checks:
        return None
    if len(checks) == 1:
        return checks[0]
    all_checks = tuple(checks)
    return lambda m: all(c(m) for c in all_checks)


def _fhir_check(path: FhirPath, test: ValueTest) -> Predicate:
    return lambda res: test(path.texts(res.data))


def _combine(types: re.Pattern[str] | None, pred: Predicate | None) -> Predicate:
    def check(m: Message) -> bool:
        if types is not None and not types.match(m.msh.message_type):
            return False
        return pred is None or pred(m)

    return check


def _type_patterns(
    value: Any, path: PathT, doc: Doc, problems: list[str]
) -> re.Pattern[str] | None:
    items = value if isinstance(value, list) else [value]
    regexes: list[str] = []
    for j, item in enumerate(items):
        where = doc.where((*path, j) if isinstance(value, list) else path)
        if not isinstance(item, str):
            problems.append(f"{where}: a message type is text like SIU^S12 or SIU^S1*")
            continue
        pattern = item.strip().upper()
        if not _TYPE_PATTERN.fullmatch(pattern):
            problems.append(
                f"{where}: bad message type pattern {item!r} (expected TYPE^TRIGGER, "
                "wildcards * ? [..] allowed)"
            )
            continue
        if "^" not in pattern:
            regexes.append(fnmatch.translate(pattern))
            pattern += "^*"
        regexes.append(fnmatch.translate(pattern))
    if not regexes:
        return None
    return re.compile("|".join(f"(?:{x})" for x in regexes))


def _codes(value: Any) -> str | None:
    if isinstance(value, bool) or value is None or isinstance(value, (dict, list)):
        return None
    return str(value).strip().upper()


def _predicate(value: Any, path: PathT, doc: Doc, problems: list[str]) -> ValueTest | None:
    """A predicate on the values at a path. Scalars compare equal, lists mean ``in``;
    comparisons ignore case and surrounding spaces (table 0278 has both Booked and BOOKED)."""
    where = doc.where(path)
    if isinstance(value, list):
        return _predicate({"in": value}, path, doc, problems)
    if not isinstance(value, dict):
        code = _codes(value)
        if code is None:
            problems.append(
                f"{where}: must be a code, a list of codes or a mapping of "
                f"{', '.join(PREDICATE_OPS)} (quote YES/NO/ON/OFF codes)"
            )
            return None
        return _equals(code)
    if not value:
        problems.append(f"{where}: an empty predicate")
        return None
    tests: list[ValueTest] = []
    for op, arg in value.items():
        opwhere = doc.where((*path, op))
        if op == "equals":
            code = _codes(arg)
            if code is None:
                problems.append(f"{opwhere}: must be a code (quote YES/NO/ON/OFF codes)")
                continue
            tests.append(_equals(code))
        elif op == "in":
            codes = [_codes(a) for a in arg] if isinstance(arg, list) else [None]
            if not codes or any(c is None for c in codes):
                problems.append(
                    f"{opwhere}: must be a non-empty list of codes (quote YES/NO/ON/OFF codes)"
                )
                continue
            allowed = frozenset(c for c in codes if c is not None)
            tests.append(_in(allowed))
        elif op == "matches":
            if not isinstance(arg, str):
                problems.append(f"{opwhere}: must be a regular expression (text)")
                continue
            try:
                rx = re.compile(arg)
            except re.error as exc:
                problems.append(f"{opwhere}: bad regular expression: {exc}")
                continue
            tests.append(_matches(rx))
        elif op == "exists":
            if not isinstance(arg, bool):
                problems.append(f"{opwhere}: must be true or false")
                continue
            tests.append(_exists(arg))
        elif op == "not":
            inner = _predicate(arg, (*path, op), doc, problems)
            if inner is not None:
                tests.append(_negate(inner))
        else:
            problems.append(f"{opwhere}: unknown predicate (one of {', '.join(PREDICATE_OPS)})")
    if not tests:
        return None
    if len(tests) == 1:
        return tests[0]
    all_tests = tuple(tests)
    return lambda vs: all(t(vs) for t in all_tests)


def _any_of(alternatives: tuple[Predicate, ...]) -> Predicate:
    return lambda m: any(a(m) for a in alternatives)


def _equals(code: str) -> ValueTest:
    return lambda vs: any(v.strip().upper() == code for v in vs)


def _in(allowed: frozenset[str]) -> ValueTest:
    return lambda vs: any(v.strip().upper() in allowed for v in vs)


def _matches(rx: re.Pattern[str]) -> ValueTest:
    return lambda vs: any(rx.search(v) for v in vs)


def _exists(want: bool) -> ValueTest:
    return lambda vs: any(v.strip() for v in vs) == want


def _negate(inner: ValueTest) -> ValueTest:
    return lambda vs: not inner(vs)


def _field_check(path: TersePath, test: ValueTest) -> Predicate:
    if path.repetition == -1:
        return lambda m: test(m.get_all(path))
    return lambda m: test([m.get(path)])
