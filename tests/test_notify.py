"""engine.store.notify: one NOTIFY per committed transaction, whatever it did and however
many rows, none for a rolled-back one; the payload's id ranges. On SQLite marking does
nothing. The daemons' side (LISTEN, wake seams, reconnect) is tests/test_notify_daemons.py."""

from __future__ import annotations

import psycopg
import pytest

from engine.store import notify
from engine.store.sql import Database


def test_ranges_compact_sorted_runs() -> None:
    assert notify.ranges([]) == "-"
    assert notify.ranges([12, 5, 6, 7, 8, 9, 7]) == "5-9,12"
    assert notify.ranges([3]) == "3"
    assert notify.parse_ids("5-9,12") == [5, 6, 7, 8, 9, 12]
    assert notify.parse_ids("-") == []
    many = list(range(0, 2 * (notify.MAX_IDS + 1), 2))  # MAX_IDS + 1 runs of one id
    assert notify.ranges(many) == "*"
    assert notify.parse_ids("*") is None


def test_one_notification_per_committed_transaction(store: Database, store_url: str) -> None:
    if store.dialect != "postgresql":
        with store.transaction() as conn:  # SQLite: a no-op, nothing to collect
            notify.mark(conn, notify.RECEIVED)
        return
    url = store_url  # NOTIFY reaches the listeners of the store's own database
    schema = str(store.conn.execute("SELECT current_schema()").fetchone()[0])
    with psycopg.connect(url, autocommit=True) as listener:
        listener.execute("LISTEN refloop")
        with store.transaction(durable=False) as conn:
            for i in (7, 3, 4, 5):  # four rows processed, rows received, an outbox row
                notify.mark(conn, notify.PROCESSED, i)
            notify.mark(conn, notify.RECEIVED)
            notify.mark(conn, notify.OUTBOX)
            notify.mark(conn, notify.RECEIVED)
        with pytest.raises(RuntimeError), store.transaction() as conn:
            notify.mark(conn, notify.RECEIVED)
            raise RuntimeError("rolled back")
        with store.transaction() as conn:
            notify.mark(conn, notify.RECEIVED)
        got = [n.payload for n in listener.notifies(timeout=2.0, stop_after=3)]
    origin = notify.ORIGIN
    assert got == [f"{schema} {origin} rpo 3-5,7", f"{schema} {origin} r -"]
