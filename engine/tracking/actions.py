"""Operator actions on referrals: close by hand, link a parked event, record a
prior-authorization outcome. Each opens its own transaction and applies through the
tracker, so an operator's event is recorded, audited and has its effects exactly like a
message's (engine.tracking.tracker mixes :class:`OperatorActions` in).

Used by ``refloop referrals close|decide-auth``, ``refloop parked link`` and the JSON API.
"""

from __future__ import annotations

from typing import Final, Protocol

from engine.clock import Clock
from engine.errors import StoreError
from engine.model import Event, Identifiers, PriorAuthDecided
from engine.store import referrals as store
from engine.store.db import Database
from engine.store.referrals import Conn
from engine.tracking import states
from engine.tracking.correlate import event_from_dict
from engine.tracking.result import ApplyResult, Source

AUTH_OUTCOMES: Final = ("pending", "approved", "denied")


class _Applies(Protocol):
    """What the operator actions need of the tracker."""

    @property
    def db(self) -> Database: ...

    @property
    def clock(self) -> Clock: ...

    def _apply_to(
        self,
        conn: Conn,
        rid: int,
        event: Event | states.InternalEvent,
        source: Source,
        actor: str,
        now: float,
        how: str,
        *,
        parked_id: int | None = None,
    ) -> ApplyResult: ...


class OperatorActions:
    """``close``, ``link`` and ``decide_auth``: methods of the tracker."""

    def close(
        self: _Applies,
        referral_id: int,
        reason: states.CloseReason,
        note: str = "",
        actor: str = "operator",
    ) -> ApplyResult:
        """Close a referral by hand with a reason from ``states.CLOSE_REASONS``. The note
        is kept with the referral, never in the audit log."""
        with self.db.transaction() as conn:
            now = self.clock.now()
            event = states.InternalEvent(
                "closed-by-operator", occurred_at=now, reason=reason, note=note
            )
            return self._apply_to(conn, referral_id, event, "operator", actor, now, "operator")

    def link(
        self: _Applies, parked_id: int, referral_id: int, actor: str = "operator"
    ) -> ApplyResult:
        """Apply a parked event to the referral an operator chose, and mark it linked."""
        with self.db.transaction() as conn:
            now = self.clock.now()
            parked = store.get_parked(conn, parked_id)
            if parked is None:
                raise StoreError(f"no parked event with id {parked_id}")
            if parked.status == "expired":
                raise StoreError(
                    f"parked event {parked_id} expired under the retention policy: "
                    "its event data was pruned"
                )
            if parked.status != "parked":
                raise StoreError(
                    f"parked event {parked_id} is already linked to referral {parked.referral_id}"
                )
            event = event_from_dict(parked.event)
            result = self._apply_to(
                conn, referral_id, event, "link", actor, now, "link", parked_id=parked_id
            )
            store.mark_linked(conn, parked_id, referral_id, actor, now)
            return result

    def decide_auth(
        self: _Applies,
        referral_id: int,
        outcome: str,
        actor: str = "operator",
        auth_number: str = "",
    ) -> ApplyResult:
        """Record a prior-authorization outcome (``pending``, ``approved``, ``denied``)
        given by an operator."""
        if outcome not in AUTH_OUTCOMES:
            raise StoreError(f"unknown prior-auth outcome {outcome!r}")
        with self.db.transaction() as conn:
            now = self.clock.now()
            event = PriorAuthDecided(
                ids=Identifiers(), occurred_at=now, outcome=outcome, auth_number=auth_number
            )
            return self._apply_to(conn, referral_id, event, "operator", actor, now, "operator")
