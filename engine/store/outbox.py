"""The outbox as the dispatcher sees it: claiming due rows, recording results, dead
letters, operator retries, delivery statuses, the SMS suppression list and inbound
replies. Rows are written by the tracker and the timers (``engine.store.referrals``
``enqueue_outbox``); everything after that lives here.

Row lifecycle (``outbox.status``)::

    pending ──claim──► sending ──sent──► sent
       ▲                  │
       └──retry (due)─────┤──max attempts / not retryable──► dead ──operator retry──► pending
                          └──(lease expired) reap_expired ──► pending
    pending | dead ──cancel──► cancelled

Claims are leases: a claim writes ``claimed_by`` (the node) and ``lease_until``, and
``attempts`` (one more per claim) is the fencing token. A result is recorded only by the
holder of that claim (``... AND claimed_by = ? AND attempts = ?``): a node whose lease
expired and whose row was claimed again records nothing (the caller counts it as a lost
lease). The holder renews the lease while its send runs; any node returns a ``sending``
row whose lease expired to ``pending`` (``reap_expired``): its node died mid-send.

Per-referral order: a row is claimable only when no earlier row (lower id) of the same
referral on the same channel is ``pending`` and no row of it on that channel is
``sending``; the partial unique index ``outbox_one_in_flight`` (referral, channel) WHERE
``sending`` backs this: at most one row per referral and channel in flight. Streams on different
channels (the specialist's packet by fax, the patient's nudges by SMS, a coordinator task
on the task queue) never hold each other up. A ``dead`` or ``cancelled`` row does
not hold back the rows after it (a dead row is bounded by max attempts, not forever).

Plain functions over an open connection, called inside the caller's transaction;
nothing here commits. Only this package runs SQL.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from engine.store.referrals import Conn
from engine.store.sql import Schema, for_update

OutboxStatus = Literal["pending", "sending", "sent", "dead", "cancelled"]
OUTBOX_STATUSES: Final[tuple[OutboxStatus, ...]] = (
    "pending",
    "sending",
    "sent",
    "dead",
    "cancelled",
)
ACTIVE: Final = ("pending", "sending")

_SCHEMA: Final = (
    "ALTER TABLE outbox ADD COLUMN recipient TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE outbox ADD COLUMN last_error TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE outbox ADD COLUMN provider_id TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE outbox ADD COLUMN provider_status TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE outbox ADD COLUMN claimed_at REAL",
    "ALTER TABLE outbox ADD COLUMN sent_at REAL",
    "ALTER TABLE outbox ADD COLUMN dead_at REAL",
    "CREATE INDEX outbox_channel_due ON outbox (channel, status, due)",
    "CREATE INDEX outbox_provider ON outbox (channel, provider_id)",
    "CREATE INDEX outbox_recipient ON outbox (channel, recipient, id)",
    """CREATE TABLE suppressed_numbers (
        number TEXT PRIMARY KEY,           -- E.164
        reason TEXT NOT NULL,              -- stop | provider-opt-out
        since REAL NOT NULL
    )""",
    """CREATE TABLE sms_replies (
        message_sid TEXT PRIMARY KEY,      -- Twilio MessageSid: webhook retries dedupe on it
        from_number TEXT NOT NULL,
        keyword TEXT NOT NULL,             -- stop | start | help | yes | other
        body TEXT NOT NULL,                -- the patient's text: PHI, never logged
        referral_id INTEGER,
        received_at REAL NOT NULL
    )""",
)


def migrate(db: Schema) -> None:
    """Schema: appended to ``engine.store.migrations.MIGRATIONS`` (after the referral tables)."""
    for statement in _SCHEMA:
        db.execute(statement)


def migrate_leases(db: Schema) -> None:
    """Claims become leases (issue 17): ``claimed_by`` (the node id) and ``lease_until``
    (epoch seconds). Rows ``sending`` now were left by a daemon of an earlier version:
    their lease is over (``lease_until`` 0), so the reaper returns them at the first
    round, as the start-up recovery did. Where two rows of one referral and channel are
    ``sending`` (an operator retry of an earlier row could do that), the later ones go
    back to ``pending`` first, so the one-in-flight index can be built."""
    db.execute("ALTER TABLE outbox ADD COLUMN claimed_by TEXT NOT NULL DEFAULT ''")
    db.execute("ALTER TABLE outbox ADD COLUMN lease_until REAL")
    db.execute(
        "UPDATE outbox SET status = 'pending', "
        "last_error = 'interrupted: the daemon stopped while sending' "
        "WHERE status = 'sending' AND referral_id IS NOT NULL AND EXISTS (SELECT 1 FROM outbox p "
        "WHERE p.status = 'sending' AND p.referral_id = outbox.referral_id "
        "AND p.channel = outbox.channel AND p.id < outbox.id)"
    )
    db.execute("UPDATE outbox SET lease_until = 0 WHERE status = 'sending'")
    db.execute(
        "CREATE UNIQUE INDEX outbox_one_in_flight ON outbox (referral_id, channel) "
        "WHERE status = 'sending'"
    )


def migrate_message_id(db: Schema) -> None:
    """The RFC 5322 Message-ID a row goes out under (Direct packets), assigned at its
    first claim and kept across retries; '' for rows that have none (every row written
    before this column existed: their MDNs still map through ``provider_id``)."""
    db.execute("ALTER TABLE outbox ADD COLUMN message_id TEXT NOT NULL DEFAULT ''")
    db.execute("CREATE INDEX outbox_message_id ON outbox (channel, message_id)")


@dataclass(frozen=True, slots=True)
class Item:
    """One outbox row with everything dispatch and the CLI show."""

    id: int
    referral_id: int | None
    channel: str
    template: str
    payload: str
    idempotency_key: str
    due: float
    status: str
    attempts: int
    created_at: float
    updated_at: float
    recipient: str
    last_error: str
    provider_id: str
    provider_status: str
    claimed_at: float | None
    sent_at: float | None
    dead_at: float | None
    message_id: str = ""  # RFC 5322 Message-ID assigned at first claim (Direct), else ''
    claimed_by: str = ""  # the node whose claim this is ('' : never claimed)
    lease_until: float | None = None  # the claim's lease ends (epoch seconds)

    @property
    def lease(self) -> Lease:
        """The claim this row was read under: what a result is fenced on."""
        return Lease(self.claimed_by, self.attempts)

    def payload_dict(self) -> dict[str, Any]:
        try:
            data = json.loads(self.payload or "{}")
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def as_dict(self) -> dict[str, Any]:
        """For ``--json``: everything but the payload and recipient (may be PHI)."""
        return {
            "id": self.id,
            "referral_id": self.referral_id,
            "channel": self.channel,
            "template": self.template,
            "status": self.status,
            "attempts": self.attempts,
            "due": self.due,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "last_error": self.last_error,
            "provider_id": self.provider_id,
            "provider_status": self.provider_status,
            "sent_at": self.sent_at,
            "dead_at": self.dead_at,
        }


@dataclass(frozen=True, slots=True)
class Lease:
    """A claim: the node that holds it and the attempt it counted (the fencing token)."""

    node: str
    attempt: int


_COLUMNS: Final = (
    "id, referral_id, channel, template, payload, idempotency_key, due, status, attempts, "
    "created_at, updated_at, recipient, last_error, provider_id, provider_status, claimed_at, "
    "sent_at, dead_at, message_id, claimed_by, lease_until"
)


def _opt(value: Any) -> float | None:
    return None if value is None else float(value)


def _item(r: Sequence[Any]) -> Item:
    return Item(
        id=int(r[0]),
        referral_id=None if r[1] is None else int(r[1]),
        channel=str(r[2]),
        template=str(r[3]),
        payload=str(r[4]),
        idempotency_key=str(r[5]),
        due=float(r[6]),
        status=str(r[7]),
        attempts=int(r[8]),
        created_at=float(r[9]),
        updated_at=float(r[10]),
        recipient=str(r[11]),
        last_error=str(r[12]),
        provider_id=str(r[13]),
        provider_status=str(r[14]),
        claimed_at=_opt(r[15]),
        sent_at=_opt(r[16]),
        dead_at=_opt(r[17]),
        message_id=str(r[18]),
        claimed_by=str(r[19]),
        lease_until=_opt(r[20]),
    )


def for_message(conn: Conn, message_id: int) -> list[Item]:
    """The rows a route's ``send`` / ``forward`` queued for inbox message ``message_id``
    (keys ``route:<id>:<action index>``, and ``...:resend:<time>`` for a resend replay:
    engine.routing.handler), oldest first; a range on the unique key index."""
    prefix = f"route:{message_id}:"
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM outbox WHERE idempotency_key >= ? AND idempotency_key < ?",
        (prefix, prefix[:-1] + ";"),  # ';' follows ':': every key with the prefix
    ).fetchall()
    return sorted((_item(r) for r in rows), key=lambda i: i.id)  # a message's few rows


def get(conn: Conn, outbox_id: int) -> Item | None:
    r = conn.execute(f"SELECT {_COLUMNS} FROM outbox WHERE id = ?", (outbox_id,)).fetchone()
    return _item(r) if r else None


# ---------------------------------------------------------------------------
# Claiming and recording (the dispatcher)


def claim_due(
    conn: Conn, channel: str, now: float, limit: int, *, node: str = "", lease: float = 60.0
) -> list[Item]:
    """Move up to ``limit`` due ``pending`` rows of ``channel`` to ``sending`` (attempts
    + 1, ``claimed_by`` ``node``, ``lease_until`` now + ``lease`` seconds) and return
    them, oldest due first. A row whose referral has an earlier row on this channel still
    pending, or any row on it sending, is skipped, so one referral's rows go out one at a
    time in id order while different referrals go in parallel. Commit durably before
    sending. (On PostgreSQL the candidate read is ``... FOR UPDATE SKIP LOCKED``.)"""
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM outbox o WHERE {_CLAIMABLE} AND o.due <= ? "
        f"ORDER BY o.due, o.id LIMIT ?{for_update(conn, skip_locked=True)}",
        (channel, now, limit),
    ).fetchall()
    out: list[Item] = []
    for r in rows:
        conn.execute(
            "UPDATE outbox SET status = 'sending', attempts = attempts + 1, claimed_at = ?, "
            "claimed_by = ?, lease_until = ?, updated_at = ? WHERE id = ? AND status = 'pending'",
            (now, node, now + lease, now, int(r[0])),
        )
        claimed = get(conn, int(r[0]))
        if claimed is not None:
            out.append(claimed)
    return out


_CLAIMABLE: Final = (
    "o.channel = ? AND o.status = 'pending' AND NOT EXISTS (SELECT 1 FROM outbox p "
    "WHERE o.referral_id IS NOT NULL AND p.referral_id = o.referral_id "
    "AND p.channel = o.channel AND (p.status = 'sending' "
    "OR (p.status = 'pending' AND p.id < o.id)))"
)


def renew(conn: Conn, items: Sequence[Item], until: float) -> list[int]:
    """Extend the leases of ``items`` (claims this node holds, sends still running) to
    ``until``; returns the ids whose claim is no longer ours (expired and re-claimed, or
    recorded)."""
    lost: list[int] = []
    for item in items:
        cur = conn.execute(
            "UPDATE outbox SET lease_until = ? WHERE id = ? AND status = 'sending' "
            "AND claimed_by = ? AND attempts = ?",
            (until, item.id, item.claimed_by, item.attempts),
        )
        if cur.rowcount != 1:
            lost.append(item.id)
    return lost


def reap_expired(conn: Conn, now: float, keep: Sequence[int] = ()) -> list[tuple[int, str, str]]:
    """Rows ``sending`` whose lease ended before ``now`` go back to ``pending`` (due now
    at the latest): the node that claimed them died or lost the database mid-send. Their
    send may have reached the provider: the retry carries the same idempotency key
    (docs/delivery.md, "Restart"). ``keep``: ids this node is still sending (never taken
    from under its own send, however late its renewal). Returns (id, former holder)."""
    sql = (
        "UPDATE outbox SET status = 'pending', due = CASE WHEN due < ?1 THEN due ELSE ?1 END, "
        "updated_at = ?1, "
        "lease_until = NULL, last_error = 'interrupted: lease expired while sending' "
        "WHERE status = 'sending' AND lease_until < ?1"
    )
    if keep:
        sql += " AND id NOT IN (SELECT value FROM json_each(?2))"
    args: tuple[object, ...] = (now, json.dumps([int(i) for i in keep])) if keep else (now,)
    rows = conn.execute(sql + " RETURNING id, channel, claimed_by", args).fetchall()
    return [(int(r[0]), str(r[1]), str(r[2])) for r in rows]


def next_expiry(conn: Conn) -> float | None:
    """When the earliest lease of a ``sending`` row ends (the reaper's next chance)."""
    r = conn.execute("SELECT min(lease_until) FROM outbox WHERE status = 'sending'").fetchone()
    return None if r is None or r[0] is None else float(r[0])


def assign_message_ids(conn: Conn, items: Sequence[Item], new_id: Callable[[], str]) -> list[Item]:
    """Give each claimed row that has no Message-ID yet a fresh one from ``new_id`` and
    return the rows as stored. A row keeps the first one it got: a retry after an
    ambiguous failure resubmits the same Message-ID, so the MDNs of either attempt map
    back to the row. Call in the claim transaction (the id is durable before any send)."""
    out: list[Item] = []
    for item in items:
        if not item.message_id:
            conn.execute(
                "UPDATE outbox SET message_id = ? WHERE id = ? AND message_id = ''",
                (new_id(), item.id),
            )
        stored = get(conn, item.id)
        out.append(stored if stored is not None else item)
    return out


def next_due(conn: Conn, channel: str) -> float | None:
    """The earliest due time of a ``channel`` row that nothing earlier holds back (a row
    waiting behind its referral's backing-off row does not count: no busy polling)."""
    r = conn.execute(f"SELECT min(o.due) FROM outbox o WHERE {_CLAIMABLE}", (channel,)).fetchone()
    return None if r is None or r[0] is None else float(r[0])


def mark_sent(
    conn: Conn,
    outbox_id: int,
    *,
    recipient: str,
    provider_id: str,
    provider_status: str,
    now: float,
    lease: Lease | None = None,
) -> bool:
    """Record a provider's acceptance. False when the row was not ``sending`` under
    ``lease`` (nothing written: the lease was lost, or the result already recorded).
    Without ``lease`` (tools, tests) any ``sending`` row is recorded."""
    fence, fence_args = _fence(lease)
    cur = conn.execute(
        "UPDATE outbox SET status = 'sent', sent_at = ?, updated_at = ?, recipient = ?, "
        "provider_id = ?, last_error = '', "
        # a delivery callback can beat the record: keep the status it wrote
        "provider_status = CASE WHEN provider_status = '' THEN ? ELSE provider_status END "
        "WHERE id = ? AND status = 'sending'" + fence,
        (now, now, recipient, provider_id, provider_status, outbox_id, *fence_args),
    )
    return cur.rowcount == 1


def mark_retry(
    conn: Conn, outbox_id: int, *, due: float, error: str, now: float, lease: Lease | None = None
) -> bool:
    """Back to ``pending`` until ``due``; ``error`` is the reason (never PHI)."""
    fence, fence_args = _fence(lease)
    cur = conn.execute(
        "UPDATE outbox SET status = 'pending', due = ?, last_error = ?, updated_at = ? "
        "WHERE id = ? AND status = 'sending'" + fence,
        (due, error, now, outbox_id, *fence_args),
    )
    return cur.rowcount == 1


def defer(
    conn: Conn, outbox_id: int, *, due: float, reason: str, now: float, lease: Lease | None = None
) -> bool:
    """A claimed row that may not go out yet (the patient's quiet hours) back to
    ``pending`` until ``due``, giving back the attempt its claim counted."""
    fence, fence_args = _fence(lease)
    cur = conn.execute(
        # CASE, not SQLite's two-argument MAX (an aggregate only, on PostgreSQL)
        "UPDATE outbox SET status = 'pending', due = ?, "
        "attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END, "
        "last_error = ?, updated_at = ? WHERE id = ? AND status = 'sending'" + fence,
        (due, reason, now, outbox_id, *fence_args),
    )
    return cur.rowcount == 1


def mark_dead(
    conn: Conn, outbox_id: int, *, error: str, now: float, lease: Lease | None = None
) -> bool:
    fence, fence_args = _fence(lease)
    cur = conn.execute(
        "UPDATE outbox SET status = 'dead', dead_at = ?, last_error = ?, updated_at = ? "
        "WHERE id = ? AND status = 'sending'" + fence,
        (now, error, now, outbox_id, *fence_args),
    )
    return cur.rowcount == 1


def mark_skipped(
    conn: Conn, outbox_id: int, *, reason: str, now: float, lease: Lease | None = None
) -> bool:
    """Cancel a claimed row that must not be sent (no consent, suppressed number)."""
    fence, fence_args = _fence(lease)
    cur = conn.execute(
        "UPDATE outbox SET status = 'cancelled', last_error = ?, updated_at = ? "
        "WHERE id = ? AND status = 'sending'" + fence,
        (reason, now, outbox_id, *fence_args),
    )
    return cur.rowcount == 1


def _fence(lease: Lease | None) -> tuple[str, tuple[object, ...]]:
    if lease is None:
        return "", ()
    return " AND claimed_by = ? AND attempts = ?", (lease.node, lease.attempt)


# ---------------------------------------------------------------------------
# Operator actions (CLI)


def retry(conn: Conn, outbox_id: int, now: float) -> Item:
    """Make a ``dead`` (or waiting ``pending``) row due now with a fresh attempt budget.
    Raises ValueError for a row that is sent, sending or cancelled, or unknown."""
    item = get(conn, outbox_id)
    if item is None:
        raise ValueError(f"no outbox item {outbox_id}")
    if item.status not in ("dead", "pending"):
        raise ValueError(f"outbox item {outbox_id} is {item.status}; only dead or pending retry")
    conn.execute(
        "UPDATE outbox SET status = 'pending', due = ?, attempts = 0, updated_at = ? WHERE id = ?",
        (now, now, outbox_id),
    )
    updated = get(conn, outbox_id)
    assert updated is not None
    return updated


def retry_dead(conn: Conn, now: float, channel: str = "") -> list[int]:
    """Every dead row (of ``channel`` when given) back to ``pending``; their ids."""
    sql = "SELECT id FROM outbox WHERE status = 'dead'"
    args: list[Any] = []
    if channel:
        sql += " AND channel = ?"
        args.append(channel)
    ids = [int(r[0]) for r in conn.execute(sql + " ORDER BY id", args)]
    for outbox_id in ids:
        conn.execute(
            "UPDATE outbox SET status = 'pending', due = ?, attempts = 0, updated_at = ? "
            "WHERE id = ?",
            (now, now, outbox_id),
        )
    return ids


def cancel(conn: Conn, outbox_id: int, now: float, reason: str = "cancelled by operator") -> Item:
    """Cancel a ``pending`` or ``dead`` row. Raises ValueError otherwise (a ``sending``
    row is in flight: wait for its result)."""
    item = get(conn, outbox_id)
    if item is None:
        raise ValueError(f"no outbox item {outbox_id}")
    if item.status not in ("pending", "dead"):
        raise ValueError(f"outbox item {outbox_id} is {item.status}; only pending or dead cancel")
    conn.execute(
        "UPDATE outbox SET status = 'cancelled', last_error = ?, updated_at = ? WHERE id = ?",
        (reason, now, outbox_id),
    )
    updated = get(conn, outbox_id)
    assert updated is not None
    return updated


def list_items(
    conn: Conn,
    *,
    status: str = "",
    channel: str = "",
    referral_id: int | None = None,
    limit: int = 0,
) -> list[Item]:
    """Rows newest first, filtered; ``limit`` 0 means all."""
    where: list[str] = []
    args: list[Any] = []
    if status:
        where.append("status = ?")
        args.append(status)
    if channel:
        where.append("channel = ?")
        args.append(channel)
    if referral_id is not None:
        where.append("referral_id = ?")
        args.append(referral_id)
    sql = f"SELECT {_COLUMNS} FROM outbox"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY id DESC"
    if limit:
        sql += " LIMIT ?"
        args.append(limit)
    return [_item(r) for r in conn.execute(sql, args).fetchall()]


@dataclass(frozen=True, slots=True)
class ChannelStats:
    channel: str
    depth: int  # pending + sending
    oldest_age: float  # seconds since the oldest pending/sending row was created (0: none)
    dead: int


def stats(conn: Conn, now: float) -> list[ChannelStats]:
    """Per channel: queue depth, age of the oldest queued row, dead rows."""
    # The dispatcher calls this after every round: the channels come by index seeks (one
    # per channel, the next name after the last) and each count reads only the channel's
    # queued or dead rows, never the sent history (a GROUP BY over the table read all of
    # it, several million rows, on each round).
    rows = conn.execute(
        "WITH RECURSIVE channels (name) AS (SELECT min(channel) FROM outbox UNION ALL "
        "SELECT (SELECT min(channel) FROM outbox WHERE channel > name) FROM channels "
        "WHERE name IS NOT NULL) "
        "SELECT name, "
        "(SELECT count(*) FROM outbox WHERE channel = name AND status IN ('pending', 'sending')), "
        "(SELECT min(created_at) FROM outbox "
        "WHERE channel = name AND status IN ('pending', 'sending')), "
        "(SELECT count(*) FROM outbox WHERE channel = name AND status = 'dead') "
        "FROM channels WHERE name IS NOT NULL ORDER BY name"
    ).fetchall()
    return [
        ChannelStats(
            channel=str(r[0]),
            depth=int(r[1] or 0),
            oldest_age=max(0.0, now - float(r[2])) if r[2] is not None else 0.0,
            dead=int(r[3] or 0),
        )
        for r in rows
    ]


# ---------------------------------------------------------------------------
# Delivery statuses (provider callbacks)


def find_by_message_id(conn: Conn, channel: str, message_id: str) -> Item | None:
    """The ``channel`` row sent under RFC 5322 ``message_id`` (the value stored with the
    row, never recomputed); rows from before the ``message_id`` column (and channels that
    report the Message-ID as their provider id) are found by ``provider_id``."""
    if not message_id:
        return None
    r = conn.execute(
        f"SELECT {_COLUMNS} FROM outbox WHERE channel = ? AND message_id = ? "
        "ORDER BY id DESC LIMIT 1",
        (channel, message_id),
    ).fetchone()
    return _item(r) if r else find_by_provider_id(conn, channel, message_id)


def find_by_provider_id(conn: Conn, channel: str, provider_id: str) -> Item | None:
    if not provider_id:
        return None
    r = conn.execute(
        f"SELECT {_COLUMNS} FROM outbox WHERE channel = ? AND provider_id = ? "
        "ORDER BY id DESC LIMIT 1",
        (channel, provider_id),
    ).fetchone()
    return _item(r) if r else None


def set_provider_status(conn: Conn, outbox_id: int, status: str, now: float) -> None:
    """Write a delivery status (the caller has checked it moves forward)."""
    conn.execute(
        "UPDATE outbox SET provider_status = ?, updated_at = ? WHERE id = ?",
        (status, now, outbox_id),
    )


def id_for_key(conn: Conn, idempotency_key: str) -> int | None:
    r = conn.execute(
        "SELECT id FROM outbox WHERE idempotency_key = ?", (idempotency_key,)
    ).fetchone()
    return None if r is None else int(r[0])


def last_referral_texted(conn: Conn, channel: str, number: str) -> int | None:
    """The referral of the latest row sent (or being sent) to ``number`` on ``channel``:
    how a patient's SMS reply finds its referral."""
    r = conn.execute(
        "SELECT referral_id FROM outbox WHERE channel = ? AND recipient = ? "
        "AND referral_id IS NOT NULL AND status IN ('sent', 'sending') ORDER BY id DESC LIMIT 1",
        (channel, number),
    ).fetchone()
    return None if r is None else int(r[0])


# ---------------------------------------------------------------------------
# SMS suppression list and replies


def suppress(conn: Conn, number: str, reason: str, now: float) -> bool:
    """Put ``number`` on the list; False when it already was."""
    cur = conn.execute(
        "INSERT INTO suppressed_numbers (number, reason, since) VALUES (?, ?, ?) "
        "ON CONFLICT DO NOTHING",
        (number, reason, now),
    )
    return cur.rowcount == 1


def unsuppress(conn: Conn, number: str) -> bool:
    cur = conn.execute("DELETE FROM suppressed_numbers WHERE number = ?", (number,))
    return cur.rowcount == 1


def is_suppressed(conn: Conn, number: str) -> bool:
    r = conn.execute("SELECT 1 FROM suppressed_numbers WHERE number = ?", (number,)).fetchone()
    return r is not None


def record_reply(
    conn: Conn,
    *,
    message_sid: str,
    from_number: str,
    keyword: str,
    body: str,
    referral_id: int | None,
    now: float,
) -> bool:
    """Keep an inbound SMS; False when this MessageSid was already recorded (a webhook
    retry: do nothing again)."""
    cur = conn.execute(
        "INSERT INTO sms_replies (message_sid, from_number, keyword, body, "
        "referral_id, received_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        (message_sid, from_number, keyword, body, referral_id, now),
    )
    return cur.rowcount == 1


# the outbox page of the dashboard (engine.store.worklist.outbox_page) reads rows as these do
COLUMNS: Final = _COLUMNS
item_of = _item
