"""MLLP fuzz run: mutated corpus frames through a live daemon while a probe keeps working.

What it does
    Starts ``refloop run`` (the repo's routes.yaml, a fresh state directory) on free
    loopback ports, then runs, in parallel:

    - ``--conns`` fuzz connections (default 8), each sending one framed, mutated message
      at a time and waiting for its answer: byte flips, truncation, a stray 0x0B or 0x1C
      inside the payload, a huge field (64 KiB - 2 MiB), a bad MSH-2, binary garbage, a
      bare ``MSH`` segment, small batches, and unmutated corpus messages. A connection the
      daemon closes is reopened.
    - one probe connection sending valid ADT^A01 messages closed-loop, timing each ACK.

Invariants (the exit status is 1 when one fails)
    - the daemon never exits (0 exits / restarts);
    - 0 connections closed without an answer for a frame whose MSH-10 was readable;
    - every frame answered AA/AE/AR with an MSA-2 is stored (the database is read at the
      end, after a clean stop), except one answered AE "could not be stored" (a failed
      commit, counted apart: 0 on a healthy disk); every probe message ACKed is stored.

Figures printed: frames tried, answers by kind (AA/AE/AR/closed/timeout), daemon RSS
before/after, probe ACK p50/p99/max and the fuzz side's slowest reply. Timings depend on
the machine's load; they are reported, never asserted.

Run (from the repo root)::

    .venv/bin/python bench/fuzz.py --frames 100000 --seed 1
    .venv/bin/python bench/fuzz.py --frames 2000 --json /tmp/fuzz.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
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
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from engine.hl7v2.message import split_messages  # noqa: E402
from engine.hl7v2.mllp import Framer, frame  # noqa: E402

HOST = "127.0.0.1"
CORPUS = REPO.parent / "shared" / "corpus" / "hl7"
REPLY_WAIT = 30.0  # seconds a frame may wait for its answer before it counts as "timeout"
STRAY_LIMIT = 4096  # the daemon's default max_stray_bytes


def stray_tail(payload: bytes) -> int:
    """Bytes the daemon sees outside any frame when ``payload`` holds a 0x1C (its frame
    ends there; the rest and our own end block are stray)."""
    i = payload.find(b"\x1c")
    return 0 if i == -1 else len(payload) - i + 1


def stored_digests(payload: bytes) -> set[bytes]:
    """sha256 of each inbox row an answered frame must have left: what the MLLP framer
    cuts out of it, split into messages when it is a batch (docs/listener.md)."""
    out = set()
    for p in Framer(1 << 30).decode(frame(payload)):
        body = p.lstrip(b"\xef\xbb\xbf").lstrip(b" \t\r\n")
        batch = split_messages(p)
        many = batch.enveloped or (len(batch.messages) > 1 and body.startswith(b"MSH"))
        looks = body[:3] in (b"FHS", b"BHS") or b"\rMSH" in body[3:] or b"\nMSH" in body[3:]
        for m in batch.messages if (looks and many) else (p,):
            out.add(hashlib.sha256(m).digest())
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def load_corpus() -> list[bytes]:
    out: list[bytes] = []
    for path in sorted(CORPUS.rglob("*")):
        if path.is_file() and path.stat().st_size < 1_000_000:
            out += [m for m in split_messages(path.read_bytes()).messages if m.startswith(b"MSH")]
    if not out:
        raise SystemExit(f"no HL7 messages under {CORPUS}")
    return out


def readable_msh10(payload: bytes) -> str:
    """MSH-10 as a receiver could read it with only MSH-1 trusted; '' when not readable."""
    body = payload.lstrip(b"\xef\xbb\xbf \t\r\n")
    if not body.startswith(b"MSH") or len(body) < 4:
        return ""
    fs = body[3:4]
    if fs.isalnum() or fs in (b" ", b"\t", b"\r", b"\n"):
        return ""
    seg = body.replace(b"\n", b"\r").split(b"\r", 1)[0]
    fields = seg.split(fs)
    return fields[9].strip().decode("latin-1") if len(fields) > 9 else ""


def set_msh10(msg: bytes, control_id: str) -> bytes:
    """``msg`` with MSH-10 replaced (corpus messages reuse ids; fuzzed ones must not)."""
    end = min((i for i in (msg.find(b"\r"), msg.find(b"\n")) if i != -1), default=len(msg))
    seg, rest = msg[:end], msg[end:]
    fs = seg[3:4]
    fields = seg.split(fs)
    while len(fields) < 12:
        fields.append(b"")
    fields[9] = control_id.encode()
    return fs.join(fields) + rest


@dataclass
class Mutator:
    rng: random.Random
    corpus: list[bytes]
    huge_max: int = 2 * 1024 * 1024  # 0: no huge-field frames
    counter: int = 0

    def next(self) -> tuple[str, bytes]:
        self.counter += 1
        cid = f"FZ{self.counter:08d}"
        base = set_msh10(self.rng.choice(self.corpus), cid)
        kind = self.rng.choices(
            [
                "clean",
                "flip",
                "truncate",
                "stray-vt",
                "stray-fs",
                "huge",
                "bad-msh2",
                "garbage",
                "bare-msh",
                "batch",
            ],
            weights=[20, 25, 12, 6, 6, 1 if self.huge_max else 0, 8, 8, 6, 8],
        )[0]
        r = self.rng
        if kind == "flip":
            b = bytearray(base)
            for _ in range(r.randint(1, 8)):
                i = r.randrange(len(b))
                v = r.randrange(256)
                b[i] = v if v not in (0x0B, 0x1C) else 0x20  # one frame in, one answer out
            return kind, bytes(b)
        if kind == "truncate":
            return kind, base[: r.randrange(len(base))]
        if kind in ("stray-vt", "stray-fs"):
            i = r.randrange(len(base))
            return kind, base[:i] + (b"\x0b" if kind == "stray-vt" else b"\x1c") + base[i:]
        if kind == "huge":
            size = r.randint(min(64 * 1024, self.huge_max), self.huge_max)
            return kind, base.rstrip(b"\r\n") + b"\rOBX|1|ED|PDF||" + b"A" * size + b"\r"
        if kind == "bad-msh2":
            return kind, base[:4] + r.choice([b"^^^^", b"", b"A~\\&", b"^~|&"]) + base[8:]
        if kind == "garbage":
            return kind, r.randbytes(r.randint(1, 2048)).replace(b"\x0b", b"").replace(b"\x1c", b"")
        if kind == "bare-msh":
            return kind, b"MSH" + r.choice([b"\r", b"\n"]) + base[base.find(b"\r") + 1 :][:200]
        if kind == "batch":
            n = r.randint(2, 40)
            msgs = [set_msh10(r.choice(self.corpus), f"{cid}B{j}") for j in range(n)]
            return kind, b"BHS|^~\\&|FUZZ|FAC|||20260101||||" + cid.encode() + b"\r" + b"".join(
                msgs
            ) + f"BTS|{n}\r".encode()
        return kind, base


@dataclass
class Tally:
    tried: int = 0
    answers: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    unanswered_with_msh10: int = 0
    unanswered_kinds: Counter[str] = field(default_factory=Counter)
    answered: set[bytes] = field(default_factory=set)  # sha256 of what must be stored
    max_reply: float = 0.0
    store_faults: int = 0  # frames answered AE "could not be stored" (a failed commit)


def parse_acks(raw: bytes) -> list[tuple[str, str]]:
    """(MSA-1, MSA-2) of each ACK in a reply (a reply batch holds several)."""
    out = []
    for seg in raw.replace(b"\n", b"\r").split(b"\r"):
        if seg.startswith(b"MSA"):
            parts = seg.decode("latin-1").split(seg.decode("latin-1")[3])
            out.append((parts[1] if len(parts) > 1 else "", parts[2] if len(parts) > 2 else ""))
    return out


class Conn:
    def __init__(self, port: int):
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.framer = Framer(1 << 30)
        self.frames: list[bytes] = []

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
        self.framer = Framer(1 << 30)
        self.frames = []

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.writer.wait_closed(), 2)
        self.writer = None

    async def ask(self, payload: bytes, timeout: float) -> bytes | None:
        """Send one frame; its reply, or None when the server closed the connection."""
        assert self.writer is not None and self.reader is not None
        try:
            self.writer.write(frame(payload))
            await self.writer.drain()
        except OSError:
            return None
        while not self.frames:
            try:
                data = await asyncio.wait_for(self.reader.read(1 << 16), timeout)
            except TimeoutError:  # an OSError too since 3.11: it is no close, say so
                raise
            except OSError:
                data = b""
            if not data:
                return None
            self.frames += self.framer.feed(data)
        return self.frames.pop(0)


async def fuzzer(port: int, mut: Mutator, budget: list[int], tally: Tally) -> None:
    conn = Conn(port)
    await conn.open()
    try:
        while budget[0] > 0:
            budget[0] -= 1
            kind, payload = mut.next()
            tally.tried += 1
            tally.kinds[kind] += 1
            t0 = time.perf_counter()
            try:
                reply = await conn.ask(payload, REPLY_WAIT)
            except TimeoutError:
                tally.answers["timeout"] += 1
                await conn.close()
                await conn.open()
                continue
            tally.max_reply = max(tally.max_reply, time.perf_counter() - t0)
            if reply is None:
                tally.answers["closed"] += 1
                if readable_msh10(payload):
                    tally.unanswered_with_msh10 += 1
                    tally.unanswered_kinds[kind] += 1
                await conn.close()
                await conn.open()
                continue
            acks = parse_acks(reply)
            tally.answers["+".join(sorted({c for c, _ in acks})) or "?"] += 1
            if b"could not be stored" in reply:
                # a failed commit (disk full, locked): AE, not stored, the sender resends
                tally.store_faults += 1
            else:
                tally.answered.update(stored_digests(payload))
            if stray_tail(payload) > STRAY_LIMIT:
                # the daemon closes a connection after that many bytes outside frames
                # (max_stray_bytes): a peer that sent them starts a new connection
                await conn.close()
                await conn.open()
    finally:
        await conn.close()


async def probe(port: int, stop: asyncio.Event, lat: list[float], acked: set[bytes]) -> None:
    conn = Conn(port)
    await conn.open()
    i = 0
    try:
        while not stop.is_set():
            i += 1
            cid = f"PROBE{i:08d}"
            msg = (
                f"MSH|^~\\&|PROBE|PFAC|REFLOOP|CLINIC|20260101120000||ADT^A01|{cid}|P|2.5.1\r"
                "PID|1||P1^^^MRN||PROBE^TEST||19800101|F\r"
            ).encode()
            t0 = time.perf_counter()
            reply = await conn.ask(msg, REPLY_WAIT)
            lat.append(time.perf_counter() - t0)
            if reply is None:
                raise RuntimeError("probe connection closed by the daemon")
            acks = parse_acks(reply)
            if acks and acks[0][0] == "AA":
                acked.add(hashlib.sha256(msg).digest())
    finally:
        await conn.close()


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_daemon(
    state: Path, log: Path, synchronous: str = "full"
) -> tuple[subprocess.Popen[bytes], int, int]:
    mllp, http = free_port(), free_port()
    routes = REPO / "routes.yaml"
    if synchronous != "full":  # the repo's routes.yaml with store.synchronous changed
        text = routes.read_text()
        routes = state / "routes.yaml"
        routes.write_text(text.replace("synchronous: full", f"synchronous: {synchronous}", 1))
    env = {k: v for k, v in os.environ.items() if k not in ("REFLOOP_ROUTES", "REFLOOP_STATE")}
    env.update(REFLOOP_MLLP_PORT=str(mllp), REFLOOP_HTTP_PORT=str(http))
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "run", "--routes", str(routes),
         "--state", str(state)],
        cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"daemon exited at start; see {log}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"http://{HOST}:{http}/readyz", timeout=1) as r,
        ):
            if r.status == 200:
                return proc, mllp, http
        time.sleep(0.05)  # polling readiness, bounded by the deadline
    proc.kill()
    raise SystemExit("daemon did not become ready")


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def campaign(
    port: int, frames: int, conns: int, seed: int, huge_max: int
) -> tuple[Tally, list[float], set[bytes]]:
    mut = Mutator(random.Random(seed), load_corpus(), huge_max)
    tally = Tally()
    lat: list[float] = []
    probe_acked: set[bytes] = set()
    stop = asyncio.Event()
    probing = asyncio.create_task(probe(port, stop, lat, probe_acked))
    budget = [frames]
    await asyncio.gather(*(fuzzer(port, mut, budget, tally) for _ in range(conns)))
    stop.set()
    await probing
    return tally, lat, probe_acked


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--conns", type=int, default=8)
    ap.add_argument(
        "--huge-max", type=int, default=2 * 1024 * 1024, help="largest huge field (0: none)"
    )
    ap.add_argument(
        "--synchronous",
        choices=["full", "normal"],
        default="full",
        help="the daemon's store.synchronous; normal (no fsync per commit) for short CI "
        "runs on slow disks: what the fuzz checks does not depend on it",
    )
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--log", type=Path, help="copy the daemon's log here at the end")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="refloop-fuzz-") as tmp:
        state = Path(tmp)
        log = state / "daemon.log"
        proc, mllp, _http = start_daemon(state, log, args.synchronous)
        exits = 0
        try:
            rss_before = rss_kb(proc.pid)
            t0 = time.perf_counter()
            tally, lat, probe_acked = asyncio.run(
                campaign(mllp, args.frames, args.conns, args.seed, args.huge_max)
            )
            elapsed = time.perf_counter() - t0
            if proc.poll() is not None:
                exits += 1
            rss_after = rss_kb(proc.pid) if proc.poll() is None else 0
            daemon_cpu = cpu_seconds(proc.pid) if proc.poll() is None else 0.0
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            else:
                exits = max(exits, 1)
        with contextlib.closing(
            sqlite3.connect(f"file:{state / 'refloop.db'}?mode=ro", uri=True)
        ) as db:
            stored = {bytes(r[0]) for r in db.execute("SELECT sha256 FROM messages")}
        missing = len((tally.answered | probe_acked) - stored)
        if args.log:
            args.log.write_bytes(log.read_bytes())
    figures = {
        "frames_tried": tally.tried,
        "seconds": round(elapsed, 1),
        "synchronous": args.synchronous,
        # with other work on the machine, wall time says little: CPU time says what the
        # run costs (on an idle machine the wall time is about the larger of the two)
        "daemon_cpu_s": round(daemon_cpu, 1),
        "fuzzer_cpu_s": round(time.process_time(), 1),
        "daemon_exits": exits,  # the daemon is never restarted: an exit is a crash
        "answers": dict(tally.answers),
        "mutations": dict(tally.kinds),
        "closed_without_answer_with_msh10": tally.unanswered_with_msh10,
        "closed_without_answer_by_mutation": dict(tally.unanswered_kinds),
        "answered_messages": len(tally.answered) + len(probe_acked),
        "answered_not_stored": missing,
        "answered_could_not_store": tally.store_faults,
        "rss_kb_before": rss_before,
        "rss_kb_after": rss_after,
        "probe_acks": len(lat),
        "probe_p50_ms": round(pct(lat, 0.50) * 1000, 1),
        "probe_p99_ms": round(pct(lat, 0.99) * 1000, 1),
        "probe_max_ms": round(max(lat, default=0) * 1000, 1),
        "fuzz_max_reply_ms": round(tally.max_reply * 1000, 1),
        "loadavg": os.getloadavg(),
    }
    for key, value in figures.items():
        print(f"{key:36s} {value}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    ok = exits == 0 and tally.unanswered_with_msh10 == 0 and missing == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
