"""A route's ``then:`` list compiled into :class:`~engine.routing.table.ActionSpec` values.

One function per action (``track``, ``send``, ``forward``, ``drop``) in :data:`COMPILERS`;
each reports its problems as ``file:line key.path: message`` and returns None for an action
it cannot compile. :func:`compile_actions` then checks the list as a whole: ``drop`` stands
alone, and every extract name of a tracking route is a field of a tracked event.
docs/routes.md "then" is the user's view.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from engine.config import PathT, Reader
from engine.model import EVENT_TYPES
from engine.routing.events import EVENT_TARGETS
from engine.routing.expressions import Compiler
from engine.routing.extract import BUILTIN_NAMES, FHIR_BUILTIN_NAMES, compile_value
from engine.routing.table import ActionSpec, ChannelSpec, Extract, TrackSpec


@dataclass(frozen=True, slots=True)
class _Route:
    """What an action compiler sees of the route it belongs to."""

    r: Reader  # the route's reader: problems go to r.problems
    compiler: Compiler
    channels: Mapping[str, ChannelSpec]
    names: list[str]  # the extract names the route defines (visible to ``send.to``)
    extracts: tuple[Extract, ...]
    fhir: bool

    def problem(self, path: PathT, message: str) -> None:
        self.r.problems.append(f"{self.r.doc.where(path)}: {message}")


ActionCompiler = Callable[[_Route, Any, PathT], ActionSpec | None]


def _track(route: _Route, arg: Any, path: PathT) -> ActionSpec | None:
    """``track: <event kind>``: build that event from the route's extracts."""
    if not isinstance(arg, str) or arg not in EVENT_TYPES:
        route.problem(path, f"unknown event kind {arg!r} (one of {', '.join(EVENT_TYPES)})")
        return None
    targets = EVENT_TARGETS[arg]
    pairs = tuple((ex.name, targets[ex.name]) for ex in route.extracts if ex.name in targets)
    return ActionSpec("track", track=TrackSpec(kind=arg, cls=EVENT_TYPES[arg], targets=pairs))


def _send(route: _Route, arg: Any, path: PathT) -> ActionSpec | None:
    """``send: {channel, template, to}``: a known channel, one of its templates, and the
    recipient as a path or an expression."""
    if not isinstance(arg, dict):
        route.problem(path, "must be a mapping of channel, template, to")
        return None
    r = route.r
    sr = Reader(r.doc, path, r.problems, r.env)
    channel, template = _send_target(sr, route.channels)
    to: Extract | None = None
    if not sr.has("to"):
        sr.fail("to", "is required (a terse path or an expression)")
    else:
        to = compile_value(
            "to",
            sr.raw("to"),
            r.doc.where((*path, "to")),
            route.compiler,
            [*(FHIR_BUILTIN_NAMES if route.fhir else BUILTIN_NAMES), *route.names],
            r.problems,
            fhir=route.fhir,
        )
    sr.done()
    return ActionSpec("send", channel=channel, template=template, to=to)


def _send_target(r: Reader, channels: Mapping[str, ChannelSpec]) -> tuple[str, str]:
    channel = r.text("channel", required=True)
    template = r.text("template", "")
    if channel and channel not in channels:
        known = ", ".join(sorted(channels)) or "none are defined"
        r.fail("channel", f"unknown channel {channel!r} (channels: {known})")
    elif channel:
        spec = channels[channel]
        if not r.has("template"):
            r.fail("template", "is required")
        elif template not in spec.templates:
            known = ", ".join(sorted(spec.templates)) or "it has none"
            r.fail("template", f"unknown template {template!r} of channel {channel!r} ({known})")
    return channel, template


def _forward(route: _Route, arg: Any, path: PathT) -> ActionSpec | None:
    """``forward: <channel>`` (or ``{channel: ...}``): the message as received, to an
    ``mllp`` channel. HL7 routes only."""
    if route.fhir:
        route.problem(path, "a FHIR resource cannot be forwarded over MLLP")
        return None
    target: Any = arg.get("channel") if isinstance(arg, dict) else arg
    cpath = (*path, "channel") if isinstance(arg, dict) else path
    if isinstance(arg, dict) and set(arg) - {"channel"}:
        route.problem(path, "forward takes only channel")
    if not isinstance(target, str) or target not in route.channels:
        known = ", ".join(sorted(route.channels)) or "none are defined"
        route.problem(cpath, f"unknown channel {target!r} (channels: {known})")
        return None
    if route.channels[target].type != "mllp":
        route.problem(cpath, f"forward needs an mllp channel, not {target!r}")
        return None
    return ActionSpec("forward", channel=target)


def _drop(route: _Route, arg: Any, path: PathT) -> ActionSpec | None:
    """``drop: <reason>``: the message is filtered, with that reason."""
    if not isinstance(arg, str) or not arg.strip():
        route.problem(path, "must be a reason (text)")
        return None
    return ActionSpec("drop", reason=arg.strip())


COMPILERS: Final[dict[str, ActionCompiler]] = {
    "track": _track,
    "send": _send,
    "forward": _forward,
    "drop": _drop,
}
ACTIONS: Final = tuple(COMPILERS)


def compile_actions(
    r: Reader,
    compiler: Compiler,
    channels: Mapping[str, ChannelSpec],
    names: list[str],
    extracts: tuple[Extract, ...],
    *,
    fhir: bool = False,
) -> tuple[ActionSpec, ...]:
    """The route's ``then`` (one action mapping or a non-empty list of them)."""
    path = (*r.path, "then")
    items = _items(r, path)
    route = _Route(r, compiler, channels, names, extracts, fhir)
    out: list[ActionSpec] = []
    for apath, item in items:
        if not isinstance(item, dict) or len(item) != 1:
            route.problem(apath, f"each action is a mapping with one of {', '.join(ACTIONS)}")
            continue
        ((action, arg),) = item.items()
        build = COMPILERS.get(action)
        if build is None:
            route.problem((*apath, action), f"unknown action (one of {', '.join(ACTIONS)})")
            continue
        spec = build(route, arg, (*apath, action))
        if spec is not None:
            out.append(spec)
    if any(a.action == "drop" for a in out) and len(out) > 1:
        route.problem(path, "drop cannot be combined with other actions")
    _check_tracked_fields(route, out)
    return tuple(out)


def _items(r: Reader, path: PathT) -> list[tuple[PathT, Any]]:
    """``then`` as (path, action mapping) pairs; none (with a problem) when it is missing
    or not an action list."""
    if not r.has("then"):
        r.fail("then", "is required (a list of actions: track, send, forward, drop)")
        return []
    data = r.raw("then")
    if isinstance(data, dict):
        return [(path, data)]
    if isinstance(data, list) and data:
        return [((*path, i), a) for i, a in enumerate(data)]
    r.fail("then", "must be a non-empty list of actions")
    return []


def _check_tracked_fields(route: _Route, actions: list[ActionSpec]) -> None:
    """In a route that tracks, every extract (but ``_helpers``) fills a field of a tracked
    event: a misspelt name would otherwise be dropped without a word."""
    tracked = [a.track.kind for a in actions if a.track is not None]
    if not tracked:
        return
    for ex in route.extracts:
        if ex.name.startswith("_"):
            continue
        if not any(ex.name in EVENT_TARGETS[k] for k in tracked):
            fields_ = sorted({n for k in tracked for n in EVENT_TARGETS[k]})
            route.problem(
                (*route.r.path, "extract", ex.name),
                f"{ex.name!r} is not a field of {' or '.join(tracked)} "
                f"(fields: {', '.join(fields_)}; prefix helpers with _)",
            )
