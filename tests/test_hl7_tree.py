"""The message view's parsed tree (engine.hl7v2.tree) and its HL7 v2.5.1 name table
(engine.hl7v2.definitions). Expected names and positions are the standard's (HL7 v2.5.1
chapters 2, 2A, 3, 4, 6, 7, 9, 10, 11), checked by hand, not a run's output."""

from __future__ import annotations

import pytest

from engine.hl7v2.definitions import DATATYPES, SEGMENTS
from engine.hl7v2.tree import Node, TreeError, build_tree

# Fields per segment in v2.5.1 (the last field of each, by the standard, in the comment).
FIELD_COUNTS = {
    "MSH": 21,  # MSH-21 Message Profile Identifier
    "PID": 39,  # PID-39 Tribal Citizenship
    "PV1": 52,  # PV1-52 Other Healthcare Provider
    "ORC": 31,  # ORC-31 Parent Universal Service Identifier
    "OBR": 50,  # OBR-50 Parent Universal Service Identifier
    "RF1": 11,  # RF1-11 External Referral Identifier
    "PRD": 9,  # PRD-9 Effective End Date of Provider Role
    "SCH": 27,  # SCH-27 Filler Order Number
    "AIS": 12,  # AIS-12 Filler Supplemental Service Information
    "AIP": 12,  # AIP-12 Filler Status Code
    "TXA": 23,  # TXA-23 Distributed Copies
    "OBX": 25,  # OBX-25 Performing Organization Medical Director
    "AUT": 10,  # AUT-10 Process Date
    "IN1": 53,  # IN1-53 VIP Indicator
}
SPOT_CHECKS = [  # (segment, sequence, name, type): fields the shipped routes read
    ("MSH", 9, "Message Type", "MSG"),
    ("MSH", 10, "Message Control ID", "ST"),
    ("PID", 3, "Patient Identifier List", "CX"),
    ("PID", 5, "Patient Name", "XPN"),
    ("PV1", 19, "Visit Number", "CX"),
    ("ORC", 1, "Order Control", "ID"),
    ("ORC", 12, "Ordering Provider", "XCN"),
    ("OBR", 4, "Universal Service Identifier", "CE"),
    ("OBR", 25, "Result Status", "ID"),
    ("RF1", 1, "Referral Status", "CE"),
    ("RF1", 6, "Originating Referral Identifier", "EI"),
    ("PRD", 7, "Provider Identifiers", "PLN"),
    ("SCH", 26, "Placer Order Number", "EI"),
    ("SCH", 25, "Filler Status Code", "CE"),
    ("AIS", 4, "Start Date/Time", "TS"),
    ("AIP", 3, "Personnel Resource ID", "XCN"),
    ("TXA", 12, "Unique Document Number", "EI"),
    ("TXA", 17, "Document Completion Status", "ID"),
    ("OBX", 5, "Observation Value", "VARIES"),
    ("AUT", 6, "Authorization Identifier", "EI"),
    ("IN1", 3, "Insurance Company ID", "CX"),
]


def test_the_table_covers_the_segments_the_routes_read() -> None:
    assert {s: len(SEGMENTS[s].fields) for s in FIELD_COUNTS} == FIELD_COUNTS
    for sid, seq, name, dtype in SPOT_CHECKS:
        assert SEGMENTS[sid].fields[seq - 1] == (name, dtype), (sid, seq)
    # every field's data type is defined, and so is every component's
    for seg in SEGMENTS.values():
        for _, dtype in seg.fields:
            assert dtype in DATATYPES, dtype
    assert DATATYPES["XPN"].components[:2] == (("Family Name", "FN"), ("Given Name", "ST"))
    assert [c for c, _ in DATATYPES["MSG"].components] == [
        "Message Code",
        "Trigger Event",
        "Message Structure",
    ]
    assert DATATYPES["EI"].components[0] == ("Entity Identifier", "ST")


def _field(tree: list, path: str) -> Node:
    for seg in tree:
        for f in seg.fields:
            if f.path == path:
                return f
    raise KeyError(path)


MESSAGE = (
    "MSH|^~\\&|EHR|CLINIC|REFLOOP|CLINIC|20260101||ORU^R01^ORU_R01|C1|P|2.5.1\n"  # LF ends
    "PID|1||MRN1^^^CLINIC^MR~99&x&y||Doe^Jane\r\n"
    "OBX|1|CE|8867-4^Heart rate^LN||72^bpm^L|||N\r"
    "OBX|2|NM|8310-5||36.6\r"
    "ZPD|1|a^b\r"
)


def test_segments_fields_components_repetitions_and_subcomponents() -> None:
    tree = build_tree(MESSAGE)
    assert [(s.id, s.occurrence, s.name) for s in tree] == [
        ("MSH", 1, "Message Header"),
        ("PID", 1, "Patient Identification"),
        ("OBX", 1, "Observation/Result"),
        ("OBX", 2, "Observation/Result"),
        ("ZPD", 1, ""),  # a Z-segment: shown, by number
    ]
    msh = tree[0]
    assert [f.path for f in msh.fields][:3] == ["MSH-1", "MSH-2", "MSH-3"]
    assert (msh.fields[0].value, msh.fields[1].value, msh.fields[1].children) == ("|", "^~\\&", ())
    msh9 = _field(tree, "MSH-9")
    assert [(c.path, c.name, c.value) for c in msh9.children] == [
        ("MSH-9.1", "Message Code", "ORU"),
        ("MSH-9.2", "Trigger Event", "R01"),
        ("MSH-9.3", "Message Structure", "ORU_R01"),
    ]
    pid3 = _field(tree, "PID-3")
    assert [(r.path, r.value) for r in pid3.children] == [
        ("PID-3[1]", "MRN1^^^CLINIC^MR"),
        ("PID-3[2]", "99&x&y"),
    ]
    first, second = pid3.children
    assert [(c.path, c.name) for c in first.children] == [  # empty components left out
        ("PID-3[1].1", "ID Number"),
        ("PID-3[1].4", "Assigning Authority"),
        ("PID-3[1].5", "Identifier Type Code"),
    ]
    (id_number,) = second.children
    assert [(s.path, s.value) for s in id_number.children] == [
        ("PID-3[2].1.1", "99"),
        ("PID-3[2].1.2", "x"),
        ("PID-3[2].1.3", "y"),
    ]
    # OBX-5 takes its type from OBX-2 (HL7 v2.5.1 §7.4.2.5)
    obx5 = _field(tree, "OBX-5")
    assert obx5.type == "CE" and [c.name for c in obx5.children] == [
        "Identifier",
        "Text",
        "Name of Coding System",
    ]
    second_obx5 = tree[3].fields[3]
    assert (second_obx5.path, second_obx5.type, second_obx5.children) == ("OBX-5", "NM", ())
    zpd2 = _field(tree, "ZPD-2")
    assert (zpd2.name, [c.value for c in zpd2.children]) == ("", ["a", "b"])
    assert "PID-2" not in {f.path for f in tree[1].fields}  # empty fields left out


def test_other_delimiters_and_the_dict_form() -> None:
    tree = build_tree("MSH#*~\\&#EHR#CLINIC#R#C#2026##ADT*A08#C9#P#2.5.1\rPID#1##M1##Roe*Ann\r")
    pid5 = _field(tree, "PID-5")
    assert [(c.name, c.value) for c in pid5.children] == [
        ("Family Name", "Roe"),
        ("Given Name", "Ann"),
    ]
    d = tree[1].as_dict()
    assert d["id"] == "PID" and d["fields"][-1]["children"][0]["path"] == "PID-5.1"


@pytest.mark.parametrize("text", ["", '{"resourceType": "ServiceRequest"}', "PID|1\rMSH|^~\\&|"])
def test_not_hl7_is_a_clear_error(text: str) -> None:
    with pytest.raises(TreeError, match="not an HL7 v2 message"):
        build_tree(text)


@pytest.mark.parametrize(
    "text",
    [
        "MSH|0000||||\rPID|1\r",  # the corpus' fuzz-so.hl7: python-hl7 asserted on it
        "MSH|^~\\|\rPID|1\r",  # MSH-2 reuses MSH-1
        "MSH|^~ &|EHR\r",  # a space as a delimiter
    ],
)
def test_unusable_delimiters_are_a_clear_error(text: str) -> None:
    with pytest.raises(TreeError, match="five distinct delimiters"):
        build_tree(text)


def test_long_values_are_cut_and_long_messages_counted() -> None:
    from engine.hl7v2.tree import MAX_VALUE, segment_count

    pdf = "A" * 5000
    tree = build_tree(
        f"MSH|^~\\&|EHR|C|R|C|2026||MDM^T02|C1|P|2.5.1\rOBX|1|ED|PDF||^AP^PDF^Base64^{pdf}\r"
    )
    obx5 = _field(tree, "OBX-5")
    assert len(obx5.value) == MAX_VALUE and obx5.value.endswith("…")
    data = obx5.children[-1]
    assert (data.path, data.name, len(data.value)) == ("OBX-5.5", "Data", MAX_VALUE)
    assert segment_count("MSH|^~\\&|\rPID|1\n\nOBX|1\r\n") == 3
