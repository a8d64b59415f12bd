"""Each referral state's escalation timeline, as data: tests/scenarios/*.yaml, played by
the real executable (``refloop simulate FILE --json``), checked against the file's
``expect:`` block.

The expected times in those files are computed by hand from the documented rules
(docs/escalation.md: not-booked steps from the opening or the no-show, the report request
3 days after the visit and again 7 days later, the task 7 days after that; the packet
resent 7 days after the referral and the call-office task 7 days after the resend), not
read from a run. The ``expect:`` block belongs to this test; it is stripped before the
scenario goes to the simulator, whose format (docs/simulator.md) does not know it.

Per referral (by placer): ``status``, ``close_reason``; ``tasks`` — how many rows went to
the coordinator channels (``task``, ``coordinator``); ``absent`` — timeline events that
must not appear; ``sequence`` — events (``event``, optional ``by`` and ``at``, minute
precision UTC) that must appear in this order; ``first_before`` — {a: b}: event ``b``
comes before the first ``a``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import refloop

SCENARIOS = Path(__file__).resolve().parent / "scenarios"
FILES = sorted(SCENARIOS.glob("*.yaml"))
TASK_CHANNELS = ("task", "coordinator")


def play(path: Path, tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the JSON result of ``refloop simulate``, the file's expectations)."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    expect = data.pop("expect")
    scenario = tmp_path / path.name
    scenario.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    done = refloop("simulate", str(scenario), "--json", timeout=300)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    return json.loads(done.stdout), expect


def matches(event: dict[str, Any], want: dict[str, Any]) -> bool:
    return all(str(event[k]) == str(v) for k, v in want.items())


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_scenario_timeline(path: Path, tmp_path: Path) -> None:
    result, expect = play(path, tmp_path)
    by_placer = {r["placer"]: r for r in result["referrals"]}
    for placer, want in expect.items():
        r = by_placer[placer]
        timeline = r["timeline"]
        names = [e["event"] for e in timeline]
        if "status" in want:
            assert r["status"] == want["status"], (placer, names)
        if "close_reason" in want:
            assert r["close_reason"] == want["close_reason"], placer
        if "tasks" in want:
            tasks = [
                (e["at"], e["event"])
                for e in timeline
                if e["event"].startswith("out:") and e["by"] in TASK_CHANNELS
            ]
            assert len(tasks) == want["tasks"], (placer, tasks)
        for name in want.get("absent", ()):
            assert name not in names, (placer, name, timeline)
        position = 0
        for step in want.get("sequence", ()):
            step = {k: str(v) for k, v in step.items()}
            found = next(
                (i for i in range(position, len(timeline)) if matches(timeline[i], step)), None
            )
            assert found is not None, (placer, step, timeline)
            position = found + 1
        for later, earlier in (want.get("first_before") or {}).items():
            assert later in names and earlier in names, (placer, later, earlier)
            assert names.index(earlier) < names.index(later), (placer, timeline)
