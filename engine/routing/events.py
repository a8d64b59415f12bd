"""From extracted values to an :class:`~engine.model.Event`: which extract names a
``track`` action fills (:data:`EVENT_TARGETS`, derived from the event dataclasses), how a
value is coerced to the field's type, and :func:`build_event`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any, Final

from engine.model import EVENT_TYPES, Event, Identifiers, PatientContact, Provider
from engine.routing.expressions import RenderError, hl7_epoch
from engine.routing.fhirpath import instant
from engine.routing.table import Target, TrackSpec

_IDS_FIELDS: Final = {f.name: str(f.type) for f in dataclasses.fields(Identifiers)}
_BASE_FIELDS: Final = ("ids", "occurred_at", "message_id", "kind")
_NESTED: Final[dict[str, type]] = {"Provider": Provider, "PatientContact": PatientContact}


def _nested_type(type_name: str) -> type | None:
    return _NESTED.get(type_name)


_EMPTY: Final = object()


def _to_str(value: Any) -> Any:
    if value is None:
        return _EMPTY
    if isinstance(value, (list, tuple)):
        value = next((v for v in value if v not in (None, "")), "")
    text = value if isinstance(value, str) else str(value)
    text = text.strip()
    return text if text else _EMPTY


def _to_strs(value: Any) -> Any:
    if value is None:
        return _EMPTY
    if isinstance(value, (list, tuple)):
        out = tuple(str(v).strip() for v in value if v not in (None, "") and str(v).strip())
    else:
        text = str(value).strip()
        out = (text,) if text else ()
    return out if out else _EMPTY


def _to_float(value: Any) -> Any:
    if value is None or value == "":
        return _EMPTY
    if isinstance(value, bool):
        raise RenderError("expected a time, not true/false")
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        if _ISO_DATE.match(text):  # FHIR dateTime / instant
            epoch = instant(text)
            if epoch is None:
                raise RenderError("not a valid ISO date/time") from None
            return epoch
        result = hl7_epoch(text)
        return _EMPTY if result == "" else result


_ISO_DATE: Final = re.compile(r"\d{4}-\d{2}")
_TRUE: Final = frozenset({"Y", "YES", "TRUE", "1", "T"})
_FALSE: Final = frozenset({"N", "NO", "FALSE", "0", "F"})


def _to_bool(value: Any) -> Any:
    if value is None or value == "":
        return _EMPTY
    if isinstance(value, bool):
        return value
    text = str(value).strip().upper()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise RenderError("expected a yes/no value")


_COERCE: Final[dict[str, Callable[[Any], Any]]] = {
    "str": _to_str,
    "tuple[str, ...]": _to_strs,
    "float": _to_float,
    "int": _to_float,
    "bool": _to_bool,
    "bool | None": _to_bool,
}


def _targets(cls: type[Event]) -> dict[str, tuple[Target, ...]]:
    """Extract name → where it goes, for one event class."""
    out: dict[str, list[Target]] = {}
    for name, type_name in _IDS_FIELDS.items():
        out.setdefault(name, []).append(Target("ids", name, _COERCE[type_name]))
    out.setdefault("occurred_at", []).append(Target("", "occurred_at", _to_float))
    for f in dataclasses.fields(cls):
        if f.name in _BASE_FIELDS:
            continue
        type_name = str(f.type)
        nested = _nested_type(type_name)
        if nested is not None:
            for sub in dataclasses.fields(nested):
                out.setdefault(f"{f.name}.{sub.name}", []).append(
                    Target(f.name, sub.name, _COERCE[str(sub.type)])
                )
        else:
            out.setdefault(f.name, []).append(Target("", f.name, _COERCE[type_name]))
    return {k: tuple(v) for k, v in out.items()}


EVENT_TARGETS: Final[dict[str, dict[str, tuple[Target, ...]]]] = {
    kind: _targets(cls) for kind, cls in EVENT_TYPES.items()
}


def build_event(spec: TrackSpec, values: Mapping[str, Any], message_id: int, when: float) -> Event:
    """The event of one ``track`` action; ``when`` is the message's own time, used when
    the route extracts no ``occurred_at``."""
    kwargs: dict[str, Any] = {}
    ids: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for name, targets in spec.targets:
        raw = values.get(name)
        for t in targets:
            try:
                v = t.coerce(raw)
            except RenderError as exc:
                raise RenderError(f"extract {name}: {exc}") from None
            if v is _EMPTY:
                continue
            if t.group == "ids":
                ids[t.name] = v
            elif t.group:
                nested.setdefault(t.group, {})[t.name] = v
            else:
                kwargs[t.name] = v
    if not (ids.get("placer_number") or ids.get("filler_numbers") or ids.get("patient_ids")):
        raise RenderError(
            f"track {spec.kind}: no identifiers (placer_number, filler_numbers and "
            "patient_ids are all empty)"
        )
    for group, sub in nested.items():
        cls = _nested_type(str(spec.cls.__dataclass_fields__[group].type))
        if cls is not None:
            kwargs[group] = cls(**sub)
    if "occurred_at" not in kwargs:
        kwargs["occurred_at"] = when
    return spec.cls(ids=Identifiers(**ids), message_id=message_id, **kwargs)
