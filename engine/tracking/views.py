"""Read views of referrals for the CLI and the JSON API: JSON-able dicts of summaries,
one referral in full (details, prior auth, timers, outbox, timeline) and parked events
(ids and keys only, no message content). Read only; nothing here writes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from engine.clock import isoformat
from engine.store import referral_search, worklist
from engine.store import referrals as store
from engine.store.db import Database
from engine.store.referral_filter import ReferralFilter
from engine.tracking import states
from engine.tracking.escalation import DAY


def _referral_summary(r: store.ReferralRow) -> dict[str, Any]:
    return {
        "id": r.id,
        "sending_facility": r.sending_facility,
        "placer_number": r.placer_number,
        "filler_numbers": list(r.filler_numbers),
        "status": r.status,
        "patient_status": r.patient_status,
        "specialist_status": r.specialist_status,
        "specialty": r.details.get("specialty") or "",
        "priority": r.details.get("priority") or "",
        "opened_at": isoformat(r.opened_at),
        "updated_at": isoformat(r.updated_at),
        "closed_at": isoformat(r.closed_at) if r.closed_at is not None else None,
        "close_reason": r.close_reason,
    }


def list_referrals(
    db: Database,
    *,
    status: str | None = None,
    specialty: str | None = None,
    open_days_over: float | None = None,
    prior_auth: str | None = None,
    limit: int = 50,
    now: float,
) -> list[dict[str, Any]]:
    """Referral summaries, newest first (``limit`` 0 = all)."""
    opened_before = now - open_days_over * DAY if open_days_over is not None else None
    rows = store.list_referrals(
        db.conn,
        status=status,
        specialty=specialty,
        opened_before=opened_before,
        prior_auth=prior_auth,
        limit=limit,
    )
    return [_referral_summary(r) for r in rows]


def _patient(p: referral_search.Patient | None) -> dict[str, str]:
    return {
        "patient_name": p.name if p else "",
        "patient_birth_date": p.birth_date if p else "",
        "patient_mrn": p.mrn if p else "",
    }


# ``limit`` 0 ("all") as a LIMIT both backends take: SQLite's -1 is an error on
# PostgreSQL, and a page counting rows against it (the priority sort) stopped early
ALL_ROWS = 1 << 62


def find_referrals(
    db: Database,
    *,
    q: str = "",
    status: str | None = None,
    specialty: str | None = None,
    open_days_over: float | None = None,
    prior_auth: str | None = None,
    sort: str = "-id",
    after: int | None = None,
    limit: int = 50,
    now: float,
) -> dict[str, Any]:
    """A page of referral summaries with the patient's name, birth date and MRN:
    ``items``, ``total`` matching, ``first`` and ``last`` (1-based) and ``next_after``
    (the ``after`` of the next page, or None). ``q`` is the search box of the worklist
    (engine.store.referral_search); ``limit`` 0 means all. ValueError for an unknown
    ``sort``."""
    order = referral_search.sort_of(sort, now, {})
    flt = ReferralFilter(
        status=status,
        open_only=open_days_over is not None,
        specialty=specialty,
        opened_before=now - open_days_over * DAY if open_days_over is not None else None,
        prior_auth=prior_auth,
        q=q,
    )
    found, rows = worklist.referral_page(
        db.conn, flt, order, limit=limit if limit > 0 else ALL_ROWS, after=after
    )
    people = referral_search.patients(db.conn, found.ids)
    return {
        "items": [{**_referral_summary(r), **_patient(people.get(r.id))} for r in rows],
        "total": found.total,
        "first": found.start,
        "last": found.end,
        "next_after": found.ids[-1] if found.has_next else None,
    }


def show_referral(db: Database, referral_id: int) -> dict[str, Any] | None:
    """One referral: summary, details, prior-auth item, timers, outbox and timeline."""
    conn = db.conn
    r = store.get_referral(conn, referral_id)
    if r is None:
        return None
    state = states.from_dict(r.state)
    auth = store.get_prior_auth(conn, referral_id)
    out = _referral_summary(r)
    out.update(_patient(referral_search.patients(conn, [referral_id]).get(referral_id)))
    out["patient_ids"] = list(r.patient_ids)
    out["details"] = dict(r.details)
    out["decline_reason"] = state.decline_reason
    out["close_note"] = state.close_note
    out["appointments"] = [dataclasses.asdict(a) for a in state.appointments]
    out["report_ids"] = list(state.report_ids)
    out["prior_auth"] = (
        None
        if auth is None
        else {
            "status": auth.status,
            "hold_packet": auth.hold_packet,
            "packet_held": auth.packet_held,
            "auth_number": auth.auth_number,
            "decided_by": auth.decided_by,
        }
    )
    out["timers"] = [
        {"kind": t.kind, "attempt": t.attempt, "due": isoformat(t.due)}
        for t in store.timers_for(conn, referral_id)
    ]
    out["outbox"] = [
        {"id": o.id, "channel": o.channel, "template": o.template, "status": o.status}
        for o in store.outbox_for(conn, referral_id)
    ]
    out["timeline"] = [
        {
            "id": e.id,
            "kind": e.kind,
            "occurred_at": isoformat(e.occurred_at),
            "recorded_at": isoformat(e.recorded_at),
            "source": e.source,
            "actor": e.actor,
            "message_id": e.message_id,
            "changed": e.changed,
            "status": e.status,
            "patient_status": e.patient_status,
            "specialist_status": e.specialist_status,
            "effects": list(e.effects),
            "detail": dict(e.detail),
        }
        for e in store.timeline(conn, referral_id)
    ]
    return out


def list_parked(db: Database, *, include_linked: bool = False) -> list[dict[str, Any]]:
    """Parked events: ids and keys only (no message content)."""
    return [
        {
            "id": p.id,
            "message_id": p.message_id,
            "kind": p.kind,
            "why": p.why,
            "sending_facility": p.sending_facility,
            "placer_number": p.placer_number,
            "filler_numbers": list(p.filler_numbers),
            "parked_at": isoformat(p.parked_at),
            "status": p.status,
            "referral_id": p.referral_id,
            "linked_by": p.linked_by,
        }
        for p in store.list_parked(db.conn, include_linked=include_linked)
    ]
