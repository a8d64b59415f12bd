"""A route's ``extract:`` compiled: each name becomes a terse path (``PID.3.1``, or a FHIR
path in a FHIR route), an expression in ``{{ }}`` or a constant, checked against the names
visible at that point (built-ins and earlier extracts). docs/routes.md "extract".
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Final

from engine.config import Reader
from engine.hl7v2.message import TersePath
from engine.routing.expressions import CompileProblem, Compiler, is_template
from engine.routing.fhirpath import FhirPath
from engine.routing.table import Extract

EXTRACT_NAME: Final = re.compile(r"_?[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)?")
BUILTIN_NAMES: Final = ("message_type", "trigger", "source")
# FHIR routes also see the resource's own reference ("ServiceRequest/123") and version.
FHIR_BUILTIN_NAMES: Final = (*BUILTIN_NAMES, "resource_ref", "version_id")


def compile_extracts(
    r: Reader, compiler: Compiler, *, fhir: bool = False
) -> tuple[tuple[Extract, ...], list[str]]:
    doc = r.doc
    builtins = FHIR_BUILTIN_NAMES if fhir else BUILTIN_NAMES
    names: list[str] = []
    if not r.has("extract"):
        r.raw("extract")
        return (), names
    data = r.raw("extract")
    path = (*r.path, "extract")
    if not isinstance(data, dict):
        r.problems.append(f"{doc.where(path)}: must be a mapping of name: path or expression")
        return (), names
    out: list[Extract] = []
    for name, value in data.items():
        kpath = (*path, name)
        where = doc.where(kpath)
        if not EXTRACT_NAME.fullmatch(str(name)):
            r.problems.append(
                f"{where}: extract names are lower-case words, optionally one dotted "
                "level (specialist.npi); a leading _ marks a helper"
            )
            continue
        ex = compile_value(
            str(name), value, where, compiler, [*builtins, *names], r.problems, fhir=fhir
        )
        if ex is not None:
            out.append(ex)
        names.append(str(name).split(".")[0])
        names.append(str(name))
    return tuple(out), names


def compile_value(
    name: str,
    value: Any,
    where: str,
    compiler: Compiler,
    visible: Iterable[str],
    problems: list[str],
    *,
    fhir: bool = False,
) -> Extract | None:
    """One value spec: "PID.3.1" (a path; in a FHIR route "Appointment.start"),
    "{{ expr }}" (an expression), {value: x} or a non-text scalar (a constant)."""
    if isinstance(value, str):
        if is_template(value):
            try:
                return Extract(name, expr=compiler.compile(value, visible))
            except CompileProblem as exc:
                problems.append(f"{where}: {exc}")
                return None
        if fhir:
            try:
                return Extract(name, fpath=FhirPath.parse(value))
            except ValueError as exc:
                problems.append(
                    f"{where}: {exc} (an expression must be inside {{{{ }}}}; a constant is "
                    "{value: ...})"
                )
                return None
        try:
            tp = TersePath.parse(value)
        except ValueError as exc:
            problems.append(
                f"{where}: {exc} (an expression must be inside {{{{ }}}}; a constant is "
                "{value: ...})"
            )
            return None
        return Extract(name, path=tp, many=tp.repetition == -1)
    if isinstance(value, dict):
        if set(value) != {"value"}:
            problems.append(f"{where}: a mapping here must be {{value: constant}}")
            return None
        return Extract(name, constant=value["value"])
    if value is None or isinstance(value, (bool, int, float)):
        return Extract(name, constant=value)
    problems.append(f"{where}: must be a terse path, an expression in {{{{ }}}} or a constant")
    return None
