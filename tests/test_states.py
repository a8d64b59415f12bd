"""The referral state machine, checked against the tables in docs/referral-states.md."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.model import EVENT_TYPES, Event, Identifiers
from engine.tracking import states
from engine.tracking.states import (
    INITIAL,
    Appointment,
    InternalEvent,
    ReferralState,
    apply,
    from_dict,
    overall_status,
    to_dict,
)

DOC = Path(__file__).resolve().parents[1] / "docs" / "referral-states.md"
NONE = "—"


def read_tables(text: str) -> dict[str, list[dict[str, str]]]:
    """Every Markdown table in ``text``, keyed by its header row ("a | b | c")."""
    tables: dict[str, list[dict[str, str]]] = {}
    header: list[str] | None = None
    for line in [*text.splitlines(), ""]:
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip().replace("`", "") for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
            tables[" | ".join(header)] = []
        elif not set("".join(cells)) <= set("-: "):
            tables[" | ".join(header)].append(dict(zip(header, cells, strict=True)))
    return tables


TABLES = read_tables(DOC.read_text(encoding="utf-8"))
TRANSITIONS = TABLES[
    "patient | specialist | status | closed | event | → patient | → specialist | → status"
    " | → closed | effects"
]
EVENTS_TABLE = TABLES["event | from | order-independent | why"]
ORDER_INDEPENDENT = sorted(r["event"] for r in EVENTS_TABLE if r["order-independent"] == "yes")


def make_event(kind: str, at: float = 200.0, **details: Any) -> Event | InternalEvent:
    """An event of ``kind`` with the defaults the transition table states."""
    if kind not in EVENT_TYPES:
        return InternalEvent(kind, at, **details)  # type: ignore[arg-type]
    defaults: dict[str, dict[str, Any]] = {
        "appointment-booked": {"appointment_id": "A1", "start": "2025-03-28T09:00"},
        "appointment-rescheduled": {"appointment_id": "A1", "start": "2025-04-02T09:00"},
        "appointment-cancelled": {"appointment_id": "A1"},
        "no-show": {"appointment_id": "A1"},
        "report-received": {"report_id": "R1", "status": "final"},
        "specialist-declined": {"reason": "capacity"},
    }
    args = {**defaults.get(kind, {}), **details}
    return EVENT_TYPES[kind](ids=Identifiers(placer_number="REF-1"), occurred_at=at, **args)


def parse_event(cell: str) -> Event | InternalEvent:
    match = re.fullmatch(r"([a-z-]+)(?:\((.*)\))?", cell)
    assert match, f"bad event cell {cell!r}"
    details: dict[str, Any] = {}
    for pair in filter(None, (match[2] or "").split(",")):
        key, _, value = pair.strip().partition("=")
        details[key] = float(value) if key == "at" else value
    return make_event(match[1], **details)


def given_state(row: dict[str, str]) -> ReferralState:
    """Build the row's starting state and check that it shows the stated statuses."""
    patient, specialist, status, closed = (
        row[k] for k in ("patient", "specialist", "status", "closed")
    )
    state = ReferralState(created=status != "new", escalated=status == "escalated")
    if patient in states.CONTACT_RANK:
        state = replace(state, contact=patient)
    elif patient == "seen":
        state = replace(state, seen=True)
    else:
        start = "" if patient == "no-show" else "2025-03-21T14:00"
        state = replace(state, appointments=(Appointment("A1", patient, 100.0, start),))  # type: ignore[arg-type]
    if specialist == "report-received":
        state = replace(state, report_ids=("R1",))
    else:
        state = replace(state, specialist=specialist)  # type: ignore[arg-type]
    if closed in ("cancelled", "patient-declined", "no-response", "other"):
        state = replace(state, closed_as=closed)  # type: ignore[arg-type]
    assert (state.patient_status, state.specialist_status) == (patient, specialist)
    assert state.close_reason == ("" if closed == NONE else closed)
    assert status in ("new", state.status)
    return state


def row_id(row: dict[str, str]) -> str:
    return f"{row['patient']}/{row['specialist']}/{row['status']}/{row['closed']}+{row['event']}"


@pytest.mark.parametrize("row", TRANSITIONS, ids=[row_id(r) for r in TRANSITIONS])
def test_transition_table(row: dict[str, str]) -> None:
    before = given_state(row)
    result = apply(before, parse_event(row["event"]))
    after = result.state
    got = {
        "→ patient": after.patient_status,
        "→ specialist": after.specialist_status,
        "→ status": after.status,
        "→ closed": after.close_reason or NONE,
        "effects": ", ".join(result.effects) or NONE,
    }
    assert got == {k: row[k] for k in got}
    assert result.changed == (after != before)
    assert result.changed or result.state is before


def test_table_covers_every_event_kind_and_status() -> None:
    kinds = {re.sub(r"\(.*", "", r["event"]) for r in TRANSITIONS}
    assert kinds == set(EVENT_TYPES) | set(states.INTERNAL_KINDS)
    assert {r["→ patient"] for r in TRANSITIONS} == set(states.PATIENT_STATUSES)
    assert {r["→ specialist"] for r in TRANSITIONS} == set(states.SPECIALIST_STATUSES)
    assert {r["→ status"] for r in TRANSITIONS} == set(states.OVERALL_STATUSES)
    assert {r["→ closed"] for r in TRANSITIONS} - {NONE} == set(states.CLOSE_PRECEDENCE)
    effects = {e for r in TRANSITIONS for e in r["effects"].split(", ")} - {NONE}
    assert effects == set(states.EFFECTS)


def test_docs_tables_match_constants() -> None:
    rows = TABLES["precedence | close reason | set by"]
    assert tuple(r["close reason"] for r in rows) == states.CLOSE_PRECEDENCE
    assert tuple(r["effect"] for r in TABLES["effect | meaning"]) == states.EFFECTS
    assert {r["event"] for r in EVENTS_TABLE} == set(EVENT_TYPES) | set(states.INTERNAL_KINDS)


def every_kind() -> list[Event | InternalEvent]:
    kinds = [*EVENT_TYPES, *states.INTERNAL_KINDS]
    return [
        make_event(k, reason="other") if k == "closed-by-operator" else make_event(k) for k in kinds
    ]


@pytest.mark.parametrize("event", every_kind(), ids=lambda e: e.kind)
@pytest.mark.parametrize("start", ["new", "open", "booked", "closed"])
def test_applying_twice_is_applying_once(event: Event | InternalEvent, start: str) -> None:
    base = {
        "new": INITIAL,
        "open": ReferralState(created=True, contact="nudged", specialist="delivered"),
        "booked": ReferralState(created=True, appointments=(Appointment("A1", "booked", 100.0),)),
        "closed": ReferralState(created=True, closed_as="cancelled"),
    }[start]
    once = apply(base, event)
    twice = apply(once.state, event)
    assert not twice.changed
    assert twice.effects == ()
    assert twice.state is once.state


def test_corrected_report_is_not_counted_twice() -> None:
    state = ReferralState(created=True, specialist="confirmed")
    final = apply(state, make_event("report-received", report_id="DOC-778", status="final"))
    corrected = apply(
        final.state, make_event("report-received", at=300, report_id="DOC-778", status="corrected")
    )
    assert final.state.report_ids == ("DOC-778",)
    assert not corrected.changed
    # The other order: the correction counts, and the late final is then a repeat.
    first = apply(state, make_event("report-received", report_id="DOC-778", status="corrected"))
    late_final = apply(
        first.state, make_event("report-received", report_id="DOC-778", status="final")
    )
    assert first.state.report_ids == ("DOC-778",)
    assert first.state.close_reason == "report-received"
    assert not late_final.changed
    second = apply(final.state, make_event("report-received", report_id="DOC-901"))
    assert second.state.report_ids == ("DOC-778", "DOC-901")
    assert second.effects == ()


@pytest.mark.parametrize(
    "closing",
    [
        make_event("referral-cancelled"),
        make_event("specialist-declined"),
        make_event("patient-declined"),
        make_event("no-response-close"),
        make_event("closed-by-operator", reason="other", note="moved away"),
    ],
    ids=lambda e: e.kind,
)
def test_report_after_close_with_reason_recloses_as_report_received(closing: Any) -> None:
    closed = apply(ReferralState(created=True), closing).state
    assert closed.status == "closed"
    assert closed.close_reason != "report-received"
    result = apply(closed, make_event("report-received", at=900))
    assert result.state.close_reason == "report-received"
    assert result.state.specialist_status == "report-received"
    assert result.effects == ("notify-referrer-closed",)


def test_cancel_stops_all_timers_and_outbound_work() -> None:
    state = apply(INITIAL, make_event("referral-created")).state
    result = apply(
        state, make_event("referral-cancelled", reason="Patient chose another cardiologist")
    )
    assert result.effects == ("cancel-all-timers", "stop-outbound")
    for event in every_kind():
        if event.kind != "report-received":
            assert apply(result.state, event).effects == (), event.kind


def test_cancel_before_creation_sends_nothing() -> None:
    cancelled = apply(INITIAL, make_event("referral-cancelled", at=100)).state
    result = apply(cancelled, make_event("referral-created", at=50))
    assert result.state.status == "closed"
    assert result.effects == ()


def test_decline_keeps_the_reason() -> None:
    state = ReferralState(created=True, specialist="delivered")
    declined = apply(state, make_event("specialist-declined", reason="Not accepting new patients"))
    assert declined.state.decline_reason == "Not accepting new patients"
    assert declined.state.close_reason == "specialist-declined"
    assert declined.effects[-1] == "notify-referrer-declined"
    # A later blank decline keeps the stated reason; a report keeps it too.
    blank = apply(declined.state, make_event("specialist-declined", at=300, reason=""))
    reported = apply(blank.state, make_event("report-received", at=400))
    assert reported.state.decline_reason == "Not accepting new patients"


def test_operator_close_keeps_the_note() -> None:
    close = make_event("closed-by-operator", reason="other", note="moved out of state")
    closed = apply(ReferralState(created=True), close).state
    cancelled = apply(closed, make_event("referral-cancelled")).state
    assert (closed.close_reason, closed.close_note) == ("other", "moved out of state")
    assert (cancelled.close_reason, cancelled.close_note) == ("cancelled", "moved out of state")


def test_declared_order_dependent_events_really_depend_on_order() -> None:
    created = ReferralState(created=True)
    escalate, book = make_event("escalated"), make_event("appointment-booked")
    assert apply(apply(created, escalate).state, book).state.status == "patient-booked"
    assert apply(apply(created, book).state, escalate).state.status == "escalated"
    assert set(ORDER_INDEPENDENT).isdisjoint({"escalated", "closed-by-operator"})


def test_operator_close_needs_a_close_reason() -> None:
    with pytest.raises(ValueError, match="closed-by-operator"):
        InternalEvent("closed-by-operator", reason="")
    with pytest.raises(ValueError, match="seen"):
        InternalEvent("seen", reason="other")


def test_unknown_event_kind_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown"):
        InternalEvent("teleported")  # type: ignore[arg-type]


def test_overall_status_is_derived_never_stored() -> None:
    assert INITIAL.status == overall_status(INITIAL) == "open"
    assert "status" not in to_dict(INITIAL)


def test_state_round_trips_through_dict() -> None:
    state = ReferralState(
        created=True,
        contact="booking-requested",
        appointments=(Appointment("A1", "rescheduled", 5.0, "2025-04-02T09:00"),),
        specialist="declined",
        decline_reason="capacity",
        declined_at=4.0,
        closed_as="cancelled",
        report_ids=("R1", "R2"),
    )
    assert from_dict(json.loads(json.dumps(to_dict(state)))) == state
    # what is stored is what dataclasses.asdict gives (to_dict skips its deep copies)
    assert to_dict(state) == dataclasses.asdict(state)
    assert json.dumps(to_dict(state)) == json.dumps(dataclasses.asdict(state))
    with pytest.raises(ValueError, match="unknown value"):
        from_dict({**to_dict(state), "specialist": "lost"})
    with pytest.raises(ValueError, match="not a referral state"):
        from_dict({"colour": "blue"})


# ---------------------------------------------------------------------------
# Property: the declared order-independent events converge under any permutation.

TIMES = st.sampled_from([100.0, 200.0, 300.0])
APPOINTMENTS = st.sampled_from(["A1", "A2", ""])
STARTS = st.sampled_from(["2025-03-21T14:00", "2025-03-28T09:00"])
STRATEGIES: dict[str, st.SearchStrategy[Event | InternalEvent]] = {
    "appointment-booked": st.builds(
        make_event, st.just("appointment-booked"), TIMES, appointment_id=APPOINTMENTS, start=STARTS
    ),
    "appointment-rescheduled": st.builds(
        make_event,
        st.just("appointment-rescheduled"),
        TIMES,
        appointment_id=APPOINTMENTS,
        start=STARTS,
    ),
    "appointment-cancelled": st.builds(
        make_event, st.just("appointment-cancelled"), TIMES, appointment_id=APPOINTMENTS
    ),
    "no-show": st.builds(make_event, st.just("no-show"), TIMES, appointment_id=APPOINTMENTS),
    "report-received": st.builds(
        make_event,
        st.just("report-received"),
        TIMES,
        report_id=st.sampled_from(["R1", "R2"]),
        status=st.sampled_from(["final", "corrected", "preliminary"]),
    ),
    "specialist-declined": st.builds(
        make_event,
        st.just("specialist-declined"),
        TIMES,
        reason=st.sampled_from(["", "capacity", "out of network"]),
    ),
}


def events_of(kind: str) -> st.SearchStrategy[Event | InternalEvent]:
    if kind in STRATEGIES:
        return STRATEGIES[kind]
    return st.builds(make_event, st.just(kind), TIMES)


SEQUENCES = st.lists(st.sampled_from(ORDER_INDEPENDENT).flatmap(events_of), max_size=12)


def run(events: list[Event | InternalEvent]) -> ReferralState:
    state = INITIAL
    for event in events:
        state = apply(state, event).state
    return state


def test_every_event_is_declared_one_way_or_the_other() -> None:
    assert {r["order-independent"] for r in EVENTS_TABLE} == {"yes", "no"}
    assert set(STRATEGIES) <= set(ORDER_INDEPENDENT)


@settings(max_examples=400)
@given(data=st.data(), events=SEQUENCES)
def test_any_order_ends_in_the_same_state(data: st.DataObject, events: list[Any]) -> None:
    expected = run(events)
    shuffled = data.draw(st.permutations(events))
    assert run(shuffled) == expected
