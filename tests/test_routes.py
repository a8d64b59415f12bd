"""Routing table tests: the shipped routes.yaml against the shared corpus and constructed
messages for the variants the corpus lacks; semantics of when / extract / then."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from engine import config
from engine.errors import MessageRejected
from engine.hl7v2.message import Message, split_messages
from engine.model import Drop, Send, StoredMessage, Track
from engine.routing.compile import compile_config
from engine.routing.decide import decide, decide_stored
from engine.routing.table import RouteTable

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / "shared" / "corpus" / "hl7"


@pytest.fixture(scope="module")
def table() -> RouteTable:
    return compile_config(config.load(ROOT / "routes.yaml"))


def corpus() -> list[tuple[str, bytes]]:
    out = []
    for p in sorted(CORPUS.rglob("*")):
        if not p.is_file():
            continue
        data = p.read_bytes()
        batch = split_messages(data)
        for i, m in enumerate(batch.messages or (data,)):
            out.append((f"{p.relative_to(CORPUS)}#{i + 1}", m))
    return out


CORPUS_MESSAGES = corpus()

# Every corpus message of a type the shipped routes handle (TestADT.txt's 124 are checked
# by type below): the route, the event kind (None: the route drops it) and key fields.
EXPECTED: dict[str, tuple[str, str | None, dict[str, Any]]] = {
    name: (route, kind, keys)
    for name, route, kind, keys in [
        (
            "cdc-dex-hl7/2.3.1_HL7_Test_File_with_HHS_Data.txt#1",
            "oru-report",
            "report-received",
            {
                "placer_number": "abc123",
                "patient_ids": ("abc123^^^WDL",),
                "filler_numbers": ("abc123",),
                "report_id": "abc123",
                "status": "final",
            },
        ),
        (
            "cdc-dex-hl7/COVID19_ELR_01.hl7#1",
            "oru-report",
            "report-received",
            {
                "placer_number": "2gcxDYvIHHLr+e6hO9Lxrg",
                "patient_ids": ("P21-0000105078^^^OneAbbottSol.STAG",),
                "filler_numbers": ("P21-0000105078",),
                "report_id": "P21-0000105078",
                "status": "final",
            },
        ),
        (
            "cdc-dex-hl7/GenV1_Batch_No_headers_twoMSH.txt#2",
            "oru-report",
            "report-received",
            {
                "placer_number": "",
                "patient_ids": ("MR99998",),
                "filler_numbers": ("123454",),
                "report_id": "123454",
                "status": "corrected",
            },
        ),
        (
            "cdc-dex-hl7/Genv1-Case-TestMessage1.HL7#1",
            "oru-report",
            "report-received",
            {
                "placer_number": "",
                "patient_ids": ("MR99998",),
                "filler_numbers": ("123451",),
                "report_id": "123451",
                "status": "final",
            },
        ),
        (
            "cdc-dex-hl7/ND_23z_Valid_1.txt#1",
            "oru-report",
            "report-received",
            {
                "placer_number": "561627",
                "patient_ids": ("1289369",),
                "filler_numbers": ("A20171427001",),
                "report_id": "A20171427001",
                "status": "final",
            },
        ),
        (
            "cdc-dex-hl7/PHLIP_FLU_2.5.1_NO_MSH12.txt#1",
            "oru-report",
            "report-received",
            {
                "placer_number": "",
                "patient_ids": ("OSCG-219496-17^^^1236O.9.7.17", "000000000^^^SSN"),
                "filler_numbers": ("575630",),
                "report_id": "575630",
                "status": "final",
            },
        ),
        (
            "cdc-dex-hl7/RawHL7DataCELR.txt#1",
            "oru-report",
            "report-received",
            {
                "placer_number": "",
                "patient_ids": ("PID00002660^^^TN.Nashville.SPHL",),
                "filler_numbers": ("N20V000178-01",),
                "report_id": "N20V000178-01",
                "status": "final",
            },
        ),
        (
            "cdc-dex-hl7/bigmessage.txt#1",
            "oru-report",
            "report-received",
            {
                "placer_number": "",
                "patient_ids": ("788788^^^UT-NEDSS",),
                "filler_numbers": ("20201611471",),
                "report_id": "20201611471",
                "status": "corrected",
            },
        ),
        (
            "cdc-dex-hl7/covid25.txt#1",
            "oru-report",
            "report-received",
            {
                "placer_number": "",
                "patient_ids": ("2811155", "M100000090"),
                "filler_numbers": ("TAA235",),
                "report_id": "TAA235",
                "status": "final",
            },
        ),
        (
            "fhir-converter/ADT-A04-01.hl7#1",
            "adt-contact",
            "contact-updated",
            {"placer_number": "", "patient_ids": ("PATID1234^^^test1", "123456789^^^USSSA")},
        ),
        (
            "fhir-converter/ADT-A08-01.hl7#1",
            "adt-contact",
            "contact-updated",
            {"placer_number": "", "patient_ids": ("PATID1234^^^test1", "123456789^^^USSSA")},
        ),
        (
            "fhir-converter/ADT-A08-02.hl7#1",
            "adt-contact",
            "contact-updated",
            {"placer_number": "", "patient_ids": ("PATID1234^^^test1", "123456789^^^USSSA")},
        ),
        (
            "fhir-converter/ADT04-23.hl7#1",
            "adt-contact",
            "contact-updated",
            {"placer_number": "", "patient_ids": ("123456789",)},
        ),
        (
            "fhir-converter/LAB-ORM-1.hl7#1",
            "orm-new",
            "referral-created",
            {
                "placer_number": "88502218",
                "patient_ids": ("10006579^^^1",),
                "filler_numbers": ("82503246",),
            },
        ),
        (
            "fhir-converter/LAB-ORU-1.hl7#1",
            "oru-report",
            "report-received",
            {
                "placer_number": "88502218",
                "patient_ids": ("10006579^^^1",),
                "filler_numbers": ("82503246",),
                "report_id": "82503246",
                "status": "final",
            },
        ),
        (
            "fhir-converter/LRI_2.0-NG_CBC_Typ_Message.hl7#1",
            "oru-report",
            "report-received",
            {
                "placer_number": "ORD666555",
                "patient_ids": ("PATID1234^^^NIST MPI",),
                "filler_numbers": ("R-991133",),
                "report_id": "R-991133",
                "status": "final",
            },
        ),
        (
            "fhir-converter/MDM-T02-01.hl7#1",
            "mdm-report",
            "report-received",
            {
                "placer_number": "00012345",
                "patient_ids": ("987654321",),
                "filler_numbers": ("1-1",),
                "report_id": "1.2.840.317.5947431.51.20080131160038",
                "status": "final",
            },
        ),
        (
            "fhir-converter/MDM-T02-03.hl7#1",
            "mdm-not-final",
            None,
            {},
        ),  # document not signed yet (TXA-17)
        (
            "fhir-converter/OMG-O19-01.hl7#1",
            "omg-change",
            "referral-updated",
            {"placer_number": "", "patient_ids": ("PATID1234^^^test1", "123456789^^^USSSA")},
        ),
        (
            "fhir-converter/ORM-O01-01.hl7#1",
            "orm-new",
            "referral-created",
            {
                "placer_number": "1101",
                "patient_ids": ("PATID1234^^^test1", "123456789^^^USSSA"),
                "filler_numbers": ("1201",),
            },
        ),
        (
            "fhir-converter/ORM-O01-02.hl7#1",
            "orm-new",
            "referral-created",
            {
                "placer_number": "1101",
                "patient_ids": ("PATID1234^^^test1", "123456789^^^USSSA"),
                "filler_numbers": ("1201",),
            },
        ),
        (
            "fhir-converter/ORM-O01-03.hl7#1",
            "orm-new",
            "referral-created",
            {
                "placer_number": "1101",
                "patient_ids": ("PATID1234^^^test1", "123456789^^^USSSA"),
                "filler_numbers": ("1201",),
            },
        ),
        (
            "fhir-converter/ORM-O01-04.hl7#1",
            "orm-new",
            "referral-created",
            {
                "placer_number": "1101",
                "patient_ids": ("PATID1234^^^test1", "123456789^^^USSSA"),
                "filler_numbers": ("1201",),
            },
        ),
        (
            "fhir-converter/ORU-R01-01.hl7#1",
            "oru-report",
            "report-received",
            {
                "placer_number": "845439",
                "patient_ids": ("14^^^IA PHIMS Stage",),
                "filler_numbers": ("986",),
                "report_id": "986",
                "status": "final",
            },
        ),
        (
            "fhir-converter/ORU-R01-RMGEAD.hl7#1",
            "oru-report",
            "report-received",
            {
                "placer_number": "845439",
                "patient_ids": ("555-44-4444",),
                "filler_numbers": ("1045813",),
                "report_id": "1045813",
                "status": "final",
            },
        ),
        (
            "fhir-converter/REF-I12-01.hl7#1",
            "ref-new",
            "referral-created",
            {
                "placer_number": "226839",
                "patient_ids": ("PATID1234^^^ADT1", "123456789"),
                "filler_numbers": ("11001",),
            },
        ),
        (
            "fhir-converter/REF-I14-01.hl7#1",
            "ref-cancel",
            "referral-cancelled",
            {
                "placer_number": "226839",
                "patient_ids": ("PATID1234^^^ADT1", "123456789"),
                "filler_numbers": ("11001",),
            },
        ),
        (
            "fhir-converter/SIU-S12-01.hl7#1",
            "siu-booked",
            "appointment-booked",
            {
                "placer_number": "",
                "patient_ids": ("PATID1234^^^test1", "123456789^^^USSSA"),
                "appointment_id": "36996",
                "start": "2021-09-24T09:30:00+02:15",
            },
        ),
        (
            "fhir-converter/SIU-S12-02.hl7#1",
            "siu-booked",
            "appointment-booked",
            {
                "placer_number": "",
                "patient_ids": ("PATID1234^^^test1", "123456789^^^USSSA"),
                "appointment_id": "36996",
                "start": "2021-08-18T11:30:00+02:15",
            },
        ),
        (
            "fhir-converter/SIU-S12_1.hl7#1",
            "siu-booked",
            "appointment-booked",
            {
                "placer_number": "",
                "patient_ids": ("PATID1234^^^test1", "123456789^^^USSSA"),
                "appointment_id": "36996",
                "start": "2020-10-04T11:26:00+02:15",
            },
        ),
        (
            "fhir-converter/SIU-S13-01.hl7#1",
            "siu-rescheduled",
            "appointment-rescheduled",
            {
                "placer_number": "",
                "patient_ids": ("PATID1234^^^test1", "123456789^^^USSSA"),
                "appointment_id": "36996",
                "start": "2021-09-24T09:30:00+02:15",
            },
        ),
        (
            "fhir-converter/SIU-S14-01.hl7#1",
            "siu-rescheduled",
            "appointment-rescheduled",
            {
                "placer_number": "",
                "patient_ids": ("PATID1234^^^test1", "123456789^^^USSSA"),
                "appointment_id": "36996",
                "start": "2021-09-24T09:30:00+02:15",
            },
        ),
        (
            "fhir-converter/SIU-S15-01.hl7#1",
            "siu-cancelled",
            "appointment-cancelled",
            {
                "placer_number": "",
                "patient_ids": ("PATID1234^^^test1", "123456789^^^USSSA"),
                "appointment_id": "36996",
            },
        ),
        (
            "fhir-converter/SIU-S17-01.hl7#1",
            "siu-cancelled",
            "appointment-cancelled",
            {
                "placer_number": "",
                "patient_ids": ("PATID1234^^^test1", "123456789^^^USSSA"),
                "appointment_id": "36996",
            },
        ),
        (
            "fhir-converter/SIU-S26-01.hl7#1",
            "siu-noshow",
            "no-show",
            {
                "placer_number": "",
                "patient_ids": ("PATID1234^^^test1", "123456789^^^USSSA"),
                "appointment_id": "36996",
            },
        ),
        (
            "hapi-hl7v2/messages.txt#1",
            "oru-report",
            "report-received",
            {
                "placer_number": "003555.0015.001",
                "patient_ids": ("N00803",),
                "filler_numbers": ("0000000566",),
                "report_id": "0000000566",
                "status": "preliminary",
            },
        ),
        (
            "hapi-hl7v2/messages.txt#16",
            "orm-new",
            "referral-created",
            {"placer_number": "003711.0001.001", "patient_ids": ("N00829",)},
        ),
        (
            "hl7-dotnetcore/Sample-ORM.txt#1",
            "orm-new",
            "referral-created",
            {"placer_number": "11777-60", "patient_ids": ("42311",)},
        ),
        (
            "hl7-v2-to-fhir/Message.hl7_MDM_T02.txt#1",
            "mdm-report",
            "report-received",
            {
                "placer_number": "ORD777999",
                "patient_ids": ("000322330^^^REDDING HOSPITAL",),
                "filler_numbers": ("432344432",),
                "report_id": "3738931392",
                "status": "final",
            },
        ),
        (
            "linuxforhealth-hl7v2-fhir/ORU-multiline-short-mixed.hl7#1",
            "oru-report",
            "report-received",
            {
                "placer_number": "PON_0d70c6c8",
                "patient_ids": ("0d70c6c8^^^MRN",),
                "filler_numbers": ("FON_0d70c6c8",),
                "report_id": "FON_0d70c6c8",
                "status": "final",
            },
        ),
        (
            "linuxforhealth-hl7v2-fhir/ORU-multiline-short.hl7#1",
            "oru-report",
            "report-received",
            {
                "placer_number": "PON_0d70c6c8",
                "patient_ids": ("0d70c6c8^^^MRN",),
                "filler_numbers": ("FON_0d70c6c8",),
                "report_id": "FON_0d70c6c8",
                "status": "final",
            },
        ),
        (
            "mirth-connect/01.hl7#1",
            "siu-booked",
            "appointment-booked",
            {
                "placer_number": "",
                "patient_ids": ("42",),
                "appointment_id": "2196178",
                "start": "2011-06-17T08:45:00",
            },
        ),
        (
            "mirth-connect/05.hl7#1",
            "adt-contact",
            "contact-updated",
            {"placer_number": "", "patient_ids": ("135769",)},
        ),
        (
            "mirth-connect/08.hl7#1",
            "oru-report",
            "report-received",
            {
                "placer_number": "",
                "patient_ids": ("12345^^^MIE",),
                "filler_numbers": ("12376",),
                "report_id": "12376",
                "status": "final",
            },
        ),
        (
            "mirth-connect/batch01.hl7#1",
            "siu-booked",
            "appointment-booked",
            {
                "placer_number": "",
                "patient_ids": ("42",),
                "appointment_id": "2196178",
                "start": "2011-06-17T08:45:00",
            },
        ),
        (
            "mirth-connect/batch01.hl7#2",
            "siu-rescheduled",
            "appointment-rescheduled",
            {
                "placer_number": "",
                "patient_ids": ("42",),
                "appointment_id": "2196178",
                "start": "2011-06-17T08:45:00",
            },
        ),
        (
            "mirth-connect/batch01.hl7#3",
            "siu-cancelled",
            "appointment-cancelled",
            {"placer_number": "", "patient_ids": ("42",), "appointment_id": "2196178"},
        ),
        (
            "mirth-connect/test-hl7-batch-input.txt#1",
            "orm-change",
            "referral-updated",
            {"placer_number": "801887.001", "patient_ids": ("4223161584",)},
        ),
        (
            "mirth-connect/test-hl7-input.txt#1",
            "orm-change",
            "referral-updated",
            {"placer_number": "801887.001", "patient_ids": ("4223161584",)},
        ),
        (
            "node-hl7-client/adt.hl7#1",
            "adt-contact",
            "contact-updated",
            {"placer_number": "", "patient_ids": ("583295^^^ADT1",)},
        ),
        (
            "rethinkhealth-hl7v2/example-orm-o01-no-trailing-newline.hl7#1",
            "orm-new",
            "referral-created",
            {"placer_number": "ORD001", "patient_ids": ("67890^^^MRN",)},
        ),
        (
            "rethinkhealth-hl7v2/mdm-t02-document.hl7#1",
            "mdm-report",
            "report-received",
            {
                "placer_number": "",
                "patient_ids": ("55667^^^MRN",),
                "report_id": "DOC00001",
                "status": "final",
            },
        ),
        (
            "rethinkhealth-hl7v2/orm-o01-order.hl7#1",
            "orm-new",
            "referral-created",
            {"placer_number": "ORD20001", "patient_ids": ("11223^^^MRN",)},
        ),
        (
            "rethinkhealth-hl7v2/siu-s12-schedule.hl7#1",
            "siu-booked",
            "appointment-booked",
            {
                "placer_number": "",
                "patient_ids": ("33445^^^MRN",),
                "appointment_id": "APT001",
                "start": "2026-03-25T14:00:00",
            },
        ),
    ]
}


def _keys(event: Any, wanted: dict[str, Any]) -> dict[str, Any]:
    got: dict[str, Any] = {}
    for k in wanted:
        got[k] = getattr(event.ids, k) if hasattr(event.ids, k) else getattr(event, k)
    return got


@pytest.mark.parametrize(("name", "raw"), CORPUS_MESSAGES, ids=[n for n, _ in CORPUS_MESSAGES])
def test_corpus_decision(table: RouteTable, name: str, raw: bytes) -> None:
    try:
        message = Message(raw)
    except MessageRejected:
        # rejected at the door (AR); never routed. decide_stored still must not raise.
        row = StoredMessage(1, 0.0, "ehr", "", "", "", "", "", "", raw, "", "received", "", "")
        decision = decide_stored(table, row)
        assert decision.status == "error"
        assert decision.reason.startswith("cannot read message")
        return
    decision = decide(table, message, "ehr", message_id=7, received_at=1.0)
    if name.startswith("mirth-connect/TestADT.txt"):
        if message.msh.message_type in ("ADT^A04", "ADT^A31"):
            assert decision.route == "adt-contact"
            (event,) = decision.events
            assert event.kind == "contact-updated"
            assert event.ids.patient_ids
        else:
            assert decision.status == "filtered"
            assert decision.reason == f"no route matched {message.msh.message_type}"
        return
    if name not in EXPECTED:
        assert decision.status == "filtered", decision
        assert decision.routes == ()
        assert decision.reason == f"no route matched {message.msh.message_type}"
        return
    route, kind, keys = EXPECTED[name]
    assert decision.route == route
    if kind is None:
        assert decision.status == "filtered"
        assert decision.reason
        assert all(isinstance(a, Drop) for a in decision.actions)
        return
    assert decision.status == "routed"
    (event,) = decision.events
    assert event.kind == kind
    assert event.message_id == 7
    assert _keys(event, keys) == keys


# ---------------------------------------------------------------------------
# Variants the corpus lacks (constructed, after referral-standards.md §1-2)


def msg(*segments: str) -> Message:
    return Message("\r".join(segments).encode() + b"\r")


MSH = "MSH|^~\\&|EHR|CLINIC_A|REFLOOP|CLINIC_A|20250303101500||{type}|C{n}|P|2.5.1"
PID = "PID|1||MRN123^^^CLINIC_A^MR||Doe^Jane||19700101|F|||||^PRN^CP^^^555^1234567||EN"
RF1 = (
    "RF1|{st}^x^HL70283|S^Stat^HL70280|Med||O|REF-1^CLINIC_A|20250303|20250401|"
    "|O^Provider^HL70336|SP-9^CARDIO"
)
PRD_RT = (
    "PRD|RT^Referred to^HL70286|Jones^Raj^^^^MD|||^NET^Internet^rjones@direct.example"
    "~^WPN^FX^^^555^7654321||9876543210^NPI|||Cardio Group"
)
ORC = (
    "ORC|{ctl}|REF-1^CLINIC_A^1.2.840^ISO|A55^CARDIO||{st}|||||||1234567890^Smith^Ann^^^^MD"
    "||||^Patient moved"
)
OBR = "OBR|1|REF-1^CLINIC_A||REFCARD^Cardiology referral^L|||||||||||||||||||||F"
SCH = "|".join(
    ["SCH", "P1", "APPT-9^CARDIO", "", "", "", "RS^Reason", "", "", "", ""]
    + ["^^60^20250321140000"]
    + [""] * 13
    + ["{st}", "REF-1^CLINIC_A", "A55^CARDIO"]
)
TXA = "TXA|1|CN^Consult^HL70270|AP|20250319||||||||DOC-778^CARDIO|DOC-700|REF-1^CLINIC_A|||{st}||AV"


def m(type_: str, *body: str, n: int = 1) -> Message:
    return msg(MSH.format(type=type_, n=n), *body)


CONSTRUCTED = [
    (
        "REF^I12 with PRD(RT)",
        m("REF^I12^REF_I12", RF1.format(st="P"), PRD_RT, PID),
        "ref-new",
        "referral-created",
        {
            "placer_number": "REF-1",
            "filler_numbers": ("SP-9",),
            "patient_ids": ("MRN123^^^CLINIC_A",),
            "priority": "stat",
            "needed_by": "2025-04-01",
        },
    ),
    ("REF^I13", m("REF^I13", RF1.format(st="P"), PID), "ref-modify", "referral-updated", {}),
    ("REF^I14", m("REF^I14", RF1.format(st="P"), PID), "ref-cancel", "referral-cancelled", {}),
    ("REF^I15", m("REF^I15", RF1.format(st="P"), PID), "ref-status-query", None, {}),
    (
        "RRI^I12 A",
        m("RRI^I12", "MSA|AA|C1", RF1.format(st="A"), PID),
        "rri-accepted",
        "specialist-accepted",
        {"placer_number": "REF-1"},
    ),
    (
        "RRI^I12 R",
        m("RRI^I12", "MSA|AA|C1", RF1.format(st="R"), PID),
        "rri-declined",
        "specialist-declined",
        {},
    ),
    ("RRI^I12 P", m("RRI^I12", "MSA|AA|C1", RF1.format(st="P"), PID), "rri-other", None, {}),
    (
        "ORM NW",
        m("ORM^O01", PID, ORC.format(ctl="NW", st=""), OBR),
        "orm-new",
        "referral-created",
        {
            "placer_number": "REF-1",
            "filler_numbers": ("A55",),
            "specialty": "REFCARD",
            "specialty_category": "Cardiology",
        },
    ),
    (
        "ORM CA",
        m("ORM^O01", PID, ORC.format(ctl="CA", st=""), OBR),
        "orm-cancel",
        "referral-cancelled",
        {"reason": "Patient moved"},
    ),
    (
        "ORM XO",
        m("ORM^O01", PID, ORC.format(ctl="XO", st=""), OBR),
        "orm-change",
        "referral-updated",
        {},
    ),
    (
        "ORM SC",
        m("ORM^O01", PID, ORC.format(ctl="SC", st="IP"), OBR),
        "orm-change",
        "referral-updated",
        {},
    ),
    (
        "OMG NW",
        m("OMG^O19", PID, ORC.format(ctl="NW", st=""), OBR),
        "omg-new",
        "referral-created",
        {"placer_number": "REF-1"},
    ),
    (
        "OMG CA",
        m("OMG^O19", PID, ORC.format(ctl="CA", st=""), OBR),
        "omg-cancel",
        "referral-cancelled",
        {},
    ),
    (
        "OSU OK",
        m("OSU^O51", PID, ORC.format(ctl="OK", st="")),
        "osu-accepted",
        "specialist-accepted",
        {"filler_numbers": ("A55",)},
    ),
    (
        "OSU SC/IP",
        m("OSU^O51", PID, ORC.format(ctl="SC", st="IP")),
        "osu-accepted",
        "specialist-accepted",
        {},
    ),
    (
        "OSU SC/CA",
        m("OSU^O51", PID, ORC.format(ctl="SC", st="CA")),
        "osu-declined",
        "specialist-declined",
        {"reason": "Patient moved"},
    ),
    (
        "OSU CR",
        m("OSU^O51", PID, ORC.format(ctl="CR", st="CA")),
        "osu-cancelled",
        "referral-cancelled",
        {},
    ),
    (
        "OSU SC/CM",
        m("OSU^O51", PID, ORC.format(ctl="SC", st="CM")),
        "osu-completed",
        "report-received",
        {"report_id": "A55", "status": "final"},
    ),
    ("OSU SC/HD", m("OSU^O51", PID, ORC.format(ctl="SC", st="HD")), "osu-other", None, {}),
    (
        "SIU^S12",
        m("SIU^S12", SCH.format(st="Booked"), PID),
        "siu-booked",
        "appointment-booked",
        {"appointment_id": "APPT-9", "start": "2025-03-21T14:00:00", "placer_number": "REF-1"},
    ),
    (
        "SIU^S14 noshow",
        m("SIU^S14", SCH.format(st="NOSHOW"), PID),
        "siu-noshow-status",
        "no-show",
        {},
    ),
    ("SIU^S26", m("SIU^S26", SCH.format(st="Noshow"), PID), "siu-noshow", "no-show", {}),
    (
        "MDM^T04",
        m("MDM^T04", PID, TXA.format(st="LA")),
        "mdm-report",
        "report-received",
        {"report_id": "DOC-778", "status": "final", "placer_number": "REF-1"},
    ),
    (
        "MDM^T08",
        m("MDM^T08", PID, TXA.format(st="AU")),
        "mdm-correction",
        "report-received",
        {"report_id": "DOC-700", "status": "corrected"},
    ),
    ("MDM^T10 unsigned", m("MDM^T10", PID, TXA.format(st="DO")), "mdm-not-final", None, {}),
    (
        "ADT^A40",
        m("ADT^A40", "EVN|A40|20250303", PID, "MRG|OLD-7^^^CLINIC_A"),
        "adt-merge",
        "patients-merged",
        {"surviving_id": "MRN123^^^CLINIC_A", "retired_id": "OLD-7^^^CLINIC_A"},
    ),
    ("ADT^A08 phone", m("ADT^A08", "EVN|A08|20250303", PID), "adt-contact", "contact-updated", {}),
]


@pytest.mark.parametrize(
    ("label", "message", "route", "kind", "keys"), CONSTRUCTED, ids=[c[0] for c in CONSTRUCTED]
)
def test_constructed_variants(
    table: RouteTable,
    label: str,
    message: Message,
    route: str,
    kind: str | None,
    keys: dict[str, Any],
) -> None:
    decision = decide(table, message, "ehr")
    assert decision.route == route, decision
    if kind is None:
        assert decision.status == "filtered" and decision.reason
        return
    assert decision.status == "routed"
    (event,) = decision.events
    assert event.kind == kind
    assert _keys(event, keys) == keys


def test_ref_providers_and_contact(table: RouteTable) -> None:
    decision = decide(table, m("REF^I12", RF1.format(st="P"), PRD_RT, PID), "ehr")
    (event,) = decision.events
    assert event.specialist.name == "Raj Jones"  # type: ignore[attr-defined]
    assert event.specialist.npi == "9876543210"  # type: ignore[attr-defined]
    assert event.specialist.direct_address == "rjones@direct.example"  # type: ignore[attr-defined]
    assert event.specialist.fax == "5557654321"  # type: ignore[attr-defined]
    assert event.specialist.organisation == "Cardio Group"  # type: ignore[attr-defined]
    assert event.contact.phone == "5551234567"  # type: ignore[attr-defined]
    assert event.contact.language == "EN"  # type: ignore[attr-defined]
    # MSH-7 20250303101500 taken as UTC
    assert event.occurred_at == 1740996900.0


def test_ref_new_only_from_the_ehr_source(table: RouteTable) -> None:
    decision = decide(table, m("REF^I12", RF1.format(st="P"), PID), "elsewhere")
    assert decision.status == "filtered"
    assert decision.reason == "no route matched REF^I12"


# ---------------------------------------------------------------------------
# Semantics on small files


def compile_text(text: str) -> RouteTable:
    head = "sources:\n  ehr: {type: mllp, port: 0}\n  lab: {type: mllp, port: 0}\n"
    return compile_config(config.loads(head + textwrap.dedent(text), file="r.yaml"))


ORM = m("ORM^O01", PID, ORC.format(ctl="NW", st=""), OBR)


def test_first_match_wins_and_continue() -> None:
    t = compile_text(
        """
        channels:
          cardio: {type: mllp, host: 127.0.0.1, port: 2600}
        routes:
          - name: copy
            when: {type: ORM^*}
            then: [{forward: cardio}]
            continue: true
          - name: new
            when: {type: "ORM^O0?", ORC.1: {in: [nw]}}
            extract: {placer_number: ORC.2.1}
            then: [{track: referral-created}]
          - name: never
            when: {type: ORM}
            then: [{drop: unreachable}]
        """
    )
    d = decide(t, ORM, "ehr")
    assert d.status == "routed"
    assert d.routes == ("copy", "new")
    assert d.route == "copy,new"
    assert [a.action for a in d.actions] == ["forward", "track"]


def test_predicates() -> None:
    t = compile_text(
        """
        routes:
          - name: a
            when:
              type: ORM
              ORC.5: {exists: false}
              PID.3[*].4: {matches: '^CLIN'}
              OBR.4.1: {not: [REFDERM, REFGI]}
              ORC.1: {not: {equals: CA}}
            extract: {placer_number: ORC.2.1}
            then: [{track: referral-created}]
        """
    )
    assert decide(t, ORM, "ehr").route == "a"
    other = m("ORM^O01", PID, ORC.format(ctl="NW", st="IP"), OBR)
    assert decide(t, other, "ehr").status == "filtered"


def test_drop_is_filtered_with_the_route_and_reason() -> None:
    t = compile_text(
        """
        routes:
          - name: quiet
            when: {type: ORM^O01}
            then: [{drop: not for us}]
        """
    )
    d = decide(t, ORM, "ehr")
    assert (d.status, d.route, d.reason) == ("filtered", "quiet", "not for us")


def test_send_renders_to() -> None:
    t = compile_text(
        """
        channels:
          fax: {type: fax, api_key: "${env:FAX_KEY:-x}", templates: {packet: "Referral {{ 1 }}"}}
        routes:
          - name: s
            when: {type: ORM^O01}
            extract: {_who: ORC.12.1}
            then: [{send: {channel: fax, template: packet, to: "{{ 'npi:' ~ _who }}"}}]
        """
    )
    d = decide(t, ORM, "ehr")
    (action,) = d.actions
    assert isinstance(action, Send)
    assert (action.channel, action.template, action.to) == ("fax", "packet", "npi:1234567890")


def test_expression_error_is_an_error_decision_without_phi() -> None:
    t = compile_text(
        """
        routes:
          - name: dates
            when: {type: ORM^O01}
            extract:
              placer_number: ORC.2.1
              needed_by: "{{ field('PID.5.1') | hl7_date }}"
            then: [{track: referral-created}]
        """
    )
    d = decide(t, ORM, "ehr")
    assert d.status == "error"
    assert d.reason == "route dates: extract needed_by: hl7_date: not an HL7 date/time"
    assert "Doe" not in d.reason


def test_no_identifiers_is_an_error() -> None:
    t = compile_text(
        """
        routes:
          - name: bare
            when: {type: ORM^O01}
            extract: {placer_number: ZZZ.1}
            then: [{track: referral-created}]
        """
    )
    d = decide(t, ORM, "ehr")
    assert d.status == "error"
    assert "no identifiers" in d.reason


def test_jinja_fallback_matches_fast_path() -> None:
    t = compile_text(
        """
        tables:
          spec: {REFCARD: Cardiology}
        routes:
          - name: j
            when: {type: ORM^O01}
            extract:
              placer_number: ORC.2.1
              specialty: "{% if field('OBR.4.1') %}{{ field('OBR.4.1') }}{% endif %}"
              specialty_category: "{{ tables.spec[specialty] }}"
              reason: "{{ field('OBR.4.2') | truncate(9, True, '') }}"
            then: [{track: referral-created}]
        """
    )
    route = t.route("j")
    assert route.extracts[1].expr is not None and route.extracts[1].expr.fast is None
    assert route.extracts[2].expr is not None and route.extracts[2].expr.fast is not None
    (event,) = decide(t, ORM, "ehr").events
    assert event.ids.specialty == "REFCARD"
    assert event.specialty_category == "Cardiology"  # type: ignore[attr-defined]
    assert event.reason == "Cardiolog"  # type: ignore[attr-defined]


def test_decisions_are_frozen(table: RouteTable) -> None:
    d = decide(table, ORM, "ehr")
    with pytest.raises(AttributeError):
        d.status = "error"  # type: ignore[misc]
    assert isinstance(d.actions[0], Track)


@pytest.mark.parametrize(
    ("filter_", "value", "expected"),
    [
        ("hl7_date", "20250303101500", "2025-03-03"),
        ("hl7_date", "202503", "2025-03"),
        ("hl7_date", "", ""),
        ("hl7_datetime", "202503211400-0500", "2025-03-21T14:00:00-05:00"),
        ("hl7_datetime", "20250321140005.1234", "2025-03-21T14:00:05"),
        ("hl7_epoch", "19700101000100", 60.0),
        ("hl7_epoch", "19700101010000+0100", 0.0),
        ("hl7_name", "Jones^Raj^K^^Dr", "Raj K Jones"),
        ("hl7_name", "EVERYMAN&&&&Aniston^ADAM", "ADAM EVERYMAN"),
        ("digits", "(555) 123-4567", "5551234567"),
    ],
)
def test_filters(filter_: str, value: str, expected: Any) -> None:
    from engine.routing import expressions as render

    assert getattr(render, filter_)(value) == expected
