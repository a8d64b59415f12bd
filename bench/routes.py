"""Route decision benchmark: µs per ``engine.routing.decide.decide`` call, shipped routes.yaml.

What is measured
    The shipped routes.yaml is compiled once. Every message of ../shared/corpus/hl7 that
    reads (rejected ones excluded) is decoded once into an ``engine.hl7msg.Message`` bytes
    holder; each timed call builds a fresh ``Message`` from the bytes (the lazy split is
    part of the cost a real decision pays) and runs ``decide``. The figure is the mean over
    ``--rounds`` passes through the corpus, per message, plus the mean by decision
    (routed / filtered) and the slowest message type. Not a timed test: the box is noisy,
    compare runs with each other.

Run (from the repo root)::

    .venv/bin/python bench/routes.py
    .venv/bin/python bench/routes.py --rounds 50 --json /tmp/routes.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine import config  # noqa: E402
from engine.errors import MessageRejected  # noqa: E402
from engine.hl7v2.message import Message, read_msh, split_messages  # noqa: E402
from engine.routing.compile import compile_config  # noqa: E402
from engine.routing.decide import decide  # noqa: E402

CORPUS = ROOT.parent / "shared" / "corpus" / "hl7"
BUDGET_US = 50.0


def load_corpus() -> list[bytes]:
    out = []
    for p in sorted(CORPUS.rglob("*")):
        if not p.is_file():
            continue
        data = p.read_bytes()
        for raw in split_messages(data).messages or (data,):
            try:
                read_msh(raw)
            except MessageRejected:
                continue
            out.append(raw)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--routes", default=str(ROOT / "routes.yaml"))
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args()

    t0 = time.perf_counter()
    table = compile_config(config.load(args.routes))
    compile_ms = (time.perf_counter() - t0) * 1000
    messages = load_corpus()
    prepared = [(raw, *read_msh(raw)) for raw in messages]
    by_status: dict[str, list[float]] = defaultdict(list)
    by_type: dict[str, list[float]] = defaultdict(list)
    rounds: list[float] = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        for raw, msh, codec in prepared:
            t = time.perf_counter()
            decision = decide(table, Message(raw, msh, codec), "ehr")
            dt = time.perf_counter() - t
            by_status[decision.status].append(dt)
            by_type[msh.message_type].append(dt)
        rounds.append((time.perf_counter() - start) / len(prepared))
    mean_us = statistics.fmean(rounds) * 1e6
    best_us = min(rounds) * 1e6
    slowest = max(by_type.items(), key=lambda kv: statistics.fmean(kv[1]))
    result = {
        "routes": len(table.routes),
        "messages": len(prepared),
        "rounds": args.rounds,
        "compile_ms": round(compile_ms, 1),
        "mean_us_per_message": round(mean_us, 2),
        "best_round_us_per_message": round(best_us, 2),
        "by_status_us": {k: round(statistics.fmean(v) * 1e6, 2) for k, v in by_status.items()},
        "slowest_type": [slowest[0], round(statistics.fmean(slowest[1]) * 1e6, 2)],
        "budget_us": BUDGET_US,
    }
    print(f"routes.yaml: {result['routes']} routes, compiled in {compile_ms:.1f} ms")
    print(f"corpus: {len(prepared)} messages x {args.rounds} rounds")
    print(f"decide: {mean_us:.1f} µs/message mean, {best_us:.1f} µs best round")
    for status, us in sorted(result["by_status_us"].items()):  # type: ignore[attr-defined]
        print(f"  {status:<9} {us:.1f} µs")
    print(f"  slowest type {slowest[0]}: {result['slowest_type'][1]} µs")
    print(f"budget {BUDGET_US:.0f} µs: {'ok' if mean_us < BUDGET_US else 'OVER'}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
