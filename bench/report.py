"""The closure report at scale: 1,000,000 referrals.

Builds a real SQLite file (all migrations, so the report's table and its triggers too) with
``--n`` referrals, written in the order the engine writes them (referral, patient ids,
events, then nudges marked sent), so the triggers fill ``report_referrals`` as they do in
production, and times :func:`engine.tracking.report.closure_report` on it.

The population, deterministic for a seed:

- ``--n`` referrals (default 1,000,000) for ``0.6 n`` patients (so many patients have
  several referrals), opened uniformly over ``--years`` calendar years ending with 2025
  (default 1: every referral falls in the reported year, the worst case for the report);
- one ``referral-created`` event each; 75 % get a final report 1–180 days later (some
  after the period, some never arrive before "now"), 2 % of those an earlier preliminary
  one too; closed ones are ``closed``, 10 % of the rest closed ``no-response``;
- 70 % got a patient nudge (sms / portal / voice, status ``sent``); for 1 in 7 of those the
  first one died and the portal took over;
- 40 specialties, 2,000 specialists, 500 referrers.

It then times, for the calendar year 2025 (the Jan 1 – Oct 31 rule applies), the report
with no grouping and with each ``--by``: the best of ``--repeat`` runs, and prints a
table. The database is cached in the temp folder by size, years and seed (``--fresh`` to
rebuild).

Run: ``.venv/bin/python bench/report.py`` (a few minutes the first time).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from datetime import UTC, date, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.store import open_database
from engine.store.db import Database
from engine.tracking import states
from engine.tracking.report import closure_ratios, closure_report

DAY = 86_400.0
NOW = datetime(2026, 3, 1, tzinfo=UTC).timestamp()


def populate(db: Database, n: int, years: int, seed: int) -> None:
    rnd = random.Random(seed)
    patients = max(1, int(n * 0.6))
    hi = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
    lo = datetime(2026 - years, 1, 1, tzinfo=UTC).timestamp()
    state = json.dumps(states.to_dict(states.INITIAL))
    refs: list[tuple[object, ...]] = []
    pats: list[tuple[object, ...]] = []
    events: list[tuple[object, ...]] = []
    outbox: list[tuple[object, ...]] = []
    # Ids follow arrival, as in the engine (a referral row is created when its order
    # arrives); 3 % arrive late (backfilled up to 30 days after they were ordered).
    arrivals = sorted(lo + rnd.random() * (hi - lo) for _ in range(n))
    for i, arrived in enumerate(arrivals, start=1):
        opened = arrived - rnd.random() * 30 * DAY if rnd.random() < 0.03 else arrived
        opened = max(lo, opened)
        status, close_reason, closed_at = "open", "", None
        events.append((i, "referral-created", f"c{i}", opened, "{}", "open", "not-sent"))
        roll = rnd.random()
        if roll < 0.75:
            reported = opened + DAY + rnd.random() * 179 * DAY
            if rnd.random() < 0.02:
                prelim = opened + 0.5 * (reported - opened)
                detail = json.dumps({"report_id": f"R{i}", "status": "preliminary"})
                events.append((i, "report-received", f"p{i}", prelim, detail, "open", "not-sent"))
            if reported <= NOW:
                status, close_reason, closed_at = "closed", "report-received", reported
                detail = json.dumps({"report_id": f"R{i}", "status": "final"})
                events.append(
                    (i, "report-received", f"r{i}", reported, detail, "closed", "report-received")
                )
        elif roll < 0.775:
            status, close_reason, closed_at = "closed", "no-response", opened + 60 * DAY
        nudge = rnd.random()
        if nudge < 0.7:
            channel = ("sms", "portal", "voice")[rnd.randrange(3)]
            status_n1 = "dead" if nudge < 0.1 else "sent"
            outbox.append((i, channel, "first_nudge", f"{i}:n1", opened + DAY, status_n1))
            if nudge < 0.1:
                outbox.append((i, "portal", "first_nudge", f"{i}:n1:next", opened + DAY, "sent"))
        refs.append(
            (
                i,
                "BENCH",
                f"P{i}",
                state,
                status,
                "not-contacted",
                "not-sent",
                close_reason,
                f"specialty-{rnd.randrange(40):02d}",
                f"{1_000_000_000 + rnd.randrange(2000)}",
                f"{1_500_000_000 + rnd.randrange(500)}",
                opened,
                opened,
                closed_at,
            )
        )
        pats.append((i, f"MRN{rnd.randrange(patients):07d}^^^BENCH"))
    with db.transaction(durable=False) as conn:
        conn.executemany(
            "INSERT INTO referrals (id, sending_facility, placer_number, state, status, "
            "patient_status, specialist_status, close_reason, specialty, specialist_npi, "
            "referring_npi, opened_at, updated_at, closed_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            refs,
        )
        conn.executemany(
            "INSERT INTO referral_patients (referral_id, patient_id) VALUES (?, ?)", pats
        )
        conn.executemany(
            "INSERT INTO referral_events (referral_id, kind, fingerprint, source, actor, "
            "occurred_at, recorded_at, changed, detail, status, patient_status, "
            "specialist_status) VALUES (?, ?, ?, 'message', 'message', ?, ?4, 1, ?, ?, "
            "'not-contacted', ?)",
            events,
        )
        conn.executemany(
            "INSERT INTO outbox (referral_id, channel, template, idempotency_key, due, status, "
            "created_at, updated_at) VALUES (?, ?, ?, ?, ?5, "
            "CASE ? WHEN 'sent' THEN 'sending' ELSE 'dead' END, ?5, ?5)",
            outbox,
        )
        # as the dispatcher records a send (the report's nudge trigger fires on it)
        conn.execute("UPDATE outbox SET status = 'sent', sent_at = due WHERE status = 'sending'")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--years", type=int, default=1)
    ap.add_argument("--seed", type=int, default=374)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--fresh", action="store_true", help="Rebuild the cached database.")
    args = ap.parse_args()

    path = (
        Path(tempfile.gettempdir()) / f"refloop-bench-report-{args.n}-{args.years}-{args.seed}.db"
    )
    if args.fresh or not path.exists():
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        t0 = time.perf_counter()
        db = open_database(path, synchronous="normal")
        populate(db, args.n, args.years, args.seed)
        db.close()
        print(f"built {path} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    db = open_database(path, synchronous="normal")
    try:
        print(f"closure report, calendar year 2025, {args.n:,} referrals over {args.years} year(s)")
        print(
            f"{'by':<12} {'groups':>6} {'denominator':>11} {'numerator':>9} {'rate':>6} "
            f"{'median d':>8} {'p90 d':>6} {'best s':>7}"
        )
        worst = 0.0
        for by in (None, "specialty", "specialist", "referrer", "month"):
            best = float("inf")
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                r = closure_report(db.conn, date(2025, 1, 1), date(2025, 12, 31), by=by, now=NOW)
                best = min(best, time.perf_counter() - t0)
            worst = max(worst, best)
            t = r.total
            print(
                f"{by or '-':<12} {len(r.groups):>6} {t.denominator:>11,} {t.numerator:>9,} "
                f"{(t.rate or 0) * 100:>5.1f}% {t.median_days or 0:>8.2f} {t.p90_days or 0:>6.2f} "
                f"{best:>7.3f}"
            )
        print(f"slowest report: {worst:.3f} s (target <= 1 s)")
        t0 = time.perf_counter()
        ratios = closure_ratios(db.conn, NOW)
        shown = ", ".join(f"{k} {v:.3f}" for k, v in ratios.items() if v is not None)
        print(f"closure ratio gauge ({shown}): {time.perf_counter() - t0:.3f} s")
    finally:
        db.close()


if __name__ == "__main__":
    main()
