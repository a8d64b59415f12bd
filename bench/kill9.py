"""kill -9 under load: N trials against the real ``refloop run``, each checking that no
ACKed message was lost, none was stored twice, and the audit chain verifies.

``--target`` picks what each trial kills (issue 18: processing runs in a worker process
that the daemon supervises): ``listener`` (the daemon's own process: the worker stops by
itself when its socket closes), ``worker`` (the daemon keeps ACKing and starts a new
worker), ``both`` (the two at the same instant), or ``mix`` (the three in turn). At the
end, once processing has caught up, every message must have been processed exactly once
(one ``referral_events`` row per message) and the end state of every referral must equal
that of a run of the same messages without kills (``--no-reference`` skips that run).

What it does
    Starts ``refloop run`` (the repo's routes.yaml, so REF^I12 referrals are tracked and
    the audit log grows with them) on a fresh state directory. Each trial: 8 connections
    send unique REF^I12 messages, pipelined 4 deep; after a random number of ACKs
    (seeded) the daemon gets SIGKILL. Straight after the kill, before anything else opens
    the file, the database is read: every message ACKed AA must be there exactly once,
    with the bytes sent, ``PRAGMA integrity_check`` must say ok and ``refloop audit
    verify`` must pass. Then the daemon is restarted on the same state, everything sent
    but not ACKed in that trial is sent again (a resend of a stored message is a
    duplicate, ACKed and not stored again), and the next trial begins. At the end every
    message of every trial is stored exactly once.

Printed, one row per trial
    ACKed before the kill, stored, ACKed-lost (must be 0), duplicate rows (must be 0),
    integrity, audit (rows, ok), seconds to be ready again after the restart.

Run (from the repo root)::

    .venv/bin/python bench/kill9.py --trials 20
    .venv/bin/python bench/kill9.py --trials 3 --messages 1500 --json /tmp/kill9.json  # CI
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from engine.hl7v2.mllp import Framer, frame  # noqa: E402

HOST = "127.0.0.1"
CONNECTIONS = 8
WINDOW = 4  # frames in flight per connection


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def referral(trial: int, i: int, rng: random.Random) -> tuple[str, bytes]:
    cid = f"K9-{trial:03d}-{i:06d}"
    note = "".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789", k=rng.randint(10, 1500)))
    msg = (
        f"MSH|^~\\&|EHR|CLINIC|REFLOOP|CLINIC|20260101120000||REF^I12^REF_I12|{cid}|P|2.5.1\r"
        f"RF1|P^Pending|R^Routine||||{cid}^CLINIC\r"
        f"PID|1||MRN{trial:03d}{i:06d}^^^CLINIC^MR||DOE^JANE||19800101|F\r"
        "PRD|RT|SPECIALIST^SAM||||||1245319599^NPI\r"
        f"NTE|1||{note}\r"
    )
    return cid, msg.encode()


class Daemon:
    def __init__(self, state: Path, log: Path):
        self.state, self.log = state, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.mllp = self.http = 0

    def start(self) -> float:
        """Start and wait for /readyz; the seconds it took."""
        t0 = time.monotonic()
        self.mllp, self.http = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if k not in ("REFLOOP_ROUTES", "REFLOOP_STATE")}
        env.update(REFLOOP_MLLP_PORT=str(self.mllp), REFLOOP_HTTP_PORT=str(self.http))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "run", "--routes", str(REPO / "routes.yaml"),
             "--state", str(self.state)],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        while time.monotonic() - t0 < 60:
            if self.proc.poll() is not None:
                raise SystemExit(f"daemon exited at start:\n{self.log.read_text()[-3000:]}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"http://{HOST}:{self.http}/readyz", timeout=1) as r,
            ):
                if r.status == 200:
                    return time.monotonic() - t0
            time.sleep(0.02)  # polling readiness, bounded by the deadline
        raise SystemExit("daemon did not become ready")

    def worker(self) -> int:
        """The pid of the daemon's processing worker (its child running engine.worker)."""
        assert self.proc is not None
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid and (
                b"engine.worker" in cmdline
            ):
                return int(entry)
        return 0

    def kill9(self, target: str = "listener") -> None:
        assert self.proc is not None
        worker = self.worker() if target in ("worker", "both") else 0
        if target == "worker":
            if worker:
                os.kill(worker, signal.SIGKILL)
            return  # the daemon goes on and starts a new worker
        if worker:
            os.kill(worker, signal.SIGKILL)
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            return self.proc.wait(60)
        return int(self.proc.returncode)


async def stream(
    port: int,
    messages: dict[str, bytes],
    kill_after: int | None,
    daemon: Daemon,
    target: str = "listener",
) -> set[str]:
    """Send ``messages`` over CONNECTIONS pipelined connections; the control ids answered
    AA. With ``kill_after``, SIGKILL the daemon once that many ACKs came back."""
    ids = list(messages)
    acked: set[str] = set()
    killed = False

    async def one(share: list[str]) -> None:
        nonlocal killed
        try:
            reader, writer = await asyncio.open_connection(HOST, port)
        except OSError:
            return
        framer, frames, pending, it = Framer(1 << 24), [], [], iter(share)
        try:
            while True:
                while len(pending) < WINDOW and (cid := next(it, None)) is not None:
                    writer.write(frame(messages[cid]))
                    pending.append(cid)
                if not pending:
                    return
                await writer.drain()
                while not frames:
                    data = await asyncio.wait_for(reader.read(65536), 30)
                    if not data:
                        return
                    frames += framer.feed(data)
                reply = frames.pop(0)
                cid = pending.pop(0)
                if f"|{cid}".encode() not in reply:
                    raise SystemExit(f"ACK out of order for {cid}")
                if b"MSA|AA|" in reply:
                    acked.add(cid)
                if kill_after is not None and len(acked) >= kill_after and not killed:
                    killed = True
                    daemon.kill9(target)
        except OSError:
            pass  # killed under us: what was not ACKed is sent again after the restart
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    await asyncio.gather(*(one(ids[i::CONNECTIONS]) for i in range(CONNECTIONS)))
    return acked


def read_back(db: Path) -> tuple[dict[str, int], dict[str, bytes], str]:
    """(rows per control id, bytes per control id, integrity_check) of the file as it is."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        counts = dict(conn.execute("SELECT control_id, count(*) FROM messages GROUP BY 1"))
        raws = {
            str(c): bytes(r)
            for c, r in conn.execute(
                "SELECT control_id, raw FROM messages JOIN message_raw ON message_id = id"
            )
        }
        integrity = str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    return counts, raws, integrity


def account(
    acked: set[str], sent: dict[str, bytes], counts: dict[str, int], raws: dict[str, bytes]
) -> tuple[int, int, int]:
    """(ACKed but not stored, rows beyond the first per control id, stored bytes that
    differ from what was sent) — each must be 0."""
    lost = sum(1 for c in acked if counts.get(c, 0) == 0)
    duplicates = sum(n - 1 for n in counts.values() if n > 1)
    differ = sum(1 for c, raw in raws.items() if c in sent and sent[c] != raw)
    return lost, duplicates, differ


def wait_processed(db: Path, timeout: float = 1800.0) -> int:
    """Wait until no row is left ``received``; how many are left at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            conn.execute("PRAGMA busy_timeout = 5000")
            left = int(
                conn.execute("SELECT count(*) FROM messages WHERE status = 'received'").fetchone()[
                    0
                ]
            )
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def end_state(db: Path) -> dict[str, tuple[object, ...]]:
    """Per message (control id): its status and route, how many times it was applied to a
    referral (``referral_events`` rows naming it: 1 = processed once), and its referral's
    status, events, timers by kind and outbox rows by template — no times, no ids."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        conn.execute("PRAGMA busy_timeout = 5000")
        rows = conn.execute(
            "SELECT m.control_id, m.status, m.route, "
            "(SELECT count(*) FROM referral_events e WHERE e.message_id = m.id), "
            "r.status, "
            "(SELECT group_concat(kind) FROM (SELECT kind FROM referral_events "
            " WHERE referral_id = r.id ORDER BY kind)), "
            "(SELECT group_concat(kind) FROM (SELECT kind FROM timers "
            " WHERE referral_id = r.id ORDER BY kind)), "
            "(SELECT group_concat(template) FROM (SELECT template FROM outbox "
            " WHERE referral_id = r.id ORDER BY template)) "
            "FROM messages m LEFT JOIN referrals r ON r.placer_number = m.control_id"
        ).fetchall()
    return {str(r[0]): tuple(r[1:]) for r in rows}


def reference_state(messages: dict[str, bytes], tmp: Path) -> dict[str, tuple[object, ...]]:
    """The same messages through a daemon that is never killed."""
    state = tmp / "reference"
    daemon = Daemon(state, tmp / "reference.log")
    daemon.start()
    try:
        acked = asyncio.run(stream(daemon.mllp, messages, None, daemon))
        if acked != set(messages):
            raise SystemExit(f"reference run: {len(messages) - len(acked)} not ACKed AA")
        if wait_processed(state / "refloop.db"):
            raise SystemExit("reference run: processing did not catch up")
    finally:
        daemon.stop()
    return end_state(state / "refloop.db")


def audit_verify(state: Path) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "engine.cli", "audit", "verify", "--state", str(state),
         "--routes", str(REPO / "routes.yaml")],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    text = (proc.stdout or proc.stderr).strip()
    return text if proc.returncode == 0 else f"FAILED: {text}"


@dataclass
class Trial:
    trial: int
    killed: str
    acked: int
    stored: int
    acked_lost: int
    duplicate_rows: int
    bytes_differ: int
    integrity: str
    audit: str
    ready_again_s: float


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--messages", type=int, default=3000, help="per trial")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument(
        "--target",
        choices=("listener", "worker", "both", "mix"),
        default="mix",
        help="what each trial kills (mix: listener, worker, both in turn)",
    )
    ap.add_argument(
        "--no-reference", action="store_true", help="skip the run without kills at the end"
    )
    args = ap.parse_args(argv)
    targets = ("listener", "worker", "both")
    rng = random.Random(args.seed)
    rows: list[Trial] = []
    sent: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="refloop-kill9-") as tmp:
        state = Path(tmp) / "state"
        daemon = Daemon(state, Path(tmp) / "daemon.log")
        daemon.start()
        print(
            f"kill9: {args.trials} trials of {args.messages} REF^I12 messages on "
            f"{CONNECTIONS} connections ({WINDOW} in flight each), seed {args.seed}, "
            f"killing {args.target}"
        )
        print(
            f"{'trial':>5} {'killed':>8} {'acked':>6} {'stored':>6} {'lost':>5} {'dup':>4} "
            f"{'bytes':>5} {'integrity':>9} {'ready s':>7}  audit"
        )
        for t in range(1, args.trials + 1):
            messages = dict(referral(t, i, rng) for i in range(args.messages))
            sent.update(messages)
            kill_after = rng.randint(args.messages // 10, args.messages * 8 // 10)
            target = targets[(t - 1) % 3] if args.target == "mix" else args.target
            acked = asyncio.run(stream(daemon.mllp, messages, kill_after, daemon, target))
            counts, raws, integrity = read_back(state / "refloop.db")
            lost, dups, differ = account(acked, sent, counts, raws)
            row = Trial(
                trial=t,
                killed=target,
                acked=len(acked),
                stored=sum(1 for c in messages if c in counts),
                acked_lost=lost,
                duplicate_rows=dups,
                bytes_differ=differ,
                integrity=integrity,
                audit=audit_verify(state),
                ready_again_s=round(daemon.start() if target != "worker" else 0.0, 2),
            )
            rows.append(row)
            print(
                f"{row.trial:5d} {row.killed:>8} {row.acked:6d} {row.stored:6d} "
                f"{row.acked_lost:5d} {row.duplicate_rows:4d} {row.bytes_differ:5d} "
                f"{row.integrity:>9} "
                f"{row.ready_again_s:7.2f}  {row.audit}",
                flush=True,
            )
            rest = {c: m for c, m in messages.items() if c not in acked}
            resent = asyncio.run(stream(daemon.mllp, rest, None, daemon))
            if resent != set(rest):
                raise SystemExit(f"trial {t}: {len(rest) - len(resent)} resends not ACKed AA")
        left = wait_processed(state / "refloop.db")
        exit_code = daemon.stop()
        counts, raws, integrity = read_back(state / "refloop.db")
        final_audit = audit_verify(state)
        ended = end_state(state / "refloop.db")
        processed_once = not left and all(v[2] == 1 for v in ended.values())
        reference = None if args.no_reference else reference_state(sent, Path(tmp))
        same_end = reference is None or reference == ended
        if reference is not None and not same_end:
            differ_ids = [c for c in sent if reference.get(c) != ended.get(c)]
            print(f"end states differ for {len(differ_ids)} messages, e.g. {differ_ids[:3]}")
            for c in differ_ids[:3]:
                print(f"  {c}: killed run {ended.get(c)}, reference {reference.get(c)}")
    every_once = all(counts.get(c) == 1 for c in sent) and len(counts) == len(sent)
    ok = (
        all(
            r.acked_lost == 0
            and r.duplicate_rows == 0
            and r.bytes_differ == 0
            and r.integrity == "ok"
            and not r.audit.startswith("FAILED")
            for r in rows
        )
        and every_once
        and processed_once
        and same_end
        and exit_code == 0
        and integrity == "ok"
        and not final_audit.startswith("FAILED")
    )
    print(
        f"end: {len(sent)} messages sent, each stored exactly once: {every_once}; "
        f"integrity {integrity}; {final_audit}; clean stop exit {exit_code}"
    )
    print(
        f"processed exactly once: {processed_once} ({left} left unprocessed); end states "
        + (
            "not compared (--no-reference)"
            if reference is None
            else f"equal to a run without kills: {same_end}"
        )
    )
    print(f"verdict: {'ok' if ok else 'FAILED'}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "trials": [r.__dict__ for r in rows],
                    "messages": len(sent),
                    "every_message_once": every_once,
                    "processed_once": processed_once,
                    "same_end_state": same_end,
                    "final_audit": final_audit,
                    "ok": ok,
                },
                indent=2,
            )
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
