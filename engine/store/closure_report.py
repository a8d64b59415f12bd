"""The closure report's data: ``report_referrals``, one row per referral with what the
report needs, kept by triggers, and the queries over it (``engine.tracking.report`` builds the
report from what they return).

Why a table of its own: a patient's first referral needs the patient (another table), the
report its time (another), the nudge its channel (another). Joining those for a million
referrals costs seconds; here each referral already carries them, plus ``prev_opened_at``,
the opening time of the same patient's previous referral. So "the patient's first referral
in ``[lo, hi)``" is a test on one row (opened in the period and ``prev_opened_at`` NULL or
before ``lo``), and the report is one range scan of the table's primary key.

The triggers below keep each row in step with the tables it summarises, inside the writer's
own transaction, so nothing else in refloop has to know about this table:

==============================  ===========================================================
written                          ``report_referrals``
==============================  ===========================================================
referrals insert                 a row; patient ``#<id>`` until the referral has a patient id
referrals opened_at / details    ``opened_at``; ``specialty``, ``specialist``, ``referrer``
referral_patients insert/delete  ``patient_id``: the lowest id the referral carries (merges
                                 move ids, so merged patients share one)
(patient_id or opened_at moved)  ``prev_opened_at`` of the moved referral and of the one
                                 after it, before and after the move
referral_events insert           ``reported_at``: the earliest counted report's own time
outbox status -> sent            ``nudge_channel``: the first patient nudge sent
==============================  ===========================================================

Plain functions over an open connection. They only read, so they work on a read-only
connection (the CLI) and inside or outside a transaction (the daemon's metrics).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

from engine.errors import StoreError
from engine.model import CLOSING_REPORT_STATUSES, OVERALL_STATUSES
from engine.store.referrals import Conn
from engine.store.sql import (
    POSTGRESQL,
    Schema,
    dialect,
    group_concat,
    has_table,
    month_of,
)

GroupBy = Literal["specialty", "specialist", "referrer", "month"]
DAY: Final = 86_400.0

# A report counts when it is final or corrected, exactly as the state machine counts it
# (engine.model.CLOSING_REPORT_STATUSES: a preliminary report is an interim note).
_COUNTED: Final = ", ".join(f"'{s}'" for s in sorted(CLOSING_REPORT_STATUSES))
# Outbox templates of patient nudges (engine.timers.service writes first_nudge / second_nudge; a
# rotation to the next channel keeps the template) and their channels (engine.tracking.escalation
# CHANNELS; anything else counts as "none").
NUDGE_TEMPLATES: Final = ("first_nudge", "second_nudge")
NUDGE_CHANNELS: Final = ("sms", "portal", "voice")
# Open aging buckets: (label, first and last whole day open; None: no limit).
AGING_BUCKETS: Final = (
    ("0-7", 0, 7),
    ("8-14", 8, 14),
    ("15-30", 15, 30),
    ("31-60", 31, 60),
    ("61-90", 61, 90),
    ("91+", 91, None),
)

_NUDGES: Final = ", ".join(f"'{t}'" for t in NUDGE_TEMPLATES)
# A provider is its NPI when known, else its name (the same person arrives both ways).
_SPECIALIST: Final = (
    "CASE WHEN {r}.specialist_npi != '' THEN {r}.specialist_npi ELSE {r}.specialist_name END"
)
_REFERRER: Final = (
    "CASE WHEN {r}.referring_npi != '' THEN {r}.referring_npi ELSE {r}.referring_name END"
)
_PATIENT: Final = (
    "coalesce((SELECT min(p.patient_id) FROM referral_patients p WHERE p.referral_id = {id}), "
    "'#' || {id})"
)

# The rows of the referrals there are, built from scratch (the migration; tests compare
# what the triggers kept with it). The previous referral: lag() over each patient's.
BACKFILL: Final = f"""
INSERT INTO report_referrals (referral_id, opened_at, patient_id, prev_opened_at, reported_at,
                              nudge_channel, specialty, specialist, referrer)
SELECT id, opened_at, pid, lag(opened_at) OVER (PARTITION BY pid ORDER BY opened_at, id),
       reported, channel, specialty, specialist, referrer
FROM (SELECT r.id, r.opened_at, {_PATIENT.format(id="r.id")} AS pid,
             (SELECT min(e.occurred_at) FROM referral_events e
              WHERE e.referral_id = r.id AND e.kind = 'report-received'
                AND json_extract(e.detail, '$.status') IN ({_COUNTED})) AS reported,
             (SELECT o.channel FROM outbox o
              WHERE o.referral_id = r.id AND o.status = 'sent' AND o.template IN ({_NUDGES})
              ORDER BY coalesce(o.sent_at, o.updated_at), o.id LIMIT 1) AS channel,
             r.specialty, {_SPECIALIST.format(r="r")} AS specialist,
             {_REFERRER.format(r="r")} AS referrer
      FROM referrals r) AS base
"""

_SCHEMA: Final = (
    """CREATE TABLE report_referrals (
        referral_id INTEGER NOT NULL REFERENCES referrals (id),
        opened_at REAL NOT NULL,
        patient_id TEXT NOT NULL,         -- lowest patient id of the referral, or '#<id>'
        prev_opened_at REAL,              -- the same patient's previous referral (NULL: none)
        reported_at REAL,                 -- occurred_at of the first final/corrected report
        nudge_channel TEXT,               -- channel of the first patient nudge sent
        specialty TEXT NOT NULL DEFAULT '',
        specialist TEXT NOT NULL DEFAULT '',
        referrer TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (opened_at, referral_id)
    ) WITHOUT ROWID""",
    "CREATE UNIQUE INDEX report_referrals_id ON report_referrals (referral_id)",
    "CREATE INDEX report_referrals_patient "
    "ON report_referrals (patient_id, opened_at, referral_id)",
    BACKFILL,
    f"""CREATE TRIGGER report_referral_added AFTER INSERT ON referrals BEGIN
        INSERT INTO report_referrals (referral_id, opened_at, patient_id, specialty,
            specialist, referrer)
        VALUES (new.id, new.opened_at, '#' || new.id, new.specialty,
            {_SPECIALIST.format(r="new")}, {_REFERRER.format(r="new")});
    END""",
    f"""CREATE TRIGGER report_referral_details AFTER UPDATE OF specialty, specialist_npi,
        specialist_name, referring_npi, referring_name ON referrals BEGIN
        UPDATE report_referrals SET specialty = new.specialty,
            specialist = {_SPECIALIST.format(r="new")}, referrer = {_REFERRER.format(r="new")}
        WHERE referral_id = new.id;
    END""",
    """CREATE TRIGGER report_referral_opened AFTER UPDATE OF opened_at ON referrals BEGIN
        UPDATE report_referrals SET opened_at = new.opened_at WHERE referral_id = new.id;
    END""",
    f"""CREATE TRIGGER report_patient_added AFTER INSERT ON referral_patients BEGIN
        UPDATE report_referrals SET patient_id = {_PATIENT.format(id="new.referral_id")}
        WHERE referral_id = new.referral_id;
    END""",
    f"""CREATE TRIGGER report_patient_removed AFTER DELETE ON referral_patients BEGIN
        UPDATE report_referrals SET patient_id = {_PATIENT.format(id="old.referral_id")}
        WHERE referral_id = old.referral_id;
    END""",
    # A referral moved in its patient's order, or to another patient: three rows can have
    # a new previous referral: the moved one, the one now after it, and the one that was
    # after it. Each is an index seek, so a patient with thousands of referrals (a
    # placeholder MRN) costs no more than one with two.
    """CREATE TRIGGER report_patient_order AFTER UPDATE OF patient_id, opened_at
        ON report_referrals
        WHEN old.patient_id IS NOT new.patient_id OR old.opened_at IS NOT new.opened_at BEGIN
        UPDATE report_referrals SET prev_opened_at = (
            SELECT p.opened_at FROM report_referrals p
            WHERE p.patient_id = report_referrals.patient_id
              AND (p.opened_at, p.referral_id)
                  < (report_referrals.opened_at, report_referrals.referral_id)
            ORDER BY p.opened_at DESC, p.referral_id DESC LIMIT 1)
        WHERE referral_id IN (
            new.referral_id,
            (SELECT s.referral_id FROM report_referrals s
             WHERE s.patient_id = new.patient_id
               AND (s.opened_at, s.referral_id) > (new.opened_at, new.referral_id)
             ORDER BY s.opened_at, s.referral_id LIMIT 1),
            (SELECT s.referral_id FROM report_referrals s
             WHERE s.patient_id = old.patient_id AND s.referral_id != new.referral_id
               AND (s.opened_at, s.referral_id) > (old.opened_at, old.referral_id)
             ORDER BY s.opened_at, s.referral_id LIMIT 1));
    END""",
    f"""CREATE TRIGGER report_report_received AFTER INSERT ON referral_events
        WHEN new.kind = 'report-received'
         AND json_extract(new.detail, '$.status') IN ({_COUNTED}) BEGIN
        UPDATE report_referrals SET reported_at = new.occurred_at
        WHERE referral_id = new.referral_id
          AND (reported_at IS NULL OR reported_at > new.occurred_at);
    END""",
    f"""CREATE TRIGGER report_nudge_sent AFTER UPDATE OF status ON outbox
        WHEN new.status = 'sent' AND new.template IN ({_NUDGES}) BEGIN
        UPDATE report_referrals SET nudge_channel = new.channel
        WHERE referral_id = new.referral_id AND nudge_channel IS NULL;
    END""",
)


def migrate(db: Schema) -> None:
    """Schema and the rows of existing referrals: appended to ``engine.store.migrations.MIGRATIONS``
    (about a minute for a million referrals, once)."""
    for statement in _SCHEMA:
        db.execute(statement)


@dataclass(frozen=True, slots=True)
class Tally:
    """One group of first referrals (the whole denominator when not grouped): how many,
    how many with a counted report in time, the same two per nudge channel (``sms``,
    ``portal``, ``voice``, ``none``), and each closed one's seconds from opening to the
    report (0 for a report dated before the referral), in no particular order."""

    key: str
    denominator: int
    numerator: int
    channels: Mapping[str, tuple[int, int]]
    seconds: tuple[int, ...]


# Group keys of a report_referrals row.
_KEYS: Final[dict[GroupBy, str]] = {
    "specialty": "specialty",
    "specialist": "specialist",
    "referrer": "referrer",
    "month": "",  # month_of(conn, "opened_at"): the dialect's
}
_IN_TIME: Final = "reported_at < :report_by"
_BY_CHANNEL: Final = ", ".join(
    f"count(*) FILTER (WHERE nudge_channel = '{c}'), "
    f"count(*) FILTER (WHERE nudge_channel = '{c}' AND {_IN_TIME})"
    for c in NUDGE_CHANNELS
)
# whole seconds from opening to the report (0 for a report dated before the referral),
# truncated as SQLite's CAST truncates
_SECONDS: Final = (
    "CAST(CASE WHEN reported_at > opened_at THEN {trunc}(reported_at - opened_at) ELSE 0 END "
    "AS INTEGER)"
)


def _tally_sql(conn: Conn, key: str) -> str:
    """One pass over the period's rows; the seconds travel as one text per group (a Python
    tuple per referral would cost more than the query)."""
    seconds = _SECONDS.format(trunc="trunc" if dialect(conn) == POSTGRESQL else "")
    return f"""
SELECT {key}, count(*), count(*) FILTER (WHERE {_IN_TIME}), {_BY_CHANNEL},
       {group_concat(conn, seconds)} FILTER (WHERE {_IN_TIME})
FROM report_referrals
WHERE opened_at >= :start AND opened_at < :stop
  AND (prev_opened_at IS NULL OR prev_opened_at < :lo)
"""


def tally(
    conn: Conn, lo: float, hi: float, report_by: float, *, by: GroupBy | None = None
) -> list[Tally]:
    """Each patient's first referral among those opened in ``[lo, hi)`` (ties: the lower
    id), with a report counted when its own time is before ``report_by``: one
    :class:`Tally` for all of them, or one per group key when ``by`` is given."""
    if not has_table(conn, "report_referrals"):
        raise StoreError("this database predates the closure report (start refloop run once)")
    args = {"lo": lo, "report_by": report_by}
    if by == "month":
        # rows come in opened_at order, so a month is a range of the primary key: one
        # range scan per month instead of sorting the period's rows by month
        sql = _tally_sql(conn, ":month")
        rows = [
            conn.execute(sql, {**args, "month": month, "start": a, "stop": b}).fetchone()
            for month, a, b in _months(lo, hi)
        ]
        rows = [r for r in rows if r[1]]  # a month with no referrals has no group
    else:
        key = month_of(conn, "opened_at") if by == "month" else _KEYS[by] if by else "''"
        sql = _tally_sql(conn, key) + (" GROUP BY 1" if by else "")
        rows = conn.execute(sql, {**args, "start": lo, "stop": hi}).fetchall()
    out = []
    for r in rows:
        pairs = [(int(r[i]), int(r[i + 1])) for i in range(3, 3 + 2 * len(NUDGE_CHANNELS), 2)]
        den, num = int(r[1]), int(r[2])
        none = (den - sum(d for d, _n in pairs), num - sum(n for _d, n in pairs))
        out.append(
            Tally(
                key=str(r[0] or ""),
                denominator=den,
                numerator=num,
                channels=dict(zip((*NUDGE_CHANNELS, "none"), (*pairs, none), strict=True)),
                seconds=tuple(map(int, r[-1].split(","))) if r[-1] else (),
            )
        )
    return out


def _months(lo: float, hi: float) -> list[tuple[str, float, float]]:
    """``[lo, hi)`` cut at UTC month starts: (``YYYY-MM``, start, stop) for each month."""
    out = []
    start = lo
    day = dt.datetime.fromtimestamp(lo, dt.UTC)
    while start < hi:
        year, month = (day.year + 1, 1) if day.month == 12 else (day.year, day.month + 1)
        nxt = dt.datetime(year, month, 1, tzinfo=dt.UTC)
        stop = min(hi, nxt.timestamp())
        out.append((f"{day.year:04d}-{day.month:02d}", start, stop))
        start, day = stop, nxt
    return out


_OPEN_COUNT: Final = (
    "SELECT count(*) FROM referrals WHERE status IN ("
    + ", ".join(f"'{s}'" for s in OVERALL_STATUSES if s != "closed")
    + ") AND opened_at >= ? AND opened_at < ?"
)


def open_aging(conn: Conn, lo: float, hi: float, now: float) -> dict[str, int]:
    """Referrals opened in ``[lo, hi)`` and not after ``now`` that are not closed, by
    whole days open at ``now`` (rounded down; :data:`AGING_BUCKETS`, in that order)."""
    counts = {}
    for label, first, last in AGING_BUCKETS:
        # floor((now - opened_at) / DAY) in [first, last]
        #   <=>  now - (last + 1) * DAY < opened_at <= now - first * DAY
        # as one half-open range: given two lower bounds SQLite seeks by one and filters
        # by the other, which would read the whole period for every bucket
        start = -math.inf if last is None else math.nextafter(now - (last + 1) * DAY, math.inf)
        stop = math.nextafter(now - first * DAY, math.inf)
        r = conn.execute(_OPEN_COUNT, (max(lo, start), min(hi, stop))).fetchone()
        counts[label] = int(r[0])
    return counts


def closure_counts(
    conn: Conn, since: Mapping[str, float], now: float
) -> dict[str, tuple[int, int]]:
    """Per window name, ``(referrals opened at or after its start and not after now,
    how many of them have a counted report)``: every referral, not only each patient's
    first (the metric). The windows nest, so each stretch is counted once, newest first,
    and the sums carried on."""
    out = {}
    n = closed = 0
    upper = math.nextafter(now, math.inf)
    for name, start in sorted(since.items(), key=lambda item: -item[1]):
        r = conn.execute(
            "SELECT count(*), count(reported_at) FROM report_referrals "
            "WHERE opened_at >= ? AND opened_at < ?",
            (start, upper),
        ).fetchone()
        n, closed = n + int(r[0]), closed + int(r[1])
        out[name] = (n, closed)
        upper = start
    return out
