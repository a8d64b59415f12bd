"""What a practice manager asks of a simulated run: staff hours, automated work, closure,
time to closure — and the same for the baseline, side by side.

Counts are generic: coordinator work is every outbox row a person handles (the scenario's
``staff.channels``) counted by template, automated actions are every other row counted by
``channel:template``, so kinds of work added to the engine appear without a change here.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Final

DAY: Final = 86_400.0
STEADY_FROM: Final = 60  # days: by then every step of the cadence is running


def work_kind(staff: Mapping[str, Any], channel: str, template: str) -> str:
    """The kind of work an outbox row is for a person (patient call, office call, ...)."""
    kind = staff["tasks"].get(template) or staff["by_channel"].get(channel) or "default"
    return str(kind)


def staff_and_automation(
    rows: Iterable[tuple[int, str, str, float, str]],
    staff: Mapping[str, Any],
    start: float,
    days: float,
    other_work: Iterable[tuple[float, str]] = (),
) -> dict[str, Any]:
    """From the outbox log (referral, channel, template, due, status): coordinator tasks
    and minutes by kind, hours per ISO week, the steady-state hours per week (the weeks
    from day 60 to the end of arrivals, when every cadence step runs), and automated
    actions by ``channel:template``. Only rows that went out (``sent``) count.
    ``other_work``: a person's work that is no outbox row, as (when, kind of work) — a
    directory entry — costed the same way and counted in the minutes and hours."""
    people = set(staff["channels"])
    minutes = staff["minutes"]
    tasks: Counter[str] = Counter()
    auto: Counter[str] = Counter()
    by_week: dict[str, float] = {}
    by_kind: dict[str, float] = {}
    steady = 0.0
    lo, hi = start + STEADY_FROM * DAY, start + days * DAY
    for _rid, channel, template, due, status in rows:
        if status != "sent":
            continue
        if channel not in people:
            auto[f"{channel}:{template}"] += 1
            continue
        kind = work_kind(staff, channel, template)
        cost = float(minutes.get(kind, minutes["default"]))
        # a row on a patient channel a person works (a voice call) keeps its channel
        tasks[template if channel in ("task", "coordinator") else f"{channel}:{template}"] += 1
        by_kind[kind] = by_kind.get(kind, 0.0) + cost
        week = datetime.fromtimestamp(due, UTC).strftime("%G-W%V")
        by_week[week] = by_week.get(week, 0.0) + cost
        if lo <= due < hi:
            steady += cost
    for due, kind in other_work:
        cost = float(minutes.get(kind, minutes["default"]))
        by_kind[kind] = by_kind.get(kind, 0.0) + cost
        week = datetime.fromtimestamp(due, UTC).strftime("%G-W%V")
        by_week[week] = by_week.get(week, 0.0) + cost
        if lo <= due < hi:
            steady += cost
    weeks = (hi - lo) / (7 * DAY)
    return {
        "coordinator_tasks_by_kind": dict(sorted(tasks.items())),
        "coordinator_minutes_by_work": {k: round(v) for k, v in sorted(by_kind.items())},
        "coordinator_hours_by_week": {k: round(v / 60, 1) for k, v in sorted(by_week.items())},
        "coordinator_hours_per_week_steady": round(steady / 60 / weeks, 1) if weeks >= 1 else None,
        "automated_by_kind": dict(sorted(auto.items())),
    }


def median_days(opened: Mapping[int, float], reported: Mapping[int, float]) -> float | None:
    """Median days from opening to the first report, over the referrals that got one."""
    spans = [(reported[r] - opened[r]) / DAY for r in opened if r in reported]
    return round(statistics.median(spans), 1) if spans else None


# -- side by side --------------------------------------------------------------------------


def _rows(result: Mapping[str, Any]) -> list[tuple[str, str]]:
    t = result["totals"]
    out = [("referrals", str(t["referrals"]))]
    for window, c in t["closure"].items():
        pct = "-" if c["rate_percent"] is None else f"{c['rate_percent']} %"
        out.append(
            (f"closed with report within {window}", f"{pct} ({c['closed']}/{c['eligible']})")
        )
    med = t["median_days_to_closure"]
    out.append(("median days to closure (closed with report)", "-" if med is None else f"{med}"))
    steady = t["coordinator_hours_per_week_steady"]
    out.append(
        ("coordinator hours per week (steady state)", "-" if steady is None else f"{steady}")
    )
    out.append(("coordinator tasks", str(sum(t["coordinator_tasks_by_kind"].values()))))
    out.append(("automated actions", str(sum(t["automated_by_kind"].values()))))
    out.append(("patient nudges sent", str(sum(t["nudges_by_channel"].values()))))
    return out


def _kinds(result: Mapping[str, Any], key: str) -> Mapping[str, int]:
    return result["totals"][key]


def compare_table(
    refloop: Mapping[str, Any], baseline: Mapping[str, Any], *, markdown: bool
) -> str:
    """The two runs of the same population side by side: headline figures, then the
    coordinator tasks and the automated actions by kind."""
    lines: list[tuple[str, str, str]] = [
        (label, b, r) for (label, b), (_, r) in zip(_rows(baseline), _rows(refloop), strict=True)
    ]
    for key, prefix in (
        ("coordinator_tasks_by_kind", "task: "),
        ("automated_by_kind", "automated: "),
    ):
        names = sorted(set(_kinds(baseline, key)) | set(_kinds(refloop, key)))
        for name in names:
            lines.append(
                (
                    prefix + name,
                    str(_kinds(baseline, key).get(name, 0)),
                    str(_kinds(refloop, key).get(name, 0)),
                )
            )
    head = ("", "baseline (a task at 14 days)", "refloop")
    title = f"{refloop['scenario']} (seed {refloop['seed']})"
    if markdown:
        out = [f"**{title}**", "", f"| {head[0]} | {head[1]} | {head[2]} |", "|---|---:|---:|"]
        out += [f"| {a} | {b} | {c} |" for a, b, c in lines]
        return "\n".join(out) + "\n"
    width = max(len(a) for a, _, _ in [head, *lines])
    out = [title, f"{head[0]:<{width}}  {head[1]:>30}  {head[2]:>16}"]
    out += [f"{a:<{width}}  {b:>30}  {c:>16}" for a, b, c in lines]
    return "\n".join(out) + "\n"
