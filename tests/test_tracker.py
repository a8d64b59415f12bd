"""The tracker against a real SQLite file: scenarios written as data (events and operator
steps in, final referral states, timelines, timers and outbox out), the CLI, metrics, and a
store-level order-independence property."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from engine.clock import VirtualClock
from engine.model import EVENT_TYPES, Event, Identifiers, PatientContact, Provider
from engine.store import audit as audit_store
from engine.store import referrals as store
from engine.store.db import Database, open_database
from engine.tracking import states
from engine.tracking.correlate import EVENT_CLASSES, event_from_dict, event_to_dict
from engine.tracking.escalation import Policy
from engine.tracking.tracker import Tracker, TrackerMetrics
from engine.tracking.views import show_referral

T0 = 1_767_225_600.0  # 2026-01-01
DAY = 86400.0
_ID_KEYS = ("placer", "fac", "fillers", "pids", "specialty")


# ---------------------------------------------------------------------------
# The scenario language


def E(kind: str, at: float, msg: int, **kw: Any) -> Event:
    """A normalised event at T0 + ``at`` days from inbox message ``msg``. Identifier
    keywords: placer, fac (default EPIC when placer is given), fillers, pids, specialty."""
    placer = kw.pop("placer", "")
    ids = Identifiers(
        sending_facility=kw.pop("fac", "EPIC" if placer else ""),
        placer_number=placer,
        filler_numbers=tuple(kw.pop("fillers", ())),
        patient_ids=tuple(kw.pop("pids", ())),
        specialty=kw.pop("specialty", ""),
    )
    return EVENT_CLASSES[kind](ids=ids, occurred_at=T0 + at * DAY, message_id=msg, **kw)


def NW(at: float, msg: int, placer: str = "R1", **kw: Any) -> Event:
    """A new referral (ORM^O01 NW / REF^I12 / ServiceRequest) with the usual details."""
    kw.setdefault("pids", ("P1^^^MRN",))
    kw.setdefault("specialty", "cardiology")
    kw.setdefault("specialist", Provider(name="Dr Heart", direct_address="heart@direct.example"))
    kw.setdefault("referring", Provider(name="Dr Home", fax="+15550100"))
    return E("referral-created", at, msg, placer=placer, **kw)


@dataclass(frozen=True)
class I:  # noqa: E742 - an internal event (timer, channel) for the referral with this placer
    kind: states.InternalKind
    placer: str = "R1"


@dataclass(frozen=True)
class Close:
    placer: str
    reason: states.CloseReason
    note: str = ""


@dataclass(frozen=True)
class Link:
    parked: int  # the n-th parked event (1-based, in parking order)
    placer: str


@dataclass(frozen=True)
class Auth:
    placer: str
    outcome: str


Step = Event | I | Close | Link | Auth


@dataclass(frozen=True)
class X:
    """Expected final state of one referral. Optional parts are checked when given:
    ``timeline`` (event kinds in recorded order), ``outbox`` ((template, status) in order),
    ``timers`` (sorted kinds), ``auth`` (prior-auth status), ``pids``, ``fillers``,
    ``details`` (a subset of detail columns)."""

    status: str
    patient: str
    specialist: str
    closed: str = ""
    timeline: tuple[str, ...] | None = None
    outbox: tuple[tuple[str, str], ...] | None = None
    timers: tuple[str, ...] | None = None
    auth: str | None = None
    pids: tuple[str, ...] | None = None
    fillers: tuple[str, ...] | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Scenario:
    name: str
    steps: tuple[Step, ...]
    expect: dict[str, X]  # placer (or "FAC/placer") -> expectation
    parked: int = 0  # events still parked at the end
    referrals: int | None = None  # referral count, when it matters


# Escalation follows progress (docs/escalation.md): the not-booked branch is the patient's
# (a booking cancels it), the booked branch waits for the visit to ask for the report.
PATIENT_TIMERS = ("attempt-close", "coordinator-task", "first-nudge", "outreach", "second-nudge")
REF_TIMERS = ("specialist-followup",)
OPEN_TIMERS = tuple(sorted(REF_TIMERS + PATIENT_TIMERS))
BOOKED_TIMERS = tuple(sorted((*REF_TIMERS, "report-request")))

SCENARIOS: tuple[Scenario, ...] = (
    # -- the happy path, one per EHR identifier style --------------------------------
    Scenario(
        "epic-orm-placer-everywhere",
        (
            NW(0, 1),
            I("packet-sent"),
            I("packet-delivered"),
            E("specialist-accepted", 1, 2, placer="R1", fillers=("F1",)),
            E("appointment-booked", 2, 3, placer="R1", appointment_id="A1", start="2026-02-01"),
            I("seen"),
            E("report-received", 30, 4, placer="R1", report_id="RPT1"),
        ),
        {
            "R1": X(
                "closed",
                "seen",
                "report-received",
                "report-received",
                timeline=(
                    "referral-created",
                    "packet-sent",
                    "packet-delivered",
                    "specialist-accepted",
                    "appointment-booked",
                    "seen",
                    "report-received",
                ),
                # the dispatcher (a later issue) marks rows sent; here it is still queued,
                # so the close cancels it
                outbox=(("no-way-to-reach-specialist", "cancelled"),),
                timers=(),
                fillers=("F1",),
            )
        },
    ),
    Scenario(
        "cerner-ref-i12-then-filler-only",
        (
            NW(0, 1, placer="REF-77", fac="CERNER"),
            E("specialist-accepted", 1, 2, placer="REF-77", fac="CERNER", fillers=("SPC-9",)),
            E("appointment-booked", 2, 3, fillers=("SPC-9",), appointment_id="A1"),
            I("seen", placer="REF-77"),
            E("report-received", 20, 4, fillers=("SPC-9",), report_id="DOC-1"),
        ),
        {"CERNER/REF-77": X("closed", "seen", "report-received", "report-received", timers=())},
    ),
    Scenario(
        "athena-report-from-specialist-facility-names-our-placer",
        (
            NW(0, 1, placer="A-100", fac="ATHENA"),
            E("appointment-booked", 3, 2, placer="A-100", fac="ATHENA", appointment_id="S1"),
            E("report-received", 30, 3, placer="A-100", fac="SPECIALIST-LAB", report_id="R9"),
        ),
        {"ATHENA/A-100": X("closed", "booked", "report-received", "report-received")},
    ),
    Scenario(
        "fhir-appointment-and-report-by-patient-and-specialty",
        (
            NW(0, 1, placer="SR-1", fac="FHIR", pids=("p-1^^^urn:ehr",)),
            E(
                "appointment-booked",
                5,
                2,
                pids=("p-1^^^urn:ehr",),
                specialty="Cardiology",
                appointment_id="Appt/1",
            ),
            E(
                "report-received",
                40,
                3,
                pids=("p-1^^^urn:ehr",),
                specialty="cardiology",
                report_id="DR/1",
            ),
        ),
        {"FHIR/SR-1": X("closed", "booked", "report-received", "report-received")},
    ),
    Scenario(
        "meditech-osu-then-siu-with-both-numbers",
        (
            NW(0, 1, placer="M1", fac="MEDITECH"),
            E("specialist-accepted", 1, 2, placer="M1", fac="MEDITECH", fillers=("X1",)),
            E("appointment-booked", 2, 3, placer="M1", fac="MEDITECH", fillers=("X1",)),
        ),
        {
            "MEDITECH/M1": X(
                "specialist-confirmed",
                "booked",
                "confirmed",
                timers=BOOKED_TIMERS,
                outbox=(("no-way-to-reach-specialist", "pending"),),
            )
        },
    ),
    # -- order and repeats -----------------------------------------------------------
    Scenario(
        "out-of-order-report-booking-acceptance",
        (
            NW(0, 1),
            E("report-received", 30, 2, placer="R1", report_id="RPT1"),
            E("appointment-booked", 2, 3, placer="R1", appointment_id="A1"),
            E("specialist-accepted", 1, 4, placer="R1"),
        ),
        {"R1": X("closed", "booked", "report-received", "report-received", timers=())},
    ),
    Scenario(
        "events-before-creation-are-parked-then-auto-linked",
        (
            E("report-received", 30, 2, placer="R1", report_id="RPT1"),
            E("appointment-booked", 2, 3, placer="R1", appointment_id="A1"),
            E("specialist-accepted", 1, 4, placer="R1", fillers=("F1",)),
            NW(0, 1),
        ),
        {
            "R1": X(
                "closed",
                "booked",
                "report-received",
                "report-received",
                timeline=(
                    "referral-created",
                    "report-received",
                    "appointment-booked",
                    "specialist-accepted",
                ),
                timers=(),
                fillers=("F1",),
            )
        },
    ),
    Scenario(
        "filler-only-event-before-its-filler-is-known-links-when-learnt",
        (
            NW(0, 1),
            E("appointment-booked", 2, 2, fillers=("F7",), appointment_id="A1"),
            E("specialist-accepted", 1, 3, placer="R1", fillers=("F7",)),
        ),
        {"R1": X("specialist-confirmed", "booked", "confirmed", fillers=("F7",))},
    ),
    Scenario(
        "same-message-twice-is-recorded-once",
        (
            NW(0, 1),
            E("appointment-booked", 2, 2, placer="R1", appointment_id="A1"),
            E("appointment-booked", 2, 2, placer="R1", appointment_id="A1"),
        ),
        {
            "R1": X(
                "patient-booked",
                "booked",
                "not-sent",
                timeline=("referral-created", "appointment-booked"),
            )
        },
    ),
    Scenario(
        "same-event-new-control-id-is-recorded-without-change",
        (
            NW(0, 1),
            E("appointment-booked", 2, 2, placer="R1", appointment_id="A1"),
            E("appointment-booked", 2, 3, placer="R1", appointment_id="A1"),
        ),
        {
            "R1": X(
                "patient-booked",
                "booked",
                "not-sent",
                timeline=("referral-created", "appointment-booked", "appointment-booked"),
                timers=BOOKED_TIMERS,
            )
        },
    ),
    Scenario(
        "referral-created-resent-is-an-update",
        (
            NW(0, 1, priority="routine"),
            NW(0.5, 2, priority="urgent"),
        ),
        {
            "R1": X(
                "open",
                "not-contacted",
                "not-sent",
                timeline=("referral-created", "referral-created"),
                outbox=(("no-way-to-reach-specialist", "pending"),),
                timers=OPEN_TIMERS,
                details={"priority": "urgent"},
            )
        },
        referrals=1,
    ),
    Scenario(
        "older-update-does-not-overwrite-newer-details",
        (
            NW(0, 1),
            E("referral-updated", 5, 3, placer="R1", priority="stat", reason="worse"),
            E("referral-updated", 3, 2, placer="R1", priority="urgent", needed_by="2026-03-01"),
        ),
        {
            "R1": X(
                "open",
                "not-contacted",
                "not-sent",
                details={"priority": "stat", "reason": "worse", "needed_by": "2026-03-01"},
            )
        },
    ),
    Scenario(
        "contact-updated-latest-wins",
        (
            NW(0, 1, contact=PatientContact(phone="+15550001", sms_consent=True)),
            E(
                "contact-updated",
                4,
                3,
                pids=("P1^^^MRN",),
                placer="R1",
                contact=PatientContact(phone="+15550003", language="es"),
            ),
            E("contact-updated", 2, 2, placer="R1", contact=PatientContact(phone="+15550002")),
        ),
        {
            "R1": X(
                "open",
                "not-contacted",
                "not-sent",
                details={"patient_phone": "+15550003", "language": "es", "sms_consent": 1},
            )
        },
    ),
    # -- closing ---------------------------------------------------------------------
    Scenario(
        "cancel-stops-timers-and-outbound",
        (NW(0, 1), E("referral-cancelled", 1, 2, placer="R1", reason="no longer needed")),
        {
            "R1": X(
                "closed",
                "not-contacted",
                "not-sent",
                "cancelled",
                timers=(),
                outbox=(("no-way-to-reach-specialist", "cancelled"),),
            )
        },
    ),
    Scenario(
        "late-booking-after-cancel-does-not-reopen",
        (
            NW(0, 1),
            E("referral-cancelled", 1, 2, placer="R1"),
            E("appointment-booked", 2, 3, placer="R1", appointment_id="A1"),
        ),
        {"R1": X("closed", "booked", "not-sent", "cancelled", timers=())},
    ),
    Scenario(
        "specialist-decline-records-reason-and-tells-referrer",
        (
            NW(0, 1),
            I("packet-sent"),
            E("specialist-declined", 2, 2, placer="R1", fillers=("F1",), reason="not covered"),
        ),
        {
            "R1": X(
                "closed",
                "not-contacted",
                "declined",
                "specialist-declined",
                timers=(),
                outbox=(("no-way-to-reach-specialist", "cancelled"),),
            )
        },
    ),
    Scenario(
        "acceptance-after-decline-stays-declined",
        (
            NW(0, 1),
            E("specialist-declined", 2, 2, placer="R1", reason="capacity"),
            E("specialist-accepted", 1, 3, placer="R1"),
        ),
        {"R1": X("closed", "not-contacted", "declined", "specialist-declined")},
    ),
    Scenario(
        "report-after-decline-re-closes-as-report",
        (
            NW(0, 1),
            E("specialist-declined", 2, 2, placer="R1", reason="capacity"),
            E("report-received", 9, 3, placer="R1", report_id="RPT1"),
        ),
        {
            "R1": X(
                "closed",
                "not-contacted",
                "report-received",
                "report-received",
                outbox=(("no-way-to-reach-specialist", "cancelled"),),
            )
        },
    ),
    Scenario(
        "operator-close",
        (NW(0, 1), Close("R1", "other", note="moved away")),
        {
            "R1": X(
                "closed",
                "not-contacted",
                "not-sent",
                "other",
                timeline=("referral-created", "closed-by-operator"),
                timers=(),
            )
        },
    ),
    Scenario(
        "patient-declined-by-sms",
        (NW(0, 1), I("patient-nudged"), I("patient-declined")),
        {"R1": X("closed", "nudged", "not-sent", "patient-declined", timers=())},
    ),
    # -- the patient branch ------------------------------------------------------------
    Scenario(
        "no-show-then-rebook",
        (
            NW(0, 1),
            E("appointment-booked", 2, 2, placer="R1", appointment_id="A1"),
            E("no-show", 10, 3, placer="R1", appointment_id="A1"),
            E("appointment-booked", 12, 4, placer="R1", appointment_id="A2"),
        ),
        {
            "R1": X(
                "patient-booked",
                "booked",
                "not-sent",
                timers=BOOKED_TIMERS,
                timeline=(
                    "referral-created",
                    "appointment-booked",
                    "no-show",
                    "appointment-booked",
                ),
            )
        },
    ),
    Scenario(
        "no-show-restarts-patient-timers",
        (
            NW(0, 1),
            E("appointment-booked", 2, 2, placer="R1", appointment_id="A1"),
            E("no-show", 10, 3, placer="R1", appointment_id="A1"),
        ),
        {"R1": X("open", "no-show", "not-sent", timers=OPEN_TIMERS)},
    ),
    Scenario(
        "reschedule-arriving-before-its-booking",
        (
            NW(0, 1),
            E("appointment-rescheduled", 3, 3, placer="R1", appointment_id="A1"),
            E("appointment-booked", 2, 2, placer="R1", appointment_id="A1"),
        ),
        {"R1": X("patient-booked", "rescheduled", "not-sent")},
    ),
    Scenario(
        "appointment-cancelled-back-to-contact-step",
        (
            NW(0, 1),
            I("patient-nudged"),
            E("appointment-booked", 2, 2, placer="R1", appointment_id="A1"),
            E("appointment-cancelled", 3, 3, placer="R1", appointment_id="A1"),
        ),
        {"R1": X("open", "nudged", "not-sent", timers=OPEN_TIMERS)},
    ),
    Scenario(
        "escalated-then-booked",
        (NW(0, 1), I("escalated"), E("appointment-booked", 15, 2, placer="R1")),
        {"R1": X("patient-booked", "booked", "not-sent")},
    ),
    # -- reports -----------------------------------------------------------------------
    Scenario(
        "corrected-report-counts-once",
        (
            NW(0, 1),
            E("report-received", 20, 2, placer="R1", report_id="RPT1"),
            E("report-received", 22, 3, placer="R1", report_id="RPT1", status="corrected"),
        ),
        {
            "R1": X(
                "closed",
                "not-contacted",
                "report-received",
                "report-received",
                outbox=(("no-way-to-reach-specialist", "cancelled"),),
            )
        },
    ),
    Scenario(
        "corrected-before-final",
        (
            NW(0, 1),
            E("report-received", 22, 3, placer="R1", report_id="RPT1", status="corrected"),
            E("report-received", 20, 2, placer="R1", report_id="RPT1"),
        ),
        {"R1": X("closed", "not-contacted", "report-received", "report-received")},
    ),
    Scenario(
        "preliminary-report-keeps-it-open",
        (
            NW(0, 1),
            E("report-received", 20, 2, placer="R1", report_id="RPT1", status="preliminary"),
        ),
        {"R1": X("open", "not-contacted", "not-sent", timers=OPEN_TIMERS)},
    ),
    # -- merges --------------------------------------------------------------------------
    Scenario(
        "merge-moves-referral-to-surviving-id",
        (
            NW(0, 1, pids=("OLD^^^MRN",)),
            E(
                "patients-merged",
                1,
                2,
                pids=("NEW^^^MRN",),
                surviving_id="NEW^^^MRN",
                retired_id="OLD^^^MRN",
            ),
            E("appointment-booked", 2, 3, pids=("NEW^^^MRN",), specialty="cardiology"),
        ),
        {
            "R1": X(
                "patient-booked",
                "booked",
                "not-sent",
                pids=("NEW^^^MRN",),
                timeline=("referral-created", "patients-merged", "appointment-booked"),
            )
        },
    ),
    Scenario(
        "merge-before-referral-applies-to-it",
        (
            E("patients-merged", 0, 1, surviving_id="NEW^^^MRN", retired_id="OLD^^^MRN"),
            NW(1, 2, pids=("OLD^^^MRN",)),
            E("appointment-booked", 2, 3, pids=("NEW^^^MRN",), specialty="cardiology"),
        ),
        {"R1": X("patient-booked", "booked", "not-sent", pids=("NEW^^^MRN",))},
    ),
    # -- parking -------------------------------------------------------------------------
    Scenario(
        "unmatched-report-parked-then-linked-by-operator",
        (
            NW(0, 1),
            E("report-received", 20, 2, fillers=("LAB-5",), report_id="RPT1"),
            Link(1, "R1"),
        ),
        {
            "R1": X(
                "closed",
                "not-contacted",
                "report-received",
                "report-received",
                fillers=("LAB-5",),
                timeline=("referral-created", "report-received"),
            )
        },
    ),
    Scenario(
        "unmatched-report-stays-parked",
        (NW(0, 1), E("report-received", 20, 2, fillers=("LAB-5",), report_id="RPT1")),
        {"R1": X("open", "not-contacted", "not-sent")},
        parked=1,
    ),
    Scenario(
        "two-open-referrals-same-patient-and-specialty-is-ambiguous",
        (
            NW(0, 1, placer="R1"),
            NW(1, 2, placer="R2"),
            E("appointment-booked", 3, 3, pids=("P1^^^MRN",), specialty="cardiology"),
        ),
        {
            "R1": X("open", "not-contacted", "not-sent"),
            "R2": X("open", "not-contacted", "not-sent"),
        },
        parked=1,
    ),
    Scenario(
        "window-match-prefers-the-open-referral",
        (
            NW(0, 1, placer="R1"),
            E("referral-cancelled", 1, 2, placer="R1"),
            NW(2, 3, placer="R2"),
            E("appointment-booked", 3, 4, pids=("P1^^^MRN",), specialty="cardiology"),
        ),
        {
            "R1": X("closed", "not-contacted", "not-sent", "cancelled"),
            "R2": X("patient-booked", "booked", "not-sent"),
        },
    ),
    Scenario(
        "outside-the-window-is-parked",
        (
            NW(0, 1),
            E("appointment-booked", 120, 2, pids=("P1^^^MRN",), specialty="cardiology"),
        ),
        {"R1": X("open", "not-contacted", "not-sent")},
        parked=1,
    ),
    Scenario(
        "unknown-placer-is-not-matched-by-patient",
        (
            NW(0, 1),
            E("appointment-booked", 2, 2, placer="R9", pids=("P1^^^MRN",), specialty="cardiology"),
        ),
        {"R1": X("open", "not-contacted", "not-sent")},
        parked=1,
    ),
    Scenario(
        "same-placer-two-facilities-placer-only-report-is-ambiguous",
        (
            NW(0, 1, placer="R1", fac="EPIC"),
            NW(0, 2, placer="R1", fac="CERNER", pids=("Q^^^MRN",)),
            E("report-received", 9, 3, placer="R1", fac="LAB", report_id="X"),
        ),
        {
            "EPIC/R1": X("open", "not-contacted", "not-sent"),
            "CERNER/R1": X("open", "not-contacted", "not-sent"),
        },
        parked=1,
        referrals=2,
    ),
    Scenario(
        "creation-without-placer-is-parked",
        (E("referral-created", 0, 1, pids=("P1^^^MRN",)),),
        {},
        parked=1,
        referrals=0,
    ),
    # -- prior authorization ---------------------------------------------------------------
    Scenario(
        "prior-auth-holds-packet-until-approved",
        (
            NW(0, 1, prior_auth_required=True, prior_auth_hold_packet=True),
            E("appointment-booked", 1, 2, placer="R1"),
            E("prior-auth-decided", 2, 3, placer="R1", outcome="approved", auth_number="PA1"),
        ),
        {
            "R1": X(
                "patient-booked",
                "booked",
                "not-sent",
                auth="approved",
                outbox=(("no-way-to-reach-specialist", "pending"),),
            )
        },
    ),
    Scenario(
        "prior-auth-held-packet-not-sent-while-pending",
        (
            NW(0, 1, prior_auth_required=True, prior_auth_hold_packet=True),
            E("prior-auth-decided", 2, 3, placer="R1", outcome="pending"),
        ),
        {"R1": X("open", "not-contacted", "not-sent", auth="pending", outbox=())},
    ),
    Scenario(
        "prior-auth-without-hold-sends-packet-and-denial-tells-referrer",
        (
            NW(0, 1, prior_auth_required=True),
            Auth("R1", "denied"),
        ),
        {
            "R1": X(
                "open",
                "not-contacted",
                "not-sent",
                auth="denied",
                outbox=(("no-way-to-reach-specialist", "pending"),),
            )
        },
    ),
    Scenario(
        "prior-auth-older-outcome-loses",
        (
            NW(0, 1, prior_auth_required=True, prior_auth_hold_packet=True),
            E("prior-auth-decided", 5, 3, placer="R1", outcome="approved"),
            E("prior-auth-decided", 2, 2, placer="R1", outcome="pending"),
        ),
        {"R1": X("open", "not-contacted", "not-sent", auth="approved")},
    ),
    Scenario(
        "prior-auth-approval-before-creation",
        (
            E("prior-auth-decided", 2, 2, placer="R1", outcome="approved"),
            NW(0, 1, prior_auth_required=True, prior_auth_hold_packet=True),
        ),
        {
            "R1": X(
                "open",
                "not-contacted",
                "not-sent",
                auth="approved",
                outbox=(("no-way-to-reach-specialist", "pending"),),
            )
        },
    ),
    Scenario(
        "prior-auth-cancel-drops-held-packet",
        (
            NW(0, 1, prior_auth_required=True, prior_auth_hold_packet=True),
            E("referral-cancelled", 1, 2, placer="R1"),
            Auth("R1", "approved"),
        ),
        {"R1": X("closed", "not-contacted", "not-sent", "cancelled", auth="approved", outbox=())},
    ),
)


# ---------------------------------------------------------------------------
# Running scenarios


@pytest.fixture
def db(store_url: str) -> Iterator[Database]:
    database = open_database(store_url)
    try:
        yield database
    finally:
        database.close()


def _referral_id(db: Database, key: str) -> int:
    fac, _, placer = key.rpartition("/")
    if fac:
        rid = store.find_by_key(db.conn, fac, placer)
        assert rid is not None, key
        return rid
    found = store.find_by_placer(db.conn, placer)
    assert len(found) == 1, key
    return found[0]


def run_steps(db: Database, clock: VirtualClock, steps: tuple[Step, ...]) -> Tracker:
    tracker = Tracker(db, clock)
    for step in steps:
        clock.advance(60)
        if isinstance(step, Event):
            with db.transaction() as conn:
                tracker.apply(step, conn)
        elif isinstance(step, I):
            with db.transaction() as conn:
                rid = _referral_id(db, step.placer)
                tracker.apply_internal(rid, states.InternalEvent(step.kind, clock.now()), conn)
        elif isinstance(step, Close):
            tracker.close(_referral_id(db, step.placer), step.reason, step.note, actor="op:test")
        elif isinstance(step, Link):
            parked = store.list_parked(db.conn, include_linked=True)[step.parked - 1]
            tracker.link(parked.id, _referral_id(db, step.placer), actor="op:test")
        else:
            tracker.decide_auth(_referral_id(db, step.placer), step.outcome, actor="op:test")
    return tracker


def check(db: Database, sc: Scenario) -> None:
    conn = db.conn
    for key, want in sc.expect.items():
        rid = _referral_id(db, key)
        row = store.get_referral(conn, rid)
        assert row is not None
        got = (row.status, row.patient_status, row.specialist_status, row.close_reason)
        assert got == (want.status, want.patient, want.specialist, want.closed), key
        # the derived columns agree with the stored state
        state = states.from_dict(row.state)
        assert (state.status, state.patient_status, state.specialist_status) == got[:3]
        if want.timeline is not None:
            assert tuple(e.kind for e in store.timeline(conn, rid)) == want.timeline, key
        if want.outbox is not None:
            assert tuple((o.template, o.status) for o in store.outbox_for(conn, rid)) == (
                want.outbox
            ), key
        if want.timers is not None:
            assert tuple(sorted(t.kind for t in store.timers_for(conn, rid))) == want.timers, key
        if want.auth is not None:
            auth = store.get_prior_auth(conn, rid)
            assert auth is not None and auth.status == want.auth, key
        if want.pids is not None:
            assert row.patient_ids == want.pids, key
        if want.fillers is not None:
            assert row.filler_numbers == want.fillers, key
        for column, value in want.details.items():
            assert row.details[column] == value, (key, column)
        if row.status == "closed":
            assert store.timers_for(conn, rid) == [], "a closed referral keeps no timers"
            assert row.closed_at is not None
    assert store.count_parked(conn) == sc.parked
    if sc.referrals is not None:
        assert len(store.list_referrals(conn, limit=0)) == sc.referrals
    assert audit_store.verify(conn).ok


def test_there_are_at_least_thirty_scenarios() -> None:
    assert len(SCENARIOS) >= 30
    assert len({s.name for s in SCENARIOS}) == len(SCENARIOS)


@pytest.mark.parametrize("sc", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_scenario(db: Database, sc: Scenario) -> None:
    run_steps(db, VirtualClock(T0), sc.steps)
    check(db, sc)


@pytest.mark.parametrize("sc", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_scenario_replayed_changes_nothing(db: Database, sc: Scenario) -> None:
    """Every message event applied again (a replay) writes nothing at all."""
    clock = VirtualClock(T0)
    tracker = run_steps(db, clock, sc.steps)
    before = _dump(db)
    with db.transaction() as conn:
        for step in sc.steps:
            if isinstance(step, Event):
                result = tracker.apply(step, conn)
                assert result.outcome in ("duplicate", "merged", "unchanged"), step.kind
    assert _dump(db) == before


def _dump(db: Database) -> dict[str, list[tuple[Any, ...]]]:
    tables = [
        "referrals",
        "referral_events",
        "referral_fillers",
        "referral_patients",
        "parked",
        "prior_auth",
        "timers",
        "outbox",
        "audit",
    ]
    return {t: db.conn.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall() for t in tables}


# ---------------------------------------------------------------------------
# Details of the contract


def test_apply_never_commits(db: Database) -> None:
    tracker = Tracker(db, VirtualClock(T0))
    with pytest.raises(RuntimeError), db.transaction() as conn:
        tracker.apply(NW(0, 1), conn)
        raise RuntimeError("the caller's transaction fails")
    assert store.list_referrals(db.conn) == []
    assert list(audit_store.rows(db.conn)) == []


def test_events_round_trip_through_json() -> None:
    for kind in EVENT_CLASSES:
        event = E(kind, 1, 5, placer="R1", fillers=("F",), pids=("P^^^A",))
        assert event_from_dict(json.loads(json.dumps(event_to_dict(event)))) == event
    created = NW(0, 1, contact=PatientContact(phone="1", sms_consent=False))
    assert event_from_dict(json.loads(json.dumps(event_to_dict(created)))) == created
    assert set(EVENT_TYPES) < set(EVENT_CLASSES)


def test_audit_rows_hold_no_phi(db: Database) -> None:
    steps = (
        NW(0, 1, reason="chest pain SECRET", contact=PatientContact(phone="+15559999")),
        E("specialist-declined", 1, 2, placer="R1", reason="SECRET decline"),
        E("report-received", 20, 3, fillers=("LAB",), pids=("P1^^^MRN",), report_id="X"),
        Close("R1", "other", note="SECRET note"),
    )
    run_steps(db, VirtualClock(T0), steps)
    text = json.dumps([r.as_dict() for r in audit_store.rows(db.conn)])
    for secret in ("SECRET", "+1555", "P1^^^MRN", "Dr Heart", "heart@direct"):
        assert secret not in text
    actions = [r.action for r in audit_store.rows(db.conn)]
    assert actions == ["referral-created", "specialist-declined", "parked", "closed-by-operator"]


def test_show_has_timeline_and_close_note(db: Database) -> None:
    run_steps(db, VirtualClock(T0), (NW(0, 1), Close("R1", "other", note="moved")))
    view = show_referral(db, _referral_id(db, "R1"))
    assert view is not None
    assert view["close_note"] == "moved"
    assert [e["kind"] for e in view["timeline"]] == ["referral-created", "closed-by-operator"]
    assert view["timeline"][1]["actor"] == "op:test"


def test_link_twice_is_refused(db: Database) -> None:
    steps = (NW(0, 1), E("report-received", 20, 2, fillers=("L",), report_id="X"), Link(1, "R1"))
    tracker = run_steps(db, VirtualClock(T0), steps)
    from engine.errors import StoreError

    with pytest.raises(StoreError, match="already linked"):
        tracker.link(1, 1)
    with pytest.raises(StoreError, match="no parked event"):
        tracker.link(99, 1)


def test_timers_and_outbox_keys(db: Database) -> None:
    clock = VirtualClock(T0)
    run_steps(db, clock, (NW(0, 1),))
    timers = store.timers_for(db.conn, 1)
    assert [(t.kind, t.attempt, t.key) for t in timers] == [
        ("first-nudge", 1, "1:first-nudge:1"),
        ("second-nudge", 2, "1:second-nudge:2"),
        ("specialist-followup", 1, "1:specialist-followup:1"),
        ("coordinator-task", 1, "1:coordinator-task:1"),
        ("outreach", 1, "1:outreach:1"),
        ("attempt-close", 1, "1:attempt-close:1"),
    ]
    assert timers[0].due == clock.now() + DAY
    (packet,) = store.outbox_for(db.conn, 1)
    assert packet.idempotency_key == "1:send-packet:1"
    assert packet.channel == "task"  # a Direct address, but no certificate
    assert json.loads(packet.payload) == {
        "close_reason": "",
        "effect": "send-packet",
        "kind": "send-packet",
        "task": "no-way-to-reach-specialist",
        "why": "no-certificate",
        "reason": "no Direct certificate and no fax number for the specialist office",
        # docs/escalation.md "Tasks": routine 10, 0 days open, no failed contact
        "priority_score": 10,
        "attempts": [],
        "referral_id": 1,
    }
    # the write API is idempotent per key
    with db.transaction() as conn:
        assert not store.enqueue_outbox(conn, 1, "direct", "x", "{}", "1:send-packet:1", T0)
        store.schedule_timer(conn, 1, "first-nudge", T0 + 5, 1, "1:first-nudge:1")
    assert len(store.timers_for(db.conn, 1)) == 6


def test_metrics(db: Database) -> None:
    registry = CollectorRegistry()
    metrics = TrackerMetrics(registry, db)
    tracker = Tracker(db, VirtualClock(T0), metrics=metrics)
    with db.transaction() as conn:
        tracker.apply(NW(0, 1), conn)
        tracker.apply(NW(0, 2, placer="R2"), conn)
        tracker.apply(E("appointment-booked", 1, 3, placer="R1"), conn)
        tracker.apply(E("appointment-booked", 1, 3, placer="R1"), conn)  # duplicate
        tracker.apply(E("report-received", 1, 4, fillers=("?",)), conn)  # parked
    value = registry.get_sample_value
    assert value("refloop_referral_transitions_total", {"kind": "referral-created"}) == 2
    assert value("refloop_referral_transitions_total", {"kind": "appointment-booked"}) == 1
    assert value("refloop_referrals", {"status": "open"}) == 1
    assert value("refloop_referrals", {"status": "patient-booked"}) == 1
    assert value("refloop_referrals", {"status": "closed"}) == 0
    assert value("refloop_parked_messages") == 1


@pytest.mark.parametrize(("notify", "result"), [("", "timeline"), ("ehr-inbox", "sent")])
def test_referrer_notice_is_a_notification_not_a_task(
    db: Database, notify: str, result: str
) -> None:
    """docs/escalation.md "Notices to the referring provider": on the ``notify`` channel
    when one is configured, else recorded only (the close event's effects); never a task,
    counted by refloop_referrer_notices_total{result}."""
    registry = CollectorRegistry()
    tracker = Tracker(
        db, VirtualClock(T0), policy=Policy(notify=notify), metrics=TrackerMetrics(registry)
    )
    with db.transaction() as conn:
        tracker.apply(NW(0, 1), conn)
    closed = tracker.close(1, "other", actor="operator:alice")
    rows = [(o.channel, o.template) for o in store.outbox_for(db.conn, 1)]
    assert ("task", "referrer-closed") not in rows
    if notify:
        assert closed.effects[-1] == "notify-referrer-closed"
        assert (notify, "referrer-closed") in rows
        (row,) = [o for o in store.outbox_for(db.conn, 1) if o.channel == notify]
        assert json.loads(row.payload)["kind"] == "notification"
    else:
        assert closed.effects[-1] == "notify-referrer-closed:timeline"
        assert not [r for r in rows if r[1] == "referrer-closed"]
    value = registry.get_sample_value("refloop_referrer_notices_total", {"result": result})
    assert value == 1


def test_window_is_configurable(db: Database) -> None:
    tracker = Tracker(db, VirtualClock(T0), window_days=200)
    with db.transaction() as conn:
        tracker.apply(NW(0, 1), conn)
        result = tracker.apply(
            E("appointment-booked", 120, 2, pids=("P1^^^MRN",), specialty="cardiology"), conn
        )
    assert (result.outcome, result.how) == ("applied", "patient-window")


# ---------------------------------------------------------------------------
# The CLI


def _cli() -> click.Group:
    """The ``refloop`` group users run (engine.cli registers these groups on it)."""
    from engine.cli.main import main

    return main


def _invoke(state: Path, *args: str) -> Any:
    routes = state.parent / "routes.yaml"  # names no store file: the default, refloop.db
    routes.write_text("version: 1\n")
    return CliRunner().invoke(_cli(), [*args, "--state", str(state), "--routes", str(routes)])


@pytest.mark.store
def test_cli_unmatched_report_parked_then_linked(tmp_path: Path) -> None:
    state = tmp_path / "state"
    db = open_database(state / "refloop.db")
    try:
        run_steps(
            db,
            VirtualClock(T0),
            (NW(0, 1), E("report-received", 20, 2, fillers=("LAB-5",), report_id="RPT1")),
        )
    finally:
        db.close()

    parked = _invoke(state, "parked", "list", "--json")
    assert parked.exit_code == 0, parked.output
    (item,) = json.loads(parked.output)
    assert item["kind"] == "report-received" and item["why"] == "no-match"
    assert "RPT1" not in parked.output  # ids and keys only

    linked = _invoke(state, "referrals", "link", str(item["id"]), "1", "--actor", "alice")
    assert linked.exit_code == 0, linked.output
    assert json.loads(_invoke(state, "parked", "list", "--json").output) == []

    listing = _invoke(state, "referrals", "list", "--json")
    (ref,) = json.loads(listing.output)
    for key in (
        "id",
        "placer_number",
        "status",
        "patient_status",
        "specialist_status",
        "specialty",
        "opened_at",
        "closed_at",
        "close_reason",
    ):
        assert key in ref
    assert (ref["status"], ref["close_reason"]) == ("closed", "report-received")

    shown = _invoke(state, "referrals", "show", "1", "--json")
    timeline = json.loads(shown.output)["timeline"]
    assert [(e["kind"], e["actor"]) for e in timeline] == [
        ("referral-created", "message"),
        ("report-received", "operator:alice"),
    ]
    text = _invoke(state, "referrals", "show", "1")
    assert text.exit_code == 0 and "report-received" in text.output

    again = _invoke(state, "referrals", "link", str(item["id"]), "1")
    assert again.exit_code == 1 and "already linked" in again.output


@pytest.mark.store
def test_cli_list_filters_close_and_audit(tmp_path: Path) -> None:
    state = tmp_path / "state"
    db = open_database(state / "refloop.db")
    try:
        run_steps(
            db,
            VirtualClock(T0),
            (
                NW(0, 1, placer="R1"),
                NW(0, 2, placer="R2", specialty="dermatology"),
                NW(0, 3, placer="R3", prior_auth_required=True, prior_auth_hold_packet=True),
            ),
        )
    finally:
        db.close()

    def ids(*args: str) -> list[int]:
        out = _invoke(state, "referrals", "list", "--json", *args)
        assert out.exit_code == 0, out.output
        return [r["id"] for r in json.loads(out.output)]

    assert ids() == [3, 2, 1]
    assert ids("--specialty", "Dermatology") == [2]
    assert ids("--limit", "1") == [3]
    assert ids("--limit", "0") == [3, 2, 1]
    assert ids("--open-days-over", "30") == [3, 2, 1]  # opened 2026-01-01, now is later
    assert ids("--open-days-over", "100000") == []
    assert ids("--prior-auth", "required") == [3]

    closed = _invoke(state, "referrals", "close", "1", "--reason", "other", "--note", "n")
    assert closed.exit_code == 0, closed.output
    assert ids("--status", "closed") == [1]
    assert ids("--status", "open") == [3, 2]
    everything = ids("--sort", "priority", "--limit", "0")  # the open ones, then the closed
    assert sorted(everything) == [1, 2, 3] and everything[-1] == 1
    bad = _invoke(state, "referrals", "close", "99", "--reason", "other")
    assert bad.exit_code == 1 and "no referral with id 99" in bad.output

    auth = _invoke(state, "referrals", "auth", "3", "--outcome", "approved")
    assert auth.exit_code == 0 and "send-packet" in auth.output

    text = _invoke(state, "referrals", "list")
    assert text.exit_code == 0 and "R2" in text.output
    verify = _invoke(state, "audit", "verify")
    assert verify.exit_code == 0 and "audit log ok" in verify.output
    export = _invoke(state, "audit", "export", "--jsonl")
    lines = [json.loads(line) for line in export.output.splitlines()]
    assert [r["id"] for r in lines] == list(range(1, len(lines) + 1))
    assert lines[-1]["actor"].startswith("operator:")
    future = _invoke(state, "audit", "export", "--since", "2100-01-01")
    assert json.loads(future.output) == []
    assert _invoke(state, "audit", "export", "--since", "yesterday").exit_code == 1


@pytest.mark.empty_store
@pytest.mark.store
def test_cli_on_a_database_without_referral_tables(tmp_path: Path) -> None:
    from engine.store.db import MIGRATIONS

    state = tmp_path / "state"
    open_database(state / "refloop.db", migrations=MIGRATIONS[:1]).close()
    out = _invoke(state, "referrals", "list")
    assert out.exit_code == 1 and "no referral tables" in out.output


def test_every_command_has_an_example_and_is_documented() -> None:
    root = Path(__file__).resolve().parent.parent
    docs = "\n".join(p.read_text(encoding="utf-8") for p in (root / "docs").glob("*.md"))
    main = _cli()
    for group in main.commands.values():
        if not isinstance(group, click.Group):  # run, send, replay, simulate
            continue
        for name, cmd in group.commands.items():
            assert "Example:" in (cmd.help or ""), name
            assert f"refloop {group.name} {name}" in docs


# ---------------------------------------------------------------------------
# Order independence at the store level

_ORDER_FREE = st.sampled_from(
    [
        E("appointment-booked", 2, 0, placer="R1", appointment_id="A1", start="s1"),
        E("appointment-booked", 4, 0, placer="R1", appointment_id="A2"),
        E("appointment-rescheduled", 3, 0, placer="R1", appointment_id="A1", start="s2"),
        E("appointment-cancelled", 5, 0, placer="R1", appointment_id="A2"),
        E("no-show", 6, 0, placer="R1", appointment_id="A1"),
        E("specialist-accepted", 1, 0, placer="R1", fillers=("F1",)),
        E("specialist-declined", 7, 0, placer="R1", reason="capacity"),
        E("report-received", 9, 0, fillers=("F1",), report_id="RPT1"),
        E("report-received", 9, 0, placer="R1", report_id="RPT1", status="corrected"),
        E("report-received", 8, 0, placer="R1", report_id="RPT2", status="preliminary"),
        E("referral-cancelled", 4, 0, placer="R1"),
        E("referral-updated", 3, 0, placer="R1", priority="urgent"),
        E("referral-updated", 5, 0, placer="R1", priority="stat", reason="r"),
        E("contact-updated", 2, 0, placer="R1", contact=PatientContact(phone="1")),
        E("contact-updated", 6, 0, placer="R1", contact=PatientContact(phone="2")),
        E("prior-auth-decided", 3, 0, placer="R1", outcome="pending"),
        E("prior-auth-decided", 5, 0, placer="R1", outcome="approved"),
        NW(0, 0, prior_auth_required=True),
    ]
)


def _numbered(events: list[Event]) -> list[Event]:
    """Give each event its own message id (as separate inbox rows would)."""
    out = []
    for n, e in enumerate(events, 1):
        data = event_to_dict(e)
        data["message_id"] = n
        out.append(event_from_dict(data))
    return out


def _final(events: list[Event]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        db = open_database(Path(tmp) / "p.db")
        try:
            tracker = Tracker(db, VirtualClock(T0))
            for e in events:
                with db.transaction() as conn:
                    tracker.apply(e, conn)
            conn = db.conn
            rows = store.list_referrals(conn, limit=0)
            assert audit_store.verify(conn).ok
            out: dict[str, Any] = {"parked": store.count_parked(conn)}
            for r in rows:
                auth = store.get_prior_auth(conn, r.id)
                out[r.placer_number] = {
                    "state": r.state,
                    "statuses": (r.status, r.patient_status, r.specialist_status, r.close_reason),
                    "details": dict(r.details),
                    "fillers": r.filler_numbers,
                    "pids": r.patient_ids,
                    "opened_at": r.opened_at,
                    "events": sorted((e.kind, e.message_id) for e in store.timeline(conn, r.id)),
                    "auth": None if auth is None else (auth.status, auth.decided_version),
                    "closed_has_no_timers": r.status != "closed"
                    or not store.timers_for(conn, r.id),
                }
            return out
        finally:
            db.close()


@settings(max_examples=60, deadline=None)
@given(
    st.lists(_ORDER_FREE, min_size=1, max_size=8).map(lambda es: [NW(0, 0), *es]),
    st.randoms(use_true_random=False),
)
@pytest.mark.store
def test_permutations_end_in_the_same_stored_state(events: list[Event], rnd: Any) -> None:
    numbered = _numbered(events)
    shuffled = list(numbered)
    rnd.shuffle(shuffled)
    assert _final(shuffled) == _final(numbered)


# ---------------------------------------------------------------------------
# HL7 → the shipped routes.yaml → tracker (message templates after tests/test_routes.py)

_MSH = "MSH|^~\\&|EHR|CLINIC_A|REFLOOP|CLINIC_A|2025030310{n:04d}||{type}|C{n}|P|2.5.1"
_PID = "PID|1||MRN123^^^CLINIC_A^MR||Doe^Jane||19700101|F|||||^PRN^CP^^^555^1234567||EN"
_RF1 = (
    "RF1|{st}^x^HL70283|S^Stat^HL70280|Med||O|REF-1^CLINIC_A|20250303|20250401|"
    "|O^Provider^HL70336|SP-9^CARDIO"
)
_ORC = (
    "ORC|{ctl}|REF-1^CLINIC_A^1.2.840^ISO|A55^CARDIO||{st}|||||||1234567890^Smith^Ann^^^^MD"
    "||||^Patient moved"
)
_OBR = "OBR|1|REF-1^CLINIC_A||REFCARD^Cardiology referral^L|||||||||||||||||||||F"
_SCH = "|".join(
    ["SCH", "P1", "APPT-9^CARDIO", "", "", "", "RS^Reason", "", "", "", ""]
    + ["^^60^20250321140000"]
    + [""] * 13
    + ["{st}", "REF-1^CLINIC_A", "A55^CARDIO"]
)
_TXA = (
    "TXA|1|CN^Consult^HL70270|AP|20250319||||||||DOC-778^CARDIO|DOC-700|REF-1^CLINIC_A|||{st}||AV"
)


def _hl7(type_: str, *body: str, n: int) -> bytes:
    return "\r".join([_MSH.format(type=type_, n=n), *body]).encode() + b"\r"


HL7_SCENARIOS = [
    (
        "ref-i12-variant",
        [
            ("REF^I12^REF_I12", (_RF1.format(st="P"), _PID)),
            ("RRI^I12", ("MSA|AA|C1", _RF1.format(st="A"), _PID)),
            ("SIU^S12", (_SCH.format(st="Booked"), _PID)),
            ("MDM^T04", (_PID, _TXA.format(st="LA"))),
        ],
        ("closed", "booked", "report-received", "report-received"),
    ),
    (
        "orm-variant-with-cancel",
        [
            ("ORM^O01", (_PID, _ORC.format(ctl="NW", st=""), _OBR)),
            ("SIU^S12", (_SCH.format(st="Booked"), _PID)),
            ("ORM^O01", (_PID, _ORC.format(ctl="CA", st=""), _OBR)),
        ],
        ("closed", "booked", "not-sent", "cancelled"),
    ),
    (
        "orm-variant-out-of-order-and-resent",
        [
            ("MDM^T04", (_PID, _TXA.format(st="LA"))),
            ("SIU^S12", (_SCH.format(st="Booked"), _PID)),
            ("ORM^O01", (_PID, _ORC.format(ctl="NW", st=""), _OBR)),
            ("SIU^S12", (_SCH.format(st="Booked"), _PID)),
        ],
        ("closed", "booked", "report-received", "report-received"),
    ),
]


@pytest.mark.parametrize(
    ("name", "messages", "expected"), HL7_SCENARIOS, ids=[s[0] for s in HL7_SCENARIOS]
)
def test_hl7_through_routes(
    db: Database,
    name: str,
    messages: list[tuple[str, tuple[str, ...]]],
    expected: tuple[str, str, str, str],
) -> None:
    from engine import config
    from engine.hl7v2.message import Message
    from engine.model import Track
    from engine.routing.compile import compile_config
    from engine.routing.decide import decide

    root = Path(__file__).resolve().parent.parent
    table = compile_config(config.load(root / "routes.yaml"))
    tracker = Tracker(db, VirtualClock(T0))
    for n, (type_, body) in enumerate(messages, 1):
        decision = decide(
            table, Message(_hl7(type_, *body, n=n)), "ehr", message_id=n, received_at=T0
        )
        tracks = [a for a in decision.actions if isinstance(a, Track)]
        assert tracks, (type_, decision.reason)
        with db.transaction() as conn:
            for action in tracks:
                tracker.apply(action.event, conn)
    (row,) = store.list_referrals(db.conn, limit=0)
    assert (row.status, row.patient_status, row.specialist_status, row.close_reason) == expected
    assert store.count_parked(db.conn) == 0
    assert audit_store.verify(db.conn).ok
