"""Retention: what PHI is pruned when (docs/operations.md, "Retention"), in small steps.

Seven kinds, each with its own period (``retention:`` in routes.yaml, engine.config):

- ``closed-referral``: the bytes of a message that reached referrals, once every one of
  them is closed, ``closed_referral_days`` after the last of them closed;
- ``unreferred``: the bytes of a processed message of no referral (filtered, rejected,
  routed without tracking), ``unreferred_days`` after receipt; a message whose event waits
  in the parked queue is kept until that event is linked or expires;
- ``error``: the bytes of a message processing failed on, ``error_days`` after receipt
  (replay may still need them);
- ``quarantine``: quarantined Direct mail (``direct/quarantined``), after receipt;
- ``outbox``: the payload and the recipient (a phone number, fax number or address) of a
  sent or cancelled outbox row, after it finished (a dead row keeps them until an
  operator retries or cancels it);
- ``parked``: a parked event never linked, ``parked_days`` after parking: its event data
  is cleared and it is marked ``expired``;
- ``sms-reply``: the text and the phone number of a patient's SMS reply,
  ``sms_reply_days`` after receipt; its keyword, referral and time stay (the
  ``suppressed_numbers`` opt-out list is not pruned: a STOP holds until START).

A pruned message keeps its ``messages`` row (id, control id, type, status, ACK code,
received time, the SHA-256 of its bytes) with ``pruned_at`` and ``pruned_size`` set: the
audit chain and the timelines never read the bytes, so they verify and read as before.
Messages not processed yet (``received``) are never pruned.

Each step (:func:`prune_step`) is one short transaction of at most ``batch`` rows and
about :data:`STEP_SECONDS`; the caller (engine.store.pruner, ``refloop prune``) runs the
steps one after the other. Plain functions over an open connection.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import sqlite_utils

from engine.clock import isoformat
from engine.store import audit
from engine.store.sql import POSTGRESQL, Database, dialect

DAY: Final = 86400.0
STEP_SECONDS: Final = 0.002  # a step stops taking rows after this long (the processor's slice)
VACUUM_PAGES: Final = 256  # pages one incremental_vacuum step returns at first
MESSAGE_KINDS: Final = ("closed-referral", "unreferred", "error", "quarantine")
KINDS: Final = (*MESSAGE_KINDS, "outbox", "parked", "sms-reply")
TABLES: Final = ("messages", "outbox", "parked", "sms_replies")  # a run's scans, in order
QUARANTINE_TYPE: Final = "direct/quarantined"
FINISHED: Final = ("sent", "cancelled")  # outbox rows whose payload may go (not dead ones)
_OPEN: Final = 1e308  # "a referral of this message is still open"

_SCHEMA: Final = (
    "ALTER TABLE messages ADD COLUMN pruned_at REAL",  # NULL: the bytes are kept
    "ALTER TABLE messages ADD COLUMN pruned_size INTEGER",  # their length, once pruned
    # the pruner's scan: unpruned rows, oldest first (a pruned row leaves the index)
    "CREATE INDEX messages_unpruned ON messages (received_at, id) WHERE pruned_at IS NULL",
    # referral_events_message (the pruner's look-up of a message's referrals) comes with
    # the earlier _m_workbench step (engine.store.referrals.migrate_message_indexes)
    "ALTER TABLE outbox ADD COLUMN pruned_at REAL",
    "CREATE INDEX outbox_unpruned ON outbox (updated_at, id) "
    "WHERE pruned_at IS NULL AND status IN ('sent', 'cancelled')",
    "ALTER TABLE parked ADD COLUMN pruned_at REAL",
)
_REPLY_SCHEMA: Final = (
    "ALTER TABLE sms_replies ADD COLUMN pruned_at REAL",  # NULL: text and number kept
    "CREATE INDEX sms_replies_unpruned ON sms_replies (received_at, message_sid) "
    "WHERE pruned_at IS NULL",
    # outbox rows pruned before the recipient was pruned with the payload
    "UPDATE outbox SET recipient = '' WHERE pruned_at IS NOT NULL",
)


class RetentionConfig(Protocol):
    """The periods in days (None: kept forever) and the step size: the ``retention:``
    section (engine.config.RetentionConfig has these fields)."""

    @property
    def closed_referral_days(self) -> int | None: ...
    @property
    def unreferred_days(self) -> int | None: ...
    @property
    def error_days(self) -> int | None: ...
    @property
    def quarantine_days(self) -> int | None: ...
    @property
    def outbox_days(self) -> int | None: ...
    @property
    def parked_days(self) -> int | None: ...
    @property
    def sms_reply_days(self) -> int | None: ...
    @property
    def batch(self) -> int: ...
    @property
    def every_minutes(self) -> int: ...


def migrate(db: sqlite_utils.Database) -> None:
    """Schema: appended to ``engine.store.migrations.MIGRATIONS``."""
    for statement in _SCHEMA:
        db.execute(statement)


def migrate_replies(db: sqlite_utils.Database) -> None:
    """Schema: the SMS replies' ``pruned_at`` and the index the pruner scans; appended to
    ``engine.store.migrations.MIGRATIONS`` after :func:`migrate`."""
    for statement in _REPLY_SCHEMA:
        db.execute(statement)


@dataclass
class Tally:
    """Rows and bytes pruned (or, for a dry run, that would be), by kind."""

    rows: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))

    def add(self, kind: str, size: int) -> None:
        self.rows[kind] += 1
        self.bytes[kind] += size

    def merge(self, other: Tally) -> None:
        for kind in KINDS:
            self.rows[kind] += other.rows[kind]
            self.bytes[kind] += other.bytes[kind]

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {k: {"rows": self.rows[k], "bytes": self.bytes[k]} for k in KINDS}


@dataclass
class Cursor:
    """Where a run is: the next steps go on after it (one run scans each table once)."""

    messages: tuple[float, int] = (float("-inf"), 0)
    outbox: tuple[float, int] = (float("-inf"), 0)
    parked: int = 0
    replies: tuple[float, str] = (float("-inf"), "")
    done: set[str] = field(default_factory=set)  # of TABLES

    @property
    def finished(self) -> bool:
        return len(self.done) == len(TABLES)


def _cutoff(days: int | None, now: float) -> float | None:
    return None if days is None else now - days * DAY


def message_kind(
    policy: RetentionConfig,
    now: float,
    *,
    received_at: float,
    status: str,
    message_type: str,
    closed: float | None,
    parked: bool,
) -> str | None:
    """The kind under which a message's bytes are due for pruning at ``now``, or None
    when they are kept. ``closed`` is when the last of its referrals closed (``_OPEN``
    while one is open; None: it reached no referral); ``parked``: an event of it waits in
    the parked queue."""
    if status == "received":  # not processed yet: the processor still needs it
        return None
    if message_type == QUARANTINE_TYPE:
        kind, since, days = "quarantine", received_at, policy.quarantine_days
    elif closed is not None:
        if closed >= _OPEN:
            return None
        kind, since, days = "closed-referral", closed, policy.closed_referral_days
    elif parked:
        return None
    elif status == "error":
        kind, since, days = "error", received_at, policy.error_days
    else:
        kind, since, days = "unreferred", received_at, policy.unreferred_days
    if days is None or since > now - days * DAY:
        return None
    return kind


def _horizon(policy: RetentionConfig, now: float) -> float | None:
    """No message received after this is due under any kind (a referral closes after
    its messages arrive)."""
    days = [
        d
        for d in (
            policy.closed_referral_days,
            policy.unreferred_days,
            policy.error_days,
            policy.quarantine_days,
        )
        if d is not None
    ]
    return now - min(days) * DAY if days else None


# (``+p.status``: look the message's parked rows up by message id, not every parked row)
_CANDIDATES: Final = f"""
SELECT m.id, m.received_at, m.status, m.message_type,
  (SELECT max(CASE WHEN r.status = 'closed' AND r.closed_at IS NOT NULL
                   THEN r.closed_at ELSE {_OPEN} END)
     FROM referral_events e JOIN referrals r ON r.id = e.referral_id
    WHERE e.message_id = m.id),
  EXISTS (SELECT 1 FROM parked p WHERE p.message_id = m.id AND +p.status = 'parked'),
  (SELECT length(raw) FROM message_raw WHERE message_id = m.id)
FROM messages m INDEXED BY messages_unpruned
WHERE m.pruned_at IS NULL AND m.received_at <= ? AND (m.received_at, m.id) > (?, ?)
ORDER BY m.received_at, m.id LIMIT ?
"""


def _message_candidates(
    conn: Any, policy: RetentionConfig, now: float, after: tuple[float, int], limit: int
) -> Iterator[tuple[tuple[float, int], str | None, int]]:
    """(scan key, kind or None, size of the bytes) of the next unpruned messages."""
    horizon = _horizon(policy, now)
    if horizon is None:
        return
    for r in conn.execute(_CANDIDATES, (horizon, after[0], after[1], limit)).fetchall():
        kind = message_kind(
            policy,
            now,
            received_at=float(r[1]),
            status=str(r[2]),
            message_type=str(r[3]),
            closed=None if r[4] is None else float(r[4]),
            parked=bool(r[5]),
        )
        yield (float(r[1]), int(r[0])), kind, int(r[6] or 0)


def _outbox_candidates(
    conn: Any, policy: RetentionConfig, now: float, after: tuple[float, int], limit: int
) -> list[tuple[float, int, int]]:
    """(updated_at, id, length of payload and recipient) of finished outbox rows due."""
    cutoff = _cutoff(policy.outbox_days, now)
    if cutoff is None:
        return []
    rows = conn.execute(
        "SELECT updated_at, id, length(payload) + length(recipient) "
        "FROM outbox INDEXED BY outbox_unpruned "
        "WHERE pruned_at IS NULL AND status IN ('sent', 'cancelled') "
        "AND updated_at <= ? AND (updated_at, id) > (?, ?) ORDER BY updated_at, id LIMIT ?",
        (cutoff, after[0], after[1], limit),
    ).fetchall()
    return [(float(r[0]), int(r[1]), int(r[2] or 0)) for r in rows]


def _parked_candidates(
    conn: Any, policy: RetentionConfig, now: float, after: int, limit: int
) -> list[tuple[int, int]]:
    """(id, event length) of parked events never linked and due."""
    cutoff = _cutoff(policy.parked_days, now)
    if cutoff is None:
        return []
    rows = conn.execute(
        "SELECT id, length(event) FROM parked WHERE status = 'parked' AND id > ? "
        "AND parked_at <= ? ORDER BY id LIMIT ?",
        (after, cutoff, limit),
    ).fetchall()
    return [(int(r[0]), int(r[1] or 0)) for r in rows]


def _reply_candidates(
    conn: Any, policy: RetentionConfig, now: float, after: tuple[float, str], limit: int
) -> list[tuple[float, str, int]]:
    """(received_at, message sid, length of text and number) of SMS replies due."""
    cutoff = _cutoff(policy.sms_reply_days, now)
    if cutoff is None:
        return []
    rows = conn.execute(
        "SELECT received_at, message_sid, length(body) + length(from_number) FROM sms_replies "
        "WHERE pruned_at IS NULL AND received_at <= ? AND (received_at, message_sid) > (?, ?) "
        "ORDER BY received_at, message_sid LIMIT ?",
        (cutoff, after[0], after[1], limit),
    ).fetchall()
    return [(float(r[0]), str(r[1]), int(r[2] or 0)) for r in rows]


def _prune_message(conn: Any, message_id: int, size: int, now: float) -> None:
    conn.execute("DELETE FROM message_raw WHERE message_id = ?", (message_id,))
    conn.execute(
        "UPDATE messages SET pruned_at = ?, pruned_size = ? WHERE id = ?",
        (now, size, message_id),
    )


def prune_step(
    db: Database,
    policy: RetentionConfig,
    now: float,
    cursor: Cursor,
    *,
    dry_run: bool = False,
    budget: float = STEP_SECONDS,
) -> Tally:
    """One short transaction: prune up to ``policy.batch`` rows of the first table the run
    has not finished (:data:`TABLES`, in order), for about ``budget`` seconds; ``cursor``
    moves past what was looked at. ``dry_run`` counts without writing (and without a
    transaction). Returns what it pruned; the run is over when ``cursor.finished``."""
    tally = Tally()
    if dry_run:
        _step(db.conn, policy, now, cursor, tally, None, write=False)
        return tally
    # deleted bytes are overwritten with zeros where that costs no extra I/O (in the
    # pages written anyway); freed pages are overwritten or cut off by the vacuum
    if dialect(db) != POSTGRESQL:  # the file's pages; PostgreSQL's are the server's
        db.conn.execute("PRAGMA secure_delete = FAST")
    with _no_autocheckpoint(db), db.transaction(durable=False) as conn:
        _step(conn, policy, now, cursor, tally, time.perf_counter() + budget, write=True)
    return tally


@contextlib.contextmanager
def _no_autocheckpoint(db: Database) -> Iterator[None]:
    """No WAL checkpoint inside this commit: SQLite would run it in the COMMIT (tens of
    ms with its fsyncs) while the step holds the write lock. The caller checkpoints off
    the lock instead (:func:`checkpoint`). Nothing on PostgreSQL."""
    if dialect(db) == POSTGRESQL:
        yield
        return
    # the daemon's connections have it off already (engine.store.checkpoint): restore
    # what was set, not SQLite's default
    before = int(db.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0])
    db.conn.execute("PRAGMA wal_autocheckpoint = 0")
    try:
        yield
    finally:
        db.conn.execute(f"PRAGMA wal_autocheckpoint = {before}")


def _step(
    conn: Any,
    policy: RetentionConfig,
    now: float,
    cursor: Cursor,
    tally: Tally,
    deadline: float | None,
    *,
    write: bool,
) -> None:
    limit = policy.batch

    def late() -> bool:
        return deadline is not None and time.perf_counter() >= deadline

    if "messages" not in cursor.done:
        # a scan reads more rows than it prunes (rows kept are passed over)
        seen = 0
        for key, kind, size in _message_candidates(conn, policy, now, cursor.messages, limit):
            seen += 1
            cursor.messages = key
            if kind is not None:
                if write:
                    _prune_message(conn, key[1], size, now)
                tally.add(kind, size)
            if late():
                return
        if seen < limit:
            cursor.done.add("messages")
        return
    if "outbox" not in cursor.done:
        rows = _outbox_candidates(conn, policy, now, cursor.outbox, limit)
        for updated_at, row_id, size in rows:
            cursor.outbox = (updated_at, row_id)
            if write:
                conn.execute(
                    "UPDATE outbox SET payload = '{}', recipient = '', pruned_at = ? WHERE id = ?",
                    (now, row_id),
                )
            tally.add("outbox", size)
            if late():
                return
        if len(rows) < limit:
            cursor.done.add("outbox")
        return
    if "parked" not in cursor.done:
        parked = _parked_candidates(conn, policy, now, cursor.parked, limit)
        for row_id, size in parked:
            cursor.parked = row_id
            if write:
                conn.execute(
                    "UPDATE parked SET status = 'expired', event = '{}', pruned_at = ? "
                    "WHERE id = ?",
                    (now, row_id),
                )
            tally.add("parked", size)
            if late():
                return
        if len(parked) < limit:
            cursor.done.add("parked")
        return
    if "sms_replies" not in cursor.done:
        replies = _reply_candidates(conn, policy, now, cursor.replies, limit)
        for received_at, sid, size in replies:
            cursor.replies = (received_at, sid)
            if write:
                conn.execute(
                    "UPDATE sms_replies SET body = '', from_number = '', pruned_at = ? "
                    "WHERE message_sid = ?",
                    (now, sid),
                )
            tally.add("sms-reply", size)
            if late():
                return
        if len(replies) < limit:
            cursor.done.add("sms_replies")


def plan(db: Database, policy: RetentionConfig, now: float) -> Tally:
    """What a run at ``now`` would prune (``refloop prune --dry-run``); writes nothing."""
    tally = Tally()
    cursor = Cursor()
    while not cursor.finished:
        tally.merge(prune_step(db, policy, now, cursor, dry_run=True))
    return tally


def prune_now(
    db: Database, policy: RetentionConfig, now: float, *, actor: str, pause: float = 1.0
) -> Tally:
    """A whole run in this thread (``refloop prune``, beside a running daemon or not):
    the steps of :func:`prune_step`, each followed by a checkpoint and a pause ``pause``
    times as long as both took (the daemon's writers get their turn), then the audit row."""
    tally = Tally()
    cursor = Cursor()
    while not cursor.finished:
        started = time.perf_counter()
        tally.merge(prune_step(db, policy, now, cursor))
        checkpoint(db.path)  # here, not in the daemon's next commit
        time.sleep((time.perf_counter() - started) * pause)
    record(db, tally, now, actor=actor)
    return tally


def record(db: Database, tally: Tally, now: float, *, actor: str) -> None:
    """The audit row of a run that pruned something: action ``pruned``, the rows and
    bytes by kind (no ids, no content)."""
    if not tally.total_rows:
        return
    detail = {k: v for k, v in tally.as_dict().items() if v["rows"]}
    with db.transaction() as conn:
        audit.append(
            conn,
            at=isoformat(now),
            actor=actor,
            action="pruned",
            referral_id=None,
            message_id=None,
            detail=detail,
        )


# -- space -------------------------------------------------------------------------


def auto_vacuum(db: Database) -> str:
    """The file's ``auto_vacuum`` mode: none, full or incremental; ``server`` on
    PostgreSQL, whose autovacuum makes the space of deleted rows reusable."""
    if dialect(db) == POSTGRESQL:
        return "server"
    mode = int(db.conn.execute("PRAGMA auto_vacuum").fetchone()[0])
    return {0: "none", 1: "full", 2: "incremental"}.get(mode, str(mode))


def free_bytes(db: Database) -> int:
    """Bytes of free pages in the file (returned to the filesystem by a vacuum); 0 on
    PostgreSQL (no file of ours)."""
    if dialect(db) == POSTGRESQL:
        return 0
    pages = int(db.conn.execute("PRAGMA freelist_count").fetchone()[0])
    return pages * page_size(db)


def page_size(db: Database) -> int:
    return int(db.conn.execute("PRAGMA page_size").fetchone()[0])


def vacuum_step(db: Database, pages: int) -> int:
    """Return up to ``pages`` free pages to the filesystem (``incremental_vacuum``) in one
    short transaction; the number of free pages left. On a file without
    ``auto_vacuum=INCREMENTAL`` this does nothing (see :func:`vacuum_full`)."""
    # Each step of the statement frees one page, and execute() steps a statement without
    # result columns only once; executescript steps it to the end, in its own transaction
    # (it commits an open one first, so it cannot run inside db.transaction()).
    db.durability(durable=False)
    with _no_autocheckpoint(db):
        db.conn.executescript(f"PRAGMA incremental_vacuum({int(pages)})")
    return int(db.conn.execute("PRAGMA freelist_count").fetchone()[0])


def checkpoint(path: str) -> None:
    """A passive WAL checkpoint on a connection of its own (a worker thread's): it copies
    what the steps wrote into the file and fsyncs it off the inbox writer's path, which
    would otherwise pay for it at its next commit (the ACK waiting)."""
    if path in ("", ":memory:"):
        return
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    finally:
        conn.close()


def vacuum_all(db: Database, *, pages: int = 4096, pause: float = 1.0) -> None:
    """Return every free page (``refloop prune``): :func:`vacuum_step` until none is left,
    each followed by a pause ``pause`` times as long as it took, then a checkpoint so the
    file itself shrinks. Nothing on a file without ``auto_vacuum=INCREMENTAL``."""
    if auto_vacuum(db) != "incremental":
        return
    left = -1
    while left:
        started = time.perf_counter()
        now_left = vacuum_step(db, pages)
        checkpoint(db.path)
        if now_left == left:
            break
        left = now_left
        time.sleep((time.perf_counter() - started) * pause)


def vacuum_full(db: Database) -> None:
    """Switch the file to ``auto_vacuum=INCREMENTAL`` and rewrite it (``VACUUM``): once per
    file made before refloop set it (``refloop prune --vacuum``, daemon stopped). Needs
    free disk space about the size of the file while it runs."""
    db.conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    db.conn.execute("VACUUM")
    db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
