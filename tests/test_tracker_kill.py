"""Kill -9 while a stream of events is applied, restart, finish: the database ends
exactly as a run without the kill (no half-applied event, no lost event, no event applied
twice), audit chain included.

The child applies each event in its own transaction together with its position in the
stream (as the processor does with its cursor), so a restart resumes after the last
committed event. Run as ``python tests/test_tracker_kill.py DB`` it is that child.
"""

from __future__ import annotations

import random
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

T0 = 1_767_225_600.0
DAY = 86400.0
CURSOR = "kill_test_cursor"
REPO = Path(__file__).resolve().parent.parent


def stream() -> list[Any]:
    """A deterministic stream: 15 referrals' messages interleaved, with events before
    their referral, repeats of the same message, a merge, and events that match nothing."""
    from engine.model import (
        AppointmentBooked,
        Identifiers,
        NoShow,
        PatientsMerged,
        Provider,
        ReferralCancelled,
        ReferralCreated,
        ReportReceived,
        SpecialistAccepted,
        SpecialistDeclined,
    )

    rnd = random.Random(20260101)
    per_referral: list[list[Any]] = []
    msg = 0

    def next_id() -> int:
        nonlocal msg
        msg += 1
        return msg

    for k in range(15):
        placer = Identifiers(sending_facility="EPIC", placer_number=f"R{k}")
        filler = Identifiers(filler_numbers=(f"F{k}",))
        at = T0 + k * DAY
        events: list[Any] = [
            ReferralCreated(
                ids=Identifiers(
                    sending_facility="EPIC",
                    placer_number=f"R{k}",
                    patient_ids=(f"P{k}^^^MRN",),
                ),
                occurred_at=at,
                message_id=next_id(),
                specialty="cardiology",
                specialist=Provider(fax="+15550100"),
                prior_auth_required=k % 5 == 0,
                prior_auth_hold_packet=k % 5 == 0,
            ),
            SpecialistAccepted(
                ids=Identifiers(
                    sending_facility="EPIC", placer_number=f"R{k}", filler_numbers=(f"F{k}",)
                ),
                occurred_at=at + 1 * DAY,
                message_id=next_id(),
            ),
            AppointmentBooked(
                ids=filler, occurred_at=at + 2 * DAY, message_id=next_id(), appointment_id="A1"
            ),
        ]
        if k % 4 == 1:
            events.append(
                NoShow(
                    ids=placer, occurred_at=at + 9 * DAY, message_id=next_id(), appointment_id="A1"
                )
            )
            events.append(
                AppointmentBooked(
                    ids=placer, occurred_at=at + 12 * DAY, message_id=next_id(), appointment_id="A2"
                )
            )
        if k % 4 == 2:
            events.append(
                ReferralCancelled(ids=placer, occurred_at=at + 3 * DAY, message_id=next_id())
            )
        if k % 4 == 3:
            events.append(
                SpecialistDeclined(
                    ids=placer, occurred_at=at + 3 * DAY, message_id=next_id(), reason="x"
                )
            )
        events.append(
            ReportReceived(
                ids=filler, occurred_at=at + 30 * DAY, message_id=next_id(), report_id="D"
            )
        )
        if k % 3 == 0:
            events.insert(0, events.pop())  # the report arrives first: parked, then linked
        if k % 2 == 0:
            events.append(events[rnd.randrange(len(events))])  # the same message again
        per_referral.append(events)

    out: list[Any] = []
    while any(per_referral):
        queue = rnd.choice([q for q in per_referral if q])
        out.append(queue.pop(0))
    out.insert(len(out) // 2, PatientsMerged(ids=Identifiers(), occurred_at=T0 + 5 * DAY,
                                             message_id=next_id(), surviving_id="P99^^^MRN",
                                             retired_id="P4^^^MRN"))  # fmt: skip
    out.append(ReportReceived(ids=Identifiers(filler_numbers=("nobody",)), occurred_at=T0,
                              message_id=next_id(), report_id="orphan"))  # fmt: skip
    return out


def child(path: str) -> None:
    from engine.clock import VirtualClock
    from engine.store.db import open_database
    from engine.tracking.tracker import Tracker

    events = stream()
    db = open_database(path)
    clock = VirtualClock(T0)
    tracker = Tracker(db, clock)
    start = int(db.get_meta(CURSOR, "0") or 0)
    for i in range(start, len(events)):
        clock.set(max(clock.now(), T0 + i * 60.0))  # a function of the position only
        with db.transaction() as conn:
            tracker.apply(events[i], conn)
            db.set_meta(CURSOR, str(i + 1))
        print(i + 1, flush=True)
    db.close()


def _dump(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    conn = sqlite3.connect(path)
    try:
        tables = [
            str(r[0])
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        ]
        return {t: conn.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in tables}
    finally:
        conn.close()


def _start(path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


def test_kill_9_mid_stream_then_restart_equals_a_clean_run(tmp_path: Path) -> None:
    clean = tmp_path / "clean.db"
    proc = _start(clean)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    total = len(out.split())
    assert total == len(stream())

    killed = tmp_path / "killed.db"
    rnd = random.Random(9)
    kills = 0
    for _ in range(200):  # bounded: each round makes progress or finishes
        proc = _start(killed)
        assert proc.stdout is not None
        target = rnd.randint(1, 20)
        seen = 0
        for _line in proc.stdout:
            seen += 1
            if seen >= target:
                break
        if proc.poll() is None and seen >= target:
            proc.kill()  # SIGKILL: no cleanup, no rollback, mid-transaction or not
            kills += 1
        proc.stdout.close()
        proc.wait(timeout=60)
        if proc.returncode == 0:
            break
    else:
        raise AssertionError("the stream never finished")
    assert kills >= 3

    assert _dump(killed) == _dump(clean)

    from engine.store import audit as audit_store
    from engine.store.db import open_database

    db = open_database(killed, readonly=True)
    try:
        assert audit_store.verify(db.conn).ok
    finally:
        db.close()


if __name__ == "__main__":
    child(sys.argv[1])
