"""A coordinator task's ``priority_score`` for a referral as it stands (docs/escalation.md,
"Tasks"): urgency, age, failed patient contacts and the needed-by date, scored by
:func:`engine.tracking.escalation.coordinator_priority`. Every task refloop queues carries
it: the timers' tasks, the packet task at creation, and the call task that replaces an
automated call that could not be placed."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

from engine.clock import parse_iso
from engine.store import timers as timer_store
from engine.store.referrals import Conn, ReferralRow
from engine.tracking.escalation import DAY, coordinator_priority

# A patient contact of the rotation (its place counts): the nudges and the call task.
NUDGE_TEMPLATES: Final = ("first_nudge", "second_nudge", "call-patient")


def task_priority(conn: Conn, referral: ReferralRow, now: float) -> int:
    """The 0–100 score of a task for ``referral`` queued at ``now``."""
    sent = timer_store.nudges_sent(conn, referral.id, NUDGE_TEMPLATES)
    return task_priority_of(referral.opened_at, referral.details, sent, now)


def task_priority_of(
    opened_at: float,
    details: Mapping[str, Any],
    sent: Iterable[tuple[str, str]],
    now: float,
) -> int:
    """:func:`task_priority` from what the caller has in hand: the referral's opening
    time and details, and its patient contacts so far (``nudges_sent``)."""
    return coordinator_priority(
        days_open=max(0.0, now - opened_at) / DAY,
        priority=str(details.get("priority") or ""),
        failed_contacts=sum(1 for _c, status in sent if status == "dead"),
        needed_by_days=days_until(str(details.get("needed_by") or ""), now),
    )


def days_until(iso_date: str, now: float) -> float | None:
    """Days from ``now`` to an ISO date (negative once past); None when absent or bad."""
    if not iso_date:
        return None
    try:
        return (parse_iso(iso_date[:10]) - now) / DAY
    except ValueError:
        return None
