"""The closure report: MIPS quality 374 / CMS50 "Closing the Referral Loop", as far as
refloop's data allows (docs/reporting.md says exactly what is counted).

- **Denominator**: each patient's first referral opened in the period ``[start, end]``
  (UTC days, inclusive). For a calendar-year report (January 1 – December 31 of one year)
  only referrals opened January 1 – October 31 count, as in CMS50, so every referral has
  at least two months to close.
- **Numerator**: those with a counted specialist report (final or corrected; a preliminary
  one closes nothing) dated before the end of the period. A report that arrives after the
  period does not count for that period.
- **Days to close**: from opening to that report; the median and the 90th percentile by the
  nearest-rank method (:func:`percentile`).
- **Open aging**: every referral opened in the period that is not closed at ``now``, by
  whole days open (``engine.store.closure_report.AGING_BUCKETS``).
- **Nudge channels**: the denominator split by the channel of each referral's first sent
  patient nudge (``sms``, ``portal``, ``voice``) or ``none``.
- **Groups** (``by``): the denominator split by the first referral's specialty,
  specialist, referrer or month opened; the groups add up to the total.

Pure arithmetic over what :mod:`engine.store.closure_report` returns; no SQL here.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any, Final, TypeVar, get_args

from engine.clock import isoformat
from engine.store import closure_report as store
from engine.store.closure_report import GroupBy
from engine.store.referrals import Conn

GROUPS: Final[tuple[GroupBy, ...]] = get_args(GroupBy)
# The nudge channel rows, listed even when empty ("none": never nudged).
NUDGE_CHANNELS: Final = (*store.NUDGE_CHANNELS, "none")
AGING_LABELS: Final = tuple(label for label, _first, _last in store.AGING_BUCKETS)
DAY: Final = store.DAY
# CMS50: "first referral during the first 10 months of the measurement period".
LAST_REFERRAL_MONTH: Final = 10
# The trailing windows of the refloop_closure_ratio gauge, in days.
RATIO_WINDOWS: Final[dict[str, int]] = {"30d": 30, "90d": 90, "365d": 365}

_N = TypeVar("_N", int, float)


@dataclass(frozen=True, slots=True)
class ClosureRow:
    """A set of first referrals (all of them, or one group) and how many closed.
    ``median_days`` and ``p90_days`` are over the closed ones (None when none closed)."""

    key: str
    denominator: int
    numerator: int
    median_days: float | None
    p90_days: float | None

    @property
    def rate(self) -> float | None:
        """numerator / denominator, None when the denominator is 0."""
        return self.numerator / self.denominator if self.denominator else None


@dataclass(frozen=True, slots=True)
class ChannelRow:
    """The first referrals whose first sent patient nudge went by ``key`` (``none``: never
    nudged), and how many of them closed."""

    key: str
    denominator: int
    numerator: int

    @property
    def rate(self) -> float | None:
        return self.numerator / self.denominator if self.denominator else None


@dataclass(frozen=True, slots=True)
class ClosureReport:
    """The report for ``start`` – ``end`` as of ``as_of``: referrals opened ``start`` –
    ``opened_to`` count (inclusive; October 31 for a calendar year), with reports received
    up to the end of ``end``. ``groups`` is empty without ``by``; ``open_aging`` is (bucket
    label, count) in bucket order."""

    start: dt.date
    end: dt.date
    by: GroupBy | None
    opened_to: dt.date
    as_of: float
    total: ClosureRow
    groups: tuple[ClosureRow, ...]
    nudge_channels: tuple[ChannelRow, ...]
    open_aging: tuple[tuple[str, int], ...]


def percentile(sorted_values: Sequence[_N], p: float) -> _N | None:
    """The nearest-rank ``p``-th percentile (0 < p <= 100) of ascending values: the
    smallest value with at least p % of the values at or below it, i.e. the one at rank
    ``ceil(p / 100 * n)`` (1-based). Always one of the values; for p = 50 and an even count
    the lower of the two middle ones. None for no values."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def is_calendar_year(start: dt.date, end: dt.date) -> bool:
    return start == dt.date(start.year, 1, 1) and end == dt.date(start.year, 12, 31)


def _epoch(day: dt.date) -> float:
    """Midnight UTC at the start of ``day``."""
    return dt.datetime.combine(day, dt.time(), dt.UTC).timestamp()


def closure_report(
    conn: Conn, start: dt.date, end: dt.date, *, by: str | None = None, now: float
) -> ClosureReport:
    """The closure report for ``start`` – ``end`` (inclusive UTC days) as of ``now``.
    ``by`` is None or one of :data:`GROUPS`. Raises ValueError for an unknown ``by`` or a
    period that ends before it starts (the CLI and the API check both first)."""
    group = next((g for g in GROUPS if g == by), None)
    if by is not None and group is None:
        raise ValueError(f"by must be one of {', '.join(GROUPS)}")
    if start > end:
        raise ValueError("the period ends before it starts")
    opened_to = end
    if is_calendar_year(start, end):
        opened_to = dt.date(start.year, LAST_REFERRAL_MONTH + 1, 1) - dt.timedelta(days=1)
    lo, period_end = _epoch(start), _epoch(end) + DAY
    tallies = sorted(
        store.tally(conn, lo, _epoch(opened_to) + DAY, period_end, by=group), key=lambda t: t.key
    )
    seconds = [sorted(t.seconds) for t in tallies]
    return ClosureReport(
        start=start,
        end=end,
        by=group,
        opened_to=opened_to,
        as_of=now,
        # sorting sorted runs one after another is a merge (timsort)
        total=_row("", sum(t.denominator for t in tallies), sorted(chain(*seconds))),
        groups=tuple(_row(t.key, t.denominator, s) for t, s in zip(tallies, seconds, strict=True))
        if group
        else (),
        nudge_channels=tuple(
            ChannelRow(
                c, sum(t.channels[c][0] for t in tallies), sum(t.channels[c][1] for t in tallies)
            )
            for c in NUDGE_CHANNELS
        ),
        open_aging=tuple(store.open_aging(conn, lo, period_end, now).items()),
    )


def open_aging_now(conn: Conn, now: float) -> tuple[tuple[str, int], ...]:
    """Every referral not closed at ``now``, whatever its opening date, by whole days
    open (the worklist's open referrals, bucketed: the dashboard's chart)."""
    return tuple(store.open_aging(conn, -math.inf, math.nextafter(now, math.inf), now).items())


def _row(key: str, denominator: int, seconds: list[int]) -> ClosureRow:
    """A row from the closed referrals' seconds to their report, in ascending order."""
    median, p90 = percentile(seconds, 50), percentile(seconds, 90)
    return ClosureRow(
        key,
        denominator,
        len(seconds),
        None if median is None else median / DAY,
        None if p90 is None else p90 / DAY,
    )


def _row_dict(row: ClosureRow) -> dict[str, Any]:
    return {
        "key": row.key,
        "denominator": row.denominator,
        "numerator": row.numerator,
        "rate": row.rate,
        "median_days": row.median_days,
        "p90_days": row.p90_days,
    }


def report_to_dict(report: ClosureReport) -> dict[str, Any]:
    """The report as JSON-able values (dates as ISO text, missing numbers as None); the
    shape is the ``/api/report`` response schema in engine.web.openapi."""
    total = _row_dict(report.total)
    del total["key"]
    return {
        "start": report.start.isoformat(),
        "end": report.end.isoformat(),
        "by": report.by,
        "referrals_opened_from": report.start.isoformat(),
        "referrals_opened_to": report.opened_to.isoformat(),
        "reports_received_by": report.end.isoformat(),
        "as_of": isoformat(report.as_of),
        **total,
        "groups": [_row_dict(g) for g in report.groups],
        "nudge_channels": [
            {"key": c.key, "denominator": c.denominator, "numerator": c.numerator, "rate": c.rate}
            for c in report.nudge_channels
        ],
        "open_aging": dict(report.open_aging),
    }


# ---------------------------------------------------------------------------
# The refloop_closure_ratio gauge


def closure_ratios(conn: Conn, now: float) -> dict[str, float | None]:
    """Per :data:`RATIO_WINDOWS` name: of the referrals opened in the trailing window,
    the share closed by a counted report (None: none opened). Every referral counts, not
    only each patient's first: an operational signal, cheaper than the report. The
    daemon's ``refloop_closure_ratio`` gauge (engine.metrics.ClosureRatio)."""
    counts = store.closure_counts(
        conn, {name: now - days * DAY for name, days in RATIO_WINDOWS.items()}, now
    )
    return {name: (closed / n if n else None) for name, (n, closed) in counts.items()}
