"""The correlation rule: which referral an event belongs to, and parking the events that
belong to none (yet).

In order (docs/referral-states.md, "Correlation and storage"):

1. the practice + placer number (ORC-2/OBR-2, RF1-6, SCH-26, TXA-14): the key with the
   sending facility or the placer number's assigning authority (EI.2); then the one
   referral that recorded that authority; then the placer number alone when exactly one
   referral has it and no stated authority contradicts it (a specialist's report names
   our placer number under its own MSH-4);
2. filler number (ORC-3, RF1-11, SCH-2), learnt from earlier events;
3. patient identifier + specialty, for a referral opened within the window (default 90
   days) of the event's own time, only when the event names no placer number (a stated
   placer number that matches nothing means its referral has not arrived yet).

An event that matches nothing (or more than one referral) is parked, never dropped: it is
stored whole (:func:`event_to_dict`) so that linking it later re-applies the same event
(:func:`event_from_dict`). Contact updates and merges that name no referral are the
tracker's (engine.tracking.tracker): they are about a patient, not a referral.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from engine.canonical import event_fingerprint
from engine.clock import isoformat
from engine.errors import StoreError
from engine.model import (
    EVENT_TYPES,
    Event,
    Identifiers,
    PatientContact,
    PriorAuthDecided,
    Provider,
    ReferralCreated,
    to_plain,
)
from engine.store import audit as audit_store
from engine.store import referrals as store
from engine.store.referrals import Conn
from engine.tracking import states

log = logging.getLogger(__name__)

DEFAULT_WINDOW_DAYS: Final = 90.0

# Every event class the tracker accepts by kind (stored parked events are rebuilt by it).
EVENT_CLASSES: Final[dict[str, type[Event]]] = {
    **EVENT_TYPES,
    "prior-auth-decided": PriorAuthDecided,
}


@dataclass(frozen=True, slots=True)
class Match:
    """The referral an event correlates with (``referral_id`` None: none, or several)."""

    referral_id: int | None
    how: str = ""  # the step that matched: key, placer-authority, placer, filler, patient-window
    why: str = ""  # why nothing matched: no-placer-number, no-match, ambiguous


def correlate(conn: Conn, event: Event, window: float) -> Match:
    """The referral of ``event`` by the rule above; ``window`` is the patient step's
    reach in seconds either side of the event's own time."""
    ids = event.ids
    if isinstance(event, ReferralCreated):
        if not ids.placer_number:
            return Match(None, why="no-placer-number")
        rid = store.find_by_key(conn, ids.sending_facility, ids.placer_number)
        return Match(rid, "key", "" if rid else "no-match")
    ambiguous = False
    if ids.placer_number:
        rid, how, ambiguous = _by_placer(conn, ids)
        if rid is not None:
            return Match(rid, how)
    if ids.filler_numbers:
        by_filler = store.find_by_fillers(conn, ids.filler_numbers)
        if len(by_filler) == 1:
            return Match(by_filler[0], "filler")
        ambiguous = ambiguous or len(by_filler) > 1
    if not ids.placer_number and ids.patient_ids and ids.specialty:
        pids = {*ids.patient_ids, *(store.surviving_id(conn, p) for p in ids.patient_ids)}
        found = store.find_by_patient(
            conn, pids, ids.specialty, event.occurred_at - window, event.occurred_at + window
        )
        open_ = [rid for rid, status in found if status != "closed"]
        if len(open_) == 1:
            return Match(open_[0], "patient-window")
        if not open_ and len(found) == 1:
            return Match(found[0][0], "patient-window")
        ambiguous = ambiguous or len(found) > 1
    return Match(None, why="ambiguous" if ambiguous else "no-match")


def _by_placer(conn: Conn, ids: Identifiers) -> tuple[int | None, str, bool]:
    """(referral, how, ambiguous) by placer number. A placer number is unique only
    within the practice that assigned it, named by the sending facility (the key) or
    the placer number's assigning authority EI.2 (docs/referral-states.md, "Which
    practice a message names"):
    the key; then the one referral whose recorded authority is the stated one; then
    the only referral with the number, unless its recorded authority contradicts the
    stated one (that practice's referral has not arrived yet)."""
    stated = ids.placer_authority
    for scope in (ids.sending_facility, *([stated] if stated else [])):
        rid = store.find_by_key(conn, scope, ids.placer_number)
        if rid is not None:
            return rid, "key", False
    candidates = store.placer_candidates(conn, ids.placer_number)
    if stated:
        owned = [c for c in candidates if stated in (c[1], c[2])]
        if len(owned) == 1:
            return owned[0][0], "placer-authority", False
        if owned:
            return None, "", True
        candidates = [c for c in candidates if not c[2]]
    if len(candidates) == 1:
        return candidates[0][0], "placer", False
    return None, "", len(candidates) > 1


def park(conn: Conn, event: Event, why: str, now: float) -> tuple[int, bool]:
    """Keep ``event`` whole until a referral claims it (auto-link) or an operator links
    it: (parked id, whether it is new; the same event from the same message parks once).
    The audit row names the kind and the reason, never the content."""
    message_id = event.message_id or None
    pid, new = store.park(
        conn,
        message_id=message_id,
        kind=event.kind,
        fingerprint=event_fingerprint(event),
        event=event_to_dict(event),
        why=why,
        sending_facility=event.ids.sending_facility,
        placer_number=event.ids.placer_number,
        filler_numbers=event.ids.filler_numbers,
        now=now,
    )
    if new:
        audit_store.append(
            conn,
            at=isoformat(now),
            actor="message",
            action="parked",
            referral_id=None,
            message_id=message_id,
            detail={"kind": event.kind, "parked_id": pid, "why": why},
        )
        log.info("message %s: %s parked as %d (%s)", message_id or "-", event.kind, pid, why)
    return pid, new


# Events as JSON: parked events are stored whole so that linking re-applies them.

_NESTED: Final[dict[str, type]] = {"Provider": Provider, "PatientContact": PatientContact}


def event_to_dict(event: Event | states.InternalEvent) -> dict[str, Any]:
    data = to_plain(event)
    data["kind"] = event.kind
    return data


def event_from_dict(data: Mapping[str, Any]) -> Event:
    """Rebuild a model event from :func:`event_to_dict` output."""
    kind = str(data.get("kind", ""))
    cls = EVENT_CLASSES.get(kind)
    if cls is None:
        raise StoreError(f"stored event has an unknown kind {kind!r}")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init or f.name not in data:
            continue
        value = data[f.name]
        if f.name == "ids":
            value = Identifiers(
                sending_facility=str(value.get("sending_facility", "")),
                placer_number=str(value.get("placer_number", "")),
                filler_numbers=tuple(value.get("filler_numbers", ())),
                patient_ids=tuple(value.get("patient_ids", ())),
                specialty=str(value.get("specialty", "")),
                placer_authority=str(value.get("placer_authority", "")),
            )
        elif isinstance(value, dict) and str(f.type) in _NESTED:
            value = _NESTED[str(f.type)](**value)
        kwargs[f.name] = value
    return cls(**kwargs)
