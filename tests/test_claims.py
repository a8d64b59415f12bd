"""Cluster-safe claim semantics on one SQLite file (issue 17, stage 0).

On a shared database an id is handed out at insert but becomes visible at commit, so a
row with a lower id can appear after a row with a higher one. These tests make that
happen with a second connection on the same file (writing with explicit ids, as the
other node's transaction would have) and check that processing and the timer wheel
still see every row: they claim by status, not by "id greater than the last one seen".
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from pathlib import Path

import psycopg
import pytest
from helpers import routed, store_conn
from prometheus_client import CollectorRegistry

from engine.clock import VirtualClock
from engine.config import loads
from engine.errors import ConfigError, StoreError
from engine.hl7v2.message import read_msh
from engine.ingest.processor import Processor
from engine.metrics import Metrics
from engine.model import Identifiers, Inbound, Outcome, ReferralCreated, StoredMessage
from engine.store import AddResult, Inbox, open_database, outbox
from engine.store import referrals as referral_store
from engine.store.db import Conn
from engine.store.migrations import MIGRATIONS
from engine.timers.service import Fired, TimerService
from engine.tracking import states
from engine.tracking.escalation import Policy
from engine.tracking.tracker import Tracker

pytestmark = pytest.mark.store  # every test here uses the store

T0 = 1_767_225_600.0


def _other_node_commits(path: Path, message_id: int) -> None:
    """Another writer's transaction commits inbox row ``message_id`` (an explicit id: the
    one its INSERT was handed before a later row committed)."""
    conn = store_conn(path)
    try:
        conn.execute("BEGIN" if routed(path) else "BEGIN IMMEDIATE")
        conn.execute(
            "INSERT INTO messages (id, received_at, source, control_id, sha256, status) "
            "VALUES (?, ?, 'mllp', ?, ?, 'received')",
            (message_id, T0, f"C{message_id}", bytes(32)),
        )
        conn.execute(
            "INSERT INTO message_raw (message_id, raw) VALUES (?, ?)",
            (message_id, f"MSH|^~\\&|{message_id}".encode()),
        )
        conn.execute("COMMIT")
    finally:
        conn.close()


def test_processing_claims_a_row_that_commits_after_a_higher_id(tmp_path: Path) -> None:
    """Row 2 commits first and is processed; row 1 (handed out first, committed later)
    must still be processed. A high-water mark at 2 would never look at 1 again."""
    path = tmp_path / "refloop.db"
    db = open_database(path)
    seen: list[int] = []

    def handler(message: StoredMessage, conn: Conn) -> Outcome:
        seen.append(message.id)
        return Outcome("filtered", "test")

    async def main() -> None:
        inbox = Inbox(db)
        processor = Processor(db, inbox, handler, VirtualClock(T0), Metrics(CollectorRegistry()))
        _other_node_commits(path, 2)
        assert processor.process_available() == 1
        _other_node_commits(path, 1)
        processor.process_available()
        assert seen == [2, 1]
        # the outcome of a row processed out of id order is known to its waiters
        assert (await processor.watch(1)).status == "filtered"
        # a new processor (a restart, or another node taking over) finds nothing left
        again = Processor(db, inbox, handler, VirtualClock(T0), Metrics(CollectorRegistry()))
        assert again.process_available() == 0

    asyncio.run(main())
    statuses = dict(db.conn.execute("SELECT id, status FROM messages").fetchall())
    assert statuses == {1: "filtered", 2: "filtered"}
    db.close()


def _other_node_schedules(path: Path, timer_id: int, referral_id: int, due: float) -> None:
    conn = store_conn(path)
    try:
        conn.execute("BEGIN" if routed(path) else "BEGIN IMMEDIATE")
        conn.execute(
            "INSERT INTO timers (id, referral_id, kind, due, attempt, key, created_at) "
            "VALUES (?, ?, 'coordinator-task', ?, 1, ?, ?)",
            (timer_id, referral_id, due, f"test:{timer_id}", T0),
        )
        conn.execute("COMMIT")
    finally:
        conn.close()


def test_timer_wheel_picks_up_a_row_that_commits_after_a_higher_id(tmp_path: Path) -> None:
    """The wheel's refill must see timer 1000's earlier sibling 999, committed after 1000
    was loaded; both fire once when due."""
    path = tmp_path / "refloop.db"
    db = open_database(path)
    clock = VirtualClock(T0)
    policy = Policy()
    tracker = Tracker(db, clock, policy=policy)
    fired: list[Fired] = []
    service = TimerService(db, tracker, policy, clock, on_fired=fired.append)
    with db.transaction() as conn:
        created = tracker.apply(
            ReferralCreated(
                ids=Identifiers(sending_facility="CLINIC", placer_number="R1", patient_ids=("P1",)),
                occurred_at=T0,
                specialty="Cardiology",
            ),
            conn,
        )
    rid = created.referral_id
    assert rid is not None
    service.load()
    _other_node_schedules(path, 1000, rid, T0 + 60)
    service.notify()
    service.tick()
    _other_node_schedules(path, 999, rid, T0 + 60)
    service.tick()
    assert 999 in service.wheel and 1000 in service.wheel
    clock.set(T0 + 61)
    service.tick()
    assert sorted(f.timer_id for f in fired if f.timer_id >= 999) == [999, 1000]
    assert service.tick() == []
    db.close()


def _inbound(raw: bytes, **kw: object) -> Inbound:
    msh, codec = read_msh(raw) if raw.startswith(b"MSH") else (None, "utf-8")
    return Inbound(
        source="mllp", peer="127.0.0.1", raw=raw, received_at=T0, msh=msh, text_encoding=codec,
        **kw,  # type: ignore[arg-type]
    )  # fmt: skip


ADT = b"MSH|^~\\&|EPIC|CLINIC|REFLOOP|HUB|20260101000000||ADT^A08|CTRL-1|P|2.5.1\rPID|1||1^^^MRN"


def test_two_writers_receiving_the_same_resend_store_it_once(tmp_path: Path) -> None:
    """Two writers on two connections (two nodes' inbox writers) both store the same
    message: one row, both answered with it, the resend counted; the same control id with
    other bytes is stored and flagged; the unique index refuses a copy written directly."""
    path = tmp_path / "refloop.db"
    node_a, node_b = open_database(path), open_database(path)

    async def main() -> tuple[AddResult, AddResult, AddResult]:
        inbox_a, inbox_b = Inbox(node_a), Inbox(node_b)
        with node_a.transaction() as conn:
            (first,) = inbox_a.add_in(conn, [_inbound(ADT)], "AA")
        with node_b.transaction() as conn:
            (again,) = inbox_b.add_in(conn, [_inbound(ADT)], "AA")
        with node_b.transaction() as conn:
            (other,) = inbox_b.add_in(conn, [_inbound(ADT + b"\rNTE|1||x")], "AA")
        return first, again, other

    first, again, other = asyncio.run(main())
    assert not first.duplicate and again.duplicate and again.id == first.id
    assert (again.status, again.ack_code) == ("received", "AA")
    assert not other.duplicate and other.id != first.id
    rows = node_a.conn.execute("SELECT id, duplicates, flags FROM messages ORDER BY id").fetchall()
    assert rows == [(first.id, 1, ""), (other.id, 0, "control-id-reused")]
    with (
        pytest.raises((sqlite3.IntegrityError, psycopg.IntegrityError)),
        node_a.transaction() as conn,
    ):
        conn.execute(
            "INSERT INTO messages (received_at, source, sending_app, sending_facility, "
            "control_id, sha256, dedupe_hash, status) SELECT received_at, source, sending_app, "
            "sending_facility, control_id, sha256, dedupe_hash, 'received' FROM messages "
            "WHERE id = ?",
            (first.id,),
        )
    node_a.close()
    node_b.close()


def test_a_fhir_version_is_the_same_message_whatever_its_bytes(tmp_path: Path) -> None:
    db = open_database(tmp_path / "refloop.db")

    async def main() -> list[AddResult]:
        inbox = Inbox(db)
        key = {"sender": "fhir-ehr", "control_id": "ServiceRequest/1/_history/2"}
        with db.transaction() as conn:
            return inbox.add_in(
                conn,
                [
                    _inbound(b'{"resourceType":"ServiceRequest","id":"1"}', **key),
                    _inbound(b'{"id":"1","resourceType":"ServiceRequest"}', **key),
                    _inbound(b'{"resourceType":"Task"}', sender="fhir-ehr"),  # no key
                    _inbound(b'{"resourceType":"Task"}', sender="fhir-ehr"),
                ],
                "AA",
            )

    one, same, keyless, keyless_again = asyncio.run(main())
    assert same.duplicate and same.id == one.id
    assert not keyless.duplicate and not keyless_again.duplicate
    assert keyless.id != keyless_again.id
    db.close()


def test_the_tracker_locks_the_referral_before_its_read_modify_write(tmp_path: Path) -> None:
    """``lock_referral`` comes first in every tracker write; outside a transaction (where
    the read and the write could interleave with another writer's) it refuses, and the
    referral is left as it was."""
    db = open_database(tmp_path / "refloop.db")
    clock = VirtualClock(T0)
    tracker = Tracker(db, clock)
    with db.transaction() as conn:
        created = tracker.apply(
            ReferralCreated(
                ids=Identifiers(sending_facility="CLINIC", placer_number="R1"),
                occurred_at=T0,
                specialty="Cardiology",
            ),
            conn,
        )
    rid = created.referral_id
    assert rid is not None
    before = referral_store.get_referral(db.conn, rid)
    with pytest.raises(StoreError, match="outside a transaction"):
        tracker.apply_internal(rid, states.InternalEvent("escalated", occurred_at=T0), db.conn)
    assert referral_store.get_referral(db.conn, rid) == before
    with db.transaction() as conn:
        referral_store.lock_referral(conn, rid)  # inside one: nothing to wait for
        result = tracker.apply_internal(
            rid, states.InternalEvent("escalated", occurred_at=T0), conn
        )
    assert result.outcome == "applied"
    db.close()


PREVIOUS_SCHEMA = 14  # the migrations before issue 17's


@pytest.mark.empty_store
def test_a_database_of_the_previous_schema_upgrades(tmp_path: Path) -> None:
    """A database written by the previous schema (processing cursor, outbox rows left
    sending, two of one referral and channel among them, timers, inbox rows of every kind)
    opens, migrates, and then behaves by the new rules."""
    path = tmp_path / "refloop.db"
    old = open_database(path, migrations=MIGRATIONS[:PREVIOUS_SCHEMA])
    hl7_a = ADT
    hl7_b = ADT + b"\rNTE|1||other bytes, same control id"
    with old.transaction() as conn:
        rows = [
            # id, sending_app, control_id, message_type, version, raw, status
            (1, "EPIC", "CTRL-1", "ADT^A08", "2.5.1", hl7_a, "routed"),
            (2, "EPIC", "CTRL-1", "ADT^A08", "2.5.1", hl7_b, "routed"),
            (3, "fhir-ehr", "ServiceRequest/1/_history/1", "ServiceRequest", "", b"{}", "routed"),
            (4, "", "", "", "", b"\x0bgarbage", "rejected"),
            (5, "", "", "", "", b"\x0bgarbage", "rejected"),
            (6, "EPIC", "CTRL-6", "ADT^A08", "2.5.1", hl7_a.replace(b"CTRL-1", b"CTRL-6"),
             "received"),
        ]  # fmt: skip
        for mid, app, cid, mtype, version, raw, status in rows:
            conn.execute(
                "INSERT INTO messages (id, received_at, source, sending_app, sending_facility, "
                "control_id, message_type, version, sha256, status) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (mid, T0, "mllp", app, "CLINIC" if version else "", cid, mtype, version,
                 hashlib.sha256(raw).digest(), status),
            )  # fmt: skip
            conn.execute("INSERT INTO message_raw (message_id, raw) VALUES (?, ?)", (mid, raw))
        conn.execute("INSERT INTO meta (key, value) VALUES ('processed_cursor', '5')")
        rid = referral_store.insert_referral(
            conn,
            sending_facility="CLINIC",
            placer_number="R1",
            state={},
            statuses=("open", "pending", "pending", ""),
            opened_at=T0,
            now=T0,
        )
        for key in ("k1", "k2", "k3"):
            referral_store.enqueue_outbox(conn, rid, "fax", "x", "{}", key, T0, now=T0)
        conn.execute("UPDATE outbox SET status = 'sending', attempts = 1 WHERE id IN (1, 2)")
        conn.execute(
            "INSERT INTO timers (referral_id, kind, due, attempt, key, created_at) "
            "VALUES (?, 'first-nudge', ?, 1, 'old-timer', ?)",
            (rid, T0 + 60, T0),
        )
    old.close()

    db = open_database(path)
    conn = db.conn
    version = "SELECT version FROM schema_version" if routed(path) else "PRAGMA user_version"
    assert conn.execute(version).fetchone()[0] == len(MIGRATIONS)
    dedupe = dict(conn.execute("SELECT id, dedupe_hash FROM messages").fetchall())
    assert dedupe == {
        1: hashlib.sha256(hl7_a).digest(),
        2: hashlib.sha256(hl7_b).digest(),
        3: b"",  # a FHIR version: deduplicated on its key alone
        4: None,  # no key
        5: None,
        6: hashlib.sha256(hl7_a.replace(b"CTRL-1", b"CTRL-6")).digest(),
    }
    # the later of the two in-flight rows of one referral and channel went back first
    sending = conn.execute("SELECT id, status, lease_until FROM outbox ORDER BY id").fetchall()
    assert sending == [(1, "sending", 0.0), (2, "pending", None), (3, "pending", None)]
    with db.transaction() as tx:  # a lease of the previous version is over at once
        assert [r[0] for r in outbox.reap_expired(tx, T0)] == [1]
    assert conn.execute("SELECT loaded FROM timers").fetchall() == [(1,)]

    async def main() -> None:
        inbox = Inbox(db)
        with db.transaction() as tx:  # an old resend is still recognised
            (again,) = inbox.add_in(tx, [_inbound(hl7_a)], "AA")
        assert again.duplicate and again.id == 1
        seen: list[int] = []

        def handler(message: StoredMessage, conn: Conn) -> Outcome:
            seen.append(message.id)
            return Outcome("filtered")

        processor = Processor(db, inbox, handler, VirtualClock(T0), Metrics(CollectorRegistry()))
        assert processor.cursor == 5
        processor.process_available()
        assert seen == [6]

    asyncio.run(main())
    db.close()


def test_a_timer_moved_earlier_fires_at_its_new_time(tmp_path: Path) -> None:
    """A timer already on the wheel whose due time another writer moves earlier (an
    appointment moved, a schedule_timer on the same key) fires at the new time."""
    path = tmp_path / "refloop.db"
    db = open_database(path)
    clock = VirtualClock(T0)
    policy = Policy()
    tracker = Tracker(db, clock, policy=policy)
    fired: list[Fired] = []
    service = TimerService(db, tracker, policy, clock, horizon=7 * 86400, on_fired=fired.append)
    with db.transaction() as conn:
        created = tracker.apply(
            ReferralCreated(
                ids=Identifiers(sending_facility="CLINIC", placer_number="R1", patient_ids=("P1",)),
                occurred_at=T0,
                specialty="Cardiology",
            ),
            conn,
        )
    assert created.referral_id is not None
    service.load()
    (timer_id, due) = db.conn.execute("SELECT id, due FROM timers ORDER BY due LIMIT 1").fetchone()
    assert timer_id in service.wheel and due > T0 + 3600
    with db.transaction() as conn:
        referral_store.schedule_timer(
            conn, created.referral_id, "first-nudge", T0 + 60, 1, "moved", now=T0
        )  # a new key: a plain insert, for contrast
        conn.execute("UPDATE timers SET due = ? WHERE id = ?", (T0 + 60, timer_id))
    clock.set(T0 + 61)
    service.tick()
    assert timer_id in [f.timer_id for f in fired]
    db.close()


def test_rows_rejected_at_the_door_count_as_processed(tmp_path: Path) -> None:
    """A rejected row is stored with its outcome and never claimed; the processed counter
    and the lag gauge still treat it as processed, as when processing read every row."""
    db = open_database(tmp_path / "refloop.db")
    registry = CollectorRegistry()
    metrics = Metrics(registry)

    async def main() -> None:
        inbox = Inbox(db)
        processor = Processor(
            db, inbox, lambda m, c: Outcome("filtered"), VirtualClock(T0), metrics
        )
        with db.transaction() as conn:
            inbox.add_in(conn, [_inbound(ADT)], "AA")
            inbox.add_in(conn, [_inbound(b"garbage", reject=("AR", "", "", "no MSH"))], "AR")
        processor.process_available()
        assert processor.process_available() == 0
        assert (await processor.watch(2)).status == "rejected"

    asyncio.run(main())
    assert registry.get_sample_value("refloop_processing_lag_messages") == 0
    for status in ("filtered", "rejected"):
        assert (
            registry.get_sample_value("refloop_messages_processed_total", {"status": status}) == 1
        )
    db.close()


def test_store_node_id_and_lease_seconds_in_routes_yaml() -> None:
    cfg = loads("version: 1\nstore:\n  node_id: refloop-a\n  lease_seconds: 12\n")
    assert (cfg.store.node_id, cfg.store.lease_seconds) == ("refloop-a", 12.0)
    assert (loads("version: 1\n").store.lease_seconds, loads("version: 1\n").store.node_id) == (
        30.0,
        "",
    )
    with pytest.raises(ConfigError) as info:
        loads("version: 1\nstore:\n  lease_seconds: 0\n")
    assert "routes.yaml:3" in str(info.value) and "at least 1" in str(info.value)
