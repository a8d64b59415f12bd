"""What scale-out costs a node: the PROXY v2 header read per connection, the cluster round
(heartbeat + lease renewal) per third of ``store.lease_seconds``, and ``refloop cluster
status``'s read.

What is measured
    ``engine.ingest.proxy.parse`` on the spec's headers (IPv4, IPv6, LOCAL), median of R
    runs of N calls; ``Membership._round`` (one write transaction, not fsync'd: heartbeat
    plus renewal) on a migrated SQLite file, median of R runs of N rounds; and
    ``cluster_status`` with 3 nodes, one lease, an inbox of M ``received`` rows.

Run: ``.venv/bin/python bench/cluster.py [N] [R]`` (defaults 20,000 and 5; prints a
markdown table).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from engine.clock import WallClock
from engine.cluster import Membership, cluster_status
from engine.ingest import proxy
from engine.store import nodes
from engine.store.db import open_database

SIG = bytes.fromhex("0d0a0d0a000d0a515549540a")
HEADERS = {
    "PROXY v2 IPv4": SIG + bytes.fromhex("2111000c c000020a 0a000005 9c40 0a0f"),
    "PROXY v2 IPv6": SIG
    + bytes.fromhex("21210024" + "20010db8" + "00" * 11 + "07" + "20010db8" + "00" * 11 + "01")
    + bytes.fromhex("c351 0a0f"),
    "PROXY v2 LOCAL": SIG + bytes.fromhex("20000000"),
}


def per_call(fn: Callable[[], object], n: int, r: int) -> float:
    """Median over ``r`` runs of the time per call, in microseconds."""
    runs = []
    for _ in range(r):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(runs)


async def _noop() -> None:
    return None


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    r = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    rows = [(name, per_call(lambda h=h: proxy.parse(h), n, r)) for name, h in HEADERS.items()]
    with tempfile.TemporaryDirectory() as tmp:
        db = open_database(Path(tmp) / "refloop.db")
        m = Membership(
            db, "a", WallClock(), lease_seconds=30, version="", on_gain=lambda _t: None,
            on_lose=_noop,
        )  # fmt: skip
        m.join()
        rows.append(("cluster round (heartbeat + renew)", per_call(m._round, n // 10, r)))
        with db.transaction() as conn:
            for node in ("b", "c"):
                nodes.register(
                    conn, node, host="h", pid=1, version="", addresses="", now=time.time()
                )
        rows.append(
            (
                "cluster_status (3 nodes, empty inbox)",
                per_call(lambda: cluster_status(db.conn, time.time(), 30.0), n // 10, r),
            )
        )
        db.close()
    print(f"n={n} r={r} (median per call)\n")
    print("| what | µs per call |")
    print("|---|---:|")
    for name, us in rows:
        print(f"| {name} | {us:,.1f} |")


if __name__ == "__main__":
    main()
