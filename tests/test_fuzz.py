"""bench/fuzz.py in a short run: mutated frames through the live daemon (``refloop run``
on loopback) while a probe keeps sending. Asserts the invariants, never the timings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import REPO


def test_fuzz_short_run_keeps_every_invariant(tmp_path: Path) -> None:
    out = tmp_path / "fuzz.json"
    proc = subprocess.run(
        [sys.executable, "bench/fuzz.py", "--frames", "2000", "--seed", "7", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        timeout=600,
        check=False,
    )
    assert out.exists(), proc.stdout.decode() + proc.stderr.decode()
    figures = json.loads(out.read_text())
    assert figures["frames_tried"] == 2000
    assert figures["daemon_exits"] == 0
    assert figures["closed_without_answer_with_msh10"] == 0, figures
    assert figures["answered_not_stored"] == 0, figures
    assert figures["probe_acks"] > 0
    # every frame got an answer or was closed for cause (no frame left hanging)
    assert figures["answers"].get("timeout", 0) == 0, figures
    assert proc.returncode == 0, proc.stdout.decode()
