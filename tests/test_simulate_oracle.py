"""The simulator against an independent oracle: a hand-written population whose every
outcome follows, by hand, from docs/escalation.md's cadence and the scenario's own plans.

The expected values are computed here from the documented rules, never copied from a run:

- the first nudge goes out 1 day after the referral opened, the second 7 days after, while
  the patient is not booked (docs/escalation.md, "The default cadence");
- a booking cancels the nudges that have not gone out yet;
- a patient with ``books_after_nudge: k`` books ``book_delay`` after the k-th nudge; one
  with ``books_by_phone: d`` books d after the referral, whatever the nudges;
- the specialist's report arrives ``report`` after the booking and closes the referral
  (``report-received``);
- a referral still open 60 days after it opened is closed ``no-response``
  (``attempt-close``);
- a patient still not booked 14 days after the referral, with recorded consent and the
  simulator's voice channel, gets the automated call ``followup-call`` and no coordinator
  task (``followup_call: true``, the default; every patient here has consent).

Referrals open at whole hours inside the patient's contact window (09:00-20:00 local), so
no nudge is deferred; the simulator's one-hour step can only add < 1 hour, which the
day-granular comparison absorbs. The arrivals are spread over 40 days so happenings
scheduled during the run (bookings, reports) must overtake later arrivals in the queue.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from helpers import refloop

DAY_H = 24
# docs/escalation.md, the default cadence (days after the referral opened)
FIRST_NUDGE = 1
SECOND_NUDGE = 7
ATTEMPT_CLOSE = 60
FOLLOWUP = 14


@dataclass(frozen=True)
class Plan:
    placer: str
    at_h: int  # hours after the scenario start (08:00 New York)
    books_after_nudge: int | None = None
    book_delay_h: int = 24
    books_by_phone_h: int | None = None
    report_h: int | None = None  # after the booking


POPULATION = (
    Plan("PHONE-3D", at_h=2, books_by_phone_h=3 * DAY_H, report_h=10 * DAY_H),
    Plan("NUDGE1", at_h=3, books_after_nudge=1, book_delay_h=2 * DAY_H, report_h=5 * DAY_H),
    Plan("NUDGE2", at_h=4, books_after_nudge=2, book_delay_h=1 * DAY_H, report_h=4 * DAY_H),
    Plan("NEVER", at_h=5),
    Plan("LATE-PHONE", at_h=20 * DAY_H + 2, books_by_phone_h=2 * DAY_H, report_h=3 * DAY_H),
    Plan("LATE-NUDGE", at_h=40 * DAY_H + 3, books_after_nudge=1, report_h=6 * DAY_H),
)


def scenario_yaml() -> str:
    lines = [
        "name: oracle",
        "seed: 1",
        "start: 2026-03-02T08:00:00-05:00",
        "days: 45",
        "follow_up: 30",
        "referrals:",
    ]
    for p in POPULATION:
        patient = []
        if p.books_after_nudge is not None:
            patient.append(f"books_after_nudge: {p.books_after_nudge}")
            patient.append(f"book_delay: {p.book_delay_h}h")
        if p.books_by_phone_h is not None:
            patient.append(f"books_by_phone: {p.books_by_phone_h}h")
        report = "null" if p.report_h is None else f"{p.report_h}h"
        lines.append(
            f"  - {{placer: {p.placer}, at: {p.at_h}h, sms_consent: true, portal: true, "
            f"time_zone: America/New_York, patient: {{{', '.join(patient)}}}, "
            f"specialist: {{confirms: 2d, report: {report}}}}}"
        )
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Outcome:
    nudges: int
    booked_day: int | None
    closed_day: int
    close_reason: str
    followup_calls: int = 0
    coordinator_tasks: int = 0


def expected(p: Plan) -> Outcome:
    """The oracle: the outcome of one referral from the documented rules alone."""
    nudge_h = [FIRST_NUDGE * DAY_H, SECOND_NUDGE * DAY_H]
    booked_h: int | None = None
    if p.books_by_phone_h is not None:
        booked_h = p.books_by_phone_h
    if p.books_after_nudge is not None:
        after = nudge_h[p.books_after_nudge - 1] + p.book_delay_h
        booked_h = after if booked_h is None else min(booked_h, after)
    sent = [h for h in nudge_h if booked_h is None or h < booked_h]
    calls = 1 if booked_h is None or booked_h > FOLLOWUP * DAY_H else 0
    if booked_h is not None and p.report_h is not None:
        closed_h = booked_h + p.report_h
        assert closed_h < ATTEMPT_CLOSE * DAY_H, "keep the oracle away from the close timer"
        return Outcome(len(sent), booked_h // DAY_H, closed_h // DAY_H, "report-received", calls)
    return Outcome(
        len(sent),
        None if booked_h is None else booked_h // DAY_H,
        ATTEMPT_CLOSE,
        "no-response",
        calls,
    )


def _day(at: str, opened: datetime) -> int:
    return int((datetime.fromisoformat(at) - opened).total_seconds() // 86400)


def observed(r: dict[str, object]) -> Outcome:
    opened = datetime.fromisoformat(str(r["opened"]))
    timeline = r["timeline"]
    assert isinstance(timeline, list)
    nudges = [
        e
        for e in timeline
        if e["event"] in ("out:first_nudge", "out:second_nudge") and e["status"] == "sent"
    ]
    booked = [e["at"] for e in timeline if e["event"] == "appointment-booked"]
    closed = [e["at"] for e in timeline if e["status"] == "closed"]
    calls = [
        _day(e["at"], opened)
        for e in timeline
        if e["event"] == "out:followup-call" and e["by"] == "voice" and e["status"] == "sent"
    ]
    assert all(day == FOLLOWUP for day in calls), calls
    return Outcome(
        len(nudges),
        _day(booked[0], opened) if booked else None,
        _day(closed[0], opened),
        str(r["close_reason"]),
        len(calls),
        sum(1 for e in timeline if e["event"] == "out:coordinator-followup"),
    )


def test_simulated_outcomes_follow_the_documented_cadence(tmp_path: Path) -> None:
    path = tmp_path / "oracle.yaml"
    path.write_text(scenario_yaml(), encoding="utf-8")
    done = refloop("simulate", str(path), "--json", timeout=300)
    assert done.returncode == 0, done.stderr.decode()
    result = json.loads(done.stdout)
    by_placer = {r["placer"]: r for r in result["referrals"]}
    assert sorted(by_placer) == sorted(p.placer for p in POPULATION)
    for p in POPULATION:
        assert observed(by_placer[p.placer]) == expected(p), p.placer
    # the totals agree with the per-referral oracle
    total_nudges = sum(expected(p).nudges for p in POPULATION)
    assert sum(result["totals"]["nudges_by_channel"].values()) == total_nudges
    closed_reported = sum(1 for p in POPULATION if expected(p).close_reason == "report-received")
    assert result["totals"]["close_reasons"]["report-received"] == closed_reported


# docs/escalation.md with `letter: letter, followup_letter: true, report_requests: 3`
# (docs/scenarios/practice-800.yaml's escalation), days after the referral opened
OUTREACH = 30
REPORT_REQUEST = 3  # days after the visit
REPORT_REPEAT = 7  # between requests, and before the task
REQUESTS = 3
VISIT_AFTER_BOOKING = 10  # a hand-written booking's visit (docs/simulator.md)


@dataclass(frozen=True)
class Chase:
    placer: str
    at_h: int
    consent: bool
    books_by_phone_h: int | None = None
    report_h: int | None = None  # after the booking


CHASED = (
    Chase("NOCONSENT-NEVER", at_h=2, consent=False),
    Chase(
        "NOCONSENT-DAY20", at_h=3, consent=False, books_by_phone_h=20 * DAY_H, report_h=5 * DAY_H
    ),
    Chase("CONSENT-NEVER", at_h=4, consent=True),
    Chase("BOOKED-NO-REPORT", at_h=5, consent=True, books_by_phone_h=1 * DAY_H),
)


@dataclass(frozen=True)
class Chased:
    letters: tuple[int, ...]  # days the letter went by the mailing channel
    calls: tuple[int, ...]  # days of automated calls (followup-call, outreach-call)
    requests: tuple[int, ...]  # days of automated report requests
    tasks: tuple[tuple[str, int], ...]  # (template, day) of every coordinator task
    closed: tuple[int, str] | None


def chased_expected(c: Chase) -> Chased:
    """From the rules alone: day 14 not booked, an automated call with consent, else the
    letter (followup_letter); day 30 not booked, the letter and the call, which for a
    patient without consent (no portal) may not be placed: a call-patient task; booked
    with no report, three requests from visit + 3 d, 7 d apart, then the task 7 d later;
    never booked, closed no-response at day 60."""
    booked = c.books_by_phone_h

    def waiting(day: int) -> bool:
        return booked is None or booked > day * DAY_H

    letters: list[int] = []
    calls: list[int] = []
    tasks: list[tuple[str, int]] = []
    if waiting(FOLLOWUP):
        (calls if c.consent else letters).append(FOLLOWUP)
    if waiting(OUTREACH):
        letters.append(OUTREACH)
        if c.consent:
            calls.append(OUTREACH)
        else:
            tasks.append(("call-patient", OUTREACH))
    requests: list[int] = []
    closed: tuple[int, str] | None = (ATTEMPT_CLOSE, "no-response") if booked is None else None
    if booked is not None and c.report_h is not None:
        closed = ((booked + c.report_h) // DAY_H, "report-received")
    elif booked is not None:
        visit_h = booked + VISIT_AFTER_BOOKING * DAY_H
        requests = [
            (visit_h + (REPORT_REQUEST + k * REPORT_REPEAT) * DAY_H) // DAY_H
            for k in range(REQUESTS)
        ]
        task_h = visit_h + (REPORT_REQUEST + REQUESTS * REPORT_REPEAT) * DAY_H
        tasks.append(("call-for-report", task_h // DAY_H))
    return Chased(tuple(letters), tuple(calls), tuple(requests), tuple(tasks), closed)


def chased_observed(r: dict[str, object]) -> Chased:
    opened = datetime.fromisoformat(str(r["opened"]))
    timeline = r["timeline"]
    assert isinstance(timeline, list)
    sent = [e for e in timeline if e["event"].startswith("out:") and e["status"] == "sent"]

    def days(event: str, by: str) -> tuple[int, ...]:
        return tuple(_day(e["at"], opened) for e in sent if e["event"] == event and e["by"] == by)

    closed = [e["at"] for e in timeline if e["status"] == "closed"]
    return Chased(
        days("out:outreach-letter", "letter"),
        tuple(sorted(days("out:followup-call", "voice") + days("out:outreach-call", "voice"))),
        days("out:specialist-report-request", "fax"),
        tuple(
            (e["event"][4:], _day(e["at"], opened))
            for e in sent
            if e["by"] in ("task", "coordinator")
        ),
        (_day(closed[0], opened), str(r["close_reason"])) if closed else None,
    )


def test_the_shipped_practice_chase_follows_its_documented_rules(tmp_path: Path) -> None:
    lines = [
        "name: oracle, practice-800's escalation",
        "seed: 1",
        "start: 2026-03-02T08:00:00-05:00",
        "days: 1",
        "follow_up: 62",
        "escalation: {letter: letter, followup_letter: true, report_requests: 3}",
        "referrals:",
    ]
    for c in CHASED:
        patient = "" if c.books_by_phone_h is None else f"books_by_phone: {c.books_by_phone_h}h"
        report = "null" if c.report_h is None else f"{c.report_h}h"
        lines.append(
            f"  - {{placer: {c.placer}, at: {c.at_h}h, sms_consent: {str(c.consent).lower()}, "
            f"portal: {str(c.consent).lower()}, time_zone: America/New_York, "
            f"specialist_reach: fax, patient: {{{patient}}}, "
            f"specialist: {{confirms: 2d, report: {report}}}}}"
        )
    path = tmp_path / "chase.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    done = refloop("simulate", str(path), "--json", timeout=300)
    assert done.returncode == 0, done.stderr.decode()
    by_placer = {r["placer"]: r for r in json.loads(done.stdout)["referrals"]}
    for c in CHASED:
        assert chased_observed(by_placer[c.placer]) == chased_expected(c), c.placer
