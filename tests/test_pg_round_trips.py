"""Round trips the PostgreSQL store saves (notify17, docs/performance.md) keep their
meaning: the referral read for a read-modify-write holds the row lock as the separate
``lock_referral`` did; an unsynced transaction's ``BEGIN`` still turns
``synchronous_commit`` off; the audit head is created by the first append and locked by
every one after it."""

from __future__ import annotations

import psycopg
import pytest

from engine.store import audit
from engine.store import referrals as referral_store
from engine.store.db import open_database
from engine.store.sql import Database


def test_the_locked_referral_read_holds_the_row(store_url: str, store: Database) -> None:
    with store.transaction() as conn:
        rid = store_insert(conn)
    with store.transaction() as conn:
        row = store_get_locked(conn, rid)
        assert row is not None and row.placer_number == "P1"
        if store.dialect == "postgresql":
            other = open_database(store_url)
            try:
                other.conn.execute("SET lock_timeout = '200ms'")
                with pytest.raises(psycopg.errors.LockNotAvailable), other.transaction() as c2:
                    store_get_locked(c2, rid)  # waits for our lock: refused at the timeout
            finally:
                other.close()
    with pytest.raises(Exception, match="outside a transaction"):
        store_get_locked(store.conn, rid)


def store_insert(conn: object) -> int:
    return referral_store.insert_referral(
        conn,  # type: ignore[arg-type]
        sending_facility="CLINIC",
        placer_number="P1",
        state={},
        statuses=("open", "", "", ""),
        opened_at=1.0,
        now=1.0,
    )


def store_get_locked(conn: object, rid: int) -> referral_store.ReferralRow | None:
    return referral_store.get_referral_locked(conn, rid)  # type: ignore[arg-type]


def test_unsynced_begin_and_the_audit_head(store: Database) -> None:
    if store.dialect != "postgresql":
        pytest.skip("PostgreSQL only (REFLOOP_TEST_STORE)")
    with store.transaction(durable=False) as conn:
        assert conn.execute("SHOW synchronous_commit").fetchone()[0] == "off"
    with store.transaction() as conn:
        assert conn.execute("SHOW synchronous_commit").fetchone()[0] == "on"
    detail = {"n": 1}
    for _ in range(3):
        with store.transaction() as conn:
            audit.append(
                conn,
                at="2026-12-05T00:00:00.000Z",
                actor="t",
                action="test",
                referral_id=None,
                message_id=None,
                detail=detail,
            )
    head = store.conn.execute("SELECT value FROM meta WHERE key = ?", (audit.HEAD_KEY,))
    last = store.conn.execute("SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
    assert head.fetchone()[0] == f"{last[0]}:{last[1]}"
    assert [r[0] for r in store.conn.execute("SELECT id FROM audit ORDER BY id")] == [1, 2, 3]
