"""Finding a referral at scale: the worklist's search box and pages over 1,000,000 referrals.

Builds a real SQLite file (all migrations: the patient columns and the search indexes of
engine.store.referral_search) with ``--n`` referrals: a placer number each, a filler
number for half of them, a PID-3 id, a patient (MRN, family and given name from 3,000 and
400 made-up names, some with accents, a birth date), one of 40 specialties and 2,000
specialists, opened over five years; 95 % closed, the rest open (routine, urgent, stat).

It then times :meth:`engine.web.service.Service.worklist_page` (what ``/ui/worklist``,
``/api/referrals`` and, through the same store query, ``refloop referrals list`` run: the
count, the page of 50, its position, the rows and the patients) for each kind of search
and page: the best of ``--repeat`` runs, in milliseconds, printed as a table. The database
is cached in the temp folder by size and seed (``--fresh`` to rebuild).

Run: ``.venv/bin/python bench/search.py`` (a few minutes the first time).
"""

from __future__ import annotations

import argparse
import json
import random
import string
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.clock import VirtualClock
from engine.store import open_database
from engine.store.db import Database
from engine.store.referral_search import normalise
from engine.tracking import states
from engine.web.service import Service

DAY = 86_400.0
NOW = datetime(2026, 3, 1, tzinfo=UTC).timestamp()
SPECIALTIES = (
    "Allergy",
    "Anesthesiology",
    "Audiology",
    "Bariatrics",
    "Cardiology",
    "Cardiac Surgery",
    "Colorectal Surgery",
    "Dermatology",
    "Endocrinology",
    "ENT",
    "Gastroenterology",
    "General Surgery",
    "Genetics",
    "Geriatrics",
    "Gynecology",
    "Hematology",
    "Hepatology",
    "Infectious Disease",
    "Internal Medicine",
    "Nephrology",
    "Neurology",
    "Neurosurgery",
    "Nutrition",
    "Obstetrics",
    "Oncology",
    "Ophthalmology",
    "Orthopedics",
    "Pain Medicine",
    "Palliative Care",
    "Physical Therapy",
    "Plastic Surgery",
    "Podiatry",
    "Psychiatry",
    "Psychology",
    "Pulmonology",
    "Radiation Oncology",
    "Rheumatology",
    "Sleep Medicine",
    "Sports Medicine",
    "Urology",
)  # 40
ACCENTED = ("Müller", "Núñez", "Øster", "Åberg", "Çelik", "Dvořák", "Łukasz", "Ébène")


def names(rnd: random.Random, count: int, extra: tuple[str, ...] = ()) -> list[str]:
    out = list(extra)
    while len(out) < count:
        n = rnd.randint(4, 9)
        out.append(rnd.choice(string.ascii_uppercase) + "".join(
            rnd.choice("aeiouy" if i % 2 else "bcdfghklmnprstvwz") for i in range(n - 1)
        ))  # fmt: skip
    return out


def populate(db: Database, n: int, seed: int) -> dict[str, Any]:
    rnd = random.Random(seed)
    families = names(rnd, 3000, ACCENTED)
    givens = names(rnd, 400)
    specialties = SPECIALTIES
    specialists = [(f"{rnd.choice(givens)} {rnd.choice(families)}", f"{1000000000 + i}")
                   for i in range(2000)]  # fmt: skip
    state = json.dumps(states.to_dict(states.INITIAL))
    lo = NOW - 5 * 365 * DAY
    refs, fillers, pids = [], [], []
    for i in range(1, n + 1):
        opened = lo + (NOW - lo) * i / (n + 1)
        closed = rnd.random() < 0.95 and opened < NOW - 10 * DAY
        family, given = rnd.choice(families), rnd.choice(givens)
        year = rnd.randint(1930, 2020)
        sname, snpi = rnd.choice(specialists)
        refs.append((
            i, "CLINIC", f"P{i:08d}", state, "closed" if closed else "open", "waiting", "waiting",
            "report-received" if closed else "", rnd.choice(specialties),
            rnd.choice(("routine",) * 8 + ("urgent", "stat")), sname, snpi,
            opened, opened, opened + 20 * DAY if closed else None,
            f"M{i:08d}", family, given, f"{year}-{rnd.randint(1, 12):02d}-{rnd.randint(1, 28):02d}",
            normalise(family), normalise(given),
        ))  # fmt: skip
        if i % 2 == 0:
            fillers.append((i, f"F{i:08d}"))
        pids.append((i, f"M{i:08d}^^^CLINIC^MR"))
    with db.transaction() as conn:
        conn.executemany(
            "INSERT INTO referrals (id, sending_facility, placer_number, state, status, "
            "patient_status, specialist_status, close_reason, specialty, priority, "
            "specialist_name, specialist_npi, opened_at, updated_at, closed_at, patient_mrn, "
            "patient_family, patient_given, patient_birth_date, patient_family_key, "
            "patient_given_key) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            refs,
        )
        conn.executemany(
            "INSERT INTO referral_fillers (referral_id, filler_number) VALUES (?, ?)", fillers
        )
        conn.executemany(
            "INSERT INTO referral_patients (referral_id, patient_id) VALUES (?, ?)", pids
        )
    mid = refs[n // 2]
    return {
        "placer": mid[2], "filler": f"F{(n // 2) & ~1:08d}", "mrn": mid[15],
        "family": mid[16], "given": mid[17], "birth": mid[18], "specialty": mid[8],
        "specialist": mid[10],
    }  # fmt: skip


def timed(svc: Service, repeat: int, **kw: Any) -> tuple[float, int]:
    best, total = float("inf"), 0
    for _ in range(repeat):
        t = time.perf_counter()
        page = svc.worklist_page(None, via="bench", **kw)
        best = min(best, (time.perf_counter() - t) * 1000)
        total = int(page["total"])
    return best, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=19)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--fresh", action="store_true")
    args = ap.parse_args()
    path = Path(tempfile.gettempdir()) / f"refloop-bench-search-{args.n}-{args.seed}.db"
    keys_path = path.with_suffix(".json")
    if args.fresh or not path.exists() or not keys_path.exists():
        for p in (path, keys_path):
            p.unlink(missing_ok=True)
        db = open_database(path, synchronous="off")
        t = time.perf_counter()
        keys = populate(db, args.n, args.seed)
        db.close()
        keys_path.write_text(json.dumps(keys))
        print(f"built {args.n:,} referrals in {time.perf_counter() - t:.0f} s: {path}")
    keys = json.loads(keys_path.read_text())
    db = open_database(path)
    svc = Service(db, VirtualClock(NOW))
    last = int(db.conn.execute("SELECT max(id) FROM referrals").fetchone()[0])
    cases: list[tuple[str, dict[str, Any]]] = [
        ("search: placer number", {"q": keys["placer"]}),
        ("search: filler number", {"q": keys["filler"]}),
        ("search: MRN", {"q": keys["mrn"]}),
        ("search: family name (full)", {"q": keys["family"]}),
        ("search: family name, 3 letters", {"q": keys["family"][:3]}),
        ("search: family + given prefix", {"q": f"{keys['family']} {keys['given'][:2]}"}),
        ("search: accented name, typed plain", {"q": "muller"}),
        ("search: birth date", {"q": keys["birth"]}),
        ("search: name + birth date", {"q": f"{keys['family']} {keys['birth']}"}),
        ("search: specialist (phrase)", {"q": keys["specialist"]}),
        ("search: specialty, open only", {"q": keys["specialty"], "open_only": True}),
        ("worklist: open, priority order", {"open_only": True}),
        ("worklist: open, next page", {"open_only": True, "after": last // 2}),
        ("worklist: overdue", {"open_only": True, "overdue": True}),
        ("worklist: all, newest first", {"sort": "-opened"}),
        ("worklist: all, page after", {"sort": "-opened", "after": last // 2}),
        ("worklist: all, by patient", {"sort": "patient"}),
        ("worklist: all, priority order", {}),
    ]
    print(f"\n{args.n:,} referrals, best of {args.repeat}; each row is one page of 50 with its "
          "total and position\n")  # fmt: skip
    print(f"| {'what':<36} | {'matches':>9} | {'ms':>8} |")
    print(f"|{'-' * 38}|{'-' * 11}|{'-' * 10}|")
    for label, kw in cases:
        ms, total = timed(svc, args.repeat, limit=50, **kw)
        print(f"| {label:<36} | {total:>9,} | {ms:>8.1f} |")
    db.close()


if __name__ == "__main__":
    main()
