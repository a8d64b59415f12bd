"""The simulator: the whole loop through the real engine on a virtual clock."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from click.testing import CliRunner

from engine.cli.main import main
from engine.sim.simulate import load_scenario, render_text, simulate, to_json

# every test here uses a store, and it is always a SQLite file of the simulator's own
# (engine/sim/simulate.py sets ``store: {file: sim.db}``): under REFLOOP_TEST_STORE the
# routing would run the simulator on PostgreSQL, which no user can choose
pytestmark = [
    pytest.mark.store,
    pytest.mark.sqlite_file("the simulator's store is always a SQLite file of its own"),
]

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "docs" / "scenarios"

PATIENT_CHANNELS = """
name: patient channels
seed: 3
start: 2026-03-02T08:00:00-05:00
days: 1
follow_up: 20
referrals:
  - {placer: BOOKS-EARLY, at: 1h, sms_consent: true, time_zone: America/New_York,
     patient: {books_by_phone: 6h}, specialist: {confirms: null, report: null}}
  - {placer: BOOKS-AFTER-SMS, at: 2h, sms_consent: true, time_zone: America/New_York,
     patient: {books_after_nudge: 1, book_delay: 2d}, specialist: {confirms: null, report: null}}
  - {placer: SMS-FAILS, at: 3h, sms_consent: true, sms_fails: true,
     time_zone: America/New_York, specialist: {confirms: null, report: null}}
  - {placer: SAYS-YES, at: 4h, sms_consent: true, time_zone: America/New_York,
     patient: {replies_yes: true}, specialist: {confirms: null, report: null}}
"""


def run(tmp_path: Path, text: str) -> dict[str, Any]:
    path = tmp_path / "scenario.yaml"
    path.write_text(text, encoding="utf-8")
    return simulate(load_scenario(path))


def referral(result: dict[str, Any], placer: str) -> dict[str, Any]:
    return next(r for r in result["referrals"] if r["placer"] == placer)


def events(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(e["at"], e["event"], e["by"]) for e in r["timeline"]]


def test_patient_channels_end_to_end(tmp_path: Path) -> None:
    result = run(tmp_path, PATIENT_CHANNELS)

    # a booking (SIU) before the first nudge cancels the patient nudges
    early = referral(result, "BOOKS-EARLY")
    assert "appointment-booked" in [e for _, e, _ in events(early)]
    assert not [e for _, e, _ in events(early) if e.endswith("_nudge")]

    # the first SMS goes out within 24 h of the referral, inside quiet hours
    sms = referral(result, "BOOKS-AFTER-SMS")
    opened = datetime.fromisoformat(sms["opened"])
    (first,) = [at for at, e, by in events(sms) if e == "out:first_nudge"]
    first_at = datetime.fromisoformat(first)
    assert (first_at - opened).total_seconds() <= 24 * 3600
    assert 9 <= first_at.astimezone(ZoneInfo("America/New_York")).hour < 20
    assert [by for _, e, by in events(sms) if e == "out:first_nudge"] == ["sms"]
    # ... and the booking that followed cancelled the second nudge
    assert "appointment-booked" in [e for _, e, _ in events(sms)]
    assert "out:second_nudge" not in [e for _, e, _ in events(sms)]

    # a failed SMS rotates to the portal
    failed = referral(result, "SMS-FAILS")
    first_nudges = [
        (by, st)
        for e in failed["timeline"]
        if e["event"] == "out:first_nudge"
        for by, st in [(e["by"], e["status"])]
    ]
    assert first_nudges[0][0] == "sms"
    assert ("portal", "sent") in first_nudges

    # a YES reply records booking-requested and creates the coordinator's call-to-book task
    yes = referral(result, "SAYS-YES")
    names = [e for _, e, _ in events(yes)]
    assert "booking-requested" in names
    assert any(e.startswith("out:call-to-book") for e in names)

    # no PHI in any text: the SMS bodies are rendered from the allow-listed context only
    assert "SIMULATED" not in to_json(result).upper().replace("SIMULATED FAMILY", "")


def test_same_scenario_same_bytes(tmp_path: Path) -> None:
    scenario = load_scenario(SCENARIOS / "practice-800.yaml", scale=0.02)
    assert 40 <= len(scenario.referrals) <= 60
    first = to_json(simulate(scenario, tmp_path / "a"))
    second = to_json(simulate(scenario, tmp_path / "b"))
    assert first == second
    assert '"referrals": 4' in first or '"referrals": 5' in first


def test_shipped_scenarios_load_and_the_cli_prints_totals(tmp_path: Path) -> None:
    for path in sorted(SCENARIOS.glob("*.yaml")):
        assert load_scenario(path, scale=0.01).referrals
    result = CliRunner().invoke(main, ["simulate", str(SCENARIOS / "hand-picked.yaml")])
    assert result.exit_code == 0, result.output
    assert "referrals 6" in result.output
    assert "closed with report within 30d: 3/6" in result.output
    assert "referral 1 R1: closed (report-received)" in result.output


def test_a_bad_scenario_is_a_clean_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nreferals: []\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["simulate", str(path)])
    assert result.exit_code == 2
    assert "unknown scenario keys: referals" in result.output


@pytest.mark.parametrize("timelines", [True, False], ids=["timelines", "summary"])
def test_text_form(tmp_path: Path, timelines: bool) -> None:
    result = run(tmp_path, PATIENT_CHANNELS)
    text = render_text(result, timelines=timelines)
    assert text.startswith("scenario patient channels")
    assert ("referral 1 " in text) == timelines


def test_direct_and_fax_only_specialists_both_close_the_loop(tmp_path: Path) -> None:
    result = simulate(load_scenario(SCENARIOS / "hand-picked.yaml"))
    for placer, channel in (("R4", "direct"), ("R5", "fax")):
        r = referral(result, placer)
        names = [(e["event"], e["by"]) for e in r["timeline"]]
        assert ("out:specialist-packet", channel) in names
        statuses = [e["status"] for e in r["timeline"] if not e["event"].startswith("out:")]
        assert "specialist-confirmed" in statuses, placer
        assert statuses.index("specialist-confirmed") < statuses.index("closed")
        assert r["status"] == "closed" and r["close_reason"] == "report-received"
    direct = [e["event"] for e in referral(result, "R4")["timeline"]]
    assert "specialist-confirmed" in direct  # the dispatched MDN
    # a fax line that never answers: the packet is dead and a coordinator task follows
    failed = referral(result, "R6")
    assert ("out:specialist-packet", "fax", "dead") in [
        (e["event"], e["by"], e["status"]) for e in failed["timeline"]
    ]
    assert "out:fax-failed" in [e["event"] for e in failed["timeline"]]


def test_inline_hl7_happenings(tmp_path: Path) -> None:
    text = """
name: inline messages
seed: 1
start: 2026-03-02T08:00:00-05:00
days: 1
follow_up: 3
messages:
  - at: 1h
    hl7: "MSH|^~\\\\&|EHR|CLINIC|REFLOOP|CLINIC|20260302140000||ORM^O01|IN1|P|2.5.1\\r\\
      PID|1||M1^^^CLINIC^MR\\rORC|NW|INLINE-1\\rOBR|1|INLINE-1||REFGI^GI referral\\r"
  - at: 2h
    file: cancel.hl7
"""
    (tmp_path / "cancel.hl7").write_bytes(
        b"MSH|^~\\&|EHR|CLINIC|REFLOOP|CLINIC|20260302150000||ORM^O01|IN2|P|2.5.1\n"
        b"PID|1||M1^^^CLINIC^MR\nORC|CA|INLINE-1\n"
    )
    result = run(tmp_path, text)
    (r,) = result["referrals"]
    assert r["placer"] == "INLINE-1"
    assert r["status"] == "closed" and r["close_reason"] == "cancelled"
    assert result["totals"]["messages_in"] == 2


def test_the_same_referral_as_hl7_and_as_fhir_ends_the_same(tmp_path: Path) -> None:
    import json

    from test_fhir_routes import HL7_SCENARIO, SR, appointment, report

    head = "seed: 1\nstart: 2026-01-01T12:00:00+00:00\ndays: 1\nfollow_up: 20\nmessages:\n"
    for i, raw in enumerate(HL7_SCENARIO):
        (tmp_path / f"m{i}.hl7").write_bytes(raw)
    for i, resource in enumerate([SR, appointment("booked"), report()]):
        (tmp_path / f"r{i}.json").write_text(json.dumps(resource), encoding="utf-8")
    hl7_text = (
        "name: as hl7\n"
        + head
        + "".join(f"  - {{at: {i + 1}h, file: m{i}.hl7}}\n" for i in range(3))
    )
    fhir_text = (
        "name: as fhir\n"
        + head
        + "".join(f"  - {{at: {i + 1}h, fhir_file: r{i}.json}}\n" for i in range(3))
    )
    (tmp_path / "a.yaml").write_text(hl7_text, encoding="utf-8")
    (tmp_path / "b.yaml").write_text(fhir_text, encoding="utf-8")
    via_hl7 = simulate(load_scenario(tmp_path / "a.yaml"))
    via_fhir = simulate(load_scenario(tmp_path / "b.yaml"))

    def outcome(result: dict[str, Any]) -> tuple[Any, ...]:
        (r,) = result["referrals"]
        events = [(e["event"], e["status"]) for e in r["timeline"]]
        return r["status"], r["close_reason"], r["patient"], r["specialist"], events

    assert outcome(via_hl7) == outcome(via_fhir)
    assert outcome(via_hl7)[:2] == ("closed", "report-received")
