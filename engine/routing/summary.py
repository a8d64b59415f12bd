"""A decision as the decisions table keeps it (for replay): action summaries whose free
text is fingerprinted, not stored, and the event fingerprints that make applying an event
twice a no-op.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any, Final

from engine.canonical import event_fingerprint, legacy_event_fingerprint
from engine.model import Decision, Event, Forward, Send, Track, to_plain


def fingerprint(event: Event) -> str:
    """A stable digest of a whole event (kind included): the tracker's too
    (:func:`engine.canonical.event_fingerprint`)."""
    return event_fingerprint(event)


def already_applied(event: Event, applied: frozenset[str]) -> bool:
    """Whether a decision that recorded the fingerprints ``applied`` handed this event to
    the tracker, in either the canonical or the pre-canonical digest form."""
    if not applied:  # no earlier decision (every new message): nothing to digest
        return False
    return event_fingerprint(event) in applied or legacy_event_fingerprint(event) in applied


_KEY_FIELDS: Final = (
    "appointment_id",
    "start",
    "report_id",
    "status",
    "surviving_id",
    "retired_id",
    "specialty_category",
    "priority",
)


def canonical_actions(
    actions: Iterable[Mapping[str, Any]], decision: Decision
) -> tuple[dict[str, Any], ...]:
    """Stored action summaries with the pre-canonical fingerprint of one of ``decision``'s
    events rewritten in the canonical form, so a replay compares like with like."""
    legacy = {legacy_event_fingerprint(e): event_fingerprint(e) for e in decision.events}
    return tuple(
        {**a, "fingerprint": legacy.get(str(a["fingerprint"]), a["fingerprint"])}
        if a.get("action") == "track"
        else dict(a)
        for a in actions
    )


def summarise(decision: Decision) -> list[dict[str, Any]]:
    """The decision's actions as JSON-able summaries (what the decisions table keeps).
    Free text (reasons, names, contact details, ``to``) is not kept, only fingerprinted."""
    out: list[dict[str, Any]] = []
    for a in decision.actions:
        if isinstance(a, Track):
            ev = a.event
            keys: dict[str, Any] = {k: v for k, v in to_plain(ev.ids).items() if v not in ("", ())}
            for k in _KEY_FIELDS:
                v = getattr(ev, k, "")
                if v not in ("", None):
                    keys[k] = v
            out.append(
                {
                    "action": "track",
                    "route": a.route,
                    "kind": ev.kind,
                    "keys": keys,
                    "fingerprint": fingerprint(ev),
                }
            )
        elif isinstance(a, Send):
            digest = hashlib.sha256(a.to.encode()).hexdigest()[:16]
            out.append(
                {
                    "action": "send",
                    "route": a.route,
                    "channel": a.channel,
                    "template": a.template,
                    "to_digest": digest,
                }
            )
        elif isinstance(a, Forward):
            out.append({"action": "forward", "route": a.route, "channel": a.channel})
        else:
            out.append({"action": "drop", "route": a.route, "reason": a.reason})
    return out
