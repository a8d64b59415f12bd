"""``refloop report closure``: the closure report (MIPS 374 / CMS50) from the command line,
as a table, JSON (the ``/api/report`` document) or CSV. Read-only: safe while the daemon
runs.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import re
from typing import Final

import click

from engine.cli.common import open_referral_store, opened_store, routes_option, state_option
from engine.clock import WallClock, isoformat
from engine.tracking.report import GROUPS, ClosureReport, closure_report, report_to_dict

_DATE: Final = re.compile(r"\d{4}-\d{2}-\d{2}")
CSV_COLUMNS: Final = (
    "section",
    "key",
    "denominator",
    "numerator",
    "rate",
    "median_days",
    "p90_days",
    "open_referrals",
)


def _date(_ctx: click.Context, param: click.Parameter, value: str) -> dt.date:
    try:
        if _DATE.fullmatch(value):
            return dt.date.fromisoformat(value)
    except ValueError:
        pass
    raise click.BadParameter(f"not a date (YYYY-MM-DD): {value!r}", param=param)


def register(main: click.Group) -> None:
    """Add the ``report`` group (defined below) to ``main``."""
    main.add_command(report)


@click.group("report")
def report() -> None:
    """Quality reports from the referral store.

    Example: refloop report closure --from 2026-01-01 --to 2026-03-31
    """


@report.command("closure")
@click.option("--from", "start", required=True, callback=_date, metavar="YYYY-MM-DD",
              help="First day of the period (inclusive, UTC).")  # fmt: skip
@click.option("--to", "end", required=True, callback=_date, metavar="YYYY-MM-DD",
              help="Last day of the period (inclusive, UTC).")  # fmt: skip
@click.option("--by", type=click.Choice(GROUPS), help="Also break the denominator down.")
@click.option("--json", "as_json", is_flag=True, help="The report as one JSON object.")
@click.option("--csv", "as_csv", is_flag=True, help="The report's rows as CSV.")
@state_option
@routes_option
def closure(
    start: dt.date,
    end: dt.date,
    by: str | None,
    as_json: bool,
    as_csv: bool,
    state_dir: str,
    routes_path: str,
) -> None:
    """The closure report (MIPS 374 / CMS50): each patient's first referral in the
    period, how many got a specialist report in time, days to close, open referrals
    by age, closure by nudge channel. A calendar year counts referrals opened January
    1 - October 31 only. See docs/reporting.md.

    Example: refloop report closure --from 2025-01-01 --to 2025-12-31 --by specialty
    """
    if start > end:
        raise click.BadParameter("the period ends before it starts", param_hint="--to")
    if as_json and as_csv:
        raise click.UsageError("--json and --csv are alternatives; give one")
    with opened_store(open_referral_store, state_dir, routes_path, readonly=True) as db:
        r = closure_report(db.conn, start, end, by=by, now=WallClock().now())
    if as_json:
        click.echo(json.dumps(report_to_dict(r), indent=1))
    elif as_csv:
        write_csv(r)
    else:
        for line in render_table(r):
            click.echo(line)


def _pct(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.1f}%"


def _days(days: float | None) -> str:
    return "-" if days is None else f"{days:.1f}"


def render_table(r: ClosureReport) -> list[str]:
    """The report as text lines: totals, groups, nudge channels, open aging."""
    head = f"{'':<24} {'PATIENTS':>9} {'CLOSED':>8} {'RATE':>7} {'MEDIAN D':>9} {'P90 D':>7}"
    t = r.total
    lines = [
        f"Closure report {r.start} to {r.end} (MIPS 374 / CMS50), as of "
        f"{isoformat(r.as_of)[:16].replace('T', ' ')} UTC",
        f"Each patient's first referral opened {r.start} to {r.opened_to}; "
        f"specialist reports received by {r.end}.",
        "",
        head,
        f"{'all':<24} {t.denominator:>9,} {t.numerator:>8,} {_pct(t.rate):>7} "
        f"{_days(t.median_days):>9} {_days(t.p90_days):>7}",
    ]
    if r.by:
        lines += ["", f"BY {r.by.upper()}"]
        lines += [
            f"{(g.key or '(none)')[:24]:<24} {g.denominator:>9,} {g.numerator:>8,} "
            f"{_pct(g.rate):>7} {_days(g.median_days):>9} {_days(g.p90_days):>7}"
            for g in r.groups
        ]
    lines += ["", "BY FIRST NUDGE CHANNEL"]
    lines += [
        f"{c.key:<24} {c.denominator:>9,} {c.numerator:>8,} {_pct(c.rate):>7}"
        for c in r.nudge_channels
    ]
    lines += ["", "OPEN REFERRALS BY DAYS OPEN"]
    lines += [f"{label:<24} {n:>9,}" for label, n in r.open_aging]
    return lines


def write_csv(r: ClosureReport) -> None:
    """One row per total, group and channel (rate 0..1, days with two decimals), then one
    per open aging bucket (only ``open_referrals`` set)."""
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(CSV_COLUMNS)

    def num(value: float | None, places: int) -> str:
        return "" if value is None else f"{value:.{places}f}"

    rows = [("total", r.total), *(("group", g) for g in r.groups)]
    for section, g in rows:
        out.writerow(
            [section, g.key, g.denominator, g.numerator, num(g.rate, 4),
             num(g.median_days, 2), num(g.p90_days, 2), ""]
        )  # fmt: skip
    for c in r.nudge_channels:
        out.writerow(
            ["nudge_channel", c.key, c.denominator, c.numerator, num(c.rate, 4), "", "", ""]
        )
    for label, n in r.open_aging:
        out.writerow(["open_aging", label, "", "", "", "", "", n])
    click.echo(buf.getvalue(), nl=False)
