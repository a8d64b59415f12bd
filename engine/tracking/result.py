"""What applying one event did: :class:`ApplyResult`, returned by every entry point of the
tracker (engine.tracking.tracker) and of the operator actions (engine.tracking.actions)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Outcome = Literal["applied", "unchanged", "duplicate", "parked", "merged", "dropped"]
# Who an applied event came from: a message, an operator, refloop itself, a (re)link.
Source = Literal["message", "operator", "internal", "link"]


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What one :meth:`Tracker.apply` did.

    ``outcome``: ``applied`` (the referral's state or prior-auth item moved),
    ``unchanged`` (recorded in the timeline, nothing moved), ``duplicate`` (this event
    from this message was already recorded: nothing written), ``parked`` (no referral
    matched), ``merged`` (a patient merge; ``referral_ids`` are the referrals moved),
    ``dropped`` (a contact update for a patient with no open referral: counted, not kept).
    ``how`` names the correlation step that matched (key, placer-authority, placer,
    filler, patient-window, patient, created, link, operator, merge). ``linked`` are
    parked events that were applied to the referral as a consequence.
    """

    outcome: Outcome
    referral_ids: tuple[int, ...] = ()
    parked_id: int | None = None
    status: str = ""
    effects: tuple[str, ...] = ()
    how: str = ""
    linked: tuple[int, ...] = ()

    @property
    def referral_id(self) -> int | None:
        return self.referral_ids[0] if self.referral_ids else None
