"""No statement the daemon runs while a practice is simulated reads a big table whole.

Every SQL statement of a small practice-800 run (MLLP ingest, routing, tracker, timers,
outbox, webhooks) is traced and explained. A plan may not ``SCAN`` a table that grows
with the practice, nor ``SEARCH`` one through an index constrained only by a column with
a handful of values (``channel``, ``status``, ``kind``): that is a scan in disguise (the
nudge caps once read every patient nudge in the outbox that way on each nudge). The
few deliberate full passes are listed with their reason.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import engine.app
from engine.simulate import load_scenario, simulate

ROOT = Path(__file__).resolve().parent.parent
GROWING = (
    "messages", "decisions", "referrals", "referral_events", "referral_patients",
    "referral_fillers", "parked", "outbox", "timers", "audit", "report_referrals",
    "sms_replies",
)  # fmt: skip
LOW_CARDINALITY = ("channel", "status", "kind", "template")
ALLOWED = {
    # the newest audit row (the hash chain's head): reverse rowid order, stops at one row
    "SELECT id, hash FROM audit ORDER BY id DESC LIMIT ?": "one row",
    # the simulator's own end-of-run summary, not the daemon
    "SELECT id, placer_number, status, patient_status, specialist_status, close_reason, "
    "opened_at FROM referrals ORDER BY id": "simulator summary",
    "SELECT referral_id, kind, occurred_at, actor, status FROM referral_events "
    "ORDER BY referral_id, id": "simulator summary",
    "SELECT referral_id, min(occurred_at) FROM referral_events WHERE kind = ? "
    "GROUP BY referral_id": "simulator summary",
    "SELECT channel FROM outbox WHERE template IN (?, ?) AND status = ?": "simulator summary",
    "SELECT due FROM outbox WHERE channel IN (?,?)": "simulator summary",
}
_LITERAL = re.compile(r"'(?:[^']|'')*'|\b\d+(?:\.\d+)?\b|X'[0-9A-Fa-f]*'")


def shape(sql: str) -> str:
    """The statement with its literal values as ``?`` and spaces collapsed."""
    return " ".join(_LITERAL.sub("?", sql).split())


@pytest.fixture(scope="module")
def statements(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str]]]:
    """(database, {statement shape: one traced statement}) of a small practice run."""
    seen: dict[str, str] = {}
    opened: list[Path] = []
    real = engine.app.open_database

    def traced(path: Any, **kw: Any) -> Any:
        db = real(path, **kw)
        db.conn.set_trace_callback(lambda sql: seen.setdefault(shape(sql), sql))
        opened.append(Path(path))
        return db

    mp = pytest.MonkeyPatch()
    mp.setattr(engine.app, "open_database", traced)  # observes; changes nothing
    try:
        state = tmp_path_factory.mktemp("plans")
        simulate(load_scenario(ROOT / "docs/scenarios/practice-800.yaml", scale=0.05), state)
    finally:
        mp.undo()
    assert opened and len(seen) > 50
    yield opened[0], seen


def plan_problems(conn: sqlite3.Connection, sql: str) -> list[str]:
    try:
        rows = conn.execute("EXPLAIN QUERY PLAN " + sql).fetchall()
    except sqlite3.Error:
        return []  # PRAGMA, BEGIN, COMMIT, DDL of migrations: nothing to plan
    out = []
    for *_, detail in rows:
        m = re.match(r"(SCAN|SEARCH) (\w+)(?: USING (?:COVERING )?INDEX \w+ \((.*)\))?", detail)
        if not m or m[2] not in GROWING:
            continue
        if m[1] == "SCAN":
            out.append(detail)
        elif m[3] is not None:
            columns = {c.split("=")[0].split(">")[0].split("<")[0] for c in m[3].split(" AND ")}
            if columns <= set(LOW_CARDINALITY):
                out.append(detail)
    return out


def test_no_statement_reads_a_growing_table_whole(statements: tuple[Path, dict[str, str]]) -> None:
    path, seen = statements
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        found = {
            key: problems
            for key, sql in seen.items()
            if key not in ALLOWED and (problems := plan_problems(conn, sql))
        }
    finally:
        conn.close()
    assert not found, "\n".join(f"{k}\n    {v}" for k, v in found.items())


def test_the_check_catches_a_scan_in_disguise(statements: tuple[Path, dict[str, str]]) -> None:
    path, _ = statements
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        # the shape of the nudge caps' old query: every patient nudge, by the channel index
        assert plan_problems(conn, "SELECT due FROM outbox WHERE channel IN ('sms', 'portal')")
        assert plan_problems(conn, "SELECT * FROM parked WHERE status = 'parked' AND why = ''")
        assert plan_problems(conn, "SELECT count(*) FROM messages")
        assert not plan_problems(conn, "SELECT * FROM outbox WHERE referral_id = 1")
    finally:
        conn.close()
