"""FHIR routes: the FHIRPath-like subset, the shipped routes.yaml FHIR routes, config
errors, and the same referral told as HL7 v2 and as FHIR ending in the same state."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fhir_server import make_service_request
from helpers import hl7

from engine.clock import VirtualClock
from engine.config import load, loads
from engine.errors import ConfigError
from engine.hl7v2.message import Message
from engine.model import Event, StoredMessage
from engine.routing.compile import compile_config
from engine.routing.decide import decide, decide_fhir, decide_stored
from engine.routing.fhirpath import FhirPath, FhirResource, reference_key
from engine.routing.table import RouteTable
from engine.store import open_database
from engine.tracking.tracker import Tracker
from engine.tracking.views import list_referrals, show_referral

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def table() -> RouteTable:
    return compile_config(load(REPO / "routes.yaml"))


SR = make_service_request(
    1,
    code={"coding": [{"code": "REFCARD"}]},
    priority="asap",
    meta={"versionId": "1", "lastUpdated": "2026-01-01T12:00:00Z"},
)


# -- the path subset ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "values"),
    [
        ("ServiceRequest.status", ["active"]),
        ("ServiceRequest.category.coding.code", ["3457005"]),
        ("ServiceRequest.identifier.value", ["REF-1"]),
        ("ServiceRequest.identifier.where(type.coding.code='PLAC').value", ["REF-1"]),
        ("ServiceRequest.identifier.where(type.coding.code='FILL').value", []),
        (
            "ServiceRequest.identifier.where(system='urn:oid:2.16.840.1.113883.19.5').value",
            ["REF-1"],
        ),
        ("ServiceRequest.nosuch.element", []),
        ("Appointment.status", []),  # another resource type yields nothing
        ("ServiceRequest.meta.versionId", ["1"]),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_path_values(path: str, values: list[str]) -> None:
    assert FhirPath.parse(path).texts(SR) == values


def test_paths_flatten_lists_at_every_step() -> None:
    appt = {
        "resourceType": "Appointment",
        "participant": [
            {
                "actor": {"reference": "Patient/1"},
                "type": [{"coding": [{"code": "A"}, {"code": "B"}]}],
            },
            {"actor": {"reference": "Practitioner/2"}, "type": [{"coding": [{"code": "C"}]}]},
        ],
        "flag": True,
    }
    assert FhirPath.parse("Appointment.participant.type.coding.code").texts(appt) == ["A", "B", "C"]
    assert FhirPath.parse(
        "Appointment.participant.where(actor.reference='Practitioner/2').type.coding.code"
    ).texts(appt) == ["C"]
    assert FhirPath.parse("Appointment.flag").texts(appt) == ["true"]


@pytest.mark.parametrize(
    "bad",
    [
        "status",
        "serviceRequest.status",
        "ServiceRequest..status",
        "ServiceRequest.status.",
        "ServiceRequest.where(x=1)",
        "ServiceRequest.Status",
    ],
)
def test_bad_paths_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="bad FHIR path"):
        FhirPath.parse(bad)


@pytest.mark.parametrize(
    ("ref", "key"),
    [
        ("ServiceRequest/7", "ServiceRequest/7"),
        ("https://ehr.example.org/fhir/R4/ServiceRequest/7/_history/3", "ServiceRequest/7"),
        ("#contained", ""),
        ("urn:uuid:1234", ""),
    ],
)
def test_reference_key(ref: str, key: str) -> None:
    assert reference_key(ref) == key


# -- the shipped FHIR routes ----------------------------------------------------------------


def appointment(status: str, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Appointment",
        "id": "a1",
        "status": status,
        "start": "2026-01-10T09:00:00+00:00",
        "basedOn": [{"reference": "ServiceRequest/sr1"}],
        "participant": [{"actor": {"reference": "Patient/p1"}, "status": "accepted"}],
        "meta": {"versionId": "1", "lastUpdated": "2026-01-01T12:00:00Z"},
        **extra,
    }


def report(status: str = "final") -> dict[str, Any]:
    return {
        "resourceType": "DiagnosticReport",
        "id": "dr1",
        "status": status,
        "code": {"text": "Consult"},
        "basedOn": [{"reference": "ServiceRequest/sr1"}],
        "subject": {"reference": "Patient/p1"},
        "meta": {"versionId": "1", "lastUpdated": "2026-01-01T12:00:00Z"},
    }


def task(status: str) -> dict[str, Any]:
    return {
        "resourceType": "Task",
        "id": "t1",
        "status": status,
        "intent": "order",
        "focus": {"reference": "ServiceRequest/sr1"},
        "for": {"reference": "Patient/p1"},
        "statusReason": {"text": "no capacity"},
    }


CASES: list[tuple[str, dict[str, Any], str, str, dict[str, Any]]] = [
    (
        "sr-new",
        SR,
        "fhir-referral-new",
        "referral-created",
        {"priority": "urgent", "specialty_category": "Cardiology"},
    ),
    ("sr-v2", {**SR, "meta": {"versionId": "2"}}, "fhir-referral-updated", "referral-updated", {}),
    (
        "sr-revoked",
        {**SR, "status": "revoked"},
        "fhir-referral-cancelled",
        "referral-cancelled",
        {},
    ),
    (
        "sr-not-referral",
        {**SR, "category": [{"coding": [{"code": "108252007"}]}]},
        "fhir-other",
        "",
        {},
    ),
    (
        "appt-booked",
        appointment("booked"),
        "fhir-appointment-booked",
        "appointment-booked",
        {"appointment_id": "Appointment/a1", "start": "2026-01-10T09:00:00+00:00"},
    ),
    (
        "appt-cancelled",
        appointment("cancelled", cancelationReason={"text": "ill"}),
        "fhir-appointment-cancelled",
        "appointment-cancelled",
        {"reason": "ill"},
    ),
    ("appt-noshow", appointment("noshow"), "fhir-appointment-noshow", "no-show", {}),
    ("appt-fulfilled", appointment("fulfilled"), "fhir-other", "", {}),
    (
        "report-final",
        report(),
        "fhir-diagnostic-report",
        "report-received",
        {"report_id": "DiagnosticReport/dr1", "status": "final"},
    ),
    (
        "report-amended",
        report("amended"),
        "fhir-diagnostic-report",
        "report-received",
        {"status": "corrected"},
    ),
    ("report-preliminary", report("preliminary"), "fhir-other", "", {}),
    ("task-accepted", task("accepted"), "fhir-task-accepted", "specialist-accepted", {}),
    (
        "task-rejected",
        task("rejected"),
        "fhir-task-declined",
        "specialist-declined",
        {"reason": "no capacity"},
    ),
    ("task-completed", task("completed"), "fhir-other", "", {}),
]


@pytest.mark.parametrize(
    ("resource", "route", "kind", "fields"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_shipped_fhir_routes(
    table: RouteTable, resource: dict[str, Any], route: str, kind: str, fields: dict[str, Any]
) -> None:
    decision = decide_fhir(table, FhirResource(resource), "ehrfhir", message_id=3, received_at=5.0)
    assert decision.routes == (route,)
    if not kind:
        assert decision.status == "filtered" and not decision.events
        return
    assert decision.status == "routed", decision.reason
    (event,) = decision.events
    assert event.kind == kind and event.message_id == 3
    assert event.ids.sending_facility == "ehrfhir"
    assert "ServiceRequest/sr1" in event.ids.filler_numbers
    assert "Patient/p1" in event.ids.patient_ids
    for name, value in fields.items():
        assert getattr(event, name) == value


def test_event_time_is_last_updated_else_received(table: RouteTable) -> None:
    (with_meta,) = decide_fhir(table, FhirResource(SR), "s").events
    assert with_meta.occurred_at == 1_767_268_800.0  # 2026-01-01T12:00:00Z
    (without,) = decide_fhir(table, FhirResource(task("accepted")), "s", received_at=9.0).events
    assert without.occurred_at == 9.0


def test_hl7_routes_never_see_fhir_and_the_other_way_round(table: RouteTable) -> None:
    raw = json.dumps(SR).encode()
    row = StoredMessage(
        1,
        1.0,
        "ehrfhir",
        "p",
        "ehrfhir",
        "",
        "ServiceRequest/sr1/_history/1",
        "ServiceRequest",
        "",
        raw,
        "utf-8",
        "received",
        "",
        "",
    )
    assert decide_stored(table, row).routes == ("fhir-referral-new",)
    msg = Message(hl7("1", msg_type="ADT^A04"))
    assert decide(table, msg, "ehr").routes == ("adt-contact",)
    broken = StoredMessage(
        2, 1.0, "s", "p", "s", "", "x", "Task", "", b"{not json", "utf-8", "received", "", ""
    )
    assert decide_stored(table, broken).reason == "cannot read resource: not valid JSON"


ROUTES = """
version: 1
routes:
  - name: r
    when:
      resource: {resource}
      {key}: active
    extract:
      placer_number: {extract}
    then:
      - {action}
"""


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (
            {"resource": "service_request"},
            "routes.yaml:6 routes[0].when.resource: a FHIR resource type like ServiceRequest, "
            "a list of them, or *",
        ),
        (
            {"key": "ServiceRequest..status"},
            "routes.yaml:7 routes[0].when.ServiceRequest..status: bad FHIR path",
        ),
        (
            {"key": "status"},
            "routes.yaml:7 routes[0].when.status: unknown key (expected resource, any, or a "
            "FHIR path like Appointment.status)",
        ),
        (
            {"extract": "PID.3.1"},
            "routes.yaml:9 routes[0].extract.placer_number: bad FHIR path 'PID.3.1'",
        ),
        (
            {"extract": "\"{{ field('PID.3') }}\""},
            "routes.yaml:9 routes[0].extract.placer_number: undefined name 'field'",
        ),
        (
            {"action": "forward: somewhere"},
            "routes.yaml:11 routes[0].then[0].forward: "
            "a FHIR resource cannot be forwarded over MLLP",
        ),
    ],
    ids=["bad-type", "bad-path", "not-a-path", "terse-path", "hl7-function", "forward"],
)
def test_fhir_route_errors_name_file_line_and_key(edit: dict[str, str], problem: str) -> None:
    values = {
        "resource": "ServiceRequest",
        "key": "ServiceRequest.status",
        "extract": "ServiceRequest.identifier.value",
        "action": "track: referral-created",
        **edit,
    }
    with pytest.raises(ConfigError) as exc:
        compile_config(loads(ROUTES.format(**values)))
    assert any(p.startswith(problem) for p in exc.value.problems), exc.value.problems


# -- acceptance: the same referral as HL7 v2 and as FHIR ------------------------------------


def seg(name: str, fields: dict[int, str]) -> str:
    out = [""] * (max(fields) + 1)
    out[0] = name
    for i, v in fields.items():
        out[i] = v
    return "|".join(out)


PID = "PID|1||p1^^^MRN||DOE^JANE||19800101|F"
HL7_SCENARIO = [
    hl7(
        "M1",
        msg_type="REF^I12",
        sending_facility="ehrfhir",
        body=(
            seg("RF1", {1: "A", 2: "A", 6: "REF-1"}),
            PID,
            seg("OBR", {1: "1", 4: "REFCARD"}),
        ),
    ),
    hl7(
        "M2",
        msg_type="SIU^S12",
        body=(
            seg(
                "SCH", {1: "APT-1", 2: "Appointment/a1", 11: "^^^20260110090000+0000", 26: "REF-1"}
            ),
            PID,
        ),
    ),
    hl7(
        "M3",
        msg_type="ORU^R01",
        body=(PID, seg("OBR", {1: "1", 2: "REF-1", 3: "DiagnosticReport/dr1", 25: "F"})),
    ),
]
FHIR_SCENARIO = [SR, appointment("booked"), report()]


def _apply(tmp: Path, events: list[Event]) -> dict[str, Any]:
    db = open_database(tmp / "refloop.db")
    try:
        clock = VirtualClock(1_767_268_800.0)
        tracker = Tracker(db, clock)
        for event in events:
            clock.advance(60)
            with db.transaction() as conn:
                tracker.apply(event, conn)
        (summary,) = list_referrals(db, now=clock.now())
        shown = show_referral(db, int(summary["id"]))
        assert shown is not None
        return shown
    finally:
        db.close()


@pytest.mark.store
def test_same_referral_as_hl7_and_as_fhir_ends_in_the_same_state(
    table: RouteTable, tmp_path: Path
) -> None:
    hl7_events = [e for raw in HL7_SCENARIO for e in decide(table, Message(raw), "ehr").events]
    fhir_events = [
        e for res in FHIR_SCENARIO for e in decide_fhir(table, FhirResource(res), "ehrfhir").events
    ]
    kinds = ["referral-created", "appointment-booked", "report-received"]
    assert [e.kind for e in hl7_events] == [e.kind for e in fhir_events] == kinds
    for h, f in zip(hl7_events, fhir_events, strict=True):
        assert (
            h.occurred_at,
            getattr(h, "priority", None),
            getattr(h, "specialty_category", None),
        ) == (f.occurred_at, getattr(f, "priority", None), getattr(f, "specialty_category", None))
    assert hl7_events[1].start == fhir_events[1].start  # type: ignore[attr-defined]
    assert hl7_events[2].status == fhir_events[2].status == "final"  # type: ignore[attr-defined]
    (tmp_path / "hl7").mkdir()
    (tmp_path / "fhir").mkdir()
    via_hl7 = _apply(tmp_path / "hl7", hl7_events)
    via_fhir = _apply(tmp_path / "fhir", fhir_events)

    def state(r: dict[str, Any]) -> tuple[Any, ...]:
        timeline = [
            (
                e["kind"],
                e["status"],
                e["patient_status"],
                e["specialist_status"],
                e["changed"],
                e["occurred_at"],
            )
            for e in r["timeline"]
        ]
        return (
            r["status"],
            r["placer_number"],
            r["priority"],
            r["report_ids"] and len(r["report_ids"]),
            timeline,
            [t["kind"] for t in r["timers"]],
        )

    assert state(via_hl7) == state(via_fhir)
    assert via_hl7["status"] == via_fhir["status"] == "closed"
    assert via_hl7["report_ids"] == via_fhir["report_ids"] == ["DiagnosticReport/dr1"]
