"""Retention benchmark: a database grown to N messages, most of them past their period,
pruned by the daemon's own pruner while its MLLP listener takes a steady stream.

What is measured
    1. A fresh database file (made by refloop, so ``auto_vacuum=INCREMENTAL``) is filled
       with N processed messages of about ``--size`` bytes (an ADT^A08 padded with NTE
       segments, each with its own MSH-10 and its real SHA-256): the oldest ``--due``
       share received 31 to 400 days ago, the rest in the last 29 days, all ``filtered``
       (no referral), so with ``unreferred_days: 30`` exactly the old share is due.
    2. The real engine (engine.app.Engine: listener, inbox writer, processor, pruner; no
       routes) starts on that file. A load client in its own process sends ``--rate``
       messages/s over ``--conns`` MLLP connections (each waits for its ACK) from the
       start to the end. The pruner's first run starts ``--baseline`` seconds in; the
       run prunes, then returns the free pages (``incremental_vacuum``).
    3. Reported: the file (plus WAL, after a checkpoint) before and after, rows and bytes
       pruned, how long pruning and vacuuming took, and the ACK latency (p50, p99, max)
       of the messages sent before the run, during pruning, during vacuuming and after.

Run (from the repo root)::

    .venv/bin/python bench/prune.py                       # 50,000 messages, ~1-2 min
    .venv/bin/python bench/prune.py --messages 1000000    # the 1M of issue 20
    .venv/bin/python bench/prune.py --json /tmp/prune.json

The table goes to stdout, progress to stderr. Exit 1 when the client saw errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Final

REPO: Final = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

HOST: Final = "127.0.0.1"
DAY: Final = 86400.0
VT, FS_CR = b"\x0b", b"\x1c\r"  # MLLP framing, HL7 v2.5.1 Appendix C.4.3


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def message(control: str, size: int) -> bytes:
    """An ADT^A08 (HL7 v2.5.1) with MSH-10 ``control``, padded to about ``size`` bytes."""
    segments = [
        f"MSH|^~\\&|EHR|CLINIC|REFLOOP|HUB|20260105090000||ADT^A08^ADT_A01|{control}|P|2.5.1",
        "EVN|A08|20260105090000",
        "PID|1||MRN12345^^^CLINIC^MR||DOE^JANE^Q||19700101|F|||1 MAIN ST^^TOWN^ST^00000",
        "PV1|1|O|CLINIC^^^MAIN||||1234567890^SMITH^ANN",
    ]
    n = 1
    while sum(len(s) + 1 for s in segments) < size:
        segments.append(f"NTE|{n}||" + "note text " * 8)
        n += 1
    return ("\r".join(segments) + "\r").encode("ascii")


# -- 1. the database -----------------------------------------------------------------


def build(path: Path, n: int, due: float, size: int, now: float) -> None:
    from engine.store.db import open_database

    open_database(path).close()  # refloop's schema, auto_vacuum=INCREMENTAL
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")
    old = int(n * due)
    batch = 10_000
    for start in range(0, n, batch):
        conn.execute("BEGIN")
        for i in range(start, min(n, start + batch)):
            if i < old:  # 400 .. 31 days ago, oldest first
                at = now - 400 * DAY + (369 * DAY) * i / max(old, 1)
            else:  # the last 29 days
                at = now - 29 * DAY + (28 * DAY) * (i - old) / max(n - old, 1)
            raw = message(f"B{i:08d}", size)
            cur = conn.execute(
                "INSERT INTO messages (received_at, source, peer, sending_app, sending_facility,"
                " control_id, message_type, version, charset, sha256, status, ack_code,"
                " processed_at) VALUES (?, 'ehr', '127.0.0.1', 'EHR', 'CLINIC', ?, "
                "'ADT^A08', '2.5.1', 'ascii', ?, 'filtered', 'AA', ?)",
                (at, f"B{i:08d}", hashlib.sha256(raw).digest(), at),
            )
            conn.execute(
                "INSERT INTO message_raw (message_id, raw) VALUES (?, ?)", (cur.lastrowid, raw)
            )
        conn.execute("COMMIT")
        if start and start % 100_000 == 0:
            log(f"  {start:,} messages")
    conn.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('processed_cursor', ?)", (str(n),)
    )
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def file_size(path: Path) -> int:
    """The database plus its WAL, after a checkpoint (what the disk holds)."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return sum(os.path.getsize(p) for p in (path, Path(f"{path}-wal")) if p.exists())


# -- 2. the load client (its own process) ----------------------------------------------


async def _client(port: int, conns: int, rate: float, size: int) -> dict[str, Any]:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    threading.Thread(
        target=lambda: (sys.stdin.readline(), loop.call_soon_threadsafe(stop.set)), daemon=True
    ).start()
    samples: list[tuple[float, float]] = []
    errors = 0
    period = conns / rate

    async def one(k: int) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(HOST, port)
        seq = 0
        next_at = time.perf_counter() + period * k / conns
        while not stop.is_set():
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            next_at += period
            seq += 1
            control = f"L{k:02d}{seq:09d}"
            sent_wall, t0 = time.time(), time.perf_counter()
            writer.write(VT + message(control, size) + FS_CR)
            try:
                ack = await asyncio.wait_for(reader.readuntil(FS_CR), 30.0)
            except (TimeoutError, asyncio.IncompleteReadError):
                errors += 1
                return
            samples.append((sent_wall, (time.perf_counter() - t0) * 1000))
            if b"MSA|AA|" + control.encode() not in ack:
                errors += 1
        writer.close()

    await asyncio.gather(*(one(k) for k in range(conns)))
    return {"samples": samples, "errors": errors}


def client_main(port: int, conns: int, rate: float, size: int) -> None:
    print(json.dumps(asyncio.run(_client(port, conns, rate, size))), flush=True)


# -- 3. the engine and the run -----------------------------------------------------------


def _config(batch: int) -> Any:
    from engine.config import loads

    text = (
        "version: 1\n"
        "store: {file: refloop.db, synchronous: full}\n"
        "http: {enabled: false}\n"
        f"sources: {{ehr: {{type: mllp, host: {HOST}, port: 0}}}}\n"
        f"retention: {{unreferred_days: 30, batch: {batch}}}\n"
    )
    return loads(text, file="bench-prune.yaml", env={})


async def run_engine(state: Path, opts: argparse.Namespace) -> dict[str, Any]:
    from engine.app import Engine

    engine = Engine(_config(opts.batch), state, prune_first_run=opts.baseline, drain_seconds=5)
    await engine.start()
    pruner = engine.pruner
    assert pruner is not None
    marks: dict[str, float] = {}
    run_once, vacuum = pruner.run_once, pruner._vacuum

    async def timed_run(policy: Any) -> Any:
        marks["prune_start"] = time.time()
        tally = await run_once(policy)
        marks["end"] = time.time()
        marks["tally"] = tally  # type: ignore[assignment]
        return tally

    async def timed_vacuum() -> None:
        marks["vacuum_start"] = time.time()
        await vacuum()

    # how long each pruning / vacuum step holds the write lock, and each group commit takes
    from engine.store import inbox as inbox_mod
    from engine.store import retention

    holds: list[tuple[float, float]] = []
    vacuums: list[tuple[float, float]] = []
    commits: list[tuple[float, float]] = []

    def timed(fn: Any, into: list[tuple[float, float]]) -> Any:
        def wrapper(*args: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                into.append((time.time(), (time.perf_counter() - t0) * 1000))

        return wrapper

    retention.prune_step = timed(retention.prune_step, holds)  # type: ignore[assignment]
    retention.vacuum_step = timed(retention.vacuum_step, vacuums)  # type: ignore[assignment]
    inbox_mod.Inbox._commit = timed(inbox_mod.Inbox._commit, commits)  # type: ignore[method-assign]
    marks["holds"], marks["vacuums"] = holds, vacuums  # type: ignore[assignment]
    marks["commits"] = commits  # type: ignore[assignment]
    pruner.run_once = timed_run  # type: ignore[method-assign]
    pruner._vacuum = timed_vacuum  # type: ignore[method-assign]
    client = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--client",
        str(engine.ports()["ehr"]),
        "--conns",
        str(opts.conns),
        "--rate",
        str(opts.rate),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    log(f"engine up; pruning starts in {opts.baseline:.0f} s")
    while "end" not in marks:
        await asyncio.sleep(0.5)
    log(f"pruning done in {marks['end'] - marks['prune_start']:.1f} s; {opts.tail:.0f} s more load")
    await asyncio.sleep(opts.tail)
    assert client.stdin is not None
    out, _ = await client.communicate(b"stop\n")
    await engine.stop()
    result = json.loads(out)
    result["marks"] = marks
    return result


def _latency(samples: list[tuple[float, float]], lo: float, hi: float) -> dict[str, Any]:
    ms = sorted(lat for at, lat in samples if lo <= at < hi)
    if not ms:
        return {"acks": 0, "p50": None, "p99": None, "max": None}
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return {"acks": len(ms), "p50": statistics.median(ms), "p99": p99, "max": ms[-1]}


def _spread(ms: list[float]) -> dict[str, Any]:
    if not ms:
        return {"count": 0, "p50": None, "p99": None, "max": None}
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return {"count": len(ms), "p50": statistics.median(ms), "p99": p99, "max": ms[-1]}


def bench(opts: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="refloop-prune-") as tmp:
        state = Path(tmp)
        db = state / "refloop.db"
        now = time.time()
        log(f"building {opts.messages:,} messages of ~{opts.size} bytes ...")
        t0 = time.perf_counter()
        build(db, opts.messages, opts.due, opts.size, now)
        log(f"  built in {time.perf_counter() - t0:.0f} s")
        before = file_size(db)
        runner: Any = asyncio.run
        with contextlib.suppress(ImportError):
            import uvloop  # the daemon's loop when installed (refloop run)

            runner = uvloop.run
        result = runner(run_engine(state, opts))
        after = file_size(db)
    marks, samples = result["marks"], result["samples"]
    tally = marks["tally"]
    start = min((at for at, _ in samples), default=marks["prune_start"])
    phases = {
        "before pruning": _latency(samples, start + 1.0, marks["prune_start"]),
        "pruning": _latency(samples, marks["prune_start"], marks["vacuum_start"]),
        "vacuuming": _latency(samples, marks["vacuum_start"], marks["end"]),
        "after": _latency(samples, marks["end"], float("inf")),
    }
    holds = sorted(ms for _, ms in marks["holds"])
    vacuums = sorted(ms for _, ms in marks["vacuums"])
    commits = marks["commits"]
    commit_phases = {
        "before pruning": _latency(commits, start + 1.0, marks["prune_start"]),
        "while pruning or vacuuming": _latency(commits, marks["prune_start"], marks["end"]),
    }
    report = {
        "messages": opts.messages,
        "due": opts.due,
        "size_bytes": opts.size,
        "rate": opts.rate,
        "conns": opts.conns,
        "batch": opts.batch,
        "file_before": before,
        "file_after": after,
        "pruned_rows": tally.total_rows,
        "pruned_bytes": sum(tally.bytes.values()),
        "prune_s": marks["vacuum_start"] - marks["prune_start"],
        "vacuum_s": marks["end"] - marks["vacuum_start"],
        "ack_latency_ms": phases,
        "step_ms": {"prune": _spread(holds), "vacuum": _spread(vacuums)},
        "group_commit_ms": commit_phases,
        "client_errors": result["errors"],
    }
    mib = 1024 * 1024
    print(
        f"\n{opts.messages:,} messages of ~{opts.size} B, {opts.due:.0%} due; load "
        f"{opts.rate:g} msgs/s on {opts.conns} connections; batch {opts.batch}\n"
    )
    print("| file before | file after | rows pruned | MiB pruned | prune s | rows/s | vacuum s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    prune_s = max(report["prune_s"], 1e-9)
    print(
        f"| {before / mib:,.0f} MiB | {after / mib:,.0f} MiB | {tally.total_rows:,} | "
        f"{report['pruned_bytes'] / mib:,.0f} | {report['prune_s']:.1f} | "
        f"{tally.total_rows / prune_s:,.0f} | {report['vacuum_s']:.1f} |"
    )
    print("\n| ACKs sent | count | p50 ms | p99 ms | max ms |\n|---|---:|---:|---:|---:|")
    for name, p in phases.items():
        cells = [f"{p[k]:.2f}" if p[k] is not None else "-" for k in ("p50", "p99", "max")]
        print(f"| {name} | {p['acks']:,} | " + " | ".join(cells) + " |")
    print("\n| steps (write lock held) | count | p50 ms | p99 ms | max ms |")
    print("|---|---:|---:|---:|---:|")
    for name, p in report["step_ms"].items():
        cells = [f"{p[k]:.2f}" if p[k] is not None else "-" for k in ("p50", "p99", "max")]
        print(f"| {name} | {p['count']:,} | " + " | ".join(cells) + " |")
    print(
        "\n| group commits (fsync) | count | p50 ms | p99 ms | max ms |\n|---|---:|---:|---:|---:|"
    )
    for name, p in commit_phases.items():
        cells = [f"{p[k]:.2f}" if p[k] is not None else "-" for k in ("p50", "p99", "max")]
        print(f"| {name} | {p['acks']:,} | " + " | ".join(cells) + " |")
    print(f"\nclient errors: {result['errors']}")
    if opts.json:
        Path(opts.json).write_text(json.dumps(report, indent=1))
    return 1 if result["errors"] else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=50_000, help="messages in the file")
    p.add_argument("--due", type=float, default=0.9, help="share past its period (0.9)")
    p.add_argument("--size", type=int, default=1500, help="bytes per message (1500)")
    p.add_argument("--rate", type=float, default=200.0, help="live load, msgs/s (200)")
    p.add_argument("--conns", type=int, default=4, help="live load connections (4)")
    p.add_argument("--batch", type=int, default=200, help="retention.batch (200)")
    p.add_argument("--baseline", type=float, default=10.0, help="load before pruning, s")
    p.add_argument("--tail", type=float, default=5.0, help="load after pruning, s")
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--client", type=int, help=argparse.SUPPRESS)
    opts = p.parse_args()
    if opts.client:
        client_main(opts.client, opts.conns, opts.rate, opts.size)
        return 0
    return bench(opts)


if __name__ == "__main__":
    sys.exit(main())
