"""The patient-contact rotation on the outbox side: which configured channel serves each
slot of escalation's ``rotation:`` (``sms``, ``portal``, ``voice``), and where a failed
contact goes next. The timers pick the first channel (engine.tracking.escalation
``Policy.channel_for``); when a send fails for good (an undelivered SMS, a dead row), the
dispatcher and the provider webhooks call :meth:`Rotation.advance` to queue the same
message on the next slot.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from engine.canonical import canonical_json
from engine.routing.channels import rotation_slots
from engine.routing.table import ChannelSpec
from engine.store import outbox
from engine.store import referrals as referral_store
from engine.store.outbox import Item
from engine.store.referrals import Conn, ReferralRow
from engine.tracking.escalation import Policy
from engine.tracking.priority import task_priority

# Where an automated call that cannot be placed goes: a person calls (the built-in task
# queue serves ``task`` when routes.yaml gives it no worklist).
TASK_CHANNEL: Final = "task"
CALL_PATIENT_TASK: Final = "call-patient"
# The calls that ask the patient to book (a person makes them when the machine cannot);
# a reminder of a booked visit is not one.
CALL_TO_BOOK: Final = frozenset(
    {"first_nudge", "first-nudge", "second_nudge", "second-nudge", "outreach-call", "followup-call"}
)
# The rotation's own nudges: a call among them that cannot be placed becomes a task only
# with escalation ``nudge_call_task: true`` (else the 14-day step is the person's call).
NUDGES: Final = frozenset({"first_nudge", "first-nudge", "second_nudge", "second-nudge"})


@dataclass(frozen=True, slots=True)
class Rotation:
    """Which configured channel serves each rotation slot (``sms``, ``portal``,
    ``voice``; escalation ``rotation:``), and how a failed patient contact moves on.

    ``slots`` maps a slot to a channel name; by default a channel named like the slot,
    else the only channel of that type (``sms``), else none (the slot is skipped)."""

    policy: Policy = field(default_factory=Policy)
    slots: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_channels(cls, policy: Policy, channels: Mapping[str, ChannelSpec]) -> Rotation:
        return cls(policy, rotation_slots(channels))

    def slot_of(self, channel: str) -> str | None:
        for slot, name in self.slots.items():
            if name == channel:
                return slot
        return None

    def next_channel(self, channel: str, referral: ReferralRow | None) -> str | None:
        """The channel after ``channel`` in the rotation, skipping SMS (it just failed
        or may not be used) and the portal for a patient without one."""
        current = self.slot_of(channel)
        if current is None:
            return None
        order = list(self.policy.rotation)
        has_portal = referral is None or referral.details.get("portal") not in (0, False)
        start = order.index(current) + 1 if current in order else 0
        for slot in order[start:] + order[:start]:
            if slot == current or slot == "sms" or (slot == "portal" and not has_portal):
                continue
            if slot in self.slots:
                return self.slots[slot]
        return None

    def advance(
        self, conn: Conn, item: Item, referral: ReferralRow | None, reason: str, now: float
    ) -> int | None:
        """Queue ``item``'s message on the next channel of the rotation (same template,
        key ``<key>:next``: doing it twice queues it once). Returns the new row's id, or
        None when there is no next channel (the coordinator's timers take over). An
        automated call that could not be placed with nowhere else to go becomes a
        ``call-patient`` task: the person the automated call replaced calls instead."""
        nxt = self.next_channel(item.channel, referral)
        if nxt is None:
            if (
                self.slot_of(item.channel) == "voice"
                and item.template in CALL_TO_BOOK
                and (self.policy.nudge_call_task or item.template not in NUDGES)
            ) and self._worth_a_call(conn, item, referral, now):
                return self._call_task(conn, item, reason, now, referral)
            return None
        payload = item.payload_dict()
        payload.pop("to", None)  # the address belonged to the failed channel
        payload["rotated_from"] = item.channel
        payload["rotated_because"] = reason
        key = f"{item.idempotency_key}:next"
        referral_store.enqueue_outbox(
            conn,
            item.referral_id,
            nxt,
            item.template,
            canonical_json(payload),
            key,
            now,
            now=now,
        )
        return outbox.id_for_key(conn, key)

    def _worth_a_call(
        self, conn: Conn, item: Item, referral: ReferralRow | None, now: float
    ) -> bool:
        """Escalation ``call_task_min_score``: a person calls in place of the automated
        call only for a referral whose task would score at least that; else the
        timeline says why no call was queued (the mailed letter was the last contact)."""
        floor = self.policy.call_task_min_score
        if floor <= 0 or referral is None:
            return True
        score = task_priority(conn, referral, now)
        if score >= floor:
            return True
        detail = {"template": item.template, "priority_score": score, "min_score": floor}
        referral_store.insert_note(
            conn, referral, "call-task-not-queued", {**detail, "outbox": item.id}, now
        )
        return False

    def _call_task(
        self, conn: Conn, item: Item, reason: str, now: float, referral: ReferralRow | None
    ) -> int | None:
        """A coordinator task (the shared task contract) to call the patient by hand,
        with the documented priority score (docs/escalation.md, "Tasks")."""
        payload = item.payload_dict()
        score = payload.get("priority_score")
        if not isinstance(score, int | float) and referral is not None:
            score = task_priority(conn, referral, now)
        task = {
            "referral_id": item.referral_id,
            "kind": str(payload.get("kind") or item.template),
            "task": CALL_PATIENT_TASK,
            "priority_score": score if isinstance(score, int | float) else 0,
            "reason": f"the automated call was not placed ({reason}): call the patient",
            "attempts": payload.get("attempts") or [],
            "rotated_from": item.channel,
        }
        key = f"{item.idempotency_key}:call"
        referral_store.enqueue_outbox(
            conn,
            item.referral_id,
            TASK_CHANNEL,
            CALL_PATIENT_TASK,
            canonical_json(task),
            key,
            now,
            now=now,
        )
        return outbox.id_for_key(conn, key)
