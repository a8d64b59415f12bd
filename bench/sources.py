"""What the Sources page costs (engine.ingest.status.source_status) on a large inbox.

What is measured
    A migrated SQLite file (engine.store.db) filled with N inbox rows over 30 days from
    three sources: ``ehr`` (busy, every day), ``lab`` (busy, every day, 1 in 500 rows
    ``error``) and ``old`` (its rows only in the first few days, so it has no message
    today and its last message is far back). Then ``source_status`` with a config naming
    ``ehr``, ``lab``, ``old`` and ``never`` (no rows at all: the worst case of the
    bounded look-back), median of R calls, and its three queries apart. The store keeps
    today's counts on the ``received_at`` index; the last message and last failure of a
    source look back at most LOOKBACK_ROWS rows by id.

Run: ``.venv/bin/python bench/sources.py [N] [R]`` (defaults 1,000,000 and 7; prints a
markdown table).
"""

from __future__ import annotations

import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

from engine.config import loads
from engine.ingest.status import source_status
from engine.store import source_status as store
from engine.store.db import open_database

DAY = 86400.0
NOW = 1_796_428_800.0 + 43_200  # 2026-12-05T12:00:00Z: half a day of "today"


def fill(path: Path, n: int) -> None:
    db = open_database(path)
    columns = (
        "received_at, source, peer, sending_app, sending_facility, receiving_app, "
        "receiving_facility, control_id, message_type, version, charset, sha256, status, "
        "ack_code, error, duplicates, flags, route, processed_at, batch_ref"
    )
    start = NOW - 30 * DAY
    rows = []
    for i in range(n):
        at = start + (NOW - start) * i / n
        source = "old" if i < n // 10 and i % 3 == 0 else ("ehr" if i % 2 else "lab")
        status = "error" if source == "lab" and i % 500 == 0 else "routed"
        digest = hashlib.sha256(str(i).encode()).hexdigest()
        rows.append(
            (at, source, "10.0.0.1:1", "EHR", "CLINIC", "REFLOOP", "CLINIC", f"c{i}",
             "SIU^S12", "2.5.1", "", digest, status, "AA",
             "route x: no identifiers" if status == "error" else "", 0, "", "r", at, "")
        )  # fmt: skip
    db.conn.execute("BEGIN")
    db.conn.executemany(f"INSERT INTO messages ({columns}) VALUES ({', '.join('?' * 20)})", rows)
    db.conn.execute("COMMIT")
    db.close()


def timed(fn: object, runs: int) -> float:
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1000


def main(n: int, runs: int) -> None:
    doc = {
        "version": 1,
        "http": {"enabled": False},
        "sources": {
            name: {"type": "mllp", "host": "127.0.0.1", "port": 2575 + i}
            for i, name in enumerate(("ehr", "lab", "old", "never"))
        },
    }
    cfg = loads(yaml.safe_dump(doc), file="bench.yaml", env={})
    names = ["ehr", "lab", "old", "never"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "refloop.db"
        t0 = time.perf_counter()
        fill(path, n)
        print(f"filled {n:,} rows in {time.perf_counter() - t0:.1f} s\n")
        db = open_database(path, readonly=True)
        conn = db.conn
        day = NOW - NOW % DAY
        rows = [
            ("counts_since (today, received_at index)",
             timed(lambda: store.counts_since(conn, day), runs)),
            ("last_received (4 sources)",
             timed(lambda: store.last_received(conn, names, day), runs)),
            ("last_failures (4 sources)", timed(lambda: store.last_failures(conn, names), runs)),
            ("source_status (all of it)",
             timed(lambda: source_status(conn, cfg, NOW, None), runs)),
        ]  # fmt: skip
        db.close()
    print(f"| query ({n:,} rows, look-back {store.LOOKBACK_ROWS:,}) | median ms |")
    print("|---|---:|")
    for name, ms in rows:
        print(f"| {name} | {ms:.1f} |")


if __name__ == "__main__":
    main(
        int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000,
        int(sys.argv[2]) if len(sys.argv) > 2 else 7,
    )
