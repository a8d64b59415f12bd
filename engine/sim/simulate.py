"""The simulator: months of a practice in seconds, through the real engine.

``refloop simulate SCENARIO.yaml`` starts the real :class:`engine.app.Engine` in-process
on a :class:`engine.clock.VirtualClock` — the shipped (or a given) routes.yaml, a store in
a temporary folder, the real MLLP listener and HTTP server on loopback — and plays a
scenario against it:

- the EHR sends each referral (ORM^O01), bookings (SIU^S12) and, from the specialist,
  acceptances (OSU^O51) and reports (ORU^R01), over MLLP;
- patients react to the nudges the engine sends: they book (the EHR then sends the SIU),
  reply YES by SMS (through the signed Twilio webhook), or never answer;
- channels are simulated at the provider boundary: a send is recorded, and an SMS the
  scenario says fails gets an ``undelivered`` status callback through the webhook, so the
  engine's own rotation moves on.

Timers fire and the outbox is dispatched by the simulator's loop (``Engine(background=
False)``), one step of virtual time after another, so the same scenario and seed give
byte-identical output.

Scenario (YAML)::

    name: small practice
    seed: 7
    start: 2026-03-02T08:00:00-05:00
    days: 90
    practice: {name: Maple Family Medicine, phone: "(555) 010-0100"}
    escalation: {...}               # optional; replaces routes.yaml's escalation section
    referrals:                      # explicit referrals, or ...
      - placer: R1
        at: 2h                      # after the start: 90m, 2h, 3d
        specialty: REFCARD
        sms_consent: true
        patient: {books_after_nudge: 1, replies_yes: null, books_by_phone: null}
        specialist: {confirms: 2d, report: 21d}   # report: after the booking
        sms_fails: false
    generate:                       # ... a practice from the behaviour model
      per_month: 800                # (engine.sim.model; docs/simulator.md names every
      patient: {schedules: 0.75}    #  parameter and its source)
      specialist: {report_sent: 0.9}
    staff: {minutes: {patient_call: 5}}   # minutes per kind of work (engine.sim.report)
"""

from __future__ import annotations

import asyncio
import heapq
import json
import random
import tempfile
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import httpx
import yaml

from engine import config as config_mod
from engine.clock import VirtualClock, isoformat
from engine.delivery.direct_inbound import DirectFlow
from engine.errors import ChannelError, ConfigError, EngineError
from engine.hl7v2.client import MllpClient, normalise
from engine.ingest.fhir import resource_inbound
from engine.model import MdnResult, OutboundMessage, SendReceipt
from engine.sim.model import Model, Office, directory, parse_model
from engine.sim.report import median_days, staff_and_automation, work_kind
from engine.store import specialists as specialist_store
from engine.store import views
from engine.tracking import specialists as specialists_lib
from engine.tracking.escalation import DAY, parse_duration

STEP: Final = 3600.0  # virtual seconds between timer/dispatch rounds
SIM_TOKEN: Final = "simulated-twilio-auth-token"
SIM_SECRET: Final = "simulated-webhook-secret-0123456789"
CONFIRM_KEY: Final = "simulated-confirmation-key-0123456789abcdef"
PATIENT_CHANNELS: Final = ("sms", "portal", "voice")
AUTOMATED_VOICE: Final = "voice"  # the automated-call channel of the refloop run
MAILED_LETTER: Final = "letter"  # the print-and-mail channel (escalation ``letter:``)
_WORLD: Final = frozenset({"book", "visit", "report-sent", "staff"})  # generated referrals
DECLINE_REASON: Final = "Not appropriate for this clinic"  # the office's stated reason


# ---------------------------------------------------------------------------
# Scenario


@dataclass(frozen=True, slots=True)
class PatientPlan:
    books_after_nudge: int | None = None  # books this many hours after the n-th nudge
    book_delay: float = DAY
    replies_yes: bool = False  # replies YES to the first SMS; the coordinator books
    books_by_phone: float | None = None  # seconds after the referral, regardless of nudges


@dataclass(frozen=True, slots=True)
class SpecialistPlan:
    confirms: float | None = 2 * DAY  # after the referral
    report: float | None = 21 * DAY  # after the booking


@dataclass(frozen=True, slots=True)
class ReferralPlan:
    placer: str
    at: float  # seconds after the start
    specialty: str = "REFCARD"
    priority: str = "R"
    sms_consent: bool = True
    portal: bool = True
    time_zone: str = ""
    phone: str = ""
    patient: PatientPlan = PatientPlan()
    specialist: SpecialistPlan = SpecialistPlan()
    sms_fails: bool = False
    # how the specialist office gets the packet: none | named (the referral names the
    # office by NPI, no address on file) | fax | direct
    reach: str = "none"
    fax_fails: bool = False  # the fax line never answers (the send fails)
    # generated referrals only: the office in the simulated directory, and the latent
    # draws of the behaviour model (engine.sim.model); ``modelled`` switches the reactions
    office: int = -1
    modelled: bool = False
    intake_lost: bool = False  # the office does not log the first packet it gets
    declined: bool = False  # the office returns the referral: never scheduled


@dataclass(frozen=True)
class Scenario:
    name: str
    seed: int
    start: float
    days: float  # referrals arrive during these days
    referrals: tuple[ReferralPlan, ...]
    follow_up: float = 0.0  # days the simulation goes on after the last arrival
    practice: Mapping[str, Any] = field(default_factory=dict)
    escalation: Mapping[str, Any] | None = None
    routes: str = ""  # routes.yaml to use ("" = the shipped one)
    messages: tuple[tuple[float, str, bytes], ...] = ()  # (offset, "hl7" | "fhir", bytes)
    model: Model | None = None  # the behaviour model of a generated practice
    offices: tuple[Office, ...] = ()  # its specialist directory
    staff: Mapping[str, Any] = field(default_factory=dict)  # minutes per kind of work


def load_scenario(path: str | Path, *, scale: float = 1.0) -> Scenario:
    """Read a scenario file; ``scale`` multiplies a generated practice's volume (tests
    run the shipped scenarios at a reduced size)."""
    file = str(path)
    try:
        data = yaml.safe_load(Path(file).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{file}: cannot read scenario: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: a scenario is a mapping")
    known = {
        "name",
        "seed",
        "start",
        "days",
        "follow_up",
        "practice",
        "escalation",
        "referrals",
        "generate",
        "routes",
        "messages",
        "staff",
    }
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{file}: unknown scenario keys: {', '.join(unknown)}")
    try:
        start = _instant(data.get("start", "2026-03-02T08:00:00-05:00"))
        seed = int(data.get("seed", 1))
        days = float(data.get("days", 90))
        plans = [_plan(r, i) for i, r in enumerate(data.get("referrals") or [])]
        gen = data.get("generate")
        model, offices = None, []
        if gen:
            model = parse_model(gen)
            rng = random.Random(seed)
            offices = directory(model, rng)
            plans += _generate(model, offices, rng, days, scale)
        messages = _messages(data.get("messages"), Path(file).parent)
        staff = _staff(data.get("staff"))
    except (TypeError, ValueError, KeyError, OSError) as exc:
        raise ConfigError(f"{file}: {exc}") from None
    routes = str(data.get("routes", "") or "")
    if routes and not Path(routes).is_absolute():
        routes = str(Path(file).parent / routes)
    return Scenario(
        name=str(data.get("name", Path(file).stem)),
        seed=seed,
        start=start,
        days=days,
        follow_up=float(data.get("follow_up", 0)),
        referrals=tuple(sorted(plans, key=lambda p: (p.at, p.placer))),
        practice=dict(data.get("practice") or {}),
        escalation=data.get("escalation"),
        routes=routes,
        messages=tuple(messages),
        model=model,
        offices=tuple(offices),
        staff=staff,
    )


# What a person's work costs, in minutes (reference/referral-outcomes.md §5/§7: all
# assumptions anchored on CAQH's 8-minute manual transaction). ``tasks`` maps an outbox
# template to a kind of work; a template not listed costs its channel's kind, else default.
DEFAULT_STAFF: Final[dict[str, Any]] = {
    "channels": ["task", "coordinator", "voice"],
    "minutes": {
        "patient_call": 5,
        "office_call": 8,
        "letter": 5,
        "fax_by_hand": 5,
        "review": 3,
        "directory_entry": 1,
        "default": 8,
    },
    "by_channel": {"voice": "patient_call"},
    "tasks": {
        "coordinator-followup": "patient_call",
        "outreach-call": "patient_call",
        "outreach-letter": "letter",
        "call-to-book": "patient_call",
        "call-patient": "patient_call",
        "call-specialist-office": "office_call",
        "chase-report": "office_call",
        "call-for-report": "office_call",
        "no-way-to-reach-specialist": "fax_by_hand",
        "referrer-closed": "review",
        "decide-close": "review",
    },
    # a person who faxes a packet by hand to an office with no address on file records
    # the office's fax in the directory (``refloop specialists set``), once per office,
    # at ``minutes.directory_entry``; the next referral to that office goes by itself
    "records_address": False,
}


def _staff(raw: Any) -> dict[str, Any]:
    """The scenario's ``staff:`` over :data:`DEFAULT_STAFF` (each sub-mapping merged)."""
    out: dict[str, Any] = {
        k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v)
        for k, v in DEFAULT_STAFF.items()
    }
    if raw is None:
        return out
    if not isinstance(raw, dict) or set(raw) - set(DEFAULT_STAFF):
        raise ValueError(f"staff: give only {', '.join(DEFAULT_STAFF)}")
    for key, value in raw.items():
        if key == "channels":
            out[key] = [str(c) for c in value]
        elif key == "records_address":
            out[key] = bool(value)
        else:
            out[key].update({str(k): v for k, v in dict(value).items()})
    for kind, minutes in out["minutes"].items():
        out["minutes"][kind] = float(minutes)
    return out


def _instant(value: Any) -> float:
    dt = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def _offset(value: Any) -> float | None:
    if value is None or value is False:
        return None
    return parse_duration(value)


def _plan(raw: Mapping[str, Any], index: int) -> ReferralPlan:
    patient = raw.get("patient") or {}
    specialist = raw.get("specialist") or {}
    return ReferralPlan(
        placer=str(raw.get("placer", f"SIM{index + 1:05d}")),
        at=_offset(raw.get("at", 0)) or 0.0,
        specialty=str(raw.get("specialty", "REFCARD")),
        priority=str(raw.get("priority", "R")),
        sms_consent=bool(raw.get("sms_consent", True)),
        portal=bool(raw.get("portal", True)),
        time_zone=str(raw.get("time_zone", "")),
        phone=str(raw.get("phone", "")),
        patient=PatientPlan(
            books_after_nudge=patient.get("books_after_nudge"),
            book_delay=_offset(patient.get("book_delay", "1d")) or DAY,
            replies_yes=bool(patient.get("replies_yes", False)),
            books_by_phone=_offset(patient.get("books_by_phone")),
        ),
        specialist=SpecialistPlan(
            confirms=_offset(specialist.get("confirms", "2d")),
            report=_offset(specialist.get("report", "21d")),
        ),
        sms_fails=bool(raw.get("sms_fails", False)),
        reach=_reach(raw.get("specialist_reach", "none")),
        fax_fails=bool(raw.get("fax_fails", False)),
    )


def _reach(value: Any) -> str:
    text = str(value or "none")
    if text not in ("none", "named", "fax", "direct"):
        raise ValueError(f"specialist_reach must be none, named, fax or direct, not {text!r}")
    return text


def _messages(raw: Any, base: Path) -> list[tuple[float, str, bytes]]:
    """Other happenings, in order: HL7 v2 messages sent over MLLP (``hl7:`` inline text or
    ``file:``) and FHIR resources stored as a FHIR source would (``fhir:`` inline mapping
    or ``fhir_file:``). Returns (offset, "hl7" | "fhir", bytes)."""
    out: list[tuple[float, str, bytes]] = []
    for i, m in enumerate(raw or []):
        given = [k for k in ("hl7", "file", "fhir", "fhir_file") if isinstance(m, dict) and k in m]
        if len(given) != 1:
            raise ValueError(f"messages[{i}]: give exactly one of hl7, file, fhir, fhir_file")
        key = given[0]
        if key == "hl7":
            kind, data = "hl7", str(m["hl7"]).encode()
        elif key == "fhir":
            kind, data = "fhir", json.dumps(m["fhir"], sort_keys=True).encode()
        else:
            path = Path(str(m[key]))
            data = (path if path.is_absolute() else base / path).read_bytes()
            kind = "hl7" if key == "file" else "fhir"
        out.append((_offset(m.get("at", 0)) or 0.0, kind, data))
    return out


def _generate(
    model: Model, offices: list[Office], rng: random.Random, days: float, scale: float
) -> list[ReferralPlan]:
    """A seeded random practice (engine.sim.model): referrals arrive on business hours,
    each to an office of its specialty in the directory. The draws fixed here are the
    patient's and the office's own dispositions; reactions to what refloop sends are drawn
    during the run from each referral's own random stream."""
    total = max(1, round(model.per_month * scale * days / 30.0))
    codes, w = list(model.specialties), list(model.specialties.values())
    by_specialty = {c: [i for i, o in enumerate(offices) if o.specialty == c] for c in codes}
    pm, sm = model.patient, model.specialist
    plans: list[ReferralPlan] = []
    for i in range(total):
        # every draw happens for every referral, in a fixed order: same seed, same practice
        at = int(rng.uniform(0, days - 1)) * DAY + rng.uniform(8, 17) * 3600
        specialty = rng.choices(codes, w)[0]
        office = rng.choice(by_specialty[specialty])
        consent = rng.random() < pm.sms_reachable
        portal = rng.random() < pm.portal
        schedules = rng.random() < pm.schedules
        schedule_after = pm.schedule_days.draw(rng) * DAY
        sms_fails = rng.random() < pm.sms_failure
        urgent = rng.random() < model.urgent
        lost = rng.random() < sm.intake_lost
        declined = rng.random() < sm.declined
        reach = offices[office].reach
        plans.append(
            ReferralPlan(
                placer=f"SIM{i + 1:06d}",
                at=at,
                specialty=specialty,
                priority="A" if urgent else "R",
                sms_consent=consent,
                portal=portal,
                phone=f"+1555{i:07d}",
                patient=PatientPlan(
                    books_by_phone=schedule_after if schedules and not declined else None
                ),
                specialist=SpecialistPlan(confirms=None, report=None),
                sms_fails=sms_fails,
                reach="named" if reach == "unknown" else reach,
                office=office,
                modelled=True,
                intake_lost=lost,
                declined=declined,
            )
        )
    return plans


# ---------------------------------------------------------------------------
# Messages the EHR and the specialist send


def _ts(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y%m%d%H%M%S")


def _seg(name: str, fields: Mapping[int, str]) -> str:
    """A segment from {field number: value}; unnamed fields stay empty."""
    values = [""] * max(fields)
    for n, v in fields.items():
        values[n - 1] = v
    return "|".join([name, *values])


def _msh(kind: str, control: str, t: float, sender: str = "EHR", facility: str = "CLINIC") -> str:
    return f"MSH|^~\\&|{sender}|{facility}|REFLOOP|CLINIC|{_ts(t)}||{kind}|{control}|P|2.5.1"


def _pid(plan: ReferralPlan, n: int) -> str:
    phone = plan.phone or _phone(n)
    return _seg(
        "PID",
        {
            1: "1",
            3: f"MRN{n:06d}^^^CLINIC^MR",
            5: f"SIMULATED^PATIENT{n}",
            7: "19700101",
            8: "F",
            13: f"^PRN^CP^^^{phone[2:5]}^{phone[5:]}",
        },
    )


def _phone(n: int) -> str:
    return f"+1555{n:07d}"


def _message(*segments: str) -> bytes:
    return ("\r".join(segments) + "\r").encode()


FHIR_SOURCE: Final = "fhir"  # the source name FHIR happenings are stored under
SPECIALIST_NPI: Final = "1245319599"  # a Direct-capable office (valid NPI check digit)
FAX_ONLY_NPI: Final = "1538267901"  # a fax-only office
SPECIALIST_DIRECT: Final = "referrals@direct.cardio.sim.example"
SPECIALIST_FAX: Final = "+15550199000"
# the offices of hand-written referrals (``specialist_reach: direct | fax``)
OFFICE_DIRECT: Final = Office(
    SPECIALIST_NPI, "REFCARD", "direct", SPECIALIST_DIRECT, SPECIALIST_FAX
)
OFFICE_FAX: Final = Office(FAX_ONLY_NPI, "REFCARD", "fax", "", SPECIALIST_FAX)
UNKNOWN_NPI: Final = "1467503219"  # an office with no address on file (its fax: below)
OFFICE_UNKNOWN: Final = Office(UNKNOWN_NPI, "REFCARD", "unknown", "", "+15550199111")
_OFFICES: Final = {"direct": OFFICE_DIRECT, "fax": OFFICE_FAX, "named": OFFICE_UNKNOWN}


def referral_message(plan: ReferralPlan, n: int, t: float, office: Office | None = None) -> bytes:
    """The referral as the EHR sends it: REF^I12 naming the office when its Direct address
    or fax number is known, else ORM^O01 (the packet then needs a person)."""
    if plan.reach != "none":
        return _ref_message(plan, n, t, office or _OFFICES[plan.reach])
    zcn = [
        f"ZCN|SMS|{'Y' if plan.sms_consent else 'N'}",
        f"ZCN|PORTAL|{'Y' if plan.portal else 'N'}",
    ]
    if plan.time_zone:
        zcn.append(f"ZCN|TZ|{plan.time_zone}")
    return _message(
        _msh("ORM^O01^ORM_O01", f"{plan.placer}-NW", t),
        _pid(plan, n),
        *zcn,
        _seg(
            "ORC",
            {
                1: "NW",
                2: plan.placer,
                7: f"^^^^^{plan.priority}",
                9: _ts(t),
                12: "1234567893^REFERRER^ANN",
            },
        ),
        _seg(
            "OBR",
            {
                1: "1",
                2: plan.placer,
                4: f"{plan.specialty}^Specialist referral",
                5: plan.priority,
                31: "^Simulated referral reason",
            },
        ),
    )


def _ref_message(plan: ReferralPlan, n: int, t: float, office: Office) -> bytes:
    """REF^I12 naming the specialist (PRD role RT) with a Direct address or a fax number
    (``named``: the office's NPI and name only, no address on file)."""
    if plan.reach == "direct":
        telecom = f"^NET^Internet^{office.direct_address}"
    elif plan.reach == "fax":
        telecom = f"^WPN^FX^^^{office.fax[2:5]}^{office.fax[5:]}"
    else:
        telecom = ""
    zcn = [
        f"ZCN|SMS|{'Y' if plan.sms_consent else 'N'}",
        f"ZCN|PORTAL|{'Y' if plan.portal else 'N'}",
    ]
    if plan.time_zone:
        zcn.append(f"ZCN|TZ|{plan.time_zone}")
    return _message(
        _msh("REF^I12^REF_I12", f"{plan.placer}-I12", t),
        _seg(
            "RF1",
            {
                1: "P^Pending^HL70283",
                2: f"{plan.priority}",
                6: f"{plan.placer}^CLINIC",
                7: _ts(t),
                10: "^Simulated referral reason",
            },
        ),
        _seg(
            "PRD",
            {1: "RP^Referring Provider^HL70286", 2: "REFERRER^ANN^^^^MD", 7: "1234567893^NPI"},
        ),
        _seg(
            "PRD",
            {
                1: "RT^Referred to Provider^HL70286",
                2: "SPECIALIST^SAM^^^^MD",
                5: telecom,
                7: f"{office.npi}^NPI",
                10: "Simulated Cardiology",
            },
        ),
        _pid(plan, n),
        *zcn,
        _seg(
            "OBR",
            {
                1: "1",
                2: plan.placer,
                4: f"{plan.specialty}^Specialist referral",
                31: "^Simulated referral reason",
            },
        ),
    )


def booking_message(
    plan: ReferralPlan, n: int, t: float, visit: float, seq: int, event: str = "S12"
) -> bytes:
    """SIU^S12 (booked); ``event`` S15 (cancelled) or S26 (no-show) for the same slot."""
    status = {"S12": "Booked", "S15": "Cancelled", "S26": "Noshow"}[event]
    return _message(
        _msh(f"SIU^{event}^SIU_{event}", f"{plan.placer}-{event}-{seq}", t),
        _seg(
            "SCH",
            {2: f"APPT-{plan.placer}-{seq}", 11: f"^^^{_ts(visit)}", 25: status, 26: plan.placer},
        ),
        _pid(plan, n),
        _seg("TQ1", {1: "1", 7: _ts(visit)}),
    )


def acceptance_message(plan: ReferralPlan, n: int, t: float) -> bytes:
    return _message(
        _msh("OSU^O51^OSU_O51", f"{plan.placer}-OSU", t, sender="SPEC", facility="SPECIALIST"),
        _pid(plan, n),
        _seg("ORC", {1: "SC", 2: f"{plan.placer}^CLINIC", 3: f"F-{plan.placer}", 5: "IP"}),
    )


def decline_message(plan: ReferralPlan, n: int, t: float) -> bytes:
    """The office returns the referral: a 360X decline (OSU^O51, ORC-1 SC, ORC-5 CA) with
    the reason in ORC-16 (routes.yaml ``osu-declined``)."""
    return _message(
        _msh("OSU^O51^OSU_O51", f"{plan.placer}-DCL", t, sender="SPEC", facility="SPECIALIST"),
        _pid(plan, n),
        _seg(
            "ORC",
            {
                1: "SC",
                2: f"{plan.placer}^CLINIC",
                3: f"F-{plan.placer}",
                5: "CA",
                16: f"^{DECLINE_REASON}",
            },
        ),
    )


def report_message(plan: ReferralPlan, n: int, t: float) -> bytes:
    return _message(
        _msh("ORU^R01^ORU_R01", f"{plan.placer}-ORU", t, sender="SPEC", facility="SPECIALIST"),
        _pid(plan, n),
        _seg(
            "OBR",
            {
                1: "1",
                2: plan.placer,
                3: f"RPT-{plan.placer}",
                4: "11488-4^Consult note^LN",
                7: _ts(t),
                25: "F",
            },
        ),
        _seg(
            "OBX",
            {1: "1", 2: "TX", 3: "11488-4^Consult note^LN", 5: "Simulated consult note", 11: "F"},
        ),
    )


# ---------------------------------------------------------------------------
# Channels at the provider boundary


@dataclass
class Send:
    at: float
    referral_id: int
    channel: str
    kind: str
    provider_id: str
    task: str = ""  # a coordinator task's template (its payload's ``task``)


class SimulatedChannel:
    """Records what the engine sends; an SMS the scenario marks as failing is accepted
    here and reported ``undelivered`` by a status callback afterwards."""

    def __init__(self, name: str, sim: Simulation):
        self.name = name
        self.sim = sim

    async def send(self, item: OutboundMessage) -> SendReceipt:
        n = len(self.sim.sends) + 1
        provider_id = f"SM{n:08d}" if self.name == "sms" else f"{self.name.upper()}{n:08d}"
        if self.name == "direct":
            provider_id = f"<SIM{n:08d}@direct.sim.example>"  # the packet's Message-ID
        rid = int(item.referral_id or 0)
        index = self.sim.plan_of_rid.get(rid)
        if (
            self.name == "fax"
            and index is not None
            and self.sim.scenario.referrals[index].fax_fails
        ):
            raise ChannelError("fax: the line did not answer", retryable=False)
        task = ""
        if item.payload:
            try:
                task = str(json.loads(item.payload).get("task") or "")
            except (ValueError, AttributeError):
                task = ""
        self.sim.sends.append(
            Send(self.sim.clock.now(), rid, self.name, item.kind or "", provider_id, task)
        )
        return SendReceipt(item.outbox_id, item.idempotency_key, self.name, provider_id, "sent")


# ---------------------------------------------------------------------------
# The run


@dataclass(order=True)
class _Happening:
    at: float
    seq: int
    what: str = field(compare=False)
    plan_index: int = field(compare=False)
    extra: dict[str, Any] = field(compare=False, default_factory=dict)


@dataclass
class _Life:
    """What the simulated world knows about one generated referral (not the engine's
    view of it): the patient's booking, the office's intake, the visit and the report."""

    rng: random.Random
    booked: bool = False
    appointment: int = 0  # the current slot's sequence number (SIU ids)
    visit_at: float = 0.0
    lead: float = 0.0
    reminded: bool = False
    logged: bool = False  # the office has logged the referral
    lost_once: bool = False  # the office already mislaid one packet
    seen: bool = False
    report: str = ""  # "" not sent | "lost" (sent, never reached the chart) | "in"
    nudges: int = 0


class Simulation:
    def __init__(self, scenario: Scenario, state_dir: Path, *, baseline: bool = False):
        self.scenario = scenario
        self.state_dir = state_dir
        self.baseline = baseline  # refloop's automation off: only the 14-day task
        # With refloop the voice slot is an automated call (channels.voice), nobody's
        # work; in the baseline it stays a person's call list.
        people = [c for c in scenario.staff["channels"] if baseline or c != AUTOMATED_VOICE]
        self.staff: Mapping[str, Any] = {**scenario.staff, "channels": people}
        self.lives: dict[int, _Life] = {}
        self.clock = VirtualClock(scenario.start)
        self.sends: list[Send] = []
        self.queue: list[_Happening] = []
        self._seq = 0
        self.rid_of: dict[str, int] = {}
        self.plan_of_rid: dict[int, int] = {}
        self.nudges_seen: Counter[int] = Counter()
        self.booked: set[int] = set()
        self.yes_sent: set[int] = set()
        self.messages = 0
        self.direct_flow: Any = None
        self.staff_work: list[tuple[float, str]] = []  # a person's work that is no task

    def _at(self, at: float, what: str, index: int, **extra: Any) -> None:
        """Schedule a happening. The queue is a heap ordered by (time, sequence number):
        everything scheduled during the run goes through ``heappush`` so it is applied at
        its own time, and ties keep the order they were scheduled in."""
        self._seq += 1
        heapq.heappush(self.queue, _Happening(at, self._seq, what, index, extra))

    def _config(self) -> config_mod.Config:
        routes = self.scenario.routes or str(Path(__file__).resolve().parents[2] / "routes.yaml")
        data = yaml.safe_load(Path(routes).read_text(encoding="utf-8"))
        data["store"] = {"file": "sim.db", "synchronous": "normal"}
        data["http"] = {
            "host": "127.0.0.1",
            "port": 0,
            "public_url": "http://127.0.0.1",
            "confirm_key": f"${{env:SIM_CONFIRM_KEY:-{CONFIRM_KEY}}}",
        }
        for source in data.get("sources", {}).values():
            if source.get("type", "mllp") == "mllp":
                source["port"] = 0
                # listener timeouts read the (virtual) clock: days pass between messages
                source["idle_timeout"] = 10 * 365 * DAY
                source["frame_timeout"] = 10 * 365 * DAY
        webhook = {
            "type": "webhook",
            "url": "http://127.0.0.1:9/unused",
            "secret": f"${{env:SIM_SECRET:-{SIM_SECRET}}}",
        }
        data["channels"] = {
            "sms": {
                "type": "sms",
                "account_sid": "AC00000000000000000000000000000000",
                "auth_token": f"${{env:SIM_TWILIO_TOKEN:-{SIM_TOKEN}}}",
                "from_number": "+15550100000",
                "status_callback_url": "https://sim.invalid/hooks/twilio/status",
            },
            "portal": dict(webhook),
            "voice": dict(webhook) if self.baseline else self._voice(),
            "task": dict(webhook),
            "coordinator": dict(webhook),
            # referring-provider notifications (issue 15): counted apart from staff work
            "notify": dict(webhook),
            # a print-and-mail service for the day-30 letter (escalation ``letter:``)
            "letter": dict(webhook),
            # the specialist office's Direct HISP and fax line, played by the simulator
            "direct": dict(webhook),
            "fax": dict(webhook),
        }
        practice = {"name": "Simulated Family Medicine", "phone": "(555) 010-0100"}
        practice.update(self.scenario.practice)
        data["practice"] = practice
        if self.scenario.escalation is not None:
            data["escalation"] = self.scenario.escalation
        # The simulated secrets are defaults in the file itself (they guard nothing), so
        # the folder `--keep` leaves opens as it is: refloop ... --routes DIR/routes.yaml.
        if self.baseline:
            data["escalation"] = baseline_escalation(data.get("escalation"))
        self.state_dir.mkdir(parents=True, exist_ok=True)
        path = self.state_dir / "routes.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        env = {
            "SIM_TWILIO_TOKEN": SIM_TOKEN,
            "SIM_SECRET": SIM_SECRET,
            "SIM_CONFIRM_KEY": CONFIRM_KEY,
        }
        return config_mod.load(path, env=env)

    @staticmethod
    def _voice() -> dict[str, Any]:
        """The automated voice channel (Twilio Programmable Voice), as a practice would
        configure it; the simulator answers at the provider boundary."""
        return {
            "type": "voice",
            "account_sid": "AC00000000000000000000000000000000",
            "auth_token": f"${{env:SIM_TWILIO_TOKEN:-{SIM_TOKEN}}}",
            "from_number": "+15550100001",
        }

    async def run(self) -> dict[str, Any]:
        from prometheus_client import CollectorRegistry

        from engine.app import Engine

        cfg = self._config()
        engine = Engine(
            cfg,
            self.state_dir,
            clock=self.clock,
            registry=CollectorRegistry(),
            background=False,
            drain_seconds=2.0,
        )
        await engine.start()
        try:
            assert engine.dispatcher is not None and engine.timers is not None
            for name in list(engine.dispatcher.channels):
                engine.dispatcher.channels[name] = SimulatedChannel(name, self)
            self._directory(engine)
            assert engine.inbox is not None and engine.db is not None
            self.direct_flow = DirectFlow(
                engine.db, engine.inbox, engine.tracker, self.clock, direct_channels=["direct"]
            )
            ports = engine.ports()
            mllp = await MllpClient.connect("127.0.0.1", ports["ehr"], timeout=30)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports['http']}") as http:
                await self._play(engine, mllp, http)
            await mllp.close()
            return self._report(engine)
        finally:
            await engine.stop()

    def _directory(self, engine: Any) -> None:
        """The Direct-capable specialist offices: address and encryption certificate in
        the specialist directory, as an operator's import would put them. (Fax-only
        offices are learnt from the referrals that name them.)"""
        offices = [o for o in self.scenario.offices if o.reach == "direct"]
        if any(p.reach == "direct" and not p.modelled for p in self.scenario.referrals):
            offices.append(OFFICE_DIRECT)
        if not offices:
            return
        key = _key()
        with engine.db.transaction() as conn:
            for office in offices:
                values = {
                    "npi": office.npi,
                    "name": f"Simulated {office.specialty} office",
                    "organisation": f"Simulated {office.specialty}",
                    "direct_address": office.direct_address,
                    "fax": office.fax,
                    "certificate": _certificate(office.direct_address, key),
                }
                specialist_store.upsert(conn, values, source="import", now=self.clock.now())

    async def _play(self, engine: Any, mllp: MllpClient, http: httpx.AsyncClient) -> None:
        sc = self.scenario
        for i, plan in enumerate(sc.referrals):
            self._at(sc.start + plan.at, "referral", i)
        for i, (offset, _kind, _raw) in enumerate(sc.messages):
            self._at(sc.start + offset, "message", -1, message=i)
        end = sc.start + (sc.days + sc.follow_up) * DAY
        now = sc.start
        next_round = now
        while now < end:
            nxt = self.queue[0].at if self.queue else end
            now = min(nxt, next_round, end)
            self.clock.set(max(now, self.clock.now()))
            while self.queue and self.queue[0].at <= now:
                h = heapq.heappop(self.queue)
                await self._happen(h, mllp, http, engine)
            if now >= next_round:
                await self._round(engine, http)
                next_round = now + STEP
            if not self.queue and now >= end:
                break
        self.clock.set(end)
        await self._round(engine, http)

    async def _round(self, engine: Any, http: httpx.AsyncClient) -> None:
        """Process the inbox, fire due timers, dispatch due outbox rows; react."""
        engine.processor.process_available(10_000)
        engine.timers.tick()
        before = len(self.sends)
        for name in sorted(engine.dispatcher.channels):
            while await engine.dispatcher.run_once(name):
                pass
        for send in self.sends[before:]:
            await self._react(send, http)
        engine.processor.process_available(10_000)

    async def _send(self, mllp: MllpClient, raw: bytes, engine: Any) -> None:
        result = await mllp.send(raw)
        if result.code != "AA":
            raise EngineError(f"simulated message {result.control_id} answered {result.code}")
        self.messages += 1
        engine.processor.process_available(10_000)

    async def _happen(
        self, h: _Happening, mllp: MllpClient, http: httpx.AsyncClient, engine: Any
    ) -> None:
        if h.what == "message":
            _, kind, raw = self.scenario.messages[h.extra["message"]]
            if kind == "hl7":
                await self._send(mllp, normalise(raw), engine)
            else:
                # as a FHIR source stores what it fetched: the inbox, then routes
                inbound = resource_inbound(
                    FHIR_SOURCE, json.loads(raw), received_at=self.clock.now(), peer="simulator"
                )
                await engine.inbox.add(inbound, "AA")
                self.messages += 1
                engine.processor.process_available(10_000)
            return
        plan = self.scenario.referrals[h.plan_index]
        n = h.plan_index + 1
        now = self.clock.now()
        if plan.modelled and h.what in _WORLD:
            await self._world(h, plan, mllp, engine)
            return
        if h.what == "referral":
            office = self.scenario.offices[plan.office] if plan.modelled else None
            await self._send(mllp, referral_message(plan, n, now, office), engine)
            rid = _referral_id(engine, plan.placer)
            self.rid_of[plan.placer] = rid
            self.plan_of_rid[rid] = h.plan_index
            if plan.modelled:
                rng = random.Random(f"{self.scenario.seed}:{plan.placer}")
                self.lives[h.plan_index] = _Life(rng)
            if plan.patient.books_by_phone is not None:
                self._at(now + plan.patient.books_by_phone, "book", h.plan_index)
            if plan.specialist.confirms is not None and plan.reach != "direct":
                self._at(now + plan.specialist.confirms, "accept", h.plan_index)
        elif h.what == "book":
            rid = self.rid_of[plan.placer]
            if rid in self.booked:
                return
            self.booked.add(rid)
            visit = now + 10 * DAY
            await self._send(mllp, booking_message(plan, n, now, visit, 1), engine)
            if plan.specialist.report is not None:
                self._at(now + plan.specialist.report, "report", h.plan_index)
        elif h.what == "accept":
            await self._send(mllp, acceptance_message(plan, n, now), engine)
        elif h.what == "decline":
            await self._send(mllp, decline_message(plan, n, now), engine)
        elif h.what == "report":
            await self._send(mllp, report_message(plan, n, now), engine)
        elif h.what == "yes":
            await _post_twilio(
                http,
                "/hooks/twilio/sms",
                {
                    "MessageSid": f"SMIN{h.seq:08d}",
                    "AccountSid": "AC" + "0" * 32,
                    "From": plan.phone or _phone(n),
                    "To": "+15550100000",
                    "Body": "YES",
                },
            )
        elif h.what == "mdn":
            self.direct_flow.handle(
                MdnResult(
                    original_message_id=h.extra["message_id"],
                    disposition=h.extra["disposition"],
                    disposition_text=h.extra["disposition"],
                    sender=h.extra.get("sender", SPECIALIST_DIRECT),
                    final_delivery=True,
                )
            )
        elif h.what == "sms-failed":
            # the status callback finds the outbox row by its MessageSid
            await _post_twilio(
                http,
                "/hooks/twilio/status",
                {
                    "MessageSid": h.extra["sid"],
                    "MessageStatus": "undelivered",
                    "AccountSid": "AC" + "0" * 32,
                    "ErrorCode": "30003",
                },
            )

    async def _react(self, send: Send, http: httpx.AsyncClient) -> None:
        index = self.plan_of_rid.get(send.referral_id)
        if index is not None and self.scenario.referrals[index].modelled:
            self._react_modelled(send, index)
            return
        if index is not None and send.channel == "direct":
            # the specialist's HISP: processed at once, dispatched when the office opens it
            plan = self.scenario.referrals[index]
            self._at(
                send.at + 300, "mdn", index, message_id=send.provider_id, disposition="processed"
            )
            if plan.specialist.confirms is not None:
                self._at(
                    send.at + plan.specialist.confirms,
                    "mdn",
                    index,
                    message_id=send.provider_id,
                    disposition="dispatched",
                )
            return
        if index is None or send.channel not in PATIENT_CHANNELS:
            return
        plan = self.scenario.referrals[index]
        now = send.at
        if send.channel == "sms" and plan.sms_fails:
            self._at(now + 60, "sms-failed", index, sid=send.provider_id)
            return
        self.nudges_seen[send.referral_id] += 1
        if (
            send.channel == "sms"
            and plan.patient.replies_yes
            and send.referral_id not in self.yes_sent
        ):
            self.yes_sent.add(send.referral_id)
            self._at(now + 2 * 3600, "yes", index)
            self._at(now + DAY, "book", index)  # the coordinator calls back and books
        booked_after = plan.patient.books_after_nudge
        if booked_after is not None and self.nudges_seen[send.referral_id] == booked_after:
            self._at(now + plan.patient.book_delay, "book", index)

    # -- the generated practice's world (engine.sim.model) -----------------------------

    def _react_modelled(self, send: Send, index: int) -> None:
        """How the world answers what refloop sent, by where it went: the office gets a
        packet or a request; a person works a task; the patient reads a nudge or a
        reminder. Reactions depend on the world's state, not on the template, so new kinds
        of outbound work are answered too."""
        plan = self.scenario.referrals[index]
        life = self.lives[index]
        model = self.scenario.model
        assert model is not None
        if send.channel in ("direct", "fax"):
            if send.channel == "direct":
                # the office's HISP processes the message at once
                self._at(
                    send.at + 300,
                    "mdn",
                    index,
                    message_id=send.provider_id,
                    disposition="processed",
                    sender=self._office(plan).direct_address,
                )
            elif life.rng.random() >= model.specialist.fax_reach:
                return  # the fax never reached the office
            self._office_receives(index, send)
        elif send.channel in self.staff["channels"]:
            # a person works the task within one to two working days, doing the kind of
            # work the task is costed as (docs/simulator.md, staff.tasks)
            work = work_kind(self.staff, send.channel, send.task or send.kind)
            self._at(send.at + life.rng.uniform(0.5, 2) * DAY, "staff", index, work=work)
        elif send.channel in PATIENT_CHANNELS or send.channel == MAILED_LETTER:
            # a mailed letter reads like a text or a portal message: a delivered nudge
            if send.channel == "sms" and plan.sms_fails:
                self._at(send.at + 60, "sms-failed", index, sid=send.provider_id)
            elif life.booked:
                life.reminded = life.reminded or send.at < life.visit_at
            elif not plan.declined:
                life.nudges += 1
                will_book = plan.patient.books_by_phone is not None
                books = (
                    model.automated_call_books
                    if send.channel == AUTOMATED_VOICE
                    else model.nudge_books
                )
                if books(life.rng, life.nudges, will_book):
                    self._at(send.at + life.rng.uniform(0.2, 3) * DAY, "book", index)

    def _office(self, plan: ReferralPlan) -> Office:
        return self.scenario.offices[plan.office]

    def _office_receives(self, index: int, send: Send) -> None:
        """A packet or a request reached the office. Not yet logged: this logs it (but the
        first one may be mislaid) and the office acknowledges a few days later. After the
        visit: a request for the report."""
        plan = self.scenario.referrals[index]
        life = self.lives[index]
        sm = self.scenario.model.specialist  # type: ignore[union-attr]
        if not life.logged:
            if plan.intake_lost and not life.lost_once:
                life.lost_once = True
                return
            life.logged = True
            after = life.rng.uniform(*sm.confirm_days) * DAY
            if plan.declined:
                # the office returns the referral it will not see (a 360X decline)
                self._at(send.at + after, "decline", index)
            elif send.channel == "direct":
                self._at(
                    send.at + after,
                    "mdn",
                    index,
                    message_id=send.provider_id,
                    disposition="dispatched",
                    sender=self._office(plan).direct_address,
                )
            else:
                self._at(send.at + after, "accept", index)
        elif life.seen:
            self._request_report(index, send.at)

    def _request_report(self, index: int, now: float) -> None:
        """Someone asked the office for the report: it sends it (again) with
        ``answers_request``, one to five days later."""
        life = self.lives[index]
        sm = self.scenario.model.specialist  # type: ignore[union-attr]
        if life.report != "in" and life.rng.random() < sm.answers_request:
            self._at(now + life.rng.uniform(1, 5) * DAY, "report-sent", index)

    async def _world(
        self, h: _Happening, plan: ReferralPlan, mllp: MllpClient, engine: Any
    ) -> None:
        life = self.lives[h.plan_index]
        model = self.scenario.model
        assert model is not None
        n, now = h.plan_index + 1, self.clock.now()
        if h.what == "book":
            if life.booked or plan.declined or life.seen:
                return
            life.booked, life.reminded = True, False
            life.appointment += 1
            life.lead = model.lead_time(life.rng, plan.specialty)
            life.visit_at = now + life.lead
            msg = booking_message(plan, n, now, life.visit_at, life.appointment)
            await self._send(mllp, msg, engine)
            self._at(life.visit_at, "visit", h.plan_index, appointment=life.appointment)
        elif h.what == "visit":
            if h.extra["appointment"] != life.appointment or not life.booked:
                return
            await self._visit(h.plan_index, plan, life, model, mllp, engine)
        elif h.what == "report-sent":
            if life.report == "in":
                return
            if life.rng.random() < model.specialist.report_reaches:
                life.report = "in"
                await self._send(mllp, report_message(plan, n, now), engine)
            else:
                life.report = "lost"
        elif h.what == "staff" and self._open(engine, plan):
            work = str(h.extra.get("work"))
            if work == "fax_by_hand" and self.staff.get("records_address"):
                self._record_address(engine, plan, now)
            self._staff_works(h.plan_index, plan, life, model, now, work)

    def _open(self, engine: Any, plan: ReferralPlan) -> bool:
        """A person works a task from the worklist: a closed referral needs nothing."""
        return views.referral_status(engine.db.conn, self.rid_of[plan.placer]) != "closed"

    async def _visit(
        self,
        index: int,
        plan: ReferralPlan,
        life: _Life,
        model: Model,
        mllp: MllpClient,
        engine: Any,
    ) -> None:
        now = self.clock.now()
        if model.attends(life.rng, life.lead, life.reminded):
            life.seen = True
            if life.rng.random() < model.specialist.report_sent:
                self._at(
                    now + model.specialist.report_days.draw(life.rng) * DAY, "report-sent", index
                )
            return
        # missed: cancelled (S15) or a no-show (S26); the patient may book again
        life.booked = False
        event = "S15" if life.rng.random() < model.patient.cancel_ahead else "S26"
        msg = booking_message(plan, index + 1, now, life.visit_at, life.appointment, event)
        await self._send(mllp, msg, engine)
        if life.rng.random() < model.patient.reschedules:
            self._at(now + life.rng.uniform(1, 42) * DAY, "book", index)

    def _record_address(self, engine: Any, plan: ReferralPlan, now: float) -> None:
        """The person faxing the packet by hand found the office's fax (they had to, to
        send it): they record it in the directory as a coordinator would, with
        ``refloop specialists set NPI --fax NUMBER`` (the same library call), once per
        office; it costs ``minutes.directory_entry``."""
        office = self._office(plan)
        if office.reach != "unknown" or not office.fax:
            return
        entry = specialist_store.find(engine.db.conn, npi=office.npi)
        if entry is not None and entry.fax:
            return  # on file already: the packet task came before the entry
        specialists_lib.set_specialist(
            engine.db, office.npi, {"fax": office.fax}, self.clock, actor="user:sim-staff"
        )
        self.staff_work.append((now, "directory_entry"))

    def _staff_works(
        self, index: int, plan: ReferralPlan, life: _Life, model: Model, now: float, work: str
    ) -> None:
        """A person works a task: the kind of work it is costed as (``staff.tasks``), on
        the referral as it is now. A patient call calls a patient not booked (booked when
        reached and willing); a letter is a delivered nudge; a fax by hand gets the packet
        to an office that never logged the referral; an office call gets an unlogged
        referral logged, or asks for a missing report; a review changes nothing in the
        world. Any other work does what the referral needs first: the patient, then the
        packet, then the report."""
        waiting = not life.booked and not life.seen  # the patient has no visit ahead
        if work not in _WORK:
            work = (
                "patient_call" if waiting else "fax_by_hand" if not life.logged else "office_call"
            )
        if work == "patient_call":
            pm = model.patient
            reached = waiting and not plan.declined and life.rng.random() < pm.phone_reach
            if reached and life.rng.random() < pm.staff_call_books:
                self._at(now + 3600, "book", index)
        elif work == "letter":
            if waiting and not plan.declined:
                life.nudges += 1
                will_book = plan.patient.books_by_phone is not None
                if model.nudge_books(life.rng, life.nudges, will_book):
                    self._at(now + life.rng.uniform(0.2, 3) * DAY, "book", index)
        elif work in ("fax_by_hand", "office_call") and not life.logged:
            life.logged = True
            after = now + life.rng.uniform(*model.specialist.confirm_days) * DAY
            self._at(after, "decline" if plan.declined else "accept", index)
        elif work == "office_call" and life.seen:
            self._request_report(index, now)

    # -- output -------------------------------------------------------------------------

    def _report(self, engine: Any) -> dict[str, Any]:
        conn = engine.db.conn
        sc = self.scenario
        end = sc.start + (sc.days + sc.follow_up) * DAY
        refs = views.referral_summaries(conn)
        events: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for rid, kind, at, actor, status in views.event_log(conn):
            events[rid].append(
                {"at": isoformat(at)[:16] + "Z", "event": kind, "by": actor, "status": status}
            )
        for rid, channel, template, due, status in views.outbox_log(conn):
            events[rid].append(
                {
                    "at": isoformat(due)[:16] + "Z",
                    "event": f"out:{template}",
                    "by": channel,
                    "status": status,
                }
            )
        reported = views.first_reports(conn)
        opened_at = {r[0]: r[6] for r in refs}
        referrals = [
            {
                "id": rid,
                "placer": placer,
                "status": status,
                "patient": pst,
                "specialist": sst,
                "close_reason": reason,
                "opened": isoformat(opened)[:16] + "Z",
                "timeline": sorted(events[rid], key=lambda e: (e["at"], e["event"])),
            }
            for rid, placer, status, pst, sst, reason, opened in refs
        ]

        def rate(days: int) -> dict[str, Any]:
            eligible = [rid for rid, opened in opened_at.items() if opened + days * DAY <= end]
            closed = [
                rid
                for rid in eligible
                if rid in reported and reported[rid] - opened_at[rid] <= days * DAY
            ]
            pct = round(100.0 * len(closed) / len(eligible), 1) if eligible else None
            return {"eligible": len(eligible), "closed": len(closed), "rate_percent": pct}

        nudges = Counter(views.sent_nudge_channels(conn))
        tasks_by_week = Counter(
            datetime.fromtimestamp(due, UTC).strftime("%G-W%V") for due in views.task_dues(conn)
        )
        statuses = Counter(r[2] for r in refs)
        reasons = Counter(r[5] for r in refs if r[5])
        work = staff_and_automation(
            views.outbox_log(conn), self.staff, sc.start, sc.days, self.staff_work
        )
        return {
            "scenario": sc.name,
            "mode": "baseline" if self.baseline else "refloop",
            "seed": sc.seed,
            "start": isoformat(sc.start)[:16] + "Z",
            "days": sc.days,
            "follow_up": sc.follow_up,
            "totals": {
                "referrals": len(refs),
                "messages_in": self.messages,
                "closure": {f"{d}d": rate(d) for d in (30, 60, 90)},
                "status": dict(sorted(statuses.items())),
                "close_reasons": dict(sorted(reasons.items())),
                "nudges_by_channel": dict(sorted(nudges.items())),
                "coordinator_tasks_by_week": dict(sorted(tasks_by_week.items())),
                "median_days_to_closure": median_days(opened_at, reported),
                **work,
            },
            "referrals": referrals,
        }


# The kinds of work a person does as such (engine.sim.report.DEFAULT_STAFF's values);
# any other kind (``default``) does what the referral needs first.
_WORK: Final = frozenset({"patient_call", "letter", "fax_by_hand", "office_call", "review"})
BASELINE_KEEP: Final = "coordinator_task"
NEVER: Final = "520w"  # ten years: a step the baseline practice does not take


def baseline_escalation(section: Mapping[str, Any] | None) -> dict[str, Any]:
    """The escalation a practice without refloop's automation has: every cadence step
    pushed out of reach except the coordinator task at 14 days (what a practice does by
    hand). Every step the engine knows (``DEFAULT_OFFSETS``) is pushed, so steps added
    later are off in the baseline too."""
    from engine.tracking.escalation import DEFAULT_OFFSETS

    out = dict(section or {})
    cadence = {k.replace("-", "_"): NEVER for k in DEFAULT_OFFSETS}
    cadence[BASELINE_KEEP] = dict(out.get("cadence") or {}).get(BASELINE_KEEP, "14d")
    out["cadence"] = cadence
    out.pop("specialties", None)
    out.pop("appointment_reminder", None)  # an automated reminder is automation too
    out.pop("notify", None)  # so are notices to the referring provider
    out.pop("letter", None)  # and letters a mailing service sends
    out.pop("followup_letter", None)  # (which the 14-day letter needs)
    out["followup_call"] = False  # the practice's 14-day follow-up is a person's call
    return out


def _referral_id(engine: Any, placer: str) -> int:
    rid = views.referral_id_by_placer(engine.db.conn, placer)
    if rid is None:
        raise EngineError(f"simulated referral {placer} was not created (check the routes)")
    return rid


def _key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _certificate(address: str, key: Any) -> str:
    """A self-signed encryption certificate bound to a Direct address (rfc822Name); the
    simulated offices share one key (generating one per office would only cost time)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, address)])
    start = dt.datetime(2020, 1, 1, tzinfo=UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=365 * 20))
        .add_extension(x509.SubjectAlternativeName([x509.RFC822Name(address)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


async def _post_twilio(http: httpx.AsyncClient, path: str, params: dict[str, str]) -> None:
    from channels.sms.twilio import compute_twilio_signature

    url = f"http://127.0.0.1{path}"
    signature = compute_twilio_signature(url, list(params.items()), SIM_TOKEN)
    response = await http.post(path, data=params, headers={"X-Twilio-Signature": signature})
    if response.status_code >= 300:
        raise EngineError(f"simulated webhook {path.split('?')[0]} answered {response.status_code}")


def simulate(
    scenario: Scenario, state_dir: Path | None = None, *, baseline: bool = False
) -> dict[str, Any]:
    """Run a scenario; returns the timeline of every referral and the totals.
    ``baseline``: the same population with refloop's automation off (only the 14-day
    coordinator task, as a practice does by hand)."""

    async def go(folder: Path) -> dict[str, Any]:
        return await Simulation(scenario, folder, baseline=baseline).run()

    if state_dir is not None:
        return asyncio.run(go(state_dir))
    with tempfile.TemporaryDirectory(prefix="refloop-sim-") as tmp:
        return asyncio.run(go(Path(tmp)))


def render_text(result: Mapping[str, Any], *, timelines: bool = True) -> str:
    """The human form of a result: totals first, then each referral's timeline."""
    t = result["totals"]
    lines = [
        f"scenario {result['scenario']} (seed {result['seed']}): referrals for "
        f"{result['days']:g} days from {result['start']}, then {result['follow_up']:g} days more",
        f"referrals {t['referrals']}, messages in {t['messages_in']}",
    ]
    for window, c in t["closure"].items():
        pct = "-" if c["rate_percent"] is None else f"{c['rate_percent']}%"
        lines.append(f"closed with report within {window}: {c['closed']}/{c['eligible']} ({pct})")
    lines.append("status: " + ", ".join(f"{k} {v}" for k, v in t["status"].items()))
    lines.append(
        "close reasons: " + (", ".join(f"{k} {v}" for k, v in t["close_reasons"].items()) or "-")
    )
    lines.append(
        "nudges by channel: "
        + (", ".join(f"{k} {v}" for k, v in t["nudges_by_channel"].items()) or "-")
    )
    lines.append(
        "coordinator tasks by week: "
        + (", ".join(f"{k} {v}" for k, v in t["coordinator_tasks_by_week"].items()) or "-")
    )
    for key, label in (
        ("coordinator_tasks_by_kind", "coordinator tasks by kind"),
        ("coordinator_minutes_by_work", "coordinator minutes by work"),
        ("coordinator_hours_by_week", "coordinator hours by week"),
        ("automated_by_kind", "automated actions by kind"),
    ):
        lines.append(f"{label}: " + (", ".join(f"{k} {v}" for k, v in t[key].items()) or "-"))
    steady = t["coordinator_hours_per_week_steady"]
    lines.append(
        "coordinator hours per week, steady state (day 60 to the last arrival): "
        + ("-" if steady is None else f"{steady}")
    )
    med = t["median_days_to_closure"]
    lines.append("median days to closure with report: " + ("-" if med is None else f"{med}"))
    if timelines:
        for r in result["referrals"]:
            lines.append("")
            lines.append(
                f"referral {r['id']} {r['placer']}: {r['status']}"
                f"{' (' + r['close_reason'] + ')' if r['close_reason'] else ''}"
            )
            for e in r["timeline"]:
                lines.append(f"  {e['at']}  {e['event']:<28} {e['by']:<12} {e['status']}")
    return "\n".join(lines) + "\n"


def to_json(result: Mapping[str, Any]) -> str:
    return json.dumps(result, indent=1, sort_keys=True) + "\n"
