"""The simulator's outcome measures (issue 15): a generated practice from a named behaviour
model, coordinator hours from minutes per kind of work, automated actions by kind, and the
baseline run of the same population beside refloop's — through the `refloop` executable."""

from __future__ import annotations

import json
import random
import statistics
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from helpers import refloop

from engine.sim.model import Lognormal, Model, directory, npi_with_check_digit

MINUTES = {"patient_call": 5, "office_call": 11, "letter": 7, "fax_by_hand": 13, "review": 2}
SMALL = {
    "name": "small generated practice",
    "seed": 11,
    "start": "2026-03-02T08:00:00-05:00",
    "days": 21,
    "follow_up": 40,
    "generate": {
        "per_month": 60,
        "directory": {"direct": 0.5, "fax": 0.5, "unknown": 0.0},
        "offices_per_specialty": 2,
    },
    "staff": {"minutes": {**MINUTES, "default": 17}},
}


def write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_compare_runs_one_population_with_and_without_automation(tmp_path: Path) -> None:
    done = refloop("simulate", str(write(tmp_path, SMALL)), "--compare", "--json", timeout=600)
    assert done.returncode == 0, done.stderr.decode()
    both = json.loads(done.stdout)
    ref, base = both["refloop"]["totals"], both["baseline"]["totals"]
    expected_referrals = round(60 * 21 / 30)  # per_month × days / 30
    assert ref["referrals"] == base["referrals"] == expected_referrals
    assert (both["refloop"]["mode"], both["baseline"]["mode"]) == ("refloop", "baseline")

    # the baseline practice does nothing automatically but send the packet: no nudges, and
    # no staff work but the 14-day task (plus what the engine cannot do without a channel)
    assert base["nudges_by_channel"] == {}
    assert set(base["coordinator_tasks_by_kind"]) <= {
        "coordinator-followup",
        "referrer-closed",
        "no-way-to-reach-specialist",
    }
    assert base["coordinator_tasks_by_kind"]["coordinator-followup"] <= expected_referrals
    assert sum(ref["nudges_by_channel"].values()) > 0

    # every referral's packet went to its office by the directory's reach (half Direct,
    # half fax-only, none unknown): once each in the baseline; refloop may resend a packet
    # the office did not acknowledge (issue 15), never send fewer
    for totals in (ref, base):
        packets = {
            k: v for k, v in totals["automated_by_kind"].items() if k.endswith(":specialist-packet")
        }
        assert set(packets) == {"direct:specialist-packet", "fax:specialist-packet"}
        if totals is base:
            assert sum(packets.values()) == expected_referrals
        else:
            assert sum(packets.values()) >= expected_referrals

    # minutes: each task costs its kind of work's minutes, per docs/simulator.md's mapping
    work = {
        "coordinator-followup": "patient_call",
        "outreach-call": "patient_call",
        "call-patient": "patient_call",
        "outreach-letter": "letter",
        "call-specialist-office": "office_call",
        "chase-report": "office_call",
        "call-for-report": "office_call",
        "no-way-to-reach-specialist": "fax_by_hand",
        "referrer-closed": "review",
        "decide-close": "review",
    }
    for totals in (ref, base):
        by_work: dict[str, int] = {}
        for kind, count in totals["coordinator_tasks_by_kind"].items():
            w = "patient_call" if kind.startswith("voice:") else work.get(kind, "default")
            by_work[w] = by_work.get(w, 0) + count * {**MINUTES, "default": 17}[w]
        assert totals["coordinator_minutes_by_work"] == dict(sorted(by_work.items()))
        hours = sum(totals["coordinator_hours_by_week"].values())
        assert (
            abs(hours - sum(by_work.values()) / 60)
            < 0.05 * len(totals["coordinator_hours_by_week"]) + 0.01
        )


def test_the_markdown_table_is_a_command(tmp_path: Path) -> None:
    small = {**SMALL, "days": 7, "follow_up": 10}
    done = refloop("simulate", str(write(tmp_path, small)), "--compare", "--markdown", timeout=600)
    assert done.returncode == 0, done.stderr.decode()
    text = done.stdout.decode()
    assert "|  | baseline (a task at 14 days) | refloop |" in text
    assert "| closed with report within 90d |" in text
    assert "| coordinator hours per week (steady state) |" in text


def test_markdown_without_compare_is_a_usage_error(tmp_path: Path) -> None:
    done = refloop("simulate", str(write(tmp_path, SMALL)), "--markdown")
    assert done.returncode != 0  # a usage error (2 from click; 1 where usage errors are one line)
    assert b"--markdown goes with --compare" in done.stderr
    assert b"Traceback" not in done.stderr


def test_an_unknown_model_parameter_is_named(tmp_path: Path) -> None:
    bad = {**SMALL, "generate": {"per_month": 10, "patient": {"sms_reach": 0.5}}}
    done = refloop("simulate", str(write(tmp_path, bad)))
    assert done.returncode != 0
    assert b"generate.patient: unknown keys: sms_reach" in done.stderr
    assert b"Traceback" not in done.stderr


def test_the_notification_and_task_channels_are_served(tmp_path: Path) -> None:
    keep = tmp_path / "kept"
    small = {**SMALL, "days": 2, "follow_up": 1}
    done = refloop("simulate", str(write(tmp_path, small)), "--summary", "--keep", str(keep))
    assert done.returncode == 0, done.stderr.decode()
    channels = yaml.safe_load((keep / "routes.yaml").read_text(encoding="utf-8"))["channels"]
    assert {"notify", "task", "coordinator"} <= set(channels)


def test_the_model_draws_what_its_parameters_say() -> None:
    rng = random.Random(5)
    days = [Lognormal(5.0, 30.0).draw(rng) for _ in range(40_000)]
    assert abs(statistics.median(days) - 5.0) < 0.25
    assert abs(statistics.quantiles(days, n=10)[-1] - 30.0) < 2.0

    # the directory's shares are apportioned exactly: 40 offices, 18 / 20 / 2
    offices = directory(Model(), random.Random(1))
    counts = {k: sum(o.reach == k for o in offices) for k in ("direct", "fax", "unknown")}
    assert counts == {"direct": 18, "fax": 20, "unknown": 2}
    assert all(o.direct_address for o in offices if o.reach == "direct")
    # an "unknown" office has a fax line like any other; the practice has none on file
    assert all(o.fax for o in offices)
    # a published valid NPI (CMS's example) gets its check digit back
    assert npi_with_check_digit("123456789") == "1234567893"


def test_the_baseline_pushes_every_cadence_step_but_the_14_day_task() -> None:
    from engine.sim.simulate import baseline_escalation
    from engine.tracking.escalation import DEFAULT_OFFSETS, parse_duration

    section = baseline_escalation(
        {"cadence": {"first_nudge": "2d"}, "specialties": {"cardiology": {"outreach": "9d"}}}
    )
    cadence = section["cadence"]
    # every step the engine knows, including any added later, is out of a run's reach
    assert {k.replace("-", "_") for k in DEFAULT_OFFSETS} == set(cadence)
    for key, value in cadence.items():
        if key == "coordinator_task":
            assert parse_duration(value) == 14 * 86_400
        else:
            assert parse_duration(value) >= 365 * 86_400, key
    assert "specialties" not in section
    # the automation's switches go too, and what remains is a valid escalation section
    shipped = {"letter": "letter", "followup_letter": True, "notify": "notify"}
    stripped = baseline_escalation({**shipped, "appointment_reminder": True})
    assert not {"letter", "followup_letter", "notify", "appointment_reminder"} & set(stripped)
    assert stripped["followup_call"] is False


def test_refloop_calls_by_the_automated_voice_channel_and_the_baseline_by_hand(
    tmp_path: Path,
) -> None:
    """The refloop run configures the automated voice channel at the provider boundary
    (type voice, so its calls are nobody's work); the baseline keeps no automation."""
    small = {**SMALL, "days": 2, "follow_up": 1}
    for flag, kind in (("--summary", "voice"), ("--baseline", "webhook")):
        keep = tmp_path / flag
        args = ["--summary"] if flag == "--summary" else ["--summary", "--baseline"]
        done = refloop("simulate", str(write(tmp_path, small)), *args, "--keep", str(keep))
        assert done.returncode == 0, done.stderr.decode()
        routes = yaml.safe_load((keep / "routes.yaml").read_text(encoding="utf-8"))
        assert routes["channels"]["voice"]["type"] == kind


def test_an_automated_call_books_as_a_live_call_when_answered() -> None:
    """Defaults: answered 0.40 × books 0.50 (a reached live call, [25]) + voicemail 0.30 ×
    a first nudge's 0.03 / (1 - 0.75) = 0.2 + 0.036 = 0.236 for a patient who would not
    book on their own."""
    model, rng = Model(), random.Random(9)
    n = 40_000
    booked = sum(model.automated_call_books(rng, 1, False) for _ in range(n)) / n
    assert abs(booked - 0.236) < 0.01


def test_a_declining_office_returns_the_referral_and_nobody_chases_it(tmp_path: Path) -> None:
    """``specialist.declined`` is "the office returns the referral" (docs/simulator.md):
    the office that logged it sends a 360X decline (OSU^O51, ORC-5 CA) within
    ``confirm_days``, so the referral closes ``specialist-declined`` and no coordinator
    task follows. Every office here is fax-only and every fax gets through, so every
    packet is logged on arrival and declined within 4 days, before any 14-day step."""
    every = {
        **SMALL,
        "days": 10,
        "follow_up": 30,
        "generate": {
            "per_month": 60,
            "directory": {"direct": 0.0, "fax": 1.0, "unknown": 0.0},
            "offices_per_specialty": 2,
            "specialist": {"declined": 1.0, "intake_lost": 0.0, "fax_reach": 1.0},
        },
    }
    done = refloop("simulate", str(write(tmp_path, every)), "--json", "--summary", timeout=600)
    assert done.returncode == 0, done.stderr.decode()
    totals = json.loads(done.stdout)["totals"]
    referrals = round(60 * 10 / 30)
    assert totals["close_reasons"] == {"specialist-declined": referrals}
    assert totals["coordinator_tasks_by_kind"] == {}


def test_a_person_does_the_work_the_task_asks_for(tmp_path: Path) -> None:
    """Staff work a task as the kind of work it is costed as: the packet task for an office
    with no address on file (``no-way-to-reach-specialist``, a fax by hand) gets the
    packet to the office, whether or not the patient has booked, so the office confirms
    and the 14-day "call the specialist office" task never comes. (Worked as "what the
    referral needs first", it was a patient call and the office never got the packet.)"""
    unknown = {
        **SMALL,
        "days": 10,
        "follow_up": 30,
        "generate": {
            "per_month": 60,
            "directory": {"direct": 0.0, "fax": 0.0, "unknown": 1.0},
            "offices_per_specialty": 2,
            "specialist": {"declined": 0.0, "intake_lost": 0.0},
        },
    }
    done = refloop("simulate", str(write(tmp_path, unknown)), "--json", "--summary", timeout=600)
    assert done.returncode == 0, done.stderr.decode()
    tasks = json.loads(done.stdout)["totals"]["coordinator_tasks_by_kind"]
    assert tasks["no-way-to-reach-specialist"] == round(60 * 10 / 30)
    assert "call-specialist-office" not in tasks


def test_staff_record_an_unknown_offices_fax_once(tmp_path: Path) -> None:
    """``staff.records_address``: the person who faxes a packet by hand to an office with
    no address on file records the office's fax (``refloop specialists set``), once, at
    ``minutes.directory_entry``. One office, no address on file: a referral queues the
    packet task only until the first task is worked (0.5–2 days after it was queued);
    every referral opened after that sends its packet by fax at once, no person."""
    one = {
        **SMALL,
        "days": 20,
        "follow_up": 10,
        "generate": {
            "per_month": 60,
            "specialties": {"REFCARD": 1},
            "directory": {"direct": 0.0, "fax": 0.0, "unknown": 1.0},
            "offices_per_specialty": 1,
            "specialist": {"declined": 0.0, "intake_lost": 0.0, "fax_reach": 1.0},
        },
        "staff": {
            "records_address": True,
            "minutes": {**MINUTES, "directory_entry": 2, "default": 17},
        },
    }
    done = refloop("simulate", str(write(tmp_path, one)), "--json", timeout=600)
    assert done.returncode == 0, done.stderr.decode()
    result = json.loads(done.stdout)

    def at(text: str) -> float:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()

    refs = sorted(result["referrals"], key=lambda r: at(r["opened"]))
    assert len(refs) == round(60 * 20 / 30)

    def events(r: dict[str, Any], name: str, by: str) -> list[float]:
        return [at(e["at"]) for e in r["timeline"] if e["event"] == name and e["by"] == by]

    first_task = events(refs[0], "out:no-way-to-reach-specialist", "task")
    assert first_task, "the first referral to the office needs a person"
    entry_by = first_task[0] + 2 * 86_400 + 3_600  # worked within 2 days (hourly steps)
    with_task = [r for r in refs if events(r, "out:no-way-to-reach-specialist", "task")]
    later = [r for r in refs if at(r["opened"]) > entry_by]
    assert later, "the scenario has referrals after the entry"
    for r in later:
        assert not events(r, "out:no-way-to-reach-specialist", "task"), r["placer"]
        assert events(r, "out:specialist-packet", "fax")[0] - at(r["opened"]) < 3_600
    totals = result["totals"]
    assert totals["coordinator_tasks_by_kind"]["no-way-to-reach-specialist"] == len(with_task)
    assert len(with_task) < len(refs)
    # one entry (2 minutes) and a fax by hand (13 minutes) for each task
    minutes = totals["coordinator_minutes_by_work"]
    assert minutes["directory_entry"] == 2
    assert minutes["fax_by_hand"] == 13 * len(with_task)
