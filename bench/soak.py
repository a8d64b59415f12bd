"""Soak: a steady referral stream with timers and outbox against the real daemon, for N
minutes; prints what must stay flat, every interval, and a verdict.

What it does
    Starts ``refloop run`` (the repo's routes.yaml plus two webhook channels, ``portal``
    and ``coordinator``, that post to a sink in this process on loopback, and an
    escalation cadence of seconds instead of days) on free loopback ports. Then, for
    ``--minutes``, at ``--rate`` referrals a second: each referral is an ORM^O01 (the
    simulator's, engine.sim.simulate) whose patient has the portal; half of them are
    booked (SIU^S12) 2 s later and closed by a report (ORU^R01) 4 s later; the other
    half run the whole not-booked escalation (portal nudges, the packet task, the
    coordinator task, outreach) until the attempt-close timer closes them. So timers are
    scheduled, fire and are deleted, and outbox rows are sent to the sink, all the time.

Printed every ``--interval`` seconds (default 60)
    daemon RSS, open file descriptors, WAL file size, processing lag (stored messages not
    yet processed), outbox rows pending, timers pending, ACKs and ACK p99 in the interval,
    webhook posts received by the sink.

Verdict
    The mean of the last third of the samples against the first third: RSS within 10 %
    + 8 MiB, file descriptors within +3, WAL within 1.5x + 1 MiB, processing lag and
    outbox pending within 2x + 2 s worth of traffic. ``flat`` (exit 0) or ``GROWING``
    naming what grew (exit 1). Every message sent must be ACKed AA, and the daemon must
    still run at the end.

Run (from the repo root)::

    .venv/bin/python bench/soak.py --minutes 30
    .venv/bin/python bench/soak.py --seconds 30 --interval 3 --json /tmp/soak.json   # CI
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from engine.hl7v2.mllp import Framer, frame  # noqa: E402
from engine.sim.simulate import (  # noqa: E402
    ReferralPlan,
    booking_message,
    referral_message,
    report_message,
)

HOST = "127.0.0.1"
SECRET = "soak-webhook-secret-0123456789"
EXTRA_CONFIG = """
channels:
  portal: {{type: webhook, url: "http://127.0.0.1:{sink}/portal", secret: "${{env:SOAK_SECRET}}"}}
  coordinator: {{type: webhook, url: "http://127.0.0.1:{sink}/coordinator",
                secret: "${{env:SOAK_SECRET}}"}}

escalation:
  cadence: {{first_nudge: 2, second_nudge: 4, specialist_followup: 3, coordinator_task: 6,
            outreach: 8, attempt_close: 10, specialist_task: 3}}
  rotation: [portal]
  contact: {{window: "00:00-23:59", per_day: 24, per_week: 100, default_time_zone: UTC}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def proc_figures(pid: int) -> tuple[int, int]:
    """(RSS in KiB, open file descriptors) of ``pid``."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def scrape(http: int) -> dict[str, float]:
    """The daemon's /metrics, summed over labels, by metric name."""
    with urllib.request.urlopen(f"http://{HOST}:{http}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        m = re.match(r"([a-z_]+)(\{[^}]*\})? (\S+)$", line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
    return out


def start_daemon(state: Path, routes: Path, log: Path) -> tuple[subprocess.Popen[bytes], int, int]:
    mllp, http = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REFLOOP_ROUTES", "REFLOOP_STATE")}
    env.update(REFLOOP_MLLP_PORT=str(mllp), REFLOOP_HTTP_PORT=str(http), SOAK_SECRET=SECRET)
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "run", "--routes", str(routes), "--state", str(state)],
        cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"daemon exited at start:\n{log.read_text()[-3000:]}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"http://{HOST}:{http}/readyz", timeout=1) as r,
        ):
            if r.status == 200:
                return proc, mllp, http
        time.sleep(0.05)  # polling readiness, bounded by the deadline
    proc.kill()
    raise SystemExit("daemon did not become ready")


@dataclass
class Stream:
    sent: int = 0
    acked: int = 0
    not_aa: int = 0
    latencies: list[float] = field(default_factory=list)  # this interval's
    posts: int = 0  # webhook posts the sink received


class Sender:
    """One MLLP connection, one message at a time (closed loop)."""

    def __init__(self, port: int, stream: Stream):
        self.port, self.stream = port, stream
        self.framer = Framer(1 << 24)
        self.frames: list[bytes] = []

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(HOST, self.port)

    async def send(self, payload: bytes) -> None:
        t0 = time.perf_counter()
        self.stream.sent += 1
        self.writer.write(frame(payload))
        await self.writer.drain()
        while not self.frames:
            data = await asyncio.wait_for(self.reader.read(65536), 30)
            if not data:
                raise SystemExit("the daemon closed a sender's connection")
            self.frames += self.framer.feed(data)
        reply = self.frames.pop(0)
        self.stream.latencies.append(time.perf_counter() - t0)
        self.stream.acked += 1
        if b"MSA|AA|" not in reply:
            self.stream.not_aa += 1

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


async def sink(stream: Stream) -> tuple[web.AppRunner, int]:
    async def hook(request: web.Request) -> web.Response:
        await request.read()
        stream.posts += 1
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/{name}", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, HOST, port).start()
    return runner, port


async def referrals(port: int, rate: float, seconds: float, stream: Stream) -> None:
    """The referral stream and, on a second connection, its bookings and reports."""
    main, events = Sender(port, stream), Sender(port, stream)
    await main.open()
    await events.open()
    later: list[tuple[float, bytes]] = []  # (when, message) for the events connection
    began = time.monotonic()
    n = 0
    try:
        while time.monotonic() - began < seconds:
            now = time.time()
            n += 1
            plan = ReferralPlan(placer=f"SOAK{n:07d}", at=0.0, sms_consent=False, portal=True)
            await main.send(referral_message(plan, n, now))
            if n % 2 == 0:
                later.append((now + 2, booking_message(plan, n, now + 2, now + 3600, 1)))
                later.append((now + 4, report_message(plan, n, now + 4)))
            while later and later[0][0] <= time.time():
                await events.send(later.pop(0)[1])
                later.sort(key=lambda x: x[0])
            next_at = began + n / rate
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    finally:
        await main.close()
        await events.close()


@dataclass
class Sample:
    t: float
    rss_kb: int
    fds: int
    wal_bytes: int
    lag: float
    outbox: float
    timers: float
    acks: int
    p99_ms: float
    posts: int


async def sampler(
    pid: int, http: int, wal: Path, stream: Stream, interval: float, out: list[Sample]
) -> None:
    began = time.monotonic()
    while True:
        await asyncio.sleep(interval)
        rss, fds = proc_figures(pid)
        metrics = await asyncio.to_thread(scrape, http)
        lat = sorted(stream.latencies)
        stream.latencies = []
        s = Sample(
            t=round(time.monotonic() - began),
            rss_kb=rss,
            fds=fds,
            wal_bytes=wal.stat().st_size if wal.exists() else 0,
            lag=metrics.get("refloop_processing_lag_messages", 0.0),
            outbox=metrics.get("refloop_outbox_depth", 0.0),
            timers=metrics.get("refloop_timers_pending", 0.0),
            acks=len(lat),
            p99_ms=round(lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1000, 1) if lat else 0.0,
            posts=stream.posts,
        )
        out.append(s)
        print(
            f"{s.t:6d}s  rss {s.rss_kb / 1024:7.1f} MiB  fds {s.fds:4d}  wal "
            f"{s.wal_bytes / 1048576:6.2f} MiB  lag {s.lag:6.0f}  outbox {s.outbox:5.0f}  "
            f"timers {s.timers:6.0f}  acks {s.acks:6d}  p99 {s.p99_ms:7.1f} ms  "
            f"posts {s.posts:7d}",
            flush=True,
        )


def verdict(samples: list[Sample], rate: float) -> tuple[bool, list[str]]:
    """Compare the mean of the last third of the samples with the first third."""
    if len(samples) < 3:
        return False, ["fewer than 3 samples: run longer or sample more often"]
    k = len(samples) // 3
    first, last = samples[:k], samples[-k:]
    traffic = 2 * rate * 2  # 2 s worth of messages (a referral brings one more on average)
    checks = [
        ("rss_kb", lambda a: a * 1.10 + 8192),
        ("fds", lambda a: a + 3),
        ("wal_bytes", lambda a: a * 1.5 + 1048576),
        ("lag", lambda a: a * 2 + traffic),
        ("outbox", lambda a: a * 2 + traffic),
    ]
    lines, ok = [], True
    for name, bound in checks:
        a = statistics.fmean(getattr(s, name) for s in first)
        b = statistics.fmean(getattr(s, name) for s in last)
        flat = b <= bound(a)
        ok = ok and flat
        lines.append(
            f"{name:10s} first third {a:12.1f}  last third {b:12.1f}  "
            f"{'flat' if flat else 'GROWING'} (bound {bound(a):.1f})"
        )
    return ok, lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    length = ap.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, default=10.0)
    length.add_argument("--seconds", type=float, help="instead of --minutes (CI: 30)")
    ap.add_argument("--rate", type=float, default=10.0, help="referrals a second")
    ap.add_argument("--interval", type=float, default=60.0, help="seconds between samples")
    ap.add_argument("--json", type=Path, help="also write the samples and verdict here")
    args = ap.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else args.minutes * 60
    with tempfile.TemporaryDirectory(prefix="refloop-soak-") as tmp:
        return asyncio.run(soak(Path(tmp), seconds, args.rate, args.interval, args.json))


async def soak(tmp: Path, seconds: float, rate: float, interval: float, out: Path | None) -> int:
    stream = Stream()
    runner, sink_port = await sink(stream)
    routes = tmp / "routes.yaml"
    routes.write_text((REPO / "routes.yaml").read_text() + EXTRA_CONFIG.format(sink=sink_port))
    log = tmp / "daemon.log"
    proc, mllp, http = await asyncio.to_thread(start_daemon, tmp / "state", routes, log)
    samples: list[Sample] = []
    print(f"soak: {seconds:.0f}s at {rate:g} referrals/s, a sample every {interval:g}s", flush=True)
    try:
        watch = asyncio.create_task(
            sampler(proc.pid, http, tmp / "state" / "refloop.db-wal", stream, interval, samples)
        )
        await referrals(mllp, rate, seconds, stream)
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch
        alive = proc.poll() is None
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, 60)
            except subprocess.TimeoutExpired:
                proc.kill()
        await runner.cleanup()
    flat, lines = verdict(samples, rate)
    print("\n".join(lines))
    complete = alive and stream.not_aa == 0 and stream.acked == stream.sent
    print(
        f"messages sent {stream.sent}, ACKed {stream.acked} (not AA: {stream.not_aa}), "
        f"webhook posts {stream.posts}, daemon {'running' if alive else 'EXITED'} at the end"
    )
    ok = flat and complete and stream.posts > 0
    print(f"verdict: {'flat' if ok else 'GROWING or FAILED'}")
    if out is not None:
        out.write_text(
            json.dumps(
                {
                    "seconds": seconds,
                    "rate": rate,
                    "samples": [s.__dict__ for s in samples],
                    "checks": lines,
                    "sent": stream.sent,
                    "acked": stream.acked,
                    "not_aa": stream.not_aa,
                    "posts": stream.posts,
                    "alive": alive,
                    "flat": flat,
                    "ok": ok,
                },
                indent=2,
            )
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
