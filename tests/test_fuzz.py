"""bench/fuzz.py in its CI mode: 20,000 mutated frames through the live daemon
(``refloop run`` on loopback) while a probe keeps sending. Asserts the invariants, never
the timings: about 22 s on a quiet 2-core box (docs/performance.md, run C's rate), two
minutes on one shared with other work; the script prints the figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

FRAMES = 20_000


@pytest.mark.slow
@pytest.mark.harness
def test_fuzz_short_run_keeps_every_invariant(tmp_path: Path) -> None:
    out = tmp_path / "fuzz.json"
    proc = subprocess.run(
        [sys.executable, "bench/fuzz.py", "--frames", str(FRAMES), "--seed", "7",
         "--huge-max", "262144", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        timeout=900,
        check=False,
    )  # fmt: skip
    assert out.exists(), proc.stdout.decode() + proc.stderr.decode()
    printed = proc.stdout.decode()
    for figure in ("frames_tried", "daemon_exits", "answers", "rss_kb_before", "rss_kb_after",
                   "probe_p99_ms", "answered_not_stored"):  # fmt: skip
        assert figure in printed, figure
    figures = json.loads(out.read_text())
    assert figures["frames_tried"] == FRAMES
    assert figures["daemon_exits"] == 0
    assert figures["closed_without_answer_with_msh10"] == 0, figures
    assert figures["answered_not_stored"] == 0, figures
    assert figures["answered_could_not_store"] == 0, figures
    assert figures["probe_acks"] > 0
    assert sum(figures["answers"].values()) == FRAMES
    # every frame got an answer or was closed for cause (no frame left hanging)
    assert figures["answers"].get("timeout", 0) == 0, figures
    assert proc.returncode == 0, printed
