"""bench/soak.py and bench/kill9.py in their short CI modes, against the real daemon.
They assert their own invariants (exit 1 when one fails); these tests check the exit
status and what the JSON says, never the timings."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from helpers import REPO


def bench(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, timeout=timeout, check=False
    )


@pytest.mark.slow
@pytest.mark.harness
def test_soak_short_run_stays_flat(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    proc = bench("bench/soak.py", "--seconds", "30", "--interval", "3", "--json", str(out))
    printed = proc.stdout.decode()
    assert out.exists(), printed + proc.stderr.decode()
    result = json.loads(out.read_text())
    assert len(result["samples"]) >= 6, result
    for column in ("rss", "fds", "wal", "lag", "outbox", "timers", "p99"):
        assert column in printed, column
    assert "verdict: flat" in printed, printed
    assert result["alive"] and result["not_aa"] == 0 and result["acked"] == result["sent"]
    assert result["posts"] > 0  # timers fired and the outbox delivered to the sink
    assert max(s["timers"] for s in result["samples"]) > 0
    assert proc.returncode == 0, printed


@pytest.mark.slow
@pytest.mark.harness
def test_kill9_short_run_loses_nothing(tmp_path: Path) -> None:
    out = tmp_path / "kill9.json"
    proc = bench(
        "bench/kill9.py", "--trials", "3", "--messages", "1500", "--seed", "5", "--json", str(out)
    )  # --target mix: the listener, the worker, both (issue 18)
    printed = proc.stdout.decode()
    assert out.exists(), printed + proc.stderr.decode()
    result = json.loads(out.read_text())
    assert len(result["trials"]) == 3
    for trial in result["trials"]:
        assert trial["acked"] > 0
        assert trial["acked_lost"] == 0, trial
        assert trial["duplicate_rows"] == 0, trial
        assert trial["bytes_differ"] == 0, trial
        assert trial["integrity"] == "ok", trial
        assert trial["audit"].startswith("audit log ok"), trial
    assert [t["killed"] for t in result["trials"]] == ["listener", "worker", "both"]
    assert result["every_message_once"] and result["messages"] == 4500
    assert result["processed_once"], printed  # one referral event per message
    assert result["same_end_state"], printed  # as a run of the same messages without kills
    assert "verdict: ok" in printed
    assert proc.returncode == 0, printed


# -- the harnesses' checks, on planted faults ----------------------------------------------


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_the_soak_verdict_sees_growth() -> None:
    soak = _load("soak")

    def samples(rss: list[int], fds: int = 20, lag: float = 0.0) -> list[object]:
        return [
            soak.Sample(
                t=i,
                rss_kb=r,
                fds=fds,
                wal_bytes=4 << 20,
                lag=lag,
                outbox=0.0,
                timers=100.0,
                acks=100,
                p99_ms=5.0,
                posts=i,
            )
            for i, r in enumerate(rss)
        ]

    flat, _ = soak.verdict(samples([100_000] * 9), rate=10)
    assert flat
    leaking, lines = soak.verdict(samples([100_000 + 20_000 * i for i in range(9)]), rate=10)
    assert not leaking
    assert any(line.startswith("rss_kb") and "GROWING" in line for line in lines)
    lagging = samples([100_000] * 9)
    for i, s in enumerate(lagging):
        s.lag = 50.0 * i  # type: ignore[attr-defined]
    assert not soak.verdict(lagging, rate=10)[0]
    assert not soak.verdict(samples([100_000] * 2), rate=10)[0]  # too few samples


def test_the_kill9_accounting_sees_loss_duplicates_and_changed_bytes() -> None:
    kill9 = _load("kill9")
    sent = {"A": b"a", "B": b"b", "C": b"c"}
    assert kill9.account({"A", "B"}, sent, {"A": 1, "B": 1, "C": 1}, sent) == (0, 0, 0)
    assert kill9.account({"A", "B"}, sent, {"A": 1}, {"A": b"a"}) == (1, 0, 0)
    assert kill9.account({"A"}, sent, {"A": 2}, {"A": b"a"}) == (0, 1, 0)
    assert kill9.account({"A"}, sent, {"A": 1}, {"A": b"x"}) == (0, 0, 1)
