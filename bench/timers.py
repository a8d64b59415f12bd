"""Timer service at scale: 1,000,000 open referrals, each with a pending timer.

Measures, on a real SQLite file in a temporary folder:

- schedule: writing the 1M timer rows through the store's write API
  (``referrals.schedule_timer``), 10,000 per transaction;
- reload: ``TimerService.load()`` at start (rebuild the wheel from the table), for the
  default one-hour horizon and, for comparison, with every timer loaded;
- RSS after each;
- tick: the median and p99 cost of ``TimerService.tick()`` (refill + advance + fire) with
  1k and with 1M pending, one tick per simulated second; it should not grow with the
  pending count.

Run: ``.venv/bin/python bench/timers.py`` (about a minute; ``--n`` to change the size).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.clock import VirtualClock
from engine.store import open_database
from engine.store import referrals as rstore
from engine.store.db import Database
from engine.timers.service import TimerService
from engine.tracking import states
from engine.tracking.escalation import DAY, Policy
from engine.tracking.tracker import Tracker

START = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def rss_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def populate(db: Database, n: int) -> float:
    """n referrals (minimal rows) and one timer each, spread over 60 days; returns the
    seconds spent scheduling the timers."""
    state = json.dumps(states.to_dict(states.INITIAL))
    statuses = ("open", "not-contacted", "not-sent")
    batch = 10_000
    with db.transaction() as conn:
        conn.executemany(
            "INSERT INTO referrals (id, sending_facility, placer_number, state, status, "
            "patient_status, specialist_status, opened_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?)",
            ((i, "BENCH", f"P{i}", state, *statuses, START, START) for i in range(1, n + 1)),
        )
    began = time.perf_counter()
    step = 60 * DAY / n
    for lo in range(1, n + 1, batch):
        with db.transaction() as conn:
            for i in range(lo, min(n + 1, lo + batch)):
                rstore.schedule_timer(
                    conn, i, "coordinator-task", START + 60 + i * step, 1, f"{i}:c:1", now=START
                )
    return time.perf_counter() - began


def ticks(service: TimerService, clock: VirtualClock, count: int) -> list[float]:
    out = []
    for _ in range(count):
        clock.advance(1.0)
        t = time.perf_counter()
        service.tick()
        out.append((time.perf_counter() - t) * 1e6)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--ticks", type=int, default=2000)
    args = ap.parse_args()
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for pending in (1000, args.n):
            db = open_database(Path(tmp) / f"t{pending}.db", synchronous="normal")
            seconds = populate(db, pending)
            clock = VirtualClock(START)
            tracker = Tracker(db, clock)
            policy = Policy()
            base = rss_mib()
            service = TimerService(db, tracker, policy, clock)
            t = time.perf_counter()
            loaded = service.load()
            reload_s = time.perf_counter() - t
            rss_horizon = rss_mib() - base
            cost = ticks(service, clock, args.ticks)
            full = TimerService(db, tracker, policy, clock, horizon=61 * DAY)
            t = time.perf_counter()
            all_loaded = full.load()
            full_s = time.perf_counter() - t
            rss_full = rss_mib() - base
            label = f"{pending:,}"
            p99 = sorted(cost)[int(len(cost) * 0.99)]
            rows += [
                (label, f"schedule {seconds:.1f} s ({seconds / pending * 1e6:.1f} µs each)"),
                (
                    label,
                    f"reload, 1 h horizon: {reload_s * 1000:.1f} ms, {loaded} in the wheel, "
                    f"+{rss_horizon:.0f} MiB RSS",
                ),
                (
                    label,
                    f"reload, all timers: {full_s:.2f} s, {all_loaded:,} in the wheel, "
                    f"+{rss_full:.0f} MiB RSS",
                ),
                (
                    label,
                    f"tick: median {statistics.median(cost):.0f} µs, p99 {p99:.0f} µs "
                    f"over {len(cost)} ticks",
                ),
            ]
            db.close()
            del service, full
    print("| pending | measure |")
    print("|---|---|")
    for label, text in rows:
        print(f"| {label} | {text} |")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS of this process: {peak:.0f} MiB")


if __name__ == "__main__":
    main()
