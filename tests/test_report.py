"""The closure report (MIPS 374 / CMS50) on a hand-built population with hand-computed
answers: referrals, reports, merges and nudges go through the real tracker and outbox store
into a real SQLite file, so the report's triggers see what production writes. Then the
CLI (table, JSON, CSV, bad input), the API, the gauge and the percentile rule.

The population (2025 unless said; "d" = days from opening to the first counted report):

======  =======  ================  =========  ======================================  ======
patient placer   opened            specialty  report                                  nudge
======  =======  ================  =========  ======================================  ======
P1      A0       2024-12-01        CARD       none (before the period)                -
P1      A1       Jan 10            CARD       final Jan 20: 10 d                      sms
P1      A2       Mar 1             CARD       final Mar 2 (not P1's first in 2025)    sms
P2      B        Feb 1             DERM       preliminary only: open                  sms x, portal
P3      C        Mar 1             CARD       corrected Mar 31: 30 d                  voice
P4      D        Oct 20            CARD       final 2026-01-03: after the period      -
P5      E        Nov 5             CARD       final Nov 10 (Nov: outside Jan-Oct)     -
P6      F1       Jun 1             DERM       final Jun 6: 5 d                        portal
P6      F2       Dec 1             DERM       none                                    -
P7a     G1       Apr 1             NEURO      none; P7a is merged into P7b            sms
P7b     G2       May 1             NEURO      final May 21 (not first after merge)    -
-       H        Jul 1             NEURO      final Jul 15: 14 d (no patient id)      -
P9      I1, I2   Aug 1 (same time) CARD       I2 final Aug 2; I1 (lower id) first     -
P10     J        Sep 1             DERM       preliminary Sep 3, final Sep 11: 10 d   sms, voice
P11     K        Sep 15 12:00      -          final Sep 15 06:00: clamped to 0 d      -
P12     L        Dec 26            CARD       none                                    -
P13     M        Dec 31 12:00      CARD       none                                    -
P14     N1, N2   Dec 10, Dec 20    CARD       none; N2 re-created as of Nov 2         -
======  =======  ================  =========  ======================================  ======

(sms x: an SMS nudge that died; the portal one after it was sent.)

Calendar year 2025 (opened Jan 1 - Oct 31, reports by Dec 31), as of 2026-01-05 00:00:
denominator A1 B C D F1 G1 H I1 J K = 10; numerator A1 C F1 H J K = 6; days 0 5 10 10 14 30:
median (rank 3) 10, p90 (rank 6) 30.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from helpers import run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from ui_rig import ref_i12, ui_engine

from engine.cli.main import main
from engine.clock import VirtualClock
from engine.metrics import Metrics
from engine.model import (
    Event,
    Identifiers,
    PatientsMerged,
    Provider,
    ReferralCreated,
    ReportReceived,
)
from engine.store import closure_report as report_store
from engine.store import referrals as referral_store
from engine.store.db import Database, open_database
from engine.tracking.report import (
    GROUPS,
    closure_ratios,
    closure_report,
    percentile,
    report_to_dict,
)
from engine.tracking.tracker import Tracker
from engine.web.openapi import REPORT

DAY = 86_400.0
NOW = datetime(2026, 1, 5, tzinfo=UTC).timestamp()
YEAR = (date(2025, 1, 1), date(2025, 12, 31))
SPECIALIST = Provider(npi="1111111111")
REFERRER = Provider(npi="2222222222")


def at(y: int, m: int, d: int, hour: int = 9) -> float:
    return datetime(y, m, d, hour, tzinfo=UTC).timestamp()


class Population:
    """Writes the table above through the tracker (one transaction per event)."""

    def __init__(self, db: Database):
        self.db = db
        self.tracker = Tracker(db, VirtualClock(at(2024, 12, 1)))
        self.message = 0

    def _apply(self, event: Event) -> None:
        with self.db.transaction() as conn:
            self.tracker.apply(event, conn)

    def _ids(self, placer: str, patients: tuple[str, ...] = ()) -> Identifiers:
        return Identifiers(sending_facility="CLINIC", placer_number=placer, patient_ids=patients)

    def _next(self) -> int:
        self.message += 1
        return self.message

    def refer(
        self,
        placer: str,
        when: float,
        patients: tuple[str, ...],
        specialty: str = "CARD",
        specialist: Provider = SPECIALIST,
        referrer: Provider = REFERRER,
    ) -> None:
        self._apply(
            ReferralCreated(
                ids=self._ids(placer, patients),
                occurred_at=when,
                message_id=self._next(),
                specialty=specialty,
                specialist=specialist,
                referring=referrer,
            )
        )

    def report(self, placer: str, when: float, status: str = "final", rid: str = "") -> None:
        self._apply(
            ReportReceived(
                ids=self._ids(placer),
                occurred_at=when,
                message_id=self._next(),
                report_id=rid or f"RPT-{placer}",
                status=status,
            )
        )

    def merge(self, retired: str, surviving: str, when: float) -> None:
        self._apply(
            PatientsMerged(
                ids=Identifiers(patient_ids=(surviving,)),
                occurred_at=when,
                message_id=self._next(),
                retired_id=retired,
                surviving_id=surviving,
            )
        )

    def nudge(self, placer: str, channel: str, status: str = "sent") -> None:
        """A patient nudge queued as the timers queue it, then recorded as the dispatcher
        records it."""
        with self.db.transaction() as conn:
            rid = referral_store.find_by_key(conn, "CLINIC", placer)
            assert rid is not None
            key = f"{rid}:first-nudge:{self._next()}"
            referral_store.enqueue_outbox(conn, rid, channel, "first_nudge", "{}", key, NOW)
            conn.execute("UPDATE outbox SET status = ? WHERE idempotency_key = ?", (status, key))


def populate(db: Database) -> None:
    p = Population(db)
    p.refer("A0", at(2024, 12, 1), ("MRN1^^^CLINIC",))
    p.refer("A1", at(2025, 1, 10), ("MRN1^^^CLINIC", "SSN1^^^SSA"))
    p.nudge("A1", "sms")
    p.report("A1", at(2025, 1, 20))
    p.refer("A2", at(2025, 3, 1), ("MRN1^^^CLINIC",))
    p.nudge("A2", "sms")
    p.report("A2", at(2025, 3, 2))
    p.refer(
        "B", at(2025, 2, 1), ("MRN2^^^CLINIC",), "DERM", Provider(name="Dr Skin"),
        Provider(name="Dr Home"),
    )  # fmt: skip
    p.nudge("B", "sms", "dead")
    p.nudge("B", "portal")
    p.report("B", at(2025, 2, 5), "preliminary")
    p.refer("C", at(2025, 3, 1), ("MRN3^^^CLINIC",), referrer=Provider(npi="3333333333"))
    p.nudge("C", "voice")
    p.report("C", at(2025, 3, 31), "corrected")
    p.refer("D", at(2025, 10, 20), ("MRN4^^^CLINIC",))
    p.report("D", at(2026, 1, 3))
    p.refer("E", at(2025, 11, 5), ("MRN5^^^CLINIC",))
    p.report("E", at(2025, 11, 10))
    p.refer("F1", at(2025, 6, 1), ("MRN6^^^CLINIC",), "DERM")
    p.nudge("F1", "portal")
    p.report("F1", at(2025, 6, 6))
    p.refer("F2", at(2025, 12, 1), ("MRN6^^^CLINIC",), "DERM")
    p.refer("G1", at(2025, 4, 1), ("MRN7A^^^CLINIC",), "NEURO")
    p.nudge("G1", "sms")
    p.refer("G2", at(2025, 5, 1), ("MRN7B^^^CLINIC",), "NEURO")
    p.report("G2", at(2025, 5, 21))
    p.merge("MRN7A^^^CLINIC", "MRN7B^^^CLINIC", at(2025, 6, 1))
    p.refer("H", at(2025, 7, 1), (), "NEURO")
    p.report("H", at(2025, 7, 15))
    p.refer("I1", at(2025, 8, 1), ("MRN9^^^CLINIC",))
    p.refer("I2", at(2025, 8, 1), ("MRN9^^^CLINIC",))
    p.report("I2", at(2025, 8, 2))
    p.refer("J", at(2025, 9, 1), ("MRN10^^^CLINIC",), "DERM")
    p.nudge("J", "sms")
    p.nudge("J", "voice")
    p.report("J", at(2025, 9, 3), "preliminary", "RPT-J")
    p.report("J", at(2025, 9, 11), "final", "RPT-J")
    p.refer("K", at(2025, 9, 15, 12), ("MRN11^^^CLINIC",), "")
    p.report("K", at(2025, 9, 15, 6))
    p.refer("L", at(2025, 12, 26), ("MRN12^^^CLINIC",))
    p.refer("M", at(2025, 12, 31, 12), ("MRN13^^^CLINIC",))
    p.refer("N1", at(2025, 12, 10), ("MRN14^^^CLINIC",))
    p.refer("N2", at(2025, 12, 20), ("MRN14^^^CLINIC",))
    p.refer("N2", at(2025, 11, 2), ("MRN14^^^CLINIC",))  # the order's real date, later


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("report") / "state"
    db = open_database(folder / "refloop.db")
    try:
        populate(db)
    finally:
        db.close()
    return folder


@pytest.fixture(scope="module")
def populated(module_store_url: str) -> str:
    """The same population in the store under test (SQLite or PostgreSQL)."""
    db = open_database(module_store_url)
    try:
        populate(db)
    finally:
        db.close()
    return module_store_url


@pytest.fixture
def db(populated: str) -> Iterator[Database]:
    d = open_database(populated, readonly=True)
    try:
        yield d
    finally:
        d.close()


def rows(data: dict[str, Any], key: str) -> dict[str, tuple[Any, ...]]:
    """``groups`` / ``nudge_channels`` as key -> (denominator, numerator, [median, p90])."""
    return {
        r["key"]: tuple(
            r[k] for k in ("denominator", "numerator", "median_days", "p90_days") if k in r
        )
        for r in data[key]
    }


# ---------------------------------------------------------------------------
# The numbers


def test_calendar_year(db: Database) -> None:
    r = report_to_dict(closure_report(db.conn, *YEAR, now=NOW))
    assert r["referrals_opened_from"] == "2025-01-01"
    assert r["referrals_opened_to"] == "2025-10-31"  # the CMS50 ten months
    assert r["reports_received_by"] == "2025-12-31"
    assert (r["denominator"], r["numerator"], r["rate"]) == (10, 6, 0.6)
    assert (r["median_days"], r["p90_days"]) == (10.0, 30.0)
    assert r["groups"] == []
    assert rows(r, "nudge_channels") == {
        "sms": (3, 2),  # A1, G1 (first of the merged patient), J (sms before voice)
        "portal": (2, 1),  # B (its sms died), F1
        "voice": (1, 1),  # C
        "none": (4, 2),  # D, H, I1, K
    }
    # open at 2026-01-05, opened in 2025: M 4 d, L 9, N1 25, F2 34, N2 63 (moved to Nov 2),
    # B, G1, I1 over 90; A0 is from 2024
    assert r["open_aging"] == {
        "0-7": 1, "8-14": 1, "15-30": 1, "31-60": 1, "61-90": 1, "91+": 3,
    }  # fmt: skip


def test_groups_add_up_to_the_total(db: Database) -> None:
    r = report_to_dict(closure_report(db.conn, *YEAR, by="specialty", now=NOW))
    assert rows(r, "groups") == {
        "": (1, 1, 0.0, 0.0),  # K
        "CARD": (4, 2, 10.0, 30.0),  # A1 10, C 30, D, I1
        "DERM": (3, 2, 5.0, 10.0),  # B, F1 5, J 10
        "NEURO": (2, 1, 14.0, 14.0),  # G1, H 14
    }
    assert [g["rate"] for g in r["groups"]] == [1.0, 0.5, 2 / 3, 0.5]
    assert (r["denominator"], r["numerator"]) == (10, 6)


def test_by_provider_and_month(db: Database) -> None:
    specialist = report_to_dict(closure_report(db.conn, *YEAR, by="specialist", now=NOW))
    assert rows(specialist, "groups") == {
        "1111111111": (9, 6, 10.0, 30.0),  # an NPI
        "Dr Skin": (1, 0, None, None),  # no NPI: the name
    }
    referrer = report_to_dict(closure_report(db.conn, *YEAR, by="referrer", now=NOW))
    assert {k: v[:2] for k, v in rows(referrer, "groups").items()} == {
        "2222222222": (8, 5),
        "3333333333": (1, 1),
        "Dr Home": (1, 0),
    }
    month = report_to_dict(closure_report(db.conn, *YEAR, by="month", now=NOW))
    assert {k: v[:2] for k, v in rows(month, "groups").items()} == {
        "2025-01": (1, 1), "2025-02": (1, 0), "2025-03": (1, 1), "2025-04": (1, 0),
        "2025-06": (1, 1), "2025-07": (1, 1), "2025-08": (1, 0), "2025-09": (2, 2),
        "2025-10": (1, 0),
    }  # fmt: skip


@pytest.mark.parametrize(
    ("start", "end", "expected"),
    [
        # not a calendar year: the whole period counts, reports by its end. A1, B, C, F1 (Jun
        # 6), G1 (merged: its own first)
        (date(2025, 1, 1), date(2025, 6, 30), (5, 3, 10.0, 30.0)),
        # C's corrected report (Mar 31) comes after the period: it does not count for it
        (date(2025, 1, 1), date(2025, 3, 15), (3, 1, 10.0, 10.0)),
        # A2 is P1's first referral *in March* (A1 is earlier, outside the period)
        (date(2025, 3, 1), date(2025, 3, 31), (2, 2, 1.0, 30.0)),
        # Nov-Dec: E 5 d, F2, L, M, and N2 (moved to Nov 2, before N1)
        (date(2025, 11, 1), date(2025, 12, 31), (5, 1, 5.0, 5.0)),
        # nothing opened
        (date(2023, 1, 1), date(2023, 6, 30), (0, 0, None, None)),
    ],
    ids=["half-year", "report-after-period", "first-in-march", "nov-dec", "empty"],
)
def test_other_periods(db: Database, start: date, end: date, expected: tuple[Any, ...]) -> None:
    r = report_to_dict(closure_report(db.conn, start, end, now=NOW))
    assert (r["denominator"], r["numerator"], r["median_days"], r["p90_days"]) == expected
    assert r["referrals_opened_to"] == end.isoformat()
    if not expected[0]:
        assert r["rate"] is None


def test_nov_dec_aging(db: Database) -> None:
    r = closure_report(db.conn, date(2025, 11, 1), date(2025, 12, 31), now=NOW)
    # M 4 d, L 9, N1 25, F2 34, N2 63 (E is closed)
    assert dict(r.open_aging) == {
        "0-7": 1, "8-14": 1, "15-30": 1, "31-60": 1, "61-90": 1, "91+": 0,
    }  # fmt: skip


def test_triggers_agree_with_a_rebuild(populated: str) -> None:
    """What the triggers kept through creates, moves, merges, reports and nudges equals
    the table built from scratch as the migration does."""
    db = open_database(populated)
    try:
        query = "SELECT * FROM report_referrals ORDER BY referral_id"
        kept = db.conn.execute(query).fetchall()
        db.conn.execute("BEGIN")
        try:
            db.conn.execute("DELETE FROM report_referrals")
            db.conn.execute(report_store.BACKFILL)
            rebuilt = db.conn.execute(query).fetchall()
        finally:
            db.conn.execute("ROLLBACK")
        assert kept == rebuilt
        assert len(kept) == 20
    finally:
        db.close()


# Operations on the tables the triggers watch: (kind, referral index, patient, day).
_OPS = st.lists(
    st.tuples(
        st.sampled_from(["refer", "add", "merge", "redate"]),
        st.integers(0, 7),
        st.sampled_from(["P1", "P2", "P3", "P4"]),
        st.integers(0, 5),  # few distinct days: ties in opened_at are common
    ),
    max_size=40,
)


@pytest.mark.store
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_OPS)
def test_triggers_agree_with_a_rebuild_under_random_moves(tmp_path_factory: Any, ops: Any) -> None:
    """Whatever order referrals are created, gain patient ids, are merged and re-dated in,
    the rows the triggers kept (prev_opened_at above all) equal a rebuild."""
    db = open_database(tmp_path_factory.mktemp("moves") / "refloop.db")
    try:
        with db.transaction() as conn:
            ids: list[int] = []
            for kind, i, patient, day in ops:
                when = at(2025, 1, 1 + day)
                if kind == "refer" or not ids:
                    ids.append(
                        referral_store.insert_referral(
                            conn, sending_facility="F", placer_number=f"R{len(ids)}",
                            state={}, statuses=("open", "", "", ""), opened_at=when, now=when,
                        )
                    )  # fmt: skip
                    referral_store.add_patient_ids(conn, ids[-1], [patient])
                elif kind == "add":
                    referral_store.add_patient_ids(conn, ids[i % len(ids)], [patient + "X"])
                elif kind == "merge":
                    referral_store.record_merge(conn, patient, f"P{day % 4 + 1}", None, when)
                else:
                    referral_store.update_referral(conn, ids[i % len(ids)], opened_at=when)
            query = "SELECT * FROM report_referrals ORDER BY referral_id"
            kept = conn.execute(query).fetchall()
            conn.execute("DELETE FROM report_referrals")
            conn.execute(report_store.BACKFILL)
            assert kept == conn.execute(query).fetchall()
    finally:
        db.close()


@pytest.mark.empty_store
@pytest.mark.store
def test_the_migration_fills_the_table_for_existing_referrals(tmp_path: Path) -> None:
    """A database from before the report (the same population, no triggers yet) gives the
    same report once the migration has run."""
    from engine.store import migrations as db_module

    path = tmp_path / "old.db"
    before = db_module.MIGRATIONS[: db_module.MIGRATIONS.index(db_module._m_closure_report)]
    old = open_database(path, migrations=before)
    try:
        populate(old)
    finally:
        old.close()
    migrated = open_database(path)
    try:
        r = report_to_dict(closure_report(migrated.conn, *YEAR, by="specialty", now=NOW))
    finally:
        migrated.close()
    assert (r["denominator"], r["numerator"], r["median_days"], r["p90_days"]) == (10, 6, 10, 30)
    assert rows(r, "nudge_channels") == {
        "sms": (3, 2), "portal": (2, 1), "voice": (1, 1), "none": (4, 2),
    }  # fmt: skip
    assert [g["key"] for g in r["groups"]] == ["", "CARD", "DERM", "NEURO"]


def test_bad_arguments(db: Database) -> None:
    with pytest.raises(ValueError, match="ends before it starts"):
        closure_report(db.conn, date(2025, 2, 1), date(2025, 1, 1), now=NOW)
    with pytest.raises(ValueError, match="by must be one of"):
        closure_report(db.conn, *YEAR, by="colour", now=NOW)


@pytest.mark.parametrize(
    ("values", "p", "expected"),
    [
        ([], 50, None),
        ([7], 50, 7),
        ([7], 90, 7),
        ([1, 2], 50, 1),  # nearest rank: the lower middle, not the mean
        ([1, 2, 3], 50, 2),
        ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 90, 9),  # rank ceil(9.0) = 9
        ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], 90, 10),  # rank ceil(9.9) = 10
        ([1, 2, 3, 4], 100, 4),
    ],
)
def test_nearest_rank_percentile(values: list[int], p: float, expected: int | None) -> None:
    assert percentile(values, p) == expected


# ---------------------------------------------------------------------------
# The gauge


def test_closure_ratio_gauge(db: Database) -> None:
    # trailing windows from 2026-01-05: 30 d = Dec 6 on: F2? no (Dec 1); L, M, N1 -> 0 of 3
    # 90 d = Oct 7 on: D (closed 2026-01-03), E, F2, L, M, N1, N2 -> 2 of 7
    # 365 d = 2025-01-05 on: every 2025 referral but none of A0 -> 11 closed of 19
    ratios = closure_ratios(db.conn, NOW)
    assert ratios == {"30d": 0.0, "90d": 2 / 7, "365d": 11 / 19}
    clock = [NOW]
    calls: list[float] = []

    def counted(now: float) -> dict[str, float | None]:
        calls.append(now)
        return closure_ratios(db.conn, now)

    registry = CollectorRegistry()
    Metrics(registry).watch_closure_ratio(counted, lambda: clock[0], interval=300)
    text = generate_latest(registry).decode()
    assert 'refloop_closure_ratio{window="365d"} 0.5789' in text
    generate_latest(registry)
    clock[0] += 301
    generate_latest(registry)
    assert calls == [NOW, NOW + 301]  # one read per interval, however often it is scraped


def test_no_referrals_no_samples(store_url: str) -> None:
    db = open_database(store_url)
    try:
        assert closure_ratios(db.conn, NOW) == {"30d": None, "90d": None, "365d": None}
        registry = CollectorRegistry()
        Metrics(registry).watch_closure_ratio(lambda n: closure_ratios(db.conn, n), lambda: NOW)
        assert "refloop_closure_ratio{" not in generate_latest(registry).decode()
    finally:
        db.close()


# ---------------------------------------------------------------------------
# The CLI


def cli(state: Path, *args: str) -> Any:
    routes = state.parent / "routes.yaml"  # names no store file: the default, refloop.db
    routes.write_text("version: 1\n")
    return CliRunner().invoke(
        main, ["report", "closure", "--state", str(state), "--routes", str(routes), *args]
    )


def test_cli_json(state: Path) -> None:
    result = cli(state, "--from", "2025-01-01", "--to", "2025-12-31", "--by", "specialty", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert (data["denominator"], data["numerator"], data["by"]) == (10, 6, "specialty")
    assert [g["key"] for g in data["groups"]] == ["", "CARD", "DERM", "NEURO"]


def test_cli_csv(state: Path) -> None:
    result = cli(state, "--from", "2025-01-01", "--to", "2025-12-31", "--by", "specialty", "--csv")
    assert result.exit_code == 0, result.output
    table = list(csv.DictReader(io.StringIO(result.output)))
    assert [(r["section"], r["key"]) for r in table[:5]] == [
        ("total", ""), ("group", ""), ("group", "CARD"), ("group", "DERM"), ("group", "NEURO"),
    ]  # fmt: skip
    total = table[0]
    assert (total["denominator"], total["numerator"], total["rate"]) == ("10", "6", "0.6000")
    assert (total["median_days"], total["p90_days"]) == ("10.00", "30.00")
    channels = {r["key"]: r["denominator"] for r in table if r["section"] == "nudge_channel"}
    assert channels == {"sms": "3", "portal": "2", "voice": "1", "none": "4"}
    aging = [r["key"] for r in table if r["section"] == "open_aging"]
    assert aging == ["0-7", "8-14", "15-30", "31-60", "61-90", "91+"]


def test_cli_table(state: Path) -> None:
    result = cli(state, "--from", "2025-01-01", "--to", "2025-12-31", "--by", "month")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "opened 2025-01-01 to 2025-10-31" in out and "received by 2025-12-31" in out
    all_line = next(line for line in out.splitlines() if line.startswith("all "))
    assert all_line.split() == ["all", "10", "6", "60.0%", "10.0", "30.0"]
    assert "BY MONTH" in out and "2025-09" in out
    assert "BY FIRST NUDGE CHANNEL" in out and "OPEN REFERRALS BY DAYS OPEN" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--from", "2025-13-01", "--to", "2025-12-31"), "not a date (YYYY-MM-DD): '2025-13-01'"),
        (("--from", "01/01/2025", "--to", "2025-12-31"), "not a date (YYYY-MM-DD)"),
        (("--from", "2025-01-01", "--to", "yesterday"), "not a date (YYYY-MM-DD): 'yesterday'"),
        (("--from", "2025-02-01", "--to", "2025-01-01"), "the period ends before it starts"),
        (("--from", "2025-01-01", "--to", "2025-12-31", "--by", "colour"), "'colour' is not"),
        (("--from", "2025-01-01", "--to", "2025-12-31", "--json", "--csv"), "alternatives"),
    ],
    ids=["month-13", "us-format", "word", "reversed", "bad-by", "json-and-csv"],
)
def test_cli_bad_input(state: Path, args: tuple[str, ...], message: str) -> None:
    result = cli(state, *args)
    # a usage error: one line, exit 1 (docs/cli.md)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.splitlines()) == 1


@pytest.mark.empty_store
@pytest.mark.store
def test_cli_no_database(tmp_path: Path) -> None:
    result = cli(tmp_path / "nowhere", "--from", "2025-01-01", "--to", "2025-12-31")
    assert result.exit_code == 1 and "no database" in result.output


# ---------------------------------------------------------------------------
# The API


@pytest.mark.store
def test_api_report(tmp_path: Path) -> None:
    async def main_() -> None:
        async with ui_engine(tmp_path) as rig, httpx.AsyncClient(timeout=10) as http:
            # the same patient (MRN1) twice, opened 2026-01-01: one patient, one referral
            await rig.send(ref_i12("REF-R1", "r1"), ref_i12("REF-R2", "r2", specialty="REFDERM"))
            await rig.wait_referral("REF-R1")
            await rig.wait_referral("REF-R2")
            url = f"{rig.base}/api/report"
            q = {"start": "2026-01-01", "end": "2026-01-31", "by": "month"}
            response = await http.get(url, params=q, headers=rig.bearer("ana"))
            assert response.status_code == 200, response.text
            data = response.json()
            assert set(data) == set(REPORT["properties"])
            assert (data["denominator"], data["numerator"], data["rate"]) == (1, 0, 0.0)
            assert data["groups"] == [
                {"key": "2026-01", "denominator": 1, "numerator": 0, "rate": 0.0,
                 "median_days": None, "p90_days": None},
            ]  # fmt: skip
            bad = await http.get(
                url, params={"start": "2026-02-01", "end": "2026-01-01"}, headers=rig.bearer("ana")
            )
            assert bad.status_code == 400
            chart = await http.get(f"{rig.base}/api/openapi.json", headers=rig.bearer("ana"))
            op = chart.json()["paths"]["/api/report"]["get"]
            assert op["responses"]["200"]["content"]["application/json"]["schema"] == REPORT

    run(main_(), timeout=60)


def test_groups_match_the_api_enum() -> None:
    from engine.web.service import REPORT_GROUPS

    assert tuple(REPORT_GROUPS) == GROUPS
