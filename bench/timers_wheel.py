"""TimerWheel at scale: schedule cost, memory, and the cost of one advance.

What is measured
    For each scenario, N timers with int keys (row-id-like, outside the small-int cache)
    and due times uniform over a spread are scheduled into ``TimerWheel(tick=1.0)``; then
    ``advance`` is called once per simulated second and each call is timed. Reported:
    total schedule time, the RSS growth from scheduling (the wheel's own structures), the
    RSS growth including the caller's key and due objects, and mean / p50 / p99 / max per
    advance. Each scenario runs in a fresh interpreter.

    1k vs 1M pending over 60 days is the escalation-layer shape (about 0.2 timers due per
    second at 1M); the max is the once-per-18 h cascade of a level-2 bucket (about 12k
    timers). The last row puts ~167 timers due in every advance, the load behind the
    "1M timers in a hashed wheel" row of /work/shared/reference/performance-limits.md.

Run: ``.venv/bin/python bench/timers_wheel.py`` (a few seconds; prints a markdown table).
"""

from __future__ import annotations

import gc
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from engine.timers.wheel import TimerWheel

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
DAY = 86_400.0

# (label, timers, spread of due times in seconds, 1 s advances to time)
SCENARIOS = [
    ("1k over 60 days", 1_000, 60 * DAY, 200_000),
    ("1M over 60 days", 1_000_000, 60 * DAY, 200_000),
    ("1M over 100 min", 1_000_000, 6_000.0, 5_000),
]


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def run(n: int, spread: float, ticks: int, rng: random.Random) -> tuple[str, ...]:
    gc.collect()
    before_inputs = rss_bytes()
    dues = [T0 + rng.random() * spread for _ in range(n)]
    keys = list(range(10**9, 10**9 + n))
    before = rss_bytes()
    wheel = TimerWheel(T0)
    started = time.perf_counter()
    for key, due in zip(keys, dues, strict=True):
        wheel.schedule(key, due)
    schedule_s = time.perf_counter() - started
    after = rss_bytes()
    del dues, keys  # the wheel keeps its own references

    costs: list[float] = []
    fired = 0
    clock = time.perf_counter
    gc.disable()  # keep collector pauses out of the per-advance figures
    for second in range(1, ticks + 1):
        now = T0 + second
        started = clock()
        fired += len(wheel.advance(now))
        costs.append((clock() - started) * 1e6)
    gc.enable()
    costs.sort()
    return (
        f"{schedule_s:.2f} s ({schedule_s / n * 1e6:.2f} µs each)",
        f"{(after - before) / 2**20:.1f} MiB ({(after - before) / n:.0f} B)",
        f"{(after - before_inputs) / 2**20:.1f} MiB ({(after - before_inputs) / n:.0f} B)",
        f"{ticks:,}",
        f"{fired / ticks:.2f}",
        f"{statistics.fmean(costs):.2f}",
        f"{costs[len(costs) // 2]:.2f}",
        f"{costs[int(len(costs) * 0.99)]:.2f}",
        f"{costs[-1] / 1000:.2f}",
    )


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--scenario":
        label, n, spread, ticks = SCENARIOS[int(sys.argv[2])]
        row = (label, *run(n, spread, ticks, random.Random(20260101)))
        print("| " + " | ".join(row) + " |", flush=True)
        return
    header = (
        "pending",
        "schedule all",
        "RSS: wheel (per timer)",
        "RSS: + keys, dues (per timer)",
        "advances",
        "due/advance",
        "advance mean µs",
        "p50 µs",
        "p99 µs",
        "max ms",
    )
    print("TimerWheel(tick=1.0, slots=256, levels=4); one advance per simulated second\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    # One fresh interpreter per scenario, so RSS growth is not masked by memory that an
    # earlier scenario freed but the process kept.
    for index in range(len(SCENARIOS)):
        command = [sys.executable, __file__, "--scenario", str(index)]
        subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
