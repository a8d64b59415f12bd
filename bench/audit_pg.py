"""Audit chain on PostgreSQL: how long concurrent writers wait for the chain's head.

What is measured
    W writer threads (default 1, 2, 4 and 8), each with its own connection from its own
    refloop store (``open_database(url)``, as separate nodes would have), run closed-loop
    for a fixed window (default 3 s): BEGIN, one ``engine.store.audit.append``, COMMIT
    (durable, as an operator action or a timer fire commits). The append locks the head
    row in ``meta`` (``SELECT … FOR UPDATE``) and holds it until COMMIT, so writers queue
    there. Reported per W: appends/s, p50/p99 of the whole transaction, and p50/p99 of
    the head wait (the time from the start of the append to holding the head lock: the
    head row's INSERT … ON CONFLICT DO NOTHING and SELECT … FOR UPDATE). Afterwards the
    chain must verify (``audit.verify``), or the run fails.

    Each run uses a fresh schema in the database of ``--url`` (default the
    REFLOOP_TEST_STORE variable, else postgresql://postgres@127.0.0.1:5432/test), dropped
    afterwards. Threads share one Python process (the GIL is released while psycopg
    waits on the server), so the numbers include client contention on 2 cores; compare
    rows with each other rather than with other machines.

Run::

    .venv/bin/python bench/audit_pg.py
    .venv/bin/python bench/audit_pg.py --writers 1,4,16 --seconds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg

from engine.store import audit
from engine.store.db import Database, open_database

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(url: str, writers: int, seconds: float) -> dict[str, Any]:
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in url else "?"
    scoped = f"{url}{sep}options=-csearch_path%3D{schema}"
    try:
        dbs = [open_database(scoped, pool=(1, 2)) for _ in range(writers)]
        waits: list[list[float]] = [[] for _ in range(writers)]
        totals: list[list[float]] = [[] for _ in range(writers)]
        start = threading.Barrier(writers + 1)
        stop = threading.Event()
        real_next = audit._next

        def timed_next(conn: Any) -> tuple[int, str]:
            began = time.perf_counter()
            out = real_next(conn)
            waits[local.index].append(time.perf_counter() - began)
            return out

        local = threading.local()
        audit._next = timed_next  # the bench observes the head wait; nothing else changes

        def writer(i: int, db: Database) -> None:
            local.index = i
            start.wait()
            n = 0
            while not stop.is_set():
                began = time.perf_counter()
                with db.transaction() as conn:
                    audit.append(
                        conn,
                        at="2026-01-01T00:00:00.000000Z",
                        actor=f"operator:bench{i}",
                        action="bench",
                        referral_id=None,
                        message_id=n,
                        detail={"writer": i, "n": n},
                    )
                totals[i].append(time.perf_counter() - began)
                n += 1

        threads = [threading.Thread(target=writer, args=(i, db)) for i, db in enumerate(dbs)]
        for t in threads:
            t.start()
        start.wait()
        time.sleep(seconds)
        stop.set()
        for t in threads:
            t.join()
        audit._next = real_next
        verified = audit.verify(dbs[0].conn)
        for db in dbs:
            db.close()
        if not verified.ok:
            raise SystemExit(f"chain broken at row {verified.bad_row}: {verified.problem}")
        all_totals = [v for w in totals for v in w]
        all_waits = [v for w in waits for v in w]
        return {
            "writers": writers,
            "appends": len(all_totals),
            "per_s": len(all_totals) / seconds,
            "txn_p50_ms": 1000 * statistics.median(all_totals),
            "txn_p99_ms": 1000 * _pct(all_totals, 0.99),
            "wait_p50_ms": 1000 * statistics.median(all_waits),
            "wait_p99_ms": 1000 * _pct(all_waits, 0.99),
            "rows_verified": verified.rows,
        }
    finally:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("REFLOOP_TEST_STORE") or DEFAULT_URL)
    parser.add_argument("--writers", default="1,2,4,8")
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    rows = [run(args.url, int(w), args.seconds) for w in args.writers.split(",")]
    head = (
        f"{'writers':>7} {'appends/s':>10} {'txn p50 ms':>11} {'txn p99 ms':>11} "
        f"{'head wait p50 ms':>17} {'head wait p99 ms':>17} {'chain':>10}"
    )
    print(head)
    for r in rows:
        print(
            f"{r['writers']:>7} {r['per_s']:>10.0f} {r['txn_p50_ms']:>11.2f} "
            f"{r['txn_p99_ms']:>11.2f} {r['wait_p50_ms']:>17.2f} {r['wait_p99_ms']:>17.2f} "
            f"{'ok ' + str(r['rows_verified']):>10}"
        )


if __name__ == "__main__":
    main()
