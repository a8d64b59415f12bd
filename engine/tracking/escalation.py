"""The escalation policy: which timers a referral gets, and when a patient may be contacted.

Pure: no I/O, no clock reads. Times are epoch seconds (UTC); the patient's local time
comes from their IANA time zone (``zoneinfo``), so quiet hours follow DST changes.

Escalation follows progress (DESIGN.md): each step's clock starts when the referral's
state makes it necessary, and its condition is checked against the state when it fires.
Default cadence (overridable per specialty category and per priority in ``routes.yaml``
``escalation:``; docs/escalation.md has the state-by-state table):

| group       | kind                 | after                        | if still                 |
|-------------|----------------------|------------------------------|--------------------------|
| patient     | first-nudge          | 1 d from open / no-show      | patient not booked       |
| patient     | second-nudge         | 7 d                          | patient not booked       |
| patient     | coordinator-task     | 14 d                         | patient not booked       |
| patient     | outreach             | 30 d                         | patient not booked       |
| patient     | attempt-close        | 60 d                         | patient not booked       |
| referral    | specialist-followup  | 7 d (resend), +7 d (task)    | specialist not confirmed |
| appointment | appointment-reminder | 1 d before the visit (opt-in)| still booked             |
| appointment | report-request       | visit + 3 d, then every +7 d | no report                |
| appointment | report-task          | +7 d after the last request  | no report                |

(``report_requests`` automated requests, 2 by default, before the report task.)
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime, time, timedelta
from typing import Any, Final, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from engine.config import Config, Reader, Section
from engine.errors import ConfigError

TimerKind = Literal[
    "first-nudge",
    "second-nudge",
    "specialist-followup",
    "coordinator-task",
    "outreach",
    "attempt-close",
]
TIMER_KINDS: Final[tuple[TimerKind, ...]] = (
    "first-nudge",
    "second-nudge",
    "specialist-followup",
    "coordinator-task",
    "outreach",
    "attempt-close",
)
NUDGE_KINDS: Final = frozenset({"first-nudge", "second-nudge"})
# The not-booked branch: a booking cancels all of these, a no-show or a cancelled
# appointment schedules them again from that moment (its own clock).
PATIENT_KINDS: Final = frozenset(
    {"first-nudge", "second-nudge", "coordinator-task", "outreach", "attempt-close"}
)
# The booked branch: a new appointment date reschedules these, losing the booking
# cancels them.
APPOINTMENT_KINDS: Final = frozenset({"appointment-reminder", "report-request", "report-task"})
# What those timers queue (outbox templates): a booking cancels the rows not yet sent
# (a call held for the contact window, a retry), so a booked patient hears nothing more.
NOT_BOOKED_TEMPLATES: Final = frozenset(
    {
        "first_nudge",
        "second_nudge",
        "followup-call",
        "outreach-call",
        "outreach-letter",
        "outreach",
        "coordinator-followup",
        "call-patient",
        "call-to-book",
    }
)
SPECIALIST_KINDS: Final = frozenset({"specialist-followup"})
CHANNELS: Final = ("sms", "portal", "voice")
# The staff channels the built-in task queue serves whenever routes.yaml gives them no
# external worklist (engine.delivery.task_queue): something always serves these.
QUEUE_CHANNELS: Final = frozenset({"task", "coordinator"})

DAY: Final = 86_400.0
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(m|h|d|w)\s*$")
_UNIT: Final = {"m": 60.0, "h": 3600.0, "d": DAY, "w": 7 * DAY}


def parse_duration(text: str | int | float) -> float:
    """``90m``, ``24h``, ``7d``, ``2w`` (or a number of seconds) → seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    m = _DURATION.match(str(text))
    if not m:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90m, 24h, 7d, 2w)")
    return float(m.group(1)) * _UNIT[m.group(2)]


@dataclass(frozen=True, slots=True)
class Cadence:
    """Offsets (seconds after the referral opened) for each timer kind."""

    offsets: Mapping[str, float]
    on_close: Literal["close", "human"] = "close"

    def due(self, kind: str, opened_at: float) -> float:
        return opened_at + self.offsets[kind]


DEFAULT_OFFSETS: Final[dict[str, float]] = {
    "first-nudge": 1 * DAY,
    "second-nudge": 7 * DAY,
    "specialist-followup": 7 * DAY,
    "coordinator-task": 14 * DAY,
    "outreach": 30 * DAY,
    "attempt-close": 60 * DAY,
    # the steps that follow progress rather than the opening day
    "specialist-task": 7 * DAY,  # after the packet was resent: "call the office" task
    "appointment-reminder": 1 * DAY,  # before the visit (only with appointment_reminder)
    "report-request": 3 * DAY,  # after the visit: first automated report request
    "report-repeat": 7 * DAY,  # between the requests, and before the human task
}
# A booking that names no appointment date: the visit is assumed this long after it.
UNDATED_VISIT: Final = 30 * DAY


TimerGroup = Literal["referral", "patient", "report"]


@dataclass(frozen=True, slots=True)
class TimerSpec:
    """A timer to schedule: ``delay`` seconds from now."""

    kind: str
    delay: float
    attempt: int = 1


@dataclass(frozen=True, slots=True)
class ContactRules:
    """When a patient may be contacted: local quiet hours, frequency caps, business days."""

    window_start: time = time(9, 0)  # contact allowed from …
    window_end: time = time(20, 0)  # … until (exclusive)
    per_day: int = 1
    per_week: int = 3  # in any 7 consecutive local calendar days
    business_days: bool = False  # weekdays only, skipping holidays
    holidays: frozenset[date] = frozenset()
    default_time_zone: str = "America/New_York"


@dataclass(frozen=True, slots=True)
class Policy:
    default: Cadence = field(default_factory=lambda: Cadence(dict(DEFAULT_OFFSETS)))
    by_specialty: Mapping[str, Cadence] = field(default_factory=dict)
    by_priority: Mapping[str, float] = field(default_factory=dict)  # scale factor, e.g. 0.5
    rotation: tuple[str, ...] = CHANNELS
    contact: ContactRules = field(default_factory=ContactRules)
    appointment_reminder: bool = False  # an SMS the day before the visit (opt-in)
    notify: str = ""  # the channel for notices to the referring provider ("" = timeline)
    # The channel that mails the day-30 outreach letter (a print-and-mail service behind a
    # webhook, say); "" = the letter is a coordinator task ``outreach-letter``.
    letter: str = ""
    packet_task: bool = True  # a task when the packet cannot be sent at all
    # A nudge no automated channel can deliver (the rotation's voice slot with no voice
    # channel, or an automated call that may not be placed): a ``call-patient`` task at
    # once (True), or nothing, the person's call being the 14-day step (False).
    nudge_call_task: bool = False
    # Day 14, not booked: an automated call where one may be placed (a voice channel,
    # consent, a number not suppressed) instead of the coordinator task (True).
    followup_call: bool = True
    # Day 14, not booked, no automated call possible: the letter by the ``letter``
    # channel instead of the coordinator task; a person's call then waits for the
    # day-30 outreach (True).
    followup_letter: bool = False
    # How many automated report requests go to the office (``report_repeat`` apart)
    # before the ``call-for-report`` task.
    report_requests: int = 2
    # A person's call to book that replaces an automated call that may not be placed (no
    # consent, no voice channel) is queued only for a referral whose task would score at
    # least this (``priority_score``, 0-100: urgency, age, failed contacts, needed-by
    # date); below it the mailed letter is the last contact and the referral's timeline
    # says ``call-task-not-queued``. 0: always (the default).
    call_task_min_score: int = 0
    # Rotation slot -> the configured channel serving it (engine.routing.channels.
    # rotation_slots); None: every slot is a channel of its own name. A ``voice`` slot
    # no channel serves is a "call the patient" coordinator task (the built-in queue).
    slots: Mapping[str, str] | None = None
    # The channel names something serves (configured channels and QUEUE_CHANNELS);
    # None: every name. The packet and report requests skip a direct/fax nothing serves.
    served: frozenset[str] | None = None

    def cadence(self, specialty_category: str = "", priority: str = "") -> Cadence:
        """The cadence for a referral: the specialty's override (or the default), with
        offsets scaled by the priority's factor (urgent referrals move faster)."""
        base = self.by_specialty.get(specialty_category.lower(), self.default)
        scale = self.by_priority.get(priority.lower(), 1.0)
        if scale == 1.0:
            return base
        return replace(base, offsets={k: v * scale for k, v in base.offsets.items()})

    def initial_timers(
        self, opened_at: float, specialty_category: str = "", priority: str = ""
    ) -> list[tuple[TimerKind, float]]:
        """Every timer a new referral gets, in due order. Patient-contact timers are not
        yet moved into the contact window: that happens when they fire (see
        :func:`next_contact_time`), so the caps see the contacts actually made."""
        cadence = self.cadence(specialty_category, priority)
        timers = [(kind, cadence.due(kind, opened_at)) for kind in TIMER_KINDS]
        return sorted(timers, key=lambda kt: (kt[1], TIMER_KINDS.index(kt[0])))

    def timers(
        self, group: TimerGroup, specialty_category: str = "", priority: str = ""
    ) -> tuple[TimerSpec, ...]:
        """The timers the tracker schedules when a referral opens (``referral``: the
        specialist follow-up), when the patient branch (re)starts at the opening or after a
        no-show or a cancelled appointment (``patient``: nudges, coordinator task,
        outreach, attempt-close, each from that moment) and after a visit reported as seen
        (``report``: the first automated report request)."""
        cadence = self.cadence(specialty_category, priority)
        if group == "patient":
            return (
                TimerSpec("first-nudge", cadence.offsets["first-nudge"], 1),
                TimerSpec("second-nudge", cadence.offsets["second-nudge"], 2),
                *(
                    TimerSpec(kind, cadence.offsets[kind])
                    for kind in ("coordinator-task", "outreach", "attempt-close")
                ),
            )
        if group == "report":
            return (TimerSpec("report-request", cadence.offsets["report-request"], 1),)
        return (TimerSpec("specialist-followup", cadence.offsets["specialist-followup"], 1),)

    def appointment_timers(
        self, visit: float, now: float, specialty_category: str = "", priority: str = ""
    ) -> tuple[TimerSpec, ...]:
        """The booked branch for a visit at ``visit`` (epoch seconds): the optional
        reminder the day before (only while still ahead) and the first report request
        ``report-request`` after the visit. Delays are from ``now``."""
        cadence = self.cadence(specialty_category, priority)
        out: list[TimerSpec] = []
        remind = visit - cadence.offsets["appointment-reminder"]
        if self.appointment_reminder and remind > now:
            out.append(TimerSpec("appointment-reminder", remind - now, 1))
        request = visit + cadence.offsets["report-request"]
        out.append(TimerSpec("report-request", max(0.0, request - now), 1))
        return tuple(out)

    def patient_kinds(self) -> frozenset[str]:
        """What a booking cancels."""
        return PATIENT_KINDS

    def appointment_kinds(self) -> frozenset[str]:
        """What a new appointment date replaces and a no-show or cancel deletes."""
        return APPOINTMENT_KINDS

    def channel_for(self, attempt: int, *, sms_allowed: bool, portal: bool = True) -> str:
        """The rotation slot for the ``attempt``-th patient nudge (0-based), skipping SMS
        without consent (the rotation then starts at the portal), the portal for a
        patient without one, and an SMS or portal slot no channel serves. ``voice`` is
        always usable: a voice channel, else a "call the patient" task (:meth:`slot_channel`)."""
        usable = [
            c
            for c in self.rotation
            if (c != "sms" or sms_allowed)
            and (c != "portal" or portal)
            and (c == "voice" or self.slot_channel(c) is not None)
        ] or ["voice"]
        return usable[attempt % len(usable)]

    def slot_channel(self, slot: str) -> str | None:
        """The channel that serves rotation ``slot``; None when no channel does (for
        ``voice``: the patient call becomes a coordinator task)."""
        return slot if self.slots is None else self.slots.get(slot)

    def serves(self, channel: str) -> bool:
        """Whether something serves ``channel`` (a configured channel or the task queue)."""
        return self.served is None or channel in self.served


def zone(name: str, default: str) -> ZoneInfo:
    """The patient's zone, or the practice default when unknown or not a valid IANA name."""
    for candidate in (name, default, "UTC"):
        if candidate:
            try:
                return ZoneInfo(candidate)
            except (ZoneInfoNotFoundError, ValueError):
                continue
    return ZoneInfo("UTC")


def next_contact_time(
    due: float,
    rules: ContactRules,
    *,
    time_zone: str = "",
    previous_contacts: Iterable[float] = (),
) -> float:
    """The earliest moment at or after ``due`` when the patient may be contacted:
    inside the local window, on a business day if required, and without breaking the
    per-day and per-week caps (local calendar days: at most ``per_day`` on one day and
    ``per_week`` in any 7 consecutive days) given the earlier contacts.
    """
    tz = zone(time_zone, rules.default_time_zone)
    earlier = sorted(previous_contacts)
    t = datetime.fromtimestamp(due, tz)
    for _ in range(400):  # bounded: at most about a year of days
        day = t.date()
        if rules.business_days and (day.weekday() >= 5 or day in rules.holidays):
            t = _at(day + timedelta(days=1), rules.window_start, tz)
            continue
        start = _at(day, rules.window_start, tz)
        end = _at(day, rules.window_end, tz)
        if t < start:
            t = start
        if t >= end:
            t = _at(day + timedelta(days=1), rules.window_start, tz)
            continue
        days = [datetime.fromtimestamp(c, tz).date() for c in earlier]
        if sum(1 for d in days if d == day) >= rules.per_day:
            t = _at(day + timedelta(days=1), rules.window_start, tz)
            continue
        week = sorted(d for d in days if day - timedelta(days=6) <= d <= day)
        if len(week) >= rules.per_week:
            # wait for the day the oldest of them leaves the 7-day window
            t = _at(week[0] + timedelta(days=7), rules.window_start, tz)
            continue
        return t.timestamp()
    raise ValueError("no contact time within a year; check the contact rules")


def _at(day: date, at: time, tz: ZoneInfo) -> datetime:
    """Local wall time on ``day``; a time skipped by a DST change moves forward (fold=0)."""
    naive = datetime.combine(day, at)
    local = naive.replace(tzinfo=tz)
    # round-trip through UTC normalises non-existent local times (spring forward)
    return datetime.fromtimestamp(local.timestamp(), tz)


def coordinator_priority(
    *, days_open: float, priority: str, failed_contacts: int, needed_by_days: float | None
) -> int:
    """A 0–100 score for ordering the coordinator's list: urgency first, then age,
    then contacts that failed, then how close the needed-by date is."""
    score = {"stat": 50, "urgent": 35}.get(priority.lower(), 10)
    score += min(25, int(days_open // 2))
    score += min(15, 5 * failed_contacts)
    if needed_by_days is not None:
        score += 10 if needed_by_days <= 0 else (5 if needed_by_days <= 7 else 0)
    return min(100, score)


# ---------------------------------------------------------------------------
# Reading the ``escalation:`` section


_CADENCE_KEYS: Final = {k.replace("-", "_"): k for k in DEFAULT_OFFSETS}


def compile_policy(config: Config) -> Policy:
    """The policy from routes.yaml's ``escalation:`` (defaults when absent); raises
    ConfigError listing every problem."""
    problems: list[str] = []
    channels = config.sections.get("channels")
    names = [str(k) for k in channels.data] if channels is not None and channels.data else []
    policy = policy_from_section(config.sections.get("escalation"), problems, config.env, names)
    if problems:
        raise ConfigError(problems)
    return policy


def policy_from_section(
    section: Section | None,
    problems: list[str],
    env: Mapping[str, str] | None = None,
    channels: Collection[str] | None = None,
) -> Policy:
    """Read an ``escalation:`` section, appending problems (``file:line key.path: …``).

    ```yaml
    escalation:
      cadence: {first_nudge: 1d, second_nudge: 7d, specialist_followup: 7d,
                coordinator_task: 14d, outreach: 30d, attempt_close: 60d,
                specialist_task: 7d, appointment_reminder: 1d, report_request: 3d,
                report_repeat: 7d}
      appointment_reminder: false  # an SMS the day before the visit
      notify: ""                   # channel for notices to the referring provider
      letter: ""                   # channel that mails the 30-day letter ("": a task)
      packet_task: true            # a task when the packet cannot be sent at all
      nudge_call_task: false       # a nudge nothing automated can deliver: no task
      followup_call: true          # day 14: an automated call before any coordinator task
      followup_letter: false       # day 14, no call possible: the mailed letter, not a task
      report_requests: 2           # automated report requests before the call-for-report task
      call_task_min_score: 0       # a person's call in place of an automated one: score >= N
      on_close: close            # or: human
      rotation: [sms, portal, voice]
      specialties: {cardiology: {second_nudge: 5d}}
      priorities: {urgent: 0.5, stat: 0.25}
      contact: {window: "09:00-20:00", per_day: 1, per_week: 3, business_days: false,
                holidays: [2026-12-25], default_time_zone: America/New_York}
    ```
    """
    if section is None or not section.data:
        return Policy()
    r = Reader(section.doc, section.path, problems, env)
    on_close = r.choice("on_close", ("close", "human"), "close")
    default = _cadence(r.child("cadence") if r.has("cadence") else None, DEFAULT_OFFSETS, on_close)
    specialties: dict[str, Cadence] = {}
    if r.has("specialties"):
        sr = r.child("specialties")
        for name in list(sr.data):
            specialties[str(name).lower()] = _cadence(sr.child(name), default.offsets, on_close)
        sr.done()
    priorities: dict[str, float] = {}
    if r.has("priorities"):
        pr = r.child("priorities")
        for name in list(pr.data):
            factor = pr.number(name, 1.0)
            if not 0 < factor <= 10:
                pr.fail(name, "must be a factor between 0 and 10 (0.5 = twice as fast)")
            priorities[str(name).lower()] = factor
        pr.done()
    rotation = r.texts("rotation") or CHANNELS
    for i, ch in enumerate(rotation):
        if ch not in CHANNELS:
            r.fail(("rotation", i), f"unknown channel {ch!r}; use {', '.join(CHANNELS)}")
    contact = _contact(r.child("contact")) if r.has("contact") else ContactRules()
    reminder = r.flag("appointment_reminder", False)
    notify = r.text("notify", "")
    if notify and channels is not None and notify not in channels:
        r.fail("notify", f"no channel named {notify!r} in channels:")
    letter = r.text("letter", "")
    if letter and channels is not None and letter not in channels:
        r.fail("letter", f"no channel named {letter!r} in channels:")
    elif letter in QUEUE_CHANNELS:
        r.fail("letter", f"{letter!r} is a staff channel; name the channel that mails letters")
    packet_task = r.flag("packet_task", True)
    nudge_call_task = r.flag("nudge_call_task", False)
    followup_call = r.flag("followup_call", True)
    followup_letter = r.flag("followup_letter", False)
    if followup_letter and not letter:
        r.fail("followup_letter", "needs `letter:`, the channel that mails the letter")
    report_requests = r.integer("report_requests", 2, lo=1, hi=10)
    call_task_min_score = r.integer("call_task_min_score", 0, lo=0, hi=101)
    r.done()
    return Policy(
        default=default,
        by_specialty=specialties,
        by_priority=priorities,
        rotation=tuple(rotation),
        contact=contact,
        appointment_reminder=reminder,
        notify=notify,
        letter=letter,
        packet_task=packet_task,
        nudge_call_task=nudge_call_task,
        followup_call=followup_call,
        followup_letter=followup_letter,
        report_requests=report_requests,
        call_task_min_score=call_task_min_score,
    )


def _cadence(r: Reader | None, base: Mapping[str, float], on_close: str) -> Cadence:
    offsets = dict(base)
    if r is not None:
        for key in list(r.data):
            kind = _CADENCE_KEYS.get(str(key))
            if kind is None:
                r.raw(key)
                r.fail(key, f"unknown timer; use {', '.join(sorted(_CADENCE_KEYS))}")
                continue
            raw = r.raw(key)
            try:
                offsets[kind] = parse_duration(raw)
            except ValueError as exc:
                r.fail(key, str(exc))
        r.done()
    return Cadence(offsets, "human" if on_close == "human" else "close")


def _contact(r: Reader) -> ContactRules:
    window = r.text("window", "09:00-20:00")
    m = re.fullmatch(r"(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})", window)
    start, end = time(9, 0), time(20, 0)
    if not m or int(m[1]) > 23 or int(m[3]) > 23 or int(m[2]) > 59 or int(m[4]) > 59:
        r.fail("window", f"must look like 09:00-20:00, not {window!r}")
    else:
        start, end = time(int(m[1]), int(m[2])), time(int(m[3]), int(m[4]))
        if end <= start:
            r.fail("window", "must end after it starts")
    holidays: set[date] = set()
    for i, value in enumerate(_dates(r.raw("holidays", []))):
        if isinstance(value, date):
            holidays.add(value)
        else:
            r.fail(("holidays", i), f"not a date (YYYY-MM-DD): {value!r}")
    tz = r.text("default_time_zone", "America/New_York")
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        r.fail("default_time_zone", f"unknown IANA time zone {tz!r}")
    rules = ContactRules(
        window_start=start,
        window_end=end,
        per_day=r.integer("per_day", 1, lo=1, hi=24),
        per_week=r.integer("per_week", 3, lo=1, hi=100),
        business_days=r.flag("business_days", False),
        holidays=frozenset(holidays),
        default_time_zone=tz,
    )
    r.done()
    return rules


def _dates(values: Any) -> Sequence[Any]:
    if not isinstance(values, list):
        return [values]
    out: list[Any] = []
    for v in values:
        if isinstance(v, date):
            out.append(v)
        else:
            try:
                out.append(date.fromisoformat(str(v)))
            except ValueError:
                out.append(v)
    return out
