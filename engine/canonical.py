"""One canonical JSON form for everything refloop hashes or compares.

Two digests of the same value must be equal, so every hash of a JSON value goes through
:func:`canonical_json`: keys sorted, no whitespace (``separators=(",", ":")``), ASCII
escapes, anything that is not JSON written with ``str``. Pure; no I/O. (The audit log's
hash chain and stored rows keep UTF-8 text, :func:`canonical_text`: changing it would
break every chain already stored. A channel's wire body, such as the signed webhook's,
is the channel's own: channels/ do not import the engine beyond its model.)

:func:`event_fingerprint` is the digest of a normalised event that the decisions table,
the referral timeline and the parked queue record (replays compare it, so it must not
drift). Stored fingerprints stay valid across two format changes:

* fields added to the events after the first release (:data:`LATE_FIELDS`) are left out
  while empty, so an event that does not use them digests as it always did;
* decisions recorded before this module existed digested the event with
  ``json.dumps``'s default separators (``", "``, ``": "``): :func:`legacy_event_fingerprint`
  recognises them (``engine.routing.summary.already_applied``), so an existing database does not
  see every decision as changed.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from typing import Any, Final

from engine.model import to_plain

# (dataclass name, field) added after fingerprints were first stored: omitted while "".
LATE_FIELDS: Final = frozenset({("Identifiers", "placer_authority"), ("Provider", "reference")})
FINGERPRINT_CHARS: Final = 32  # hex characters of sha256 kept


def canonical_json(value: Any) -> str:
    """``value`` as canonical JSON text: sorted keys, compact separators."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def canonical_text(value: Any) -> str:
    """:func:`canonical_json` with non-ASCII characters kept as UTF-8 text, not ``\\u``
    escapes: the form stored rows and the audit chain have always used (changing it
    would change every stored hash)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def digest(value: Any) -> str:
    """sha256 of :func:`canonical_json`, first :data:`FINGERPRINT_CHARS` hex digits."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()[:FINGERPRINT_CHARS]


def event_dict(event: Any) -> dict[str, Any]:
    """The event as plain data with its ``kind``, late fields left out while empty."""
    data = _drop_late(event, to_plain(event))
    data["kind"] = event.kind
    return data


def event_fingerprint(event: Any) -> str:
    """The digest of a whole event (kind included).

    Remembered for the last :data:`MEMO_EVENTS` event objects, by identity (events are
    frozen): routing's summary, the replay check and the tracker each ask for the same
    event's digest, and computing it (plain data, JSON, sha256) was a fifth of
    processing a new referral (docs/performance.md, issue 18). The memo holds the
    event itself, so its id cannot be reused by another object while remembered."""
    held = _memo.get(id(event))
    if held is not None and held[0] is event:
        return held[1]
    value = digest(event_dict(event))
    if len(_memo) >= MEMO_EVENTS:
        _memo.popitem(last=False)  # the oldest (one call: safe beside other threads)
    _memo[id(event)] = (event, value)
    return value


MEMO_EVENTS: Final = 64
_memo: OrderedDict[int, tuple[Any, str]] = OrderedDict()


def legacy_event_fingerprint(event: Any) -> str:
    """The digest decisions recorded before :mod:`engine.canonical` hold (default
    ``json.dumps`` separators); only to recognise them, never to record."""
    body = json.dumps(event_dict(event), sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()[:FINGERPRINT_CHARS]


def _drop_late(value: Any, plain: Any) -> Any:
    """``plain`` (``to_plain(value)``) without the empty :data:`LATE_FIELDS`."""
    if not isinstance(plain, dict):
        return plain
    cls = type(value).__name__
    out: dict[str, Any] = {}
    for name, item in plain.items():
        if (cls, name) in LATE_FIELDS and item == "":
            continue
        out[name] = _drop_late(getattr(value, name), item) if isinstance(item, dict) else item
    return out
