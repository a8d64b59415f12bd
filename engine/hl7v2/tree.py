"""An HL7 v2 message as a tree for people to read: segment → field → repetition →
component → subcomponent, each named from the HL7 v2.5.1 definitions
(engine.hl7v2.definitions) where the segment is one the shipped routes read.

Off the hot path: only the message view (engine.web.service) builds a tree, on demand.
python-hl7 does the parsing (its full parse costs ~2 ms a message, which is why the ACK
and routing paths never call it; tests/test_layers.py allows it in this module only).

Values are shown as they were sent (escape sequences included): the raw text beside the
tree is the record, and an analyst comparing the two needs the same characters. Empty
fields, components and subcomponents are left out; a value longer than
:data:`MAX_VALUE` characters is cut (ending in "…"), and only the first
:data:`MAX_SEGMENTS` segments are read (:func:`segment_count` tells the whole count).
OBX-5 takes its data type from OBX-2 (HL7 v2.5.1 §7.4.2.5), as the standard says.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Final

import hl7

from engine.hl7v2.definitions import DATATYPES, SEGMENTS

_SEGMENT_END: Final = re.compile(r"\r\n|\r|\n")
MAX_SEGMENTS: Final = 2000  # a tree that large is unreadable; the raw text has the rest
MAX_VALUE: Final = 500  # characters of a value shown in the tree (an embedded PDF is MBs)


class TreeError(ValueError):
    """The text is not an HL7 v2 message python-hl7 can read (the reason, no content)."""


@dataclass(frozen=True, slots=True)
class Node:
    """One element: ``path`` like ``PID-3[2].4.1``, its standard name ("" when unknown),
    data type, the value as sent and its children."""

    path: str
    name: str
    type: str
    value: str
    children: tuple[Node, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "name": self.name,
            "type": self.type,
            "value": self.value,
            "children": [c.as_dict() for c in self.children],
        }


@dataclass(frozen=True, slots=True)
class SegmentNode:
    id: str  # MSH, PID, ZPD, ...
    occurrence: int  # 1 for the first PID, 2 for the second, ...
    name: str  # "Patient Identification"; "" when the segment is not in the table
    fields: tuple[Node, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "occurrence": self.occurrence,
            "name": self.name,
            "fields": [f.as_dict() for f in self.fields],
        }


def segment_count(text: str) -> int:
    """How many segments ``text`` has (to tell a truncated tree)."""
    return sum(1 for s in _SEGMENT_END.split(text) if s.strip())


def _cut(value: str) -> str:
    return value if len(value) <= MAX_VALUE else value[: MAX_VALUE - 1] + "…"


def build_tree(text: str) -> list[SegmentNode]:
    """The tree of one HL7 v2 message (segment ends CR, LF or CRLF). Raises
    :class:`TreeError` when python-hl7 cannot read it (no MSH first, say)."""
    lines = [s for s in _SEGMENT_END.split(text.lstrip("\ufeff \t\r\n")) if s.strip()]
    if not lines or not lines[0].startswith("MSH") or len(lines[0]) < 8:
        raise TreeError("not an HL7 v2 message (it does not start with MSH)")
    delimiters = lines[0][3:8]  # MSH-1 and the four MSH-2 characters
    if len(set(delimiters)) != 5 or any(c.isalnum() or c.isspace() for c in delimiters):
        raise TreeError("MSH-1 and MSH-2 do not declare five distinct delimiters")
    try:
        message = hl7.parse("\r".join(lines[:MAX_SEGMENTS]))
    except Exception as exc:  # a third-party parser on any input: never an error page
        raise TreeError(f"python-hl7 cannot read it: {type(exc).__name__}") from None
    seen: dict[str, int] = {}
    out: list[SegmentNode] = []
    for segment in message:
        sid = str(segment[0])
        seen[sid] = seen.get(sid, 0) + 1
        out.append(_segment(sid, seen[sid], segment))
    return out


def _segment(sid: str, occurrence: int, segment: Any) -> SegmentNode:
    spec = SEGMENTS.get(sid)
    fields: list[Node] = []
    obx_type = str(segment[2]) if sid == "OBX" and len(segment) > 2 else ""
    for seq in range(1, len(segment)):
        raw = segment[seq]
        value = str(raw)
        if value == "":
            continue
        name, dtype = ("", "")
        if spec is not None and seq <= len(spec.fields):
            name, dtype = spec.fields[seq - 1]
        if sid == "OBX" and seq == 5 and obx_type in DATATYPES:
            dtype = obx_type
        path = f"{sid}-{seq}"
        if sid == "MSH" and seq <= 2:  # the delimiters themselves: never split
            fields.append(Node(path, name, dtype, value))
            continue
        fields.append(Node(path, name, dtype, _cut(value), _repetitions(path, dtype, raw)))
    return SegmentNode(sid, occurrence, spec.name if spec else "", tuple(fields))


def _repetitions(path: str, dtype: str, raw: Any) -> tuple[Node, ...]:
    """A field's content: its components directly when it has one repetition, else one
    node per repetition (``PID-3[2]``) holding its components."""
    reps = _parts(raw)
    if len(reps) <= 1:
        return _components(path, dtype, reps[0] if reps else "")
    out = []
    for i, rep in enumerate(reps, 1):
        value = str(rep)
        if value:
            rpath = f"{path}[{i}]"
            out.append(Node(rpath, "", dtype, _cut(value), _components(rpath, dtype, rep)))
    return tuple(out)


def _components(path: str, dtype: str, rep: Any) -> tuple[Node, ...]:
    parts = _parts(rep)
    if len(parts) <= 1 and len(_parts(parts[0])) <= 1:  # a simple value: no children
        return ()
    spec = DATATYPES.get(dtype)
    out = []
    for i, part in enumerate(parts, 1):
        value = str(part)
        if not value:
            continue
        name, ctype = ("", "")
        if spec is not None and i <= len(spec.components):
            name, ctype = spec.components[i - 1]
        cpath = f"{path}.{i}"
        out.append(Node(cpath, name, ctype, _cut(value), _subcomponents(cpath, ctype, part)))
    return tuple(out)


def _subcomponents(path: str, dtype: str, component: Any) -> tuple[Node, ...]:
    parts = _parts(component)
    if len(parts) <= 1:
        return ()
    spec = DATATYPES.get(dtype)
    out = []
    for i, part in enumerate(parts, 1):
        value = str(part)
        if value:
            name, stype = ("", "")
            if spec is not None and i <= len(spec.components):
                name, stype = spec.components[i - 1]
            out.append(Node(f"{path}.{i}", name, stype, _cut(value)))
    return tuple(out)


def _parts(container: Any) -> list[Any]:
    """python-hl7 keeps one level of nesting per delimiter (field → repetitions →
    components → subcomponents); a plain string has no parts below it."""
    if isinstance(container, str):
        return [container]
    return list(container)
