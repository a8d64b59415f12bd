"""Timer rows: reading them into the wheel, claiming one to fire, moving one.

The rows are written by the tracker (``referrals.schedule_timer`` / ``cancel_timers``) in
the transactions that make them necessary or moot; this module is what the timer service
reads. Nothing here commits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engine.store.referrals import Conn, TimerRow

_COLUMNS = "id, referral_id, kind, due, attempt, key"
_CHUNK = 500  # ids per statement


def _timer(r: tuple[Any, ...]) -> TimerRow:
    return TimerRow(int(r[0]), int(r[1]), str(r[2]), float(r[3]), int(r[4]), str(r[5]))


def due_until(conn: Conn, until: float, *, after: float | None = None) -> list[tuple[int, float]]:
    """(id, due) of timers due at or before ``until`` (and after ``after``), in due order."""
    if after is None:
        rows = conn.execute(
            "SELECT id, due FROM timers WHERE due <= ? ORDER BY due, id", (until,)
        ).fetchall()
    else:
        rows = conn.execute(
            "SELECT id, due FROM timers WHERE due > ? AND due <= ? ORDER BY due, id",
            (after, until),
        ).fetchall()
    return [(int(r[0]), float(r[1])) for r in rows]


def unloaded(conn: Conn) -> list[tuple[int, float]]:
    """(id, due) of timers the wheel has not read yet (``loaded = 0``: written, or their
    due time moved (trigger ``timers_moved``), since the wheel's last look), in id order.
    A status, not "ids after the last one seen": on a shared database a lower id can
    commit after a higher one."""
    rows = conn.execute("SELECT id, due FROM timers WHERE loaded = 0 ORDER BY id").fetchall()
    return [(int(r[0]), float(r[1])) for r in rows]


def claim_unloaded(conn: Conn) -> list[tuple[int, float]]:
    """Mark every unloaded row loaded and return (id, due) of each as this statement
    found it, in id order: the due time the wheel schedules is the one it marked, in one
    statement. (A read, then a mark, let another node move a row earlier in between: the
    wheel kept the old due time and the row was marked read, so a move to within the
    horizon was never picked up and the timer never fired.) On PostgreSQL a row another
    transaction is moving is waited for and taken as moved; a move committed after this
    sets ``loaded = 0`` again (trigger ``timers_moved``)."""
    rows = conn.execute(
        "UPDATE timers SET loaded = 1 WHERE loaded = 0 RETURNING id, due"
    ).fetchall()
    return sorted((int(r[0]), float(r[1])) for r in rows)


def mark_all_loaded(conn: Conn) -> int:
    """At the wheel's rebuild (it then reads every row due within its horizon)."""
    return int(conn.execute("UPDATE timers SET loaded = 1 WHERE loaded = 0").rowcount)


def migrate_loaded(db: Any) -> None:
    """Schema: the ``loaded`` flag the wheel's refill claims new and moved rows by (it
    read "ids above the highest seen" before). Existing rows count as loaded: the wheel
    reads every row due within its horizon when it starts."""
    db.execute("ALTER TABLE timers ADD COLUMN loaded INTEGER NOT NULL DEFAULT 0")
    db.execute("UPDATE timers SET loaded = 1")
    db.execute("CREATE INDEX timers_unloaded ON timers (id) WHERE loaded = 0")
    # a row whose due time moved (schedule_timer on an existing key, move) is new to the
    # wheel again: an earlier due time then fires on time, not at the old one
    db.execute(
        "CREATE TRIGGER timers_moved AFTER UPDATE OF due ON timers WHEN NEW.due != OLD.due "
        "BEGIN UPDATE timers SET loaded = 0 WHERE id = NEW.id; END"
    )


def get(conn: Conn, timer_id: int) -> TimerRow | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM timers WHERE id = ?", (timer_id,)).fetchone()
    return _timer(row) if row else None


def delete(conn: Conn, timer_id: int) -> bool:
    """Claim a timer to fire by deleting its row; False when it is already gone (on
    PostgreSQL another firer may have deleted it while this transaction waited for the
    row: that firer acted, this one must not)."""
    return int(conn.execute("DELETE FROM timers WHERE id = ?", (timer_id,)).rowcount) == 1


def move(conn: Conn, timer_id: int, due: float) -> None:
    conn.execute("UPDATE timers SET due = ? WHERE id = ?", (due, timer_id))


def pending_by_kind(conn: Conn) -> dict[str, int]:
    return {
        str(k): int(n)
        for k, n in conn.execute("SELECT kind, count(*) FROM timers GROUP BY kind").fetchall()
    }


@dataclass(frozen=True, slots=True)
class TimerListing:
    id: int
    referral_id: int
    placer_number: str
    kind: str
    due: float
    attempt: int


def listing(conn: Conn, *, due_before: float | None = None, limit: int = 0) -> list[TimerListing]:
    sql = (
        "SELECT t.id, t.referral_id, r.placer_number, t.kind, t.due, t.attempt "
        "FROM timers t JOIN referrals r ON r.id = t.referral_id"
    )
    args: list[object] = []
    if due_before is not None:
        sql += " WHERE t.due < ?"
        args.append(due_before)
    sql += " ORDER BY t.due, t.id"
    if limit:
        sql += " LIMIT ?"
        args.append(limit)
    return [
        TimerListing(int(r[0]), int(r[1]), str(r[2]), str(r[3]), float(r[4]), int(r[5]))
        for r in conn.execute(sql, args).fetchall()
    ]


NUDGE_CHANNELS = ("sms", "portal", "voice")


def patient_contacts(conn: Conn, referral_id: int, phone: str, since: float) -> list[float]:
    """When this patient was (or is queued to be) contacted by a nudge since ``since``:
    across all their referrals when a phone number identifies them."""
    if phone:
        sql = (
            # by the patient's referrals, then their outbox rows (``+channel``: not the
            # channel index, which would scan every patient nudge there is)
            "SELECT due FROM outbox WHERE referral_id IN "
            "(SELECT id FROM referrals WHERE patient_phone = ?) AND due >= ? "
            "AND status NOT IN ('cancelled', 'dead') AND +channel IN ('sms', 'portal', 'voice')"
        )
        args: tuple[object, ...] = (phone, since)
    else:
        sql = (
            "SELECT due FROM outbox WHERE referral_id = ? AND due >= ? "
            "AND status NOT IN ('cancelled', 'dead') AND channel IN ('sms', 'portal', 'voice')"
        )
        args = (referral_id, since)
    return sorted(float(r[0]) for r in conn.execute(sql, args).fetchall())


def nudges_sent(conn: Conn, referral_id: int, templates: Sequence[str]) -> list[tuple[str, str]]:
    """(channel, status) of this referral's patient contacts so far (outbox rows with one
    of ``templates``, on whichever channel serves the rotation slot), oldest first."""
    marks = ", ".join("?" for _ in templates)
    return [
        (str(r[0]), str(r[1]))
        for r in conn.execute(
            f"SELECT channel, status FROM outbox WHERE referral_id = ? "
            f"AND template IN ({marks}) ORDER BY id",
            (referral_id, *templates),
        ).fetchall()
    ]
