"""Field access in route expressions: the path functions ``field``, ``fields``, ``ids``,
``telecom`` of HL7 routes and ``path``, ``paths``, ``refs`` of FHIR routes.

HL7 v2 datatypes read here: CX (PID-3, MRG-1) and XTN (tables 0201/0202). docs/routes.md
"Expressions" lists them for the user.
"""

from __future__ import annotations

import dataclasses
from typing import Final

from engine.hl7v2.message import Message, TersePath
from engine.routing.expressions import PathFunction
from engine.routing.fhirpath import path_all, path_first, path_refs


def _field(message: Message, path: TersePath) -> str:
    return message.get(path)


def _fields(message: Message, path: TersePath) -> list[str]:
    return message.get_all(path)


def _reps(path: TersePath) -> TersePath:
    return dataclasses.replace(path, repetition=-1, component=0, subcomponent=0)


def _ids(message: Message, path: TersePath) -> tuple[str, ...]:
    """CX repetitions (PID-3, MRG-1) as ``id^^^authority`` (CX.1 and CX.4's namespace).
    Whole repetitions read with ``^`` and ``&`` whatever the message's delimiters."""
    out = []
    for rep in message.get_all(path):
        parts = rep.split("^")
        ident = parts[0].strip()
        if not ident:
            continue
        auth = parts[3].split("&")[0].strip() if len(parts) > 3 else ""
        out.append(f"{ident}^^^{auth}" if auth else ident)
    return tuple(out)


TELECOM_KINDS: Final = ("phone", "mobile", "fax", "email")


def _telecom(message: Message, path: TersePath, kind: str = "phone") -> str:
    """The first XTN repetition of a kind (HL7 table 0201 use / 0202 equipment):
    ``email`` (NET or Internet: XTN.4), ``fax`` (FX), ``mobile`` (CP), ``phone`` (any
    telephone, not fax or e-mail). Numbers come from XTN.12, else XTN.6+XTN.7, else XTN.1."""
    for rep in message.get_all(path):
        c = rep.split("^") + [""] * 12
        use, equip = c[1].strip().upper(), c[2].strip().upper()
        is_email = use == "NET" or equip in ("INTERNET", "X.400")
        if kind == "email":
            if is_email and (c[3].strip() or c[0].strip()):
                return (c[3] or c[0]).strip()
            continue
        if is_email:
            continue
        if kind == "fax" and equip != "FX":
            continue
        if kind == "mobile" and equip != "CP":
            continue
        if kind == "phone" and equip == "FX":
            continue
        number = c[11].strip() or (c[5].strip() + c[6].strip()) or c[0].strip()
        if number:
            return number
    return ""


PATH_FUNCTIONS: Final[dict[str, PathFunction]] = {
    "field": PathFunction(_field),
    "fields": PathFunction(_fields),
    "ids": PathFunction(_ids, prepare=_reps),
    "telecom": PathFunction(_telecom, max_args=2, choices=(TELECOM_KINDS,), prepare=_reps),
}

# The path functions of FHIR routes (engine.routing.fhirpath; docs/routes.md "FHIR routes").
FHIR_PATH_FUNCTIONS: Final[dict[str, PathFunction]] = {
    "path": PathFunction(path_first),
    "paths": PathFunction(path_all),
    "refs": PathFunction(path_refs, max_args=2),
}
