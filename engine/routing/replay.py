"""Replay: run stored inbox messages through the current routes again.

A dry run opens the database read-only and writes nothing: it decides each selected
message anew and reports the old decision (from the decisions table, or the inbox row's
status and route for messages processed before it existed) beside the new one.

A real replay re-applies each message in its own transaction: the message's status and
route, its decision row, and the tracker events its old decision had not already applied
(events are compared by fingerprint, so replaying twice applies nothing the second time).
``send`` / ``forward`` side effects are not re-sent unless ``resend`` is true. Messages the
daemon has not processed yet (``received``) and messages rejected at the door are skipped:
the processor owns the first and the second were never accepted; so are messages whose
bytes retention pruned (engine.store.retention): only their metadata is left.

Each re-applied message is also written to the audit log (actor ``operator:<login>``,
action ``replayed``, old and new status/route) in its transaction.

Safe while the daemon runs: SQLite WAL, a separate connection, a busy timeout, and each
message's transaction is short.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from engine.clock import Clock, WallClock, isoformat
from engine.config import Config
from engine.errors import StoreError
from engine.model import Decision, StoredMessage
from engine.routing.compile import compile_config
from engine.routing.decide import decide_stored
from engine.routing.handler import RouteHandler, Tracker
from engine.routing.summary import canonical_actions, summarise
from engine.routing.table import RouteTable
from engine.store import Inbox, audit, open_database
from engine.store.db import has_table, is_postgres_url
from engine.store.decisions import DecisionRow, Decisions
from engine.tracking.tracker import build_tracker

log = logging.getLogger(__name__)

SKIPPED_STATUSES = ("received", "rejected")


@dataclass(frozen=True, slots=True)
class ReplayFilter:
    """Which inbox messages to replay (all given conditions must hold)."""

    ids: tuple[int, ...] = ()
    since: float | None = None
    until: float | None = None
    message_type: str | None = None  # "SIU^S12" or a wildcard "SIU^S1*"
    source: str | None = None
    status: str | None = None  # the message's current status
    route: str | None = None  # a route the message's current decision names


@dataclass(frozen=True, slots=True)
class Side:
    """One decision as the report shows it: no message content."""

    status: str
    route: str
    reason: str = ""
    events: tuple[str, ...] = ()  # "kind" per tracked event
    actions: tuple[dict[str, Any], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "route": self.route,
            "reason": self.reason,
            "events": list(self.events),
        }


@dataclass(frozen=True, slots=True)
class ReplayItem:
    message_id: int
    message_type: str
    old: Side
    new: Side | None  # None when skipped
    changed: bool
    applied: bool  # written (real replay of a changed or re-decided message)
    skipped: str = ""  # why the message was not replayed

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.message_id,
            "type": self.message_type,
            "old": self.old.as_dict(),
            "new": self.new.as_dict() if self.new else None,
            "changed": self.changed,
            "applied": self.applied,
            "skipped": self.skipped,
        }


@dataclass
class ReplaySummary:
    selected: int = 0
    changed: int = 0
    applied: int = 0
    skipped: int = 0
    items: list[ReplayItem] = field(default_factory=list)


def _old_side(row: StoredMessage, previous: DecisionRow | None) -> Side:
    if previous is None:
        return Side(row.status, row.route, row.error)
    return Side(
        previous.status,
        previous.route,
        previous.reason,
        tuple(str(a["kind"]) for a in previous.actions if a.get("action") == "track"),
        previous.actions,
    )


def _new_side(decision: Decision) -> Side:
    return Side(
        decision.status,
        decision.route,
        decision.reason,
        tuple(e.kind for e in decision.events),
        # through JSON, as the decisions table stores it (tuples become lists)
        tuple(json.loads(json.dumps(summarise(decision), sort_keys=True))),
    )


def _differs(old: Side, new: Side) -> bool:
    if (old.status, old.route, old.reason) != (new.status, new.route, new.reason):
        return True
    # without a recorded decision the old actions are unknown: the events decide
    return bool(old.actions or new.actions) and old.actions != new.actions


def select(inbox: Inbox, decisions: Decisions | None, flt: ReplayFilter) -> list[StoredMessage]:
    """The inbox rows the filter selects, oldest first."""
    rows = list(
        inbox.list(
            since=flt.since,
            until=flt.until,
            message_type=flt.message_type,
            status=flt.status,
            source=flt.source,
            ids=list(flt.ids) or None,
            limit=0,
            newest_first=False,
        )
    )
    if flt.route:
        wanted = flt.route

        def names(row: StoredMessage) -> set[str]:
            return set(row.route.split(",")) if row.route else set()

        rows = [r for r in rows if wanted in names(r)]
    return rows


def replay(
    db_path: str | Path,
    config: Config,
    flt: ReplayFilter,
    *,
    dry_run: bool = True,
    resend: bool = False,
    user: str = "",
    tracker: Tracker | None = None,
    clock: Clock | None = None,
    table: RouteTable | None = None,
    progress: Callable[[ReplayItem, int], None] | None = None,
) -> ReplaySummary:
    """Replay the selected messages through ``config``'s routes (ConfigError if they do
    not compile; StoreError if there is no database at ``db_path``). ``track`` actions
    go through ``tracker``, by default the daemon's (engine.tracking.tracker.build_tracker), in
    the transaction that records the decision. ``user`` is recorded with each
    re-applied decision. ``progress`` is called after each message with the item and
    the number of messages selected."""
    table = table or compile_config(config)
    clock = clock or WallClock()
    # never make up an empty database to replay into
    if not is_postgres_url(db_path) and not Path(db_path).exists():
        raise StoreError(f"no database at {db_path}")
    if is_postgres_url(db_path):  # nor an empty schema: the read-only open refuses one
        open_database(db_path, readonly=True).close()
    db = open_database(db_path, readonly=dry_run)
    try:
        if tracker is None and not dry_run:
            # the daemon's own tracker; its metrics go to a registry nothing scrapes
            tracker = build_tracker(
                config, db, clock, policy=table.escalation, registry=CollectorRegistry()
            )
        inbox = Inbox(db)
        decisions = Decisions(db)
        has_decisions = decisions.available()
        rows = select(inbox, decisions if has_decisions else None, flt)
        handler = RouteHandler(table, db, tracker, clock=clock)
        summary = ReplaySummary(selected=len(rows))
        for item in _run(rows, inbox, decisions, has_decisions, handler, dry_run, resend, user):
            summary.items.append(item)
            summary.changed += item.changed
            summary.applied += item.applied
            summary.skipped += bool(item.skipped)
            if progress is not None:
                progress(item, summary.selected)
        if not dry_run:
            log.info(
                "replay by %s: %d selected, %d changed, %d re-applied, %d skipped",
                user or "unknown",
                summary.selected,
                summary.changed,
                summary.applied,
                summary.skipped,
            )
        return summary
    finally:
        db.close()


def _run(
    rows: list[StoredMessage],
    inbox: Inbox,
    decisions: Decisions,
    has_decisions: bool,
    handler: Any,
    dry_run: bool,
    resend: bool,
    user: str,
    actor: str = "",
) -> Iterator[ReplayItem]:
    """Decide each row anew; re-apply it (unless ``dry_run``) when its decision changed
    or ``resend``. ``actor`` (default ``operator:<user>``) goes into the audit log."""
    audited = not dry_run and has_table(handler.db.conn, "audit")
    actor = actor or f"operator:{user or 'unknown'}"
    for row in rows:
        previous = decisions.get(row.id) if has_decisions else None
        old = _old_side(row, previous)
        if row.status in SKIPPED_STATUSES:
            why = "not processed yet" if row.status == "received" else "rejected at the door"
            yield ReplayItem(row.id, row.message_type, old, None, False, False, why)
            continue
        if row.pruned_at is not None:  # retention deleted the bytes: nothing to decide on
            why = f"bytes pruned {isoformat(row.pruned_at)[:10]} (retention)"
            yield ReplayItem(row.id, row.message_type, old, None, False, False, why)
            continue
        decision = decide_stored(handler.table, row)
        new = _new_side(decision)
        changed = _differs(replace(old, actions=canonical_actions(old.actions, decision)), new)
        if dry_run or not (changed or resend):  # --resend: send again what it sent
            yield ReplayItem(row.id, row.message_type, old, new, changed, False)
            continue
        now = handler.clock.now()
        with handler.db.transaction() as conn:
            outcome = handler.process(
                row, conn, replayed_by=user or "unknown", decision=decision, resend=resend
            )
            inbox.mark(row.id, outcome.status, error=outcome.error, route=outcome.route, now=now)
            if audited:
                audit.append(
                    conn,
                    at=isoformat(now),
                    actor=actor,
                    action="replayed",
                    referral_id=None,
                    message_id=row.id,
                    detail={
                        "old": {"status": old.status, "route": old.route},
                        "new": {"status": new.status, "route": new.route},
                        "events": list(new.events),
                        "resend": resend,
                    },
                )
        yield ReplayItem(row.id, row.message_type, old, new, True, True)


def replay_one(
    handler: RouteHandler,
    message_id: int,
    *,
    user: str,
    actor: str,
    resend: bool = False,
    dry_run: bool = False,
) -> ReplayItem | None:
    """One message through ``handler`` (the daemon's current routes, on its own
    database connection): the replay above for a single id, as the dashboard's and the
    API's *Reprocess* runs it. None when there is no such message."""
    inbox = Inbox(handler.db)
    decisions = Decisions(handler.db)
    has_decisions = decisions.available()
    rows = select(inbox, decisions if has_decisions else None, ReplayFilter(ids=(message_id,)))
    if not rows:
        return None
    run = _run(rows, inbox, decisions, has_decisions, handler, dry_run, resend, user, actor)
    return next(iter(run))
