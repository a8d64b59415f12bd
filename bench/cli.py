"""CLI start: how long ``refloop --version`` takes, against ``python -c "import click"``.

What is measured
    Wall time of whole processes, started with ``subprocess.run`` from this interpreter:
    ``python -m engine.cli --version`` (what the ``refloop`` script runs) and, as the
    baseline in the same run, ``python -c "import click"`` (an interpreter that loads the
    one library every refloop command needs). The two alternate, run by run, so a busy
    machine slows both alike; after a warm-up run of each (file cache), N runs each, median
    and p90 reported, and the ratio of the medians. ``refloop --help`` is timed too.
    Issue 16's goal: ``--version`` within 2x the baseline, which holds while no command
    group, store module or channel SDK is imported to print the version (engine.cli.main
    loads its groups lazily; tests/test_cli_start.py checks the imports).

Run: ``.venv/bin/python bench/cli.py [N]`` (N defaults to 30; prints a markdown table).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {
    'python -c "import click"': [sys.executable, "-c", "import click"],
    "refloop --version": [sys.executable, "-m", "engine.cli", "--version"],
    "refloop --help": [sys.executable, "-m", "engine.cli", "--help"],
}


def once(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(runs: int) -> None:
    for argv in COMMANDS.values():
        once(argv)  # warm the file cache
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(runs):
        for name, argv in COMMANDS.items():
            times[name].append(once(argv))
    base = statistics.median(times['python -c "import click"'])
    print(f"{runs} runs each, alternating; Python {sys.version.split()[0]}\n")
    print("| command | median ms | p90 ms | × import click |")
    print("|---|---:|---:|---:|")
    for name, values in times.items():
        median = statistics.median(values)
        p90 = statistics.quantiles(values, n=10)[-1]
        print(f"| `{name}` | {median * 1000:.1f} | {p90 * 1000:.1f} | {median / base:.2f} |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
