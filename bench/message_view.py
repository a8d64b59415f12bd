"""The message view's parsed tree: how long ``engine.hl7v2.tree.build_tree`` takes per
message (python-hl7's parse plus naming every element), on the shared HL7 corpus and on
synthetic messages of growing size.

What is measured
    For each message, N calls of ``build_tree`` on its decoded text (after one warm-up
    call); the median and p90 per call, and beside them the median of python-hl7's own
    ``hl7.parse`` of the same text (what the tree adds is the difference). The corpus
    rows summarise every ``*.hl7`` file under ``../shared/corpus/hl7`` that starts with
    MSH and python-hl7 can read (median, and the slowest); the synthetic rows are
    a REF^I12 with 10, 100 and 1,000 OBX segments (a long result document). The tree is
    built on demand, only when a signed-in analyst opens a message: this is the wait for
    that page, not a cost on the ACK path (which never calls python-hl7).

Run: ``.venv/bin/python bench/message_view.py [N]`` (N defaults to 50; prints a markdown
table).
"""

from __future__ import annotations

import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import hl7  # noqa: E402

from engine.hl7v2.tree import TreeError, build_tree  # noqa: E402

CORPUS = ROOT.parent / "shared" / "corpus" / "hl7"
HEAD = (
    "MSH|^~\\&|EHR|CLINIC|REFLOOP|CLINIC|20260101090000||REF^I12^REF_I12|C1|P|2.5.1\r"
    "RF1|A^Accepted^HL70283|R^Routine^HL70280|Med||O|REF-1^CLINIC|20260101|||^Chest pain\r"
    "PID|1||MRN1^^^CLINIC^MR||Doe^Jane||19700101|F\r"
)


def obx(n: int) -> str:
    return HEAD + "".join(
        f"OBX|{i}|CE|8867-4^Heart rate^LN||{60 + i % 40}^bpm^L|||N|||F\r" for i in range(1, n + 1)
    )


def timed(text: str, runs: int) -> tuple[float, float, int, float]:
    """(median, p90 of build_tree, segments, median of python-hl7's parse alone)."""
    tree = build_tree(text)  # warm-up
    # python-hl7's input as build_tree hands it over: no BOM, CR segment ends
    lines = re.split(r"\r\n|\r|\n", text.lstrip("\ufeff \t\r\n"))
    plain = "\r".join(line for line in lines if line.strip())
    samples, parse = [], []
    for _ in range(runs):
        start = time.perf_counter()
        build_tree(text)
        samples.append(time.perf_counter() - start)
        start = time.perf_counter()
        hl7.parse(plain)
        parse.append(time.perf_counter() - start)
    samples.sort()
    p90 = samples[int(0.9 * (len(samples) - 1))]
    return statistics.median(samples), p90, len(tree), statistics.median(parse)


def main(runs: int) -> None:
    rows: list[tuple[str, int, int, float, float, float]] = []
    corpus = []
    for path in sorted(CORPUS.rglob("*.hl7")):
        text = path.read_bytes().decode("utf-8", errors="replace")
        if text.lstrip("\ufeff \r\n").startswith("MSH"):
            corpus.append((path.name, text))
    for name, text in corpus:
        try:
            median, p90, segments, parse = timed(text, runs)
        except TreeError:
            continue
        rows.append((f"corpus {name}", len(text), segments, median, p90, parse))
    for n in (10, 100, 1000):
        text = obx(n)
        median, p90, segments, parse = timed(text, runs)
        rows.append((f"REF^I12 + {n} OBX", len(text), segments, median, p90, parse))
    print(f"build_tree, {runs} runs each (median, p90 per call)\n")
    print("| message | bytes | segments | median ms | p90 ms | python-hl7 parse alone, median ms |")
    print("|---|---:|---:|---:|---:|---:|")
    shown = [r for r in rows if not r[0].startswith("corpus")]
    corpus_rows = [r for r in rows if r[0].startswith("corpus")]
    if corpus_rows:
        med = statistics.median(r[3] for r in corpus_rows)
        worst = max(corpus_rows, key=lambda r: r[3])
        parse = statistics.median(r[5] for r in corpus_rows)
        print(f"| corpus: {len(corpus_rows)} messages, median of medians | - | - | "
              f"{med * 1000:.3f} | - | {parse * 1000:.3f} |")  # fmt: skip
        name, size, segments, median, p90, parse = worst
        print(f"| corpus slowest: {name[7:]} | {size} | {segments} | {median * 1000:.3f} | "
              f"{p90 * 1000:.3f} | {parse * 1000:.3f} |")  # fmt: skip
    for name, size, segments, median, p90, parse in shown:
        print(f"| {name} | {size} | {segments} | {median * 1000:.3f} | {p90 * 1000:.3f} | "
              f"{parse * 1000:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 50)
