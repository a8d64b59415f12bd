"""Read-only views over the referral tables for tools that summarise a whole run (the
simulator's output). Nothing here writes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from engine.store.sql import Conn


def referral_summaries(conn: Conn) -> list[tuple[int, str, str, str, str, str, float]]:
    """(id, placer, status, patient status, specialist status, close reason, opened at)."""
    return [
        (int(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4]), str(r[5]), float(r[6]))
        for r in conn.execute(
            "SELECT id, placer_number, status, patient_status, specialist_status, "
            "close_reason, opened_at FROM referrals ORDER BY id"
        )
    ]


def referral_id_by_placer(conn: Conn, placer: str) -> int | None:
    row = conn.execute("SELECT id FROM referrals WHERE placer_number = ?", (placer,)).fetchone()
    return None if row is None else int(row[0])


def event_log(conn: Conn) -> Iterator[tuple[int, str, float, str, str]]:
    """(referral, kind, occurred at, actor, overall status after) in timeline order."""
    for r in conn.execute(
        "SELECT referral_id, kind, occurred_at, actor, status FROM referral_events "
        "ORDER BY referral_id, id"
    ):
        yield int(r[0]), str(r[1]), float(r[2]), str(r[3]), str(r[4])


def outbox_log(conn: Conn) -> Iterator[tuple[int, str, str, float, str]]:
    """(referral, channel, template, due, status) of every referral's outbound row."""
    for r in conn.execute(
        "SELECT referral_id, channel, template, due, status FROM outbox "
        "WHERE referral_id IS NOT NULL ORDER BY referral_id, id"
    ):
        yield int(r[0]), str(r[1]), str(r[2]), float(r[3]), str(r[4])


def first_reports(conn: Conn) -> dict[int, float]:
    """When each referral's first report was received."""
    return {
        int(r[0]): float(r[1])
        for r in conn.execute(
            "SELECT referral_id, min(occurred_at) FROM referral_events "
            "WHERE kind = 'report-received' GROUP BY referral_id"
        )
    }


def sent_nudge_channels(conn: Conn) -> list[str]:
    """The channel of every patient nudge that was sent."""
    return [
        str(r[0])
        for r in conn.execute(
            "SELECT channel FROM outbox WHERE template IN ('first_nudge', 'second_nudge') "
            "AND status = 'sent'"
        )
    ]


def task_dues(conn: Conn, channels: tuple[str, ...] = ("task", "coordinator")) -> list[float]:
    """When each coordinator task was queued."""
    marks = ",".join("?" * len(channels))
    args: tuple[Any, ...] = channels
    return [
        float(r[0])
        for r in conn.execute(f"SELECT due FROM outbox WHERE channel IN ({marks})", args)
    ]


def referral_status(conn: Conn, referral_id: int) -> str:
    """A referral's overall status now ("" when there is no such referral)."""
    row = conn.execute("SELECT status FROM referrals WHERE id = ?", (referral_id,)).fetchone()
    return "" if row is None else str(row[0])
