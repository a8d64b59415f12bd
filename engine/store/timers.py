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


def added_since(conn: Conn, last_id: int, until: float) -> list[tuple[int, float]]:
    """Timers created after row ``last_id`` that are due by ``until``."""
    rows = conn.execute(
        "SELECT id, due FROM timers WHERE id > ? AND due <= ? ORDER BY id", (last_id, until)
    ).fetchall()
    return [(int(r[0]), float(r[1])) for r in rows]


def max_id(conn: Conn) -> int:
    row = conn.execute("SELECT max(id) FROM timers").fetchone()
    return int(row[0] or 0)


def get(conn: Conn, timer_id: int) -> TimerRow | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM timers WHERE id = ?", (timer_id,)).fetchone()
    return _timer(row) if row else None


def delete(conn: Conn, timer_id: int) -> None:
    conn.execute("DELETE FROM timers WHERE id = ?", (timer_id,))


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
