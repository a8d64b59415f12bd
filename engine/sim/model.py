"""The simulator's behaviour model: how patients, specialist offices and practice staff
act, with every parameter named in the scenario's ``generate:`` section.

Defaults come from ``reference/referral-outcomes.md`` §7 (published figures where there
are any, labelled assumptions otherwise); docs/simulator.md lists each parameter with its
source. Pure: the draws use the ``random.Random`` handed in, so the same seed gives the
same practice and the same reactions.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Final

DAY: Final = 86_400.0
Z90: Final = 1.2816  # the standard normal's 90th percentile


@dataclass(frozen=True, slots=True)
class Lognormal:
    """A lognormal given by its median and 90th percentile (days)."""

    median: float
    p90: float

    def draw(self, rng: random.Random) -> float:
        sigma = math.log(self.p90 / self.median) / Z90
        return self.median * math.exp(sigma * rng.gauss(0.0, 1.0))


def lognormal_by_mean(rng: random.Random, mean: float, cv: float) -> float:
    """A lognormal draw with the given mean and coefficient of variation."""
    s2 = math.log(1.0 + cv * cv)
    return math.exp(math.log(mean) - s2 / 2 + math.sqrt(s2) * rng.gauss(0.0, 1.0))


@dataclass(frozen=True, slots=True)
class PatientModel:
    sms_reachable: float = 0.50  # valid mobile number and recorded SMS consent
    portal: float = 0.40  # has an active portal account (assumption)
    sms_failure: float = 0.05  # the carrier reports the text undelivered (assumption)
    schedules: float = 0.75  # schedules on their own within 90 days, no nudge
    schedule_days: Lognormal = Lognormal(5.0, 30.0)  # referral → the patient books
    nudge_adds: float = 0.03  # extra share of all patients who book after the first nudge
    nudge_decay: float = 0.6  # the k-th contact's effect × decay^(k-1)
    nudge_speeds: float = 0.25  # a patient who would book later books now (assumption)
    phone_reach: float = 0.40  # a staff call reaches the patient
    staff_call_books: float = 0.50  # a reached patient lets staff book (assumption)
    # An automated call (channels.voice): answered by the patient (assumption: as often
    # as a live call, [27] 36 %), else left on voicemail (assumption), else nothing.
    voice_answered: float = 0.40
    voice_voicemail: float = 0.30
    attend: float = 0.80  # attends, lead time over 7 days
    short_lead_odds: float = 2.0  # odds of attending × this when lead time ≤ 7 days
    reminder_effect: float = 1.10  # attendance × this after an appointment reminder
    cancel_ahead: float = 0.5  # a non-attender cancels (S15) rather than no-shows (S26)
    reschedules: float = 0.12  # books again within 6 weeks after a missed visit


@dataclass(frozen=True, slots=True)
class SpecialistModel:
    intake_lost: float = 0.04  # the office never logs the first packet it received
    declined: float = 0.04  # the office returns the referral: never scheduled
    confirm_days: tuple[float, float] = (1.0, 4.0)  # packet → acknowledgement (uniform)
    lead_time_days: Mapping[str, float] = field(
        default_factory=lambda: {
            "REFCARD": 27.0,
            "REFDERM": 35.0,
            "REFGI": 26.0,
            "REFORTHO": 17.0,
            "REFNEURO": 26.0,
        }
    )
    lead_time_cv: float = 0.8
    report_sent: float = 0.90  # the office sends a report after the visit
    report_reaches: float = 0.80  # a sent report reaches the practice's chart
    report_days: Lognormal = Lognormal(5.0, 35.0)  # visit → report sent
    answers_request: float = 0.50  # a request (automated or a call) makes them send it
    fax_reach: float = 0.97  # a fax gets through to the office


@dataclass(frozen=True, slots=True)
class Model:
    """Everything a generated practice needs beyond its volume."""

    per_month: float = 800.0
    urgent: float = 0.1
    specialties: Mapping[str, float] = field(
        default_factory=lambda: {
            "REFCARD": 3,
            "REFDERM": 2,
            "REFGI": 2,
            "REFORTHO": 2,
            "REFNEURO": 1,
        }
    )
    directory: Mapping[str, float] = field(
        default_factory=lambda: {"direct": 0.45, "fax": 0.50, "unknown": 0.05}
    )
    offices_per_specialty: int = 8
    patient: PatientModel = PatientModel()
    specialist: SpecialistModel = SpecialistModel()

    def lead_time(self, rng: random.Random, specialty: str) -> float:
        mean = self.specialist.lead_time_days.get(specialty, 26.0)
        return lognormal_by_mean(rng, mean, self.specialist.lead_time_cv) * DAY

    def attends(self, rng: random.Random, lead: float, reminded: bool) -> bool:
        p = self.patient.attend
        if lead <= 7 * DAY:
            odds = p / (1 - p) * self.patient.short_lead_odds
            p = odds / (1 + odds)
        if reminded:
            p *= self.patient.reminder_effect
        return rng.random() < min(p, 0.99)

    def nudge_books(self, rng: random.Random, k: int, will_book: bool) -> bool:
        """Does the k-th delivered nudge (1-based) make a not-yet-booked patient book now?"""
        decay = self.patient.nudge_decay ** (k - 1)
        if will_book:
            return rng.random() < self.patient.nudge_speeds * decay
        never = max(1e-9, 1 - self.patient.schedules)
        return rng.random() < min(1.0, self.patient.nudge_adds / never) * decay

    def automated_call_books(self, rng: random.Random, k: int, will_book: bool) -> bool:
        """Does an automated call (the k-th contact, 1-based) make a not-yet-booked
        patient book now? Answered: as a live staff call that reaches them (Nielson 2018
        [25]: live calls added nothing to automated ones); on voicemail: as a delivered
        nudge; otherwise not."""
        pm = self.patient
        r = rng.random()
        if r < pm.voice_answered:
            return rng.random() < pm.staff_call_books
        if r < pm.voice_answered + pm.voice_voicemail:
            return self.nudge_books(rng, k, will_book)
        return False


def parse_model(raw: Mapping[str, Any]) -> Model:
    """``generate:`` → :class:`Model`; an unknown key is an error naming it."""
    top = {f.name for f in fields(Model)}
    unknown = sorted(set(raw) - top)
    if unknown:
        raise ValueError(f"generate: unknown keys: {', '.join(unknown)}")
    patient = _section(PatientModel, raw.get("patient") or {}, "generate.patient")
    specialist = _section(SpecialistModel, raw.get("specialist") or {}, "generate.specialist")
    values: dict[str, Any] = {
        k: raw[k] for k in top & set(raw) if k not in ("patient", "specialist")
    }
    for k in ("per_month", "urgent"):
        if k in values:
            values[k] = float(values[k])
    if "offices_per_specialty" in values:
        values["offices_per_specialty"] = int(values["offices_per_specialty"])
    directory = dict(values.get("directory") or Model().directory)
    if set(directory) - {"direct", "fax", "unknown"}:
        raise ValueError("generate.directory: give shares of direct, fax, unknown")
    values["directory"] = {k: float(v) for k, v in directory.items()}
    return Model(patient=patient, specialist=specialist, **values)


def _section(cls: Any, raw: Mapping[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown keys: {', '.join(unknown)}")
    default = cls()
    values: dict[str, Any] = {}
    for name, value in raw.items():
        current = getattr(default, name)
        if isinstance(current, Lognormal):
            values[name] = Lognormal(float(value["median"]), float(value["p90"]))
        elif isinstance(current, tuple):
            low, high = value
            values[name] = (float(low), float(high))
        elif isinstance(current, Mapping):
            values[name] = {str(k): float(v) for k, v in value.items()}
        else:
            values[name] = float(value)
    return cls(**values)


@dataclass(frozen=True, slots=True)
class Office:
    """A specialist office in the simulated directory."""

    npi: str
    specialty: str
    reach: str  # direct | fax | unknown (the practice has no address on file)
    direct_address: str = ""
    fax: str = ""  # the office's fax line (for an unknown office: not on file)


def npi_with_check_digit(base9: str) -> str:
    """Append the NPI check digit (Luhn over the prefix 80840 + the 9 digits)."""
    digits = [int(c) for c in "80840" + base9]
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 0:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return base9 + str((10 - total % 10) % 10)


def _apportion(shares: Mapping[str, float], total: int) -> list[str]:
    """``total`` labels in the given shares, by largest remainder (so "a few unknown"
    offices exist even in a small directory)."""
    norm = sum(shares.values()) or 1.0
    exact = {k: v / norm * total for k, v in shares.items()}
    counts = {k: int(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: (counts[k] - exact[k], k))[: total - sum(counts.values())]:
        counts[k] += 1
    return [k for k in shares for _ in range(counts[k])]


def directory(model: Model, rng: random.Random) -> list[Office]:
    """The practice's specialist offices: per specialty, ``offices_per_specialty`` offices,
    Direct-capable, fax-only or unknown (no address on file) in the directory's shares
    (apportioned exactly, then shuffled with the scenario's seed)."""
    specialties = sorted(model.specialties)
    reaches = _apportion(model.directory, len(specialties) * model.offices_per_specialty)
    rng.shuffle(reaches)
    offices: list[Office] = []
    for s_index, specialty in enumerate(specialties):
        for o in range(model.offices_per_specialty):
            reach = reaches[s_index * model.offices_per_specialty + o]
            n = s_index * 100 + o + 1
            npi = npi_with_check_digit(f"1{n:08d}")
            slug = f"{specialty.lower()}{o + 1}"
            offices.append(
                Office(
                    npi=npi,
                    specialty=specialty,
                    reach=reach,
                    direct_address=(
                        f"referrals@{slug}.direct.sim.example" if reach == "direct" else ""
                    ),
                    # every office has a fax line; for an "unknown" one the practice
                    # has none on file (the referral names the office, not its number)
                    fax=f"+1555020{n:04d}",
                )
            )
    return offices
