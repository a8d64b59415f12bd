"""Finding a referral (engine.store.referral_search): the patient read from PID / FHIR
Patient, the search box over a real SQLite file, keyset paging forward and back, the
sorts, and the migration that fills the patient columns of referrals made before it.

Expected values are worked out by hand from the rows planted here."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.hl7v2.message import Message
from engine.hl7v2.patient import Demographics, from_fhir, from_hl7
from engine.model import StoredMessage
from engine.routing.patient import demographics
from engine.store import open_database, referral_search
from engine.store import referrals as store
from engine.store.db import Database
from engine.store.referral_filter import ReferralFilter
from engine.store.worklist import referral_page

DAY = 86400.0
NOW = dt.datetime(2026, 3, 1, 12, tzinfo=dt.UTC).timestamp()
TARGETS = {"stat": 2.0, "urgent": 7.0, "routine": 30.0}

# placer, filler, pid (id^^^authority), patient, specialty, specialist (name, npi),
# priority, days ago opened, closed days ago (None: open)
PLANTED = [
    ("P-100", "F-100", "M100^^^CLINIC", Demographics("M100", "Müller", "Åsa", "1970-01-02"),
     "Cardiology", ("Ann Smith", "1234567893"), "routine", 40, None),
    ("P-101", "", "M101^^^CLINIC", Demographics("M101", "Muller", "Bo", "1981-05-06"),
     "Dermatology", ("Cy Jones", "1111111111"), "urgent", 3, None),
    ("P-102", "F-102", "M102^^^OTHER", Demographics("M102", "Smith", "Jane", "1970-01-02"),
     "Internal Medicine", ("Ann Smith", "1234567893"), "stat", 5, None),
    ("P-103", "", "M103^^^CLINIC", Demographics("M103", "Doe", "John", "1990-12-31"),
     "Cardiology", ("Dee Park", "2222222222"), "routine", 10, 2),
    ("P-104", "", "M104^^^CLINIC", Demographics("M104", "van der Berg", "Ida", "2001-07-08"),
     "Gastroenterology", ("Eve Lin", "3333333333"), "routine", 1, None),
    ("P-105", "", "M105^^^CLINIC", Demographics("M105", "Smithers", "Al", "1955-02-03"),
     "Cardiology", ("Ann Smith", "1234567893"), "urgent", 8, None),
    ("P-106", "", "M106^^^CLINIC", Demographics(), "Cardiology", ("", ""), "routine", 20, None),
]  # fmt: skip


@pytest.fixture
def db(store_url: str) -> Iterator[Database]:
    d = open_database(store_url)
    with d.transaction() as conn:
        for placer, filler, pid, who, specialty, (sname, snpi), prio, ago, closed in PLANTED:
            rid = store.insert_referral(
                conn, sending_facility="CLINIC", placer_number=placer, state={},
                statuses=("open", "waiting", "waiting", ""), opened_at=NOW - ago * DAY, now=NOW,
            )  # fmt: skip
            store.update_referral(
                conn, rid,
                details={"specialty": specialty, "specialist_name": sname,
                         "specialist_npi": snpi, "priority": prio},
                closed_at=None if closed is None else NOW - closed * DAY,
                statuses=("closed", "done", "done", "other") if closed is not None else None,
            )  # fmt: skip
            if filler:
                store.add_fillers(conn, rid, [filler])
            store.add_patient_ids(conn, rid, [pid])
            referral_search.set_patient(conn, rid, who)
    yield d
    d.close()


def placers(db: Database, q: str = "", **kw: object) -> list[str]:
    flt = ReferralFilter(q=q, **kw)  # type: ignore[arg-type]
    order = referral_search.sort_of("placer", NOW, TARGETS)
    page, rows = referral_page(db.conn, flt, order, limit=100)
    assert page.total == len(rows)
    return [r.placer_number for r in rows]


def test_normalise_strips_accents_and_case() -> None:
    assert referral_search.normalise("Müller") == "muller"
    assert referral_search.normalise("ÅSA-Maria  O'Neil") == "asa maria o neil"
    # Ø, Ł, Đ, Æ are letters NFKD does not split: spelled plain, as typed on a US keyboard
    assert referral_search.normalise("ØSTBY") == "ostby"
    assert referral_search.normalise("Łukasz Đorđević-Ærø") == "lukasz dordevic aero"
    assert referral_search.as_date("01/02/1970") == "1970-01-02"
    assert referral_search.as_date("19700102") == "1970-01-02"
    assert referral_search.as_date("1970-13-02") == ""


def test_names_keyed_before_the_plain_spelling_are_rekeyed(db: Database) -> None:
    """A referral keyed by the earlier rule (Ø kept as ø) is found by "ost" after the
    rekey migration step (fails before: the key stayed "øster")."""
    with db.transaction() as conn:
        rid = store.insert_referral(
            conn, sending_facility="CLINIC", placer_number="P-200", state={},
            statuses=("open", "waiting", "waiting", ""), opened_at=NOW, now=NOW,
        )  # fmt: skip
        referral_search.set_patient(conn, rid, Demographics("M200", "Øster", "Ida", ""))
        conn.execute(  # the key the earlier rule stored
            "UPDATE referrals SET patient_family_key = 'øster' WHERE id = ?", (rid,)
        )
    assert placers(db, "ost") == []
    with db.transaction():
        referral_search.migrate_rekey(db)
    assert placers(db, "ost") == ["P-200"]
    assert placers(db, "Øst") == ["P-200"]


def test_patient_from_pid_prefers_the_mr_identifier() -> None:
    raw = (
        "MSH|^~\\&|EHR|CLINIC|REFLOOP|CLINIC|20260101090000||REF^I12|c1|P|2.5.1\r"
        "PID|1||99^^^SSA^SS~M-77^^^CLINIC^MR||M\\E\\ller^Åsa^K^^^||19700102083000|F\r"
    ).encode()
    assert from_hl7(Message(raw)) == Demographics("M-77", "M\\ller", "Åsa K", "1970-01-02")
    no_pid = b"MSH|^~\\&|EHR|CLINIC|REFLOOP|CLINIC|20260101090000||SIU^S12|c2|P|2.5.1\r"
    assert not from_hl7(Message(no_pid))


def test_patient_from_a_contained_fhir_patient() -> None:
    resource = {
        "resourceType": "ServiceRequest",
        "contained": [
            {
                "resourceType": "Patient",
                "id": "p",
                "identifier": [
                    {"system": "urn:ssn", "value": "123"},
                    {"type": {"coding": [{"code": "MR"}]}, "value": "MRN-9"},
                ],
                "name": [{"family": "Núñez", "given": ["Ana", "María"]}],
                "birthDate": "1988-04-30",
            }
        ],
        "subject": {"reference": "#p"},
    }
    assert from_fhir(resource) == Demographics("MRN-9", "Núñez", "Ana María", "1988-04-30")
    assert not from_fhir({"resourceType": "ServiceRequest"})


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        ("P-102", ["P-102"]),  # placer number
        ("p-102", ["P-102"]),  # typed in lower case
        ("F-100", ["P-100"]),  # filler number
        ("M103", ["P-103"]),  # MRN
        ("M102^^^OTHER", ["P-102"]),  # PID-3 as received
        ("mul", ["P-100", "P-101"]),  # family prefix, accents and case ignored
        ("MÜLLER", ["P-100", "P-101"]),
        ("asa", ["P-100"]),  # given name prefix (Åsa)
        ("smith", ["P-102", "P-105"]),  # Smith, Smithers (not "Ann Smith": a name's start)
        ("smith jane", ["P-102"]),  # two words: both must match
        ("smith, jane", ["P-102"]),
        ("1970-01-02", ["P-100", "P-102"]),  # birth date
        ("01/02/1970", ["P-100", "P-102"]),
        ("derm", ["P-101"]),  # specialty prefix
        ("internal med", ["P-102"]),  # the whole phrase: a specialty
        ("van der berg", ["P-104"]),  # the whole phrase: a family name
        ("1234567893", ["P-100", "P-102", "P-105"]),  # specialist NPI
        ("dee", ["P-103"]),  # specialist name prefix
        ("ann smith", ["P-100", "P-102", "P-105"]),  # the whole phrase: the specialist
        ("nobody", []),
        ("smith nobody", []),
    ],
)
def test_search(db: Database, q: str, expected: list[str]) -> None:
    assert placers(db, q) == expected


def test_search_combines_with_filters(db: Database) -> None:
    assert placers(db, "cardiology", open_only=True) == ["P-100", "P-105", "P-106"]
    assert placers(db, "cardiology", status="closed") == ["P-103"]


def test_overdue_in_sql_is_the_worklist_rule(db: Database) -> None:
    # routine > 30 days: P-100 (40), stat > 2: P-102 (5), urgent > 7: P-105 (8); P-101 is
    # urgent at 3 days, P-106 routine at 20, P-103 closed
    late = placers(db, overdue=True, now=NOW, targets=tuple(TARGETS.items()))
    assert late == ["P-100", "P-102", "P-105"]
    on_time = placers(db, overdue=False, now=NOW, targets=tuple(TARGETS.items()))
    assert on_time == ["P-101", "P-103", "P-104", "P-106"]


def walk(db: Database, sort: str, limit: int) -> list[list[str]]:
    """Every page forward, then every page back from the last: both must agree."""
    order = referral_search.sort_of(sort, NOW, TARGETS)
    flt = ReferralFilter()
    by_id = {r.id: r.placer_number for r in store.list_referrals(db.conn, limit=0)}
    pages: list[list[str]] = []
    starts = []
    page, _rows = referral_page(db.conn, flt, order, limit=limit)
    while True:
        pages.append([by_id[i] for i in page.ids])
        starts.append((page.start, page.end, page.total))
        if not page.has_next:
            break
        page, _rows = referral_page(db.conn, flt, order, limit=limit, after=page.ids[-1])
    assert starts == [
        (1 + n * limit, min(len(PLANTED), (n + 1) * limit), len(PLANTED)) for n in range(len(pages))
    ]
    back = [pages[-1]]
    while page.has_prev:
        page, _rows = referral_page(db.conn, flt, order, limit=limit, before=page.ids[0])
        back.insert(0, [by_id[i] for i in page.ids])
    assert back == pages
    return pages


def test_paging_forward_and_back(db: Database) -> None:
    assert walk(db, "placer", 3) == [["P-100", "P-101", "P-102"], ["P-103", "P-104", "P-105"],
                                     ["P-106"]]  # fmt: skip
    assert walk(db, "-placer", 3) == [["P-106", "P-105", "P-104"], ["P-103", "P-102", "P-101"],
                                      ["P-100"]]  # fmt: skip


def test_sorts(db: Database) -> None:
    def flat(sort: str) -> list[str]:
        return [p for page in walk(db, sort, 2) for p in page]

    # overdue first (P-102 stat, P-105 urgent, P-100 routine), then open by priority
    # (P-101 urgent; P-104 and P-106 routine, oldest first), closed last
    assert flat("priority") == ["P-102", "P-105", "P-100", "P-101", "P-106", "P-104", "P-103"]
    # patient: family key then given key; no name ("") first
    assert flat("patient") == ["P-106", "P-103", "P-100", "P-101", "P-102", "P-105", "P-104"]
    # days open (P-103 closed after 8 days) longest first
    assert flat("-days") == ["P-100", "P-106", "P-105", "P-103", "P-102", "P-101", "P-104"]
    assert flat("opened") == ["P-100", "P-106", "P-103", "P-105", "P-102", "P-101", "P-104"]
    with pytest.raises(ValueError, match="sort must be one of"):
        referral_search.sort_of("nonsense", NOW, TARGETS)


def test_an_unknown_cursor_is_the_first_page(db: Database) -> None:
    order = referral_search.sort_of("placer", NOW, TARGETS)
    page, _rows = referral_page(db.conn, ReferralFilter(), order, limit=2, after=10**9)
    assert page.start == 1 and page.total == len(PLANTED)


def test_after_the_last_referral_is_an_empty_last_page(db: Database) -> None:
    order = referral_search.sort_of("placer", NOW, TARGETS)
    last = max(r.id for r in store.list_referrals(db.conn, limit=0))
    page, rows = referral_page(db.conn, ReferralFilter(), order, limit=2, after=last)
    assert (page.ids, rows, page.total, page.has_next) == ([], [], len(PLANTED), False)


@pytest.mark.store
def test_migration_fills_referrals_from_their_opening_message(tmp_path: Path) -> None:
    """The patient columns of referrals tracked before the migration come from the PID
    of the message that opened each (its referral-created event)."""
    d = open_database(tmp_path / "refloop.db")
    raw = (
        b"MSH|^~\\&|EHR|CLINIC|REFLOOP|CLINIC|20260101090000||REF^I12|c1|P|2.5.1\r"
        b"PID|1||M-5^^^CLINIC^MR||Ng^Lan||19991231|F\r"
    )
    with d.transaction() as conn:
        rid = store.insert_referral(
            conn, sending_facility="CLINIC", placer_number="OLD-1", state={},
            statuses=("open", "waiting", "waiting", ""), opened_at=NOW, now=NOW,
        )  # fmt: skip
        conn.execute(
            "INSERT INTO messages (id, received_at, source, status) VALUES (7, ?, 'ehr', 'routed')",
            (NOW,),
        )
        conn.execute("INSERT INTO message_raw (message_id, raw) VALUES (7, ?)", (raw,))
        store.insert_event(
            conn, referral_id=rid, kind="referral-created", message_id=7, fingerprint="x",
            source="message", actor="message", occurred_at=NOW, recorded_at=NOW, changed=True,
            statuses=("open", "waiting", "waiting"), effects=(), detail={},
        )  # fmt: skip
    import sqlite_utils

    from engine.store.pg import PgSchema
    from engine.store.sql import POSTGRESQL, dialect

    with d.transaction() as conn:
        # what a migration step gets: sqlite_utils' Database, or its PostgreSQL stand-in
        schema = PgSchema(conn) if dialect(conn) == POSTGRESQL else sqlite_utils.Database(conn)
        referral_search.migrate(schema, backfill=lambda b: from_hl7(Message(b)))
    people = referral_search.patients(d.conn, [rid])
    assert people[rid] == referral_search.Patient("M-5", "Ng", "Lan", "1999-12-31")
    assert placers(d, "ng lan") == ["OLD-1"]
    json.dumps(people[rid].name)  # a plain string
    d.close()


def _stored(raw: bytes, message_type: str) -> StoredMessage:
    return StoredMessage(
        id=1, received_at=NOW, source="x", peer="", sending_app="", sending_facility="",
        control_id="", message_type=message_type, version="", raw=raw, charset="utf-8",
        status="received", ack_code="", error="",
    )  # fmt: skip


def test_the_handler_reads_hl7_fhir_and_nothing() -> None:
    """What the processing handler writes on the referral (engine.routing.patient)."""
    hl7 = (
        b"MSH|^~\\&|EHR|CLINIC|REFLOOP|CLINIC|20260101090000||REF^I12|c1|P|2.5.1\r"
        b"PID|1||M-5^^^CLINIC^MR||Ng^Lan||19991231|F\r"
    )
    assert demographics(_stored(hl7, "REF^I12")) == Demographics("M-5", "Ng", "Lan", "1999-12-31")
    bundle = {
        "resourceType": "Bundle",
        "entry": [{"resource": {"resourceType": "Patient", "birthDate": "1960-02-29",
                                "name": [{"family": "Åberg", "given": ["Sven"]}]}}],
    }  # fmt: skip
    found = demographics(_stored(json.dumps(bundle).encode(), "Bundle"))
    assert found == Demographics("", "Åberg", "Sven", "1960-02-29")
    assert not demographics(_stored(b"not a message", "REF^I12"))
    assert not demographics(_stored(b"{not json", "Patient"))


def test_priority_pages_cross_from_open_to_closed(db: Database) -> None:
    """With closed referrals in the list, the open ones come first (overdue, then by
    priority, oldest first), then the closed ones by priority, oldest first: the same
    order forward and back, whatever the page size."""
    with db.transaction() as conn:
        for placer in ("P-101", "P-104", "P-106"):  # urgent 3 d, routine 1 d, routine 20 d
            (rid,) = store.find_by_placer(conn, placer)
            store.update_referral(
                conn, rid, statuses=("closed", "done", "done", "other"), closed_at=NOW
            )
    # open: P-102 (stat, overdue), P-105 (urgent, overdue), P-100 (routine, overdue);
    # closed: P-101 (urgent), then routine oldest first: P-106 (20 d), P-103 (10 d), P-104 (1 d)
    expected = ["P-102", "P-105", "P-100", "P-101", "P-106", "P-103", "P-104"]
    for size in (1, 2, 3, 4, 10):
        assert [p for page in walk(db, "priority", size) for p in page] == expected


def _changes(conn: Any, rid: int) -> object:
    if hasattr(conn, "total_changes"):
        return conn.total_changes
    return conn.execute("SELECT xmin FROM referrals WHERE id = ?", (rid,)).fetchone()[0]


def test_set_patient_keeps_what_a_message_leaves_out(db: Database) -> None:
    (rid,) = store.find_by_placer(db.conn, "P-103")
    with db.transaction() as conn:
        # the same patient again: no write (SQLite counts changes; PostgreSQL: the row's
        # version, xmin, stays)
        before = _changes(conn, rid)
        referral_search.set_patient(conn, rid, Demographics("M103", "Doe", "John", "1990-12-31"))
        assert _changes(conn, rid) == before
        referral_search.set_patient(conn, rid, Demographics(family="Doe-Smith"))
    assert referral_search.patients(db.conn, [rid])[rid] == referral_search.Patient(
        "M103", "Doe-Smith", "John", "1990-12-31"
    )
    assert placers(db, "doe smith") == ["P-103"]  # the key: "doe smith"


@pytest.mark.parametrize("sort", ["-id", "priority"])
def test_limit_0_lists_every_referral(db: Database, sort: str) -> None:
    """``refloop referrals list --limit 0`` (all): PostgreSQL refuses the ``LIMIT -1``
    that meant "no limit" on SQLite (fails before on PostgreSQL: LIMIT must not be
    negative)."""
    from engine.tracking.views import find_referrals

    listed = find_referrals(db, limit=0, sort=sort, now=NOW)
    assert len(listed["items"]) == listed["total"] == len(PLANTED)
