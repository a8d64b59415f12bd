"""The escalation policy: cadence, overrides, quiet hours across zones and DST, caps."""

from __future__ import annotations

from datetime import UTC, date, datetime, time
from zoneinfo import ZoneInfo

import pytest

from engine.config import loads
from engine.errors import ConfigError
from engine.tracking.escalation import (
    DAY,
    ContactRules,
    Policy,
    compile_policy,
    coordinator_priority,
    next_contact_time,
    parse_duration,
)


def ts(text: str, tz: str = "UTC") -> float:
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(tz)).timestamp()


def local(t: float, tz: str) -> str:
    return datetime.fromtimestamp(t, ZoneInfo(tz)).strftime("%Y-%m-%d %H:%M %a")


OPENED = ts("2026-03-02T10:00:00")  # a Monday


@pytest.mark.parametrize(
    ("kind", "days"),
    [
        ("first-nudge", 1),
        ("second-nudge", 7),
        ("specialist-followup", 7),
        ("coordinator-task", 14),
        ("outreach", 30),
        ("attempt-close", 60),
    ],
    ids=lambda v: str(v),
)
def test_default_cadence_is_the_recipe(kind: str, days: int) -> None:
    timers = dict(Policy().initial_timers(OPENED))
    assert timers[kind] == OPENED + days * DAY


def test_timers_come_in_due_order() -> None:
    timers = Policy().initial_timers(OPENED)
    assert [d for _, d in timers] == sorted(d for _, d in timers)
    assert [k for k, _ in timers][:3] == ["first-nudge", "second-nudge", "specialist-followup"]


CONFIG = """
version: 1
escalation:
  cadence: {first_nudge: 12h}
  on_close: human
  rotation: [sms, portal, voice]
  specialties:
    cardiology: {second_nudge: 5d}
  priorities: {urgent: 0.5}
  contact: {window: "08:30-19:00", per_day: 1, per_week: 2, business_days: true,
            holidays: [2026-12-25], default_time_zone: America/Chicago}
"""


def test_progress_defaults_and_overrides() -> None:
    """The new steps' defaults (docs/escalation.md) and their keys in routes.yaml."""
    default = Policy().cadence().offsets
    assert default["report-request"] == 3 * DAY
    assert default["report-repeat"] == 7 * DAY
    assert default["specialist-task"] == 7 * DAY
    assert Policy().appointment_reminder is False and Policy().notify == ""
    # the staff-time defaults (docs/escalation.md, "Channels and consent")
    assert (Policy().nudge_call_task, Policy().followup_call, Policy().letter) == (False, True, "")
    assert (Policy().followup_letter, Policy().report_requests) == (False, 2)
    assert Policy().call_task_min_score == 0  # a person calls whenever the machine cannot
    mailed = compile_policy(
        loads(
            "version: 1\nchannels: {mail: {type: webhook, url: 'http://x'}}\n"
            "escalation: {letter: mail, followup_letter: true, report_requests: 3,\n"
            "  call_task_min_score: 35}\n"
        )
    )
    assert (mailed.letter, mailed.followup_letter, mailed.report_requests) == ("mail", True, 3)
    assert mailed.call_task_min_score == 35
    text = (
        "version: 1\nchannels: {ehr: {type: webhook, url: 'http://x'}}\n"
        "escalation:\n  cadence: {report_request: 2d, report_repeat: 5d}\n"
        "  appointment_reminder: true\n  notify: ehr\n  packet_task: false\n"
    )
    policy = compile_policy(loads(text))
    assert policy.cadence().offsets["report-request"] == 2 * DAY
    assert (policy.appointment_reminder, policy.notify, policy.packet_task) == (True, "ehr", False)
    # the booked branch for a visit 10 days ahead: reminder 1 day before, request 2 d after
    specs = policy.appointment_timers(OPENED + 10 * DAY, OPENED)
    assert [(s.kind, s.delay) for s in specs] == [
        ("appointment-reminder", 9 * DAY),
        ("report-request", 12 * DAY),
    ]


def test_overrides_per_specialty_and_priority() -> None:
    policy = compile_policy(loads(CONFIG))
    assert policy.cadence().offsets["first-nudge"] == 12 * 3600
    assert policy.cadence().on_close == "human"
    cardio = policy.cadence("Cardiology")
    assert cardio.offsets["second-nudge"] == 5 * DAY
    assert cardio.offsets["first-nudge"] == 12 * 3600  # inherits the file's default
    urgent = policy.cadence("cardiology", "URGENT")
    assert urgent.offsets["second-nudge"] == 2.5 * DAY
    assert urgent.offsets["attempt-close"] == 30 * DAY
    assert policy.contact.window_start == time(8, 30)
    assert policy.contact.holidays == frozenset({date(2026, 12, 25)})


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        (
            "escalation: {cadence: {first_nudge: soon}}",
            "routes.yaml:2 escalation.cadence.first_nudge: not a duration",
        ),
        (
            "escalation: {cadence: {third_nudge: 2d}}",
            "routes.yaml:2 escalation.cadence.third_nudge: unknown timer",
        ),
        (
            "escalation: {rotation: [sms, pigeon]}",
            "routes.yaml:2 escalation.rotation[1]: unknown channel 'pigeon'",
        ),
        (
            "escalation: {contact: {window: '20:00-09:00'}}",
            "escalation.contact.window: must end after it starts",
        ),
        ("escalation: {contact: {default_time_zone: Mars/Olympus}}", "unknown IANA time zone"),
        ("escalation: {priorities: {urgent: 0}}", "escalation.priorities.urgent: must be a factor"),
        ("escalation: {on_close: maybe}", "escalation.on_close: must be one of close, human"),
        ("escalation: {bogus: 1}", "escalation.bogus: unknown key"),
        (
            "channels: {ehr: {type: webhook, url: 'http://x'}}\nescalation:\n  notify: inbox",
            "routes.yaml:4 escalation.notify: no channel named 'inbox' in channels:",
        ),
        (
            "escalation: {cadence: {report_request: later}}",
            "routes.yaml:2 escalation.cadence.report_request: not a duration",
        ),
        (
            "escalation: {appointment_reminder: perhaps}",
            "routes.yaml:2 escalation.appointment_reminder:",
        ),
        (
            "channels: {mail: {type: webhook, url: 'http://x'}}\nescalation:\n  letter: post",
            "routes.yaml:4 escalation.letter: no channel named 'post' in channels:",
        ),
        (
            "channels: {task: {type: webhook, url: 'http://x'}}\nescalation:\n  letter: task",
            "routes.yaml:4 escalation.letter: 'task' is a staff channel",
        ),
        (
            "escalation:\n  nudge_call_task: sometimes",
            "routes.yaml:3 escalation.nudge_call_task: must be true or false",
        ),
        (
            "escalation:\n  followup_call: 1",
            "routes.yaml:3 escalation.followup_call: must be true or false",
        ),
        (
            "escalation:\n  followup_letter: true",
            "routes.yaml:3 escalation.followup_letter: needs `letter:`",
        ),
        ("escalation:\n  report_requests: 0", "routes.yaml:3 escalation.report_requests:"),
        ("escalation:\n  call_task_min_score: -1", "routes.yaml:3 escalation.call_task_min_score:"),
    ],
    ids=[
        "duration",
        "timer",
        "channel",
        "window",
        "zone",
        "factor",
        "on_close",
        "unknown",
        "notify",
        "report-request",
        "reminder",
        "letter",
        "letter-staff",
        "nudge-call-task",
        "followup-call",
        "followup-letter-without-letter",
        "report-requests",
        "call-task-min-score",
    ],
)
def test_bad_escalation_config_names_line_and_path(yaml_text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        compile_policy(loads("version: 1\n" + yaml_text))
    assert expected in str(info.value)


def test_channel_rotation_and_consent() -> None:
    p = Policy()
    assert [p.channel_for(i, sms_allowed=True) for i in range(4)] == [
        "sms",
        "portal",
        "voice",
        "sms",
    ]
    # without SMS consent the rotation starts at the portal
    assert [p.channel_for(i, sms_allowed=False) for i in range(3)] == ["portal", "voice", "portal"]
    assert p.channel_for(0, sms_allowed=False, portal=False) == "voice"


@pytest.mark.parametrize(
    ("due", "tz", "expected"),
    [
        # inside the window: unchanged
        ("2026-03-03T15:00:00+00:00", "America/New_York", "2026-03-03 10:00 Tue"),
        # 03:00 local: moved to 09:00 the same day
        ("2026-03-03T08:00:00+00:00", "America/New_York", "2026-03-03 09:00 Tue"),
        # 21:00 local: moved to 09:00 the next day
        ("2026-03-04T02:00:00+00:00", "America/New_York", "2026-03-04 09:00 Wed"),
        # the same instant is mid-morning in Honolulu's evening? 02:00Z = 16:00 HST: allowed
        ("2026-03-04T02:00:00+00:00", "Pacific/Honolulu", "2026-03-03 16:00 Tue"),
        # Los Angeles at 23:00Z (15:00 PST) allowed
        ("2026-03-03T23:00:00+00:00", "America/Los_Angeles", "2026-03-03 15:00 Tue"),
        # DST spring forward (US, 2026-03-08): 09:00 exists, window opens at 09:00 EDT
        ("2026-03-08T07:30:00+00:00", "America/New_York", "2026-03-08 09:00 Sun"),
        # DST fall back (2026-11-01): 08:30 EST is before the window
        ("2026-11-01T13:30:00+00:00", "America/New_York", "2026-11-01 09:00 Sun"),
        # an unknown zone falls back to the practice default
        ("2026-03-03T08:00:00+00:00", "Not/AZone", "2026-03-03 09:00 Tue"),
    ],
    ids=[
        "inside",
        "early",
        "late",
        "honolulu",
        "los-angeles",
        "dst-spring",
        "dst-fall",
        "unknown-zone",
    ],
)
def test_quiet_hours_in_the_patients_zone(due: str, tz: str, expected: str) -> None:
    rules = ContactRules()
    t = next_contact_time(datetime.fromisoformat(due).timestamp(), rules, time_zone=tz)
    shown_tz = tz if tz != "Not/AZone" else rules.default_time_zone
    assert local(t, shown_tz) == expected


def test_dst_spring_forward_window_start_inside_the_gap() -> None:
    # a window opening at 02:30 on the spring-forward day (02:00-03:00 does not exist)
    rules = ContactRules(window_start=time(2, 30), window_end=time(20, 0))
    t = next_contact_time(
        ts("2026-03-08T01:00:00", "America/New_York"), rules, time_zone="America/New_York"
    )
    assert local(t, "America/New_York") == "2026-03-08 03:30 Sun"


def test_at_most_one_a_day_and_three_a_week() -> None:
    rules = ContactRules()
    tz = "America/New_York"
    contacts: list[float] = []
    due = ts("2026-03-02T09:00:00", tz)
    for _ in range(6):
        t = next_contact_time(due, rules, time_zone=tz, previous_contacts=contacts)
        contacts.append(t)
    days = [local(c, tz) for c in contacts]
    assert days[:3] == ["2026-03-02 09:00 Mon", "2026-03-03 09:00 Tue", "2026-03-04 09:00 Wed"]
    # the fourth waits until the first is a week old
    assert days[3] == "2026-03-09 09:00 Mon"
    # the DST change on 2026-03-08 does not shift the local hour
    assert all(d.endswith("09:00 " + d[-3:]) for d in days)
    dates = [datetime.fromtimestamp(c, ZoneInfo(tz)).date() for c in contacts]
    for d in dates:
        assert sum(1 for e in dates if 0 <= (d - e).days <= 6) <= 3


def test_business_days_skip_weekends_and_holidays() -> None:
    rules = ContactRules(business_days=True, holidays=frozenset({date(2026, 12, 25)}))
    tz = "America/New_York"
    # Thursday 2026-12-24 at 21:00 → Friday is a holiday → Monday 28th 09:00
    t = next_contact_time(ts("2026-12-24T21:00:00", tz), rules, time_zone=tz)
    assert local(t, tz) == "2026-12-28 09:00 Mon"


def test_coordinator_priority_orders_urgent_and_old_first() -> None:
    routine_new = coordinator_priority(
        days_open=14, priority="routine", failed_contacts=0, needed_by_days=None
    )
    urgent_new = coordinator_priority(
        days_open=14, priority="urgent", failed_contacts=0, needed_by_days=None
    )
    routine_old = coordinator_priority(
        days_open=40, priority="routine", failed_contacts=2, needed_by_days=-1
    )
    assert urgent_new > routine_new
    assert routine_old > routine_new
    assert 0 <= routine_new <= 100


def test_parse_duration() -> None:
    assert parse_duration("90m") == 5400
    assert parse_duration("1.5d") == 1.5 * DAY
    assert parse_duration(3600) == 3600
    with pytest.raises(ValueError):
        parse_duration("7 days")


def test_utc_helper_sanity() -> None:
    assert datetime.fromtimestamp(OPENED, UTC).weekday() == 0
