"""MLLP ingest benchmark: ACKed messages/s and ACK latency for four servers.

What is measured
    For each server and each connection count N (default 1, 16 and 64), a load client
    opens N MLLP connections to 127.0.0.1 and runs each one closed-loop: send one framed
    ~1.5 KB ORM^O01 (HL7 v2.5.1), wait for its ACK frame, record the latency, send the
    next. After a warm-up (default 1 s) it counts the ACKs that arrive during a fixed
    window (default 5 s) and reports messages/s, p50/p99 ACK latency, errors, and the
    CPU used by the client and by the server's process group (100 % = one core).
    Every message carries a unique MSH-10; every ACK must be MSA-1 AA (or CA) with MSA-2
    equal to that MSH-10. Anything else counts as an error, and so do failed connects,
    dropped connections and ACKs that take longer than ``--ack-timeout``. Each message
    also carries its own placer number (ORC-2, OBR-2), so each is a new referral.

The four servers
    bare        (a) the fastest bare ACK server Python manages here: uvloop, an
                ``asyncio.Protocol``, MLLP framing, MSH-only split, hand-built ACK, no
                persistence. This is the ceiling for a Python MLLP listener.
    python-hl7  (b) the receiver from python-hl7's documentation
                (``hl7.mllp.start_hl7_server``, ``readmessage()``, which calls
                ``hl7.parse``, then ``create_ack()``), run with aiorun as the docs show,
                minus the per-message print. No persistence.
    durable     (d) the durable ceiling: refloop's own MLLP listener (MSH-only read) and
                inbox group-commit writer with ``synchronous=FULL``, no routes and no
                processing (rows stay ``received``): the same code path as (c) minus
                processing.
    refloop     (c) the real daemon (``refloop run`` with the repo's routes.yaml and a
                fresh state directory). It commits every message durably to SQLite before
                ACKing, and routes and tracks each as a new referral.

Ratios: c/d (what processing costs the ACK path), c/b and c/a, per connection count.

SQL statements: the storing servers (d) and (c) run with ``REFLOOP_SQL_STATS`` set, so
every store connection counts its statements (engine.store.sql.CountingConnection: one
per execute, one per executemany) and writes its counts when closed. After each stops,
the table gives reads, writes and control statements (BEGIN, COMMIT, SAVEPOINT, PRAGMA
settings) per stored message for the inbox writer's connection and per processed message
for the main connection (processing, plus the daemon's timers, dispatcher and HTTP reads).

Sustained run (``--sustain SECONDS``): after refloop's cells, once processing has caught
up, ``--rate`` msgs/s (paced, on ``--sustain-conns`` connections) for that long; it
prints the ACK figures, ``refloop_processing_lag_messages`` when the load stops, and how
long processing then takes to reach 0.

Several nodes (``--nodes 1,2,3 --store postgresql://user@host/db``): instead of the four
servers, ``refloop run`` with the routes given, first one node on SQLite, then N daemons on
one fresh PostgreSQL schema per node count (dropped afterwards), the client's
``--nodes-conns`` connections spread round-robin over the nodes' MLLP ports. Per
configuration: msgs/s and p50/p99 ACK over ``--seconds``; statements per processed
message summed over every node's connections (statements sent together in one round trip,
such as a NOTIFY with its COMMIT, count once); with ``--sustain``, half the measured rate
paced for that long, the rows still ``received`` when it stops, how long processing then
takes to reach 0 and what it processes per second meanwhile (read from the database, so
every node's processing counts).

Each server runs in its own subprocess and session, and so does the load client (this
script re-run in an internal mode), so client and server never share an interpreter or a
GIL. Server CPU % is summed over the server's whole process group. The box is noisy, and
anything else running on it shows up as server CPU % well below 100 while the server is
the bottleneck; compare ratios within one run rather than absolute figures across runs
(the report ends with the load average at the start and the end).

Run (from the repo root; the default run takes about 2-3 minutes)::

    .venv/bin/python bench/ingest.py
    .venv/bin/python bench/ingest.py --servers bare,hl7 --seconds 2
    .venv/bin/python bench/ingest.py --conns 16,64 --sustain 10 --rate 300
    .venv/bin/python bench/ingest.py --servers durable,refloop --refloop ../other/.venv/bin/refloop
    .venv/bin/python bench/ingest.py --conns 64 --seconds 10 --json /tmp/ingest.json
    .venv/bin/python bench/ingest.py --nodes 1,2,3 --store postgresql://postgres@127.0.0.1/test \
        --sustain 10

The tables go to stdout and progress to stderr. The exit status is 1 when a requested
server could not be started or a client run failed, and 130 when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import platform
import resource
import secrets
import select
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Final, Literal, cast

REPO: Final = Path(__file__).resolve().parent.parent
HOST: Final = "127.0.0.1"

# MLLP framing, HL7 v2.5.1 Appendix C.4.3: <VT> message <FS><CR>.
START_BLOCK: Final = b"\x0b"
END_BLOCK: Final = b"\x1c"
CARRIAGE_RETURN: Final = b"\x0d"
FRAME_END: Final = END_BLOCK + CARRIAGE_RETURN
# HL7 v2.5.1 §2.5.4: segments are terminated by <CR>.
SEGMENT_END: Final = b"\r"
# HL7 v2.5.1 Table 0008: AA (original mode) and CA (enhanced mode) both accept.
ACCEPT_CODES: Final = frozenset({b"AA", b"CA"})

MAX_FRAME_BYTES: Final = 1 << 20
READY_LINE: Final = b"READY "
SERVER_START_TIMEOUT_S: Final = 15.0
STOP_GRACE_S: Final = 10.0

ServerName = Literal["bare", "hl7", "durable", "refloop"]
SERVER_NAMES: Final[tuple[ServerName, ...]] = ("bare", "hl7", "durable", "refloop")
SERVER_ALIASES: Final[dict[str, ServerName]] = {
    "bare": "bare",
    "hl7": "hl7",
    "python-hl7": "hl7",
    "durable": "durable",
    "refloop": "refloop",
}
SERVER_LABELS: Final[dict[ServerName, str]] = {
    "bare": "bare",
    "hl7": "python-hl7",
    "durable": "durable",
    "refloop": "refloop",
}
# Servers whose process counts its SQL statements (REFLOOP_SQL_STATS) and stores messages.
STORING: Final = frozenset({"durable", "refloop"})
SQL_STATS_FILE: Final = "sql-stats.jsonl"
TRACE_FILE: Final = "trace.jsonl"  # --trace: REFLOOP_TXN_TRACE's file (engine.store.trace)
TRACE = False  # --trace
# The durable ceiling's one source: refloop's MLLP listener as routes.yaml would give it.
DURABLE_YAML: Final = """
version: 1
store: {file: refloop.db, synchronous: full}
sources:
  ehr: {type: mllp, host: 127.0.0.1, port: 0, ack_mode: original, ack_when: on-commit}
"""

# A synthetic referral order (no real person, facility or provider). {control_id} is
# replaced per message; everything else is fixed so every server parses the same bytes.
ORM_O01_SEGMENTS: Final = (
    r"MSH|^~\&|NWC_EHR|NORTHWIND_CLINIC|REFLOOP|REGIONAL_CARDIOLOGY|20261128093015-0500||"
    r"ORM^O01^ORM_O01|{control_id}|P|2.5.1|||||USA||en",
    r"PID|1||MRN00482913^^^NWC^MR||TESTPATIENT^JANE^Q^^^^L|SAMPLE^^^^^^M|19780412|F||"
    r"2106-3^White^CDCREC|1200 EXAMPLE AVE^APT 4B^SPRINGFIELD^IL^62704^USA^H||"
    r"^PRN^PH^^1^217^5550147|^WPN^PH^^1^217^5550199|en^English^ISO639|M^Married^HL70002|||||"
    r"N^Not Hispanic or Latino^HL70189",
    r"PV1|1|O|NWC^EXAM3^01^NWC^^^^^Northwind Family Medicine||||"
    r"1234567893^WELBY^MARCUS^A^^DR^MD^^NPI^L^^^NPI|||FAM||||1||||OP|V000193842^^^NWC^VN",
    r"ORC|NW|{control_id}^NWC_EHR|||SC||^^^20261128093000^^R||20261128093015-0500|"
    r"NURSE01^RATCHED^MILDRED^^^^RN||1234567893^WELBY^MARCUS^A^^DR^MD^^NPI|NWC^EXAM3^01|"
    r"^WPN^PH^^1^217^5550100|20261128093015-0500||NWC^Northwind Family Medicine^L",
    r"OBR|1|{control_id}^NWC_EHR||REF-CARD^Referral to Cardiology^L|R|20261128093000|||||||||"
    r"1234567893^WELBY^MARCUS^A^^DR^MD^^NPI|^WPN^PH^^1^217^5550100|||||||||||"
    r"^^^20261128093000^^R||||I49.9^Cardiac arrhythmia, unspecified^I10C",
    r"OBX|1|CWE|REASON^Reason for referral^L||I49.9^Cardiac arrhythmia, unspecified^I10C||||||F"
    r"|||20261128093015",
    r"OBX|2|NM|8867-4^Heart rate^LN||112|/min^beats per minute^UCUM|60-100|H|||F|||"
    r"20261128091500",
    r"OBX|3|NM|8480-6^Systolic blood pressure^LN||138|mm[Hg]^millimeter of mercury^UCUM|"
    r"90-120|H|||F|||20261128091500",
    r"OBX|4|ST|URGENCY^Requested urgency^L||Routine, within 4 weeks||||||F",
    r"NTE|1|P|Intermittent palpitations for 3 months. Synthetic test data only.",
    r"NTE|2|P|Patient prefers morning appointments; please telephone before booking.",
)


def message_template() -> tuple[bytes, ...]:
    """The MLLP-framed test message split where the control id goes: MSH-10 and, so
    that every message is a new referral, the placer number in ORC-2 and OBR-2."""
    text = "\r".join(ORM_O01_SEGMENTS) + "\r"
    parts = text.encode("ascii").split(b"{control_id}")
    return (START_BLOCK + parts[0], *parts[1:-1], parts[-1] + FRAME_END)


# ---------------------------------------------------------------------------
# Results


@dataclass(frozen=True, slots=True)
class CellResult:
    """One server at one connection count, as measured by the load client."""

    server: str
    conns: int
    connected: int
    window_s: float
    acked: int
    msgs_per_s: float
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    # Errors are counted over warm-up, window and drain; latencies over the window only.
    mismatches: int  # MSA-2 differs from the MSH-10 sent
    naks: int  # MSA-1 neither AA nor CA
    failures: int  # failed connects, dropped connections, ACK timeouts, malformed ACKs
    failure_kinds: dict[str, int] = field(default_factory=dict)
    client_cpu_pct: float | None = None
    server_cpu_pct: float | None = None
    note: str = ""

    @property
    def errors(self) -> int:
        return self.mismatches + self.naks + self.failures


class BenchError(Exception):
    """A server or client run failed; the message says which and why."""


# ---------------------------------------------------------------------------
# Helpers shared by the subprocess modes


def _best_event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def _watch_parent(loop: asyncio.AbstractEventLoop, on_gone: Callable[[], None]) -> None:
    """Call ``on_gone`` when stdin (a pipe from the orchestrator) reaches EOF.

    The orchestrator stops its children explicitly; this covers it dying without
    cleaning up, so a server never outlives the benchmark.
    """
    fd = sys.stdin.fileno()

    def readable() -> None:
        if not os.read(fd, 4096):
            loop.remove_reader(fd)
            on_gone()

    loop.add_reader(fd, readable)


def _announce_ready(port: int) -> None:
    sys.stdout.buffer.write(READY_LINE + str(port).encode() + b"\n")
    sys.stdout.buffer.flush()


def _group_cpu_seconds(pgid: int) -> float | None:
    """User + system CPU seconds of every live process in process group ``pgid`` (Linux)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    found = False
    try:
        pids = [name for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_bytes()
        except OSError:
            continue
        # Fields after "(comm)": state ppid pgrp ... utime(14) stime(15), see proc(5).
        fields = stat[stat.rfind(b")") + 2 :].split()
        if int(fields[2]) == pgid:
            found = True
            total += int(fields[11]) + int(fields[12])
    return total / ticks if found else None


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------------------
# Server (a): bare uvloop + Protocol, MSH-only split, hand-built ACK


class _BareAckState:
    """What all bare connections share: the ACK control-id counter and a cached MSH-7."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._second = -1
        self._timestamp = b""

    def next_control_id(self) -> bytes:
        return b"BARE%d" % next(self._ids)

    def timestamp(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._timestamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(now)).encode()
        return self._timestamp


def bare_ack(data: bytes, start: int, end: int, state: _BareAckState) -> bytes | None:
    """The framed ACK for the frame ``data[start:end]`` (``<VT>`` included, ``<FS><CR>`` not).

    Reads MSH only: the segment up to the first ``<CR>``, split on MSH-1. Returns None
    when the frame does not start with ``<VT>MSH`` or MSH has no MSH-10.
    """
    if data[start : start + 4] != b"\x0bMSH":
        return None
    msh_end = data.find(SEGMENT_END, start, end)
    msh = data[start + 1 : msh_end if msh_end >= 0 else end]
    sep = msh[3:4]
    # f[n - 1] is MSH-n because MSH-1 is the separator itself (HL7 v2.5.1 §2.15.9).
    f = msh.split(sep, 12)
    if len(f) < 10:
        return None
    comp = f[1][:1] or b"^"
    trigger = f[8].split(comp)[1] if comp in f[8] else b""
    processing_id = f[10] if len(f) > 10 else b"P"
    version = f[11] if len(f) > 11 else b"2.5.1"
    return b"".join(
        (
            START_BLOCK,
            sep.join(
                (
                    b"MSH",
                    f[1],
                    f[4],  # sending app/facility = the message's receiving ones
                    f[5],
                    f[2],
                    f[3],
                    state.timestamp(),
                    b"",
                    b"ACK" + comp + trigger + comp + b"ACK",
                    state.next_control_id(),
                    processing_id,
                    version,
                )
            ),
            SEGMENT_END,
            sep.join((b"MSA", b"AA", f[9])),
            SEGMENT_END,
            FRAME_END,
        )
    )


class BareAckProtocol(asyncio.Protocol):
    """MLLP receiver that ACKs every frame AA at once; closes the connection on bad framing."""

    def __init__(self, state: _BareAckState) -> None:
        self._state = state
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        assert transport is not None
        if self._buffer:
            self._buffer += data
            data = bytes(self._buffer)
            self._buffer.clear()
        start = 0
        while (end := data.find(FRAME_END, start)) >= 0:
            ack = bare_ack(data, start, end, self._state)
            if ack is None:
                transport.close()
                return
            transport.write(ack)
            start = end + len(FRAME_END)
        if start < len(data):
            if len(data) - start > MAX_FRAME_BYTES:
                transport.close()
                return
            self._buffer += data[start:]


async def _serve_bare() -> None:
    loop = asyncio.get_running_loop()
    state = _BareAckState()
    server = await loop.create_server(lambda: BareAckProtocol(state), HOST, 0)
    parent_gone = loop.create_future()
    _watch_parent(loop, lambda: parent_gone.set_result(None))
    async with server:
        _announce_ready(server.sockets[0].getsockname()[1])
        await parent_gone


def run_bare_server() -> None:
    with asyncio.Runner(loop_factory=_best_event_loop_factory()) as runner:
        runner.run(_serve_bare())


# ---------------------------------------------------------------------------
# Server (b): python-hl7 0.4.5, built as its docs/mllp.rst "HL7 Receiver" shows


async def _process_hl7_messages(hl7_reader: Any, hl7_writer: Any) -> None:
    """The documented per-connection handler: parse, ``create_ack()``, write, drain."""
    try:
        while not hl7_writer.is_closing():
            hl7_message = await hl7_reader.readmessage()
            hl7_writer.writemessage(hl7_message.create_ack())
            await hl7_writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        if not hl7_writer.is_closing():
            hl7_writer.close()
            with contextlib.suppress(ConnectionError):
                await hl7_writer.wait_closed()


async def _serve_hl7() -> None:
    from hl7.mllp import start_hl7_server

    loop = asyncio.get_running_loop()
    _watch_parent(loop, loop.stop)  # aiorun shuts down gracefully on loop.stop()
    try:
        async with await start_hl7_server(_process_hl7_messages, host=HOST, port=0) as hl7_server:
            _announce_ready(hl7_server.sockets[0].getsockname()[1])
            await hl7_server.serve_forever()
    except asyncio.CancelledError:
        pass


def run_hl7_server() -> None:
    import aiorun

    aiorun.run(_serve_hl7(), stop_on_unhandled_errors=True)


# ---------------------------------------------------------------------------
# Server (d): the durable ceiling: refloop's listener and inbox writer, processing off


async def _serve_durable(state: Path) -> None:
    """refloop's own MLLP listener (MSH-only read at the door) and inbox group-commit
    writer (``synchronous=FULL``: each ACK waits for its fsync'd commit), with no routes
    and no processing: every stored row stays ``received``. The same code path as (c)
    minus processing, so (c)/(d) is what processing costs the ACK path."""
    from prometheus_client import CollectorRegistry

    from engine.clock import WallClock
    from engine.config import loads
    from engine.ingest.listener import MllpServer
    from engine.ingest.processor import Processor, no_routes
    from engine.metrics import Metrics
    from engine.store import Inbox, open_database, trace

    config = loads(DURABLE_YAML)
    db = open_database(state / config.store.file, synchronous=config.store.synchronous)
    inbox = Inbox(db)
    clock, metrics = WallClock(), Metrics(CollectorRegistry())
    processor = Processor(db, inbox, no_routes, clock, metrics)  # never run
    writer = asyncio.create_task(inbox.run_writer())
    server = MllpServer(config.sources[0], inbox, processor, clock, metrics)
    await server.start()
    stalls = asyncio.create_task(trace.watch_loop()) if trace.enabled() else None
    loop = asyncio.get_running_loop()
    parent_gone = loop.create_future()
    _watch_parent(loop, lambda: parent_gone.set_result(None))
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: parent_gone.done() or parent_gone.set_result(None))
    _announce_ready(server.port)
    await parent_gone
    if stalls is not None:
        stalls.cancel()
    await server.stop(drain=2.0)
    inbox.close()
    await writer
    db.close()


def run_durable_server(state: str) -> None:
    directory = Path(state)
    directory.mkdir(parents=True, exist_ok=True)
    with asyncio.Runner(loop_factory=_best_event_loop_factory()) as runner:
        runner.run(_serve_durable(directory))


# ---------------------------------------------------------------------------
# Load client


class _LoadRun:
    """State shared by the client's connections: message template, phase and tallies."""

    def __init__(self, tag: str, ack_timeout_s: float) -> None:
        self.parts = message_template()
        self.tag = tag
        self.period_ns = 0  # per connection, for a paced run (--sustain); 0: closed loop
        self.ack_timeout_ns = int(ack_timeout_s * 1e9)
        self.sending = True
        self.measuring = False
        self.closing = False
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.latencies_ns: list[int] = []
        self.mismatches = 0
        self.naks = 0
        self.failure_kinds: Counter[str] = Counter()

    def fail(self, kind: str) -> None:
        self.failure_kinds[kind] += 1

    def check_idle(self) -> None:
        if not self.sending and self.in_flight == 0:
            self.idle.set()


class LoadConnection(asyncio.Protocol):
    """One closed-loop MLLP sender: one message in flight, the next sent on its ACK."""

    def __init__(self, run: _LoadRun, index: int) -> None:
        self._run = run
        self._prefix = f"{run.tag}.{index}.".encode()
        self._seq = 0
        self._expected = b""
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self.sent_at_ns = 0  # of the message in flight; 0 when none is
        self.due_ns = 0  # paced: when the message in flight was due to be sent
        self.dead = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check.
        self._transport = cast(asyncio.Transport, transport)

    def send_next(self) -> None:
        assert self._transport is not None
        run = self._run
        self._seq += 1
        self._expected = self._prefix + str(self._seq).encode()
        frame = self._expected.join(run.parts)
        run.in_flight += 1
        self.sent_at_ns = time.perf_counter_ns()
        self._transport.write(frame)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter_ns()
        run = self._run
        buffer = self._buffer
        buffer += data
        end = buffer.find(FRAME_END)
        if end < 0:
            if len(buffer) > MAX_FRAME_BYTES:
                self.abort("oversized ACK")
            return
        if self.sent_at_ns == 0 or end + len(FRAME_END) != len(buffer):
            self.abort("unsolicited data")
            return
        frame = bytes(buffer[:end])
        buffer.clear()
        latency = now - self.sent_at_ns
        self.sent_at_ns = 0
        run.in_flight -= 1
        msa = _msa_fields(frame)
        if msa is None:
            self.abort("malformed ACK")
            return
        if msa[1] != self._expected:
            run.mismatches += 1
        elif msa[0] not in ACCEPT_CODES:
            run.naks += 1
        elif run.measuring:
            run.latencies_ns.append(latency)
        if run.sending:
            self._next()
        else:
            run.check_idle()

    def _next(self) -> None:
        """The next message: at once (closed loop), or at this connection's next slot
        (paced: a connection that fell behind sends at once and stays on its schedule)."""
        period = self._run.period_ns
        if not period:
            self.send_next()
            return
        self.due_ns += period
        wait = (self.due_ns - time.perf_counter_ns()) / 1e9
        if wait <= 0:
            self.send_next()
        else:
            asyncio.get_running_loop().call_later(wait, self._send_if_sending)

    def _send_if_sending(self) -> None:
        if self._run.sending and not self.dead:
            self.send_next()
        else:
            self._run.check_idle()

    def abort(self, kind: str) -> None:
        """Count a failure and drop this connection (it is not reopened)."""
        if self.dead:
            return
        self.dead = True
        self._run.fail(kind)
        self._settle()
        if self._transport is not None:
            self._transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.dead and not self._run.closing:
            self.dead = True
            self._run.fail("connection lost")
            self._settle()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _settle(self) -> None:
        if self.sent_at_ns:
            self.sent_at_ns = 0
            self._run.in_flight -= 1
        self._run.check_idle()


def _msa_fields(frame: bytes) -> tuple[bytes, bytes] | None:
    """(MSA-1, MSA-2) of an ACK frame (``<VT>`` included), or None if it is not an ACK."""
    if frame[:4] != b"\x0bMSH":
        return None
    sep = frame[4:5]
    at = frame.find(SEGMENT_END + b"MSA" + sep)
    if at < 0:
        return None
    seg_end = frame.find(SEGMENT_END, at + 1)
    parts = frame[at + 1 : seg_end if seg_end >= 0 else len(frame)].split(sep, 3)
    if len(parts) < 3:
        return None
    return parts[1], parts[2]


def _percentile_ms(sorted_ns: Sequence[int], q: float) -> float | None:
    """Nearest-rank percentile in milliseconds."""
    if not sorted_ns:
        return None
    rank = max(1, math.ceil(q * len(sorted_ns)))
    return sorted_ns[rank - 1] / 1e6


async def _watchdog(run: _LoadRun, conns: Sequence[LoadConnection]) -> None:
    """Fail ACKs slower than the timeout; exit at once if the orchestrator has died."""
    parent = os.getppid()
    while True:
        await asyncio.sleep(0.2)
        if os.getppid() != parent:
            os._exit(1)  # orphaned: nobody will read the result
        deadline = time.perf_counter_ns() - run.ack_timeout_ns
        for conn in conns:
            if conn.sent_at_ns and conn.sent_at_ns < deadline:
                conn.abort("ACK timeout")


async def run_load(
    port: int | Sequence[int],
    conns: int,
    seconds: float,
    warmup: float,
    tag: str,
    server_pgid: int | None,
    ack_timeout_s: float,
    rate: float = 0.0,
) -> dict[str, Any]:
    """Drive ``conns`` closed-loop connections (with ``rate``, paced to that many messages
    per second in all); return the measurement as a JSON-able dict."""
    loop = asyncio.get_running_loop()
    ports = [port] if isinstance(port, int) else list(port)  # connection i: ports[i % n]
    run = _LoadRun(tag, ack_timeout_s)
    if rate > 0:
        run.period_ns = int(conns * 1e9 / rate)
    attempts = await asyncio.gather(
        *(
            loop.create_connection(lambda i=i: LoadConnection(run, i), HOST, ports[i % len(ports)])
            for i in range(conns)
        ),
        return_exceptions=True,
    )
    connections: list[LoadConnection] = []
    for attempt in attempts:
        if isinstance(attempt, BaseException):
            run.fail(f"connect: {type(attempt).__name__}")
        else:
            connections.append(attempt[1])
    watchdog = asyncio.create_task(_watchdog(run, connections))
    start_ns = time.perf_counter_ns()
    for index, conn in enumerate(connections):
        if run.period_ns:  # spread the connections' slots over one period
            conn.due_ns = start_ns + index * run.period_ns // len(connections) - run.period_ns
            conn._next()
        else:
            conn.send_next()

    await asyncio.sleep(warmup)
    run.measuring = True
    wall0, cpu0 = time.perf_counter(), _own_cpu_seconds()
    server0 = _group_cpu_seconds(server_pgid) if server_pgid else None
    await asyncio.sleep(seconds)
    run.measuring = False
    wall1, cpu1 = time.perf_counter(), _own_cpu_seconds()
    server1 = _group_cpu_seconds(server_pgid) if server_pgid else None

    run.sending = False
    run.check_idle()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(run.idle.wait(), ack_timeout_s + 1)
    run.closing = True
    watchdog.cancel()
    for conn in connections:
        conn.close()
    await asyncio.sleep(0.05)

    window = wall1 - wall0
    latencies = sorted(run.latencies_ns)
    server_cpu = (
        round(100 * (server1 - server0) / window, 1)
        if server0 is not None and server1 is not None
        else None
    )
    return {
        "conns": conns,
        "connected": len(connections),
        "window_s": round(window, 3),
        "acked": len(latencies),
        "msgs_per_s": round(len(latencies) / window, 1),
        "p50_ms": _percentile_ms(latencies, 0.50),
        "p90_ms": _percentile_ms(latencies, 0.90),
        "p99_ms": _percentile_ms(latencies, 0.99),
        "max_ms": _percentile_ms(latencies, 1.0),
        "mismatches": run.mismatches,
        "naks": run.naks,
        "failures": sum(run.failure_kinds.values()),
        "failure_kinds": dict(run.failure_kinds),
        "client_cpu_pct": round(100 * (cpu1 - cpu0) / window, 1),
        "server_cpu_pct": server_cpu,
    }


def client_main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="ingest.py _client")
    parser.add_argument("--port", required=True, help="a port, or several: a,b,c")
    parser.add_argument("--conns", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--warmup", type=float, required=True)
    parser.add_argument("--tag", required=True)
    parser.add_argument("--server-pgid", type=int)
    parser.add_argument("--ack-timeout", type=float, required=True)
    parser.add_argument("--rate", type=float, default=0.0)
    args = parser.parse_args(argv)
    with asyncio.Runner(loop_factory=_best_event_loop_factory()) as runner:
        result = runner.run(
            run_load(
                [int(p) for p in args.port.split(",")],
                args.conns,
                args.seconds,
                args.warmup,
                args.tag,
                args.server_pgid,
                args.ack_timeout,
                args.rate,
            )
        )
    json.dump(result, sys.stdout)


# ---------------------------------------------------------------------------
# Orchestrator: start servers, run one client per cell, report


@dataclass(frozen=True, slots=True)
class RunningServer:
    name: ServerName
    proc: subprocess.Popen[bytes]
    mllp_port: int
    log_path: Path
    http_port: int | None = None
    state: Path | None = None  # where a storing server keeps its database


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel picked it)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group, then SIGKILL it after a grace period."""
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            _progress(f"  pid {proc.pid} ignored SIGTERM for {STOP_GRACE_S:g} s; killing it")
    # Kill leftovers in the group even when the leader has exited.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def _start_own_server(name: ServerName, workdir: Path) -> RunningServer:
    log_path = workdir / f"{name}.log"
    command = [sys.executable, str(Path(__file__).resolve()), "_serve", name]
    env = dict(os.environ)
    state = None
    if name in STORING:
        state = workdir / f"{name}-state"
        command.append(str(state))
        env["REFLOOP_SQL_STATS"] = str(workdir / f"{name}-{SQL_STATS_FILE}")
        if TRACE:
            env["REFLOOP_TXN_TRACE"] = str(workdir / f"{name}-{TRACE_FILE}")
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            env=env,
            cwd=REPO,
            start_new_session=True,
        )
    try:
        assert proc.stdout is not None
        readable, _, _ = select.select([proc.stdout], [], [], SERVER_START_TIMEOUT_S)
        line = proc.stdout.readline() if readable else b""
        if not line.startswith(READY_LINE):
            raise BenchError(f"{name} server did not start\n{_log_tail(log_path)}")
        return RunningServer(name, proc, int(line[len(READY_LINE) :]), log_path, state=state)
    except BaseException:
        stop_server(proc)
        raise


def _http_ok(url: str) -> bool:
    # An empty ProxyHandler: loopback requests must not follow http_proxy from the environment.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


ROUTES = REPO / "routes.yaml"  # --routes changes it (e.g. bench/ingest-only.yaml)
EXECUTABLE = REPO / ".venv" / "bin" / "refloop"  # --refloop changes it


def _start_refloop(
    workdir: Path, ready_timeout_s: float, *, store: str = "", tag: str = ""
) -> RunningServer:
    """``refloop run`` on a fresh state directory (``store``: ``--store``, e.g. a
    PostgreSQL schema several of them share; ``tag`` names its state, log and stats)."""
    executable = EXECUTABLE
    routes = ROUTES
    if not executable.exists():
        raise BenchError(f"{executable} does not exist (pip install -e . first)")
    if not routes.exists():
        raise BenchError(f"{routes} does not exist")
    state = workdir / f"refloop{tag}-state"
    state.mkdir()
    mllp_port, http_port = free_port(), free_port()
    while http_port == mllp_port:
        http_port = free_port()
    env = dict(
        os.environ,
        REFLOOP_MLLP_PORT=str(mllp_port),
        REFLOOP_HTTP_PORT=str(http_port),
        REFLOOP_SQL_STATS=str(workdir / f"refloop{tag}-{SQL_STATS_FILE}"),
    )
    if TRACE:
        env["REFLOOP_TXN_TRACE"] = str(workdir / f"refloop{tag}-{TRACE_FILE}")
    log_path = workdir / f"refloop{tag}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [str(executable), "run", "--routes", str(routes), "--state", str(state)]
            + (["--store", store] if store else []),
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        url = f"http://{HOST}:{http_port}/readyz"
        deadline = time.monotonic() + ready_timeout_s
        while not _http_ok(url):
            if proc.poll() is not None:
                raise BenchError(
                    f"refloop exited with status {proc.returncode} before it was ready\n"
                    f"{_log_tail(log_path)}"
                )
            if time.monotonic() > deadline:
                raise BenchError(
                    f"GET {url} did not return 200 within {ready_timeout_s:g} s\n"
                    f"{_log_tail(log_path)}"
                )
            time.sleep(0.1)
        return RunningServer("refloop", proc, mllp_port, log_path, http_port, state)
    except BaseException:
        stop_server(proc)
        raise


def start_server(name: ServerName, workdir: Path, ready_timeout_s: float) -> RunningServer:
    if name == "refloop":
        return _start_refloop(workdir, ready_timeout_s)
    return _start_own_server(name, workdir)


def run_cell(
    server: RunningServer,
    conns: int,
    tag: str,
    opts: argparse.Namespace,
    *,
    seconds: float | None = None,
    rate: float = 0.0,
    ports: Sequence[int] = (),
) -> CellResult:
    """Run one load client process against ``server`` and return what it measured
    (``rate``: paced to that many messages per second in all, for ``seconds``)."""
    label = SERVER_LABELS[server.name]
    seconds = opts.seconds if seconds is None else seconds
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "_client",
        f"--port={','.join(map(str, ports or [server.mllp_port]))}",
        f"--conns={conns}",
        f"--seconds={seconds}",
        f"--warmup={opts.warmup}",
        f"--tag={tag}",
        f"--server-pgid={server.proc.pid}",
        f"--ack-timeout={opts.ack_timeout}",
        f"--rate={rate}",
    ]
    budget = opts.warmup + seconds + opts.ack_timeout + 30
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            timeout=budget,
            start_new_session=True,
            check=True,
        )
        payload = json.loads(done.stdout)
    except subprocess.CalledProcessError as exc:
        stderr = exc.stderr.decode(errors="replace").strip().splitlines()[-5:]
        raise BenchError(f"client for {label} x{conns} failed: {' | '.join(stderr)}") from exc
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"client for {label} x{conns} ran over {budget:g} s") from exc
    except json.JSONDecodeError as exc:
        raise BenchError(f"client for {label} x{conns} printed no result") from exc
    return CellResult(server=label, **payload)


def _empty_cell(label: str, conns: int, note: str) -> CellResult:
    return CellResult(
        server=label,
        conns=conns,
        connected=0,
        window_s=0.0,
        acked=0,
        msgs_per_s=0.0,
        p50_ms=None,
        p90_ms=None,
        p99_ms=None,
        max_ms=None,
        mismatches=0,
        naks=0,
        failures=0,
        note=note,
    )


def _message_bytes_without_msh10() -> int:
    """The message's size without its control ids (MSH-10, ORC-2, OBR-2)."""
    return sum(map(len, message_template())) - len(START_BLOCK) - len(FRAME_END)


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def render_report(
    results: Sequence[CellResult], unavailable: dict[str, str], conns: Sequence[int]
) -> str:
    """The markdown table, notes and msgs/s ratios of refloop to the two baselines."""
    lines = [
        "| server | conns | msgs/s | p50 ms | p99 ms | errors | client CPU % | server CPU % |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes: list[str] = []
    for cell in results:
        lines.append(
            f"| {cell.server} | {cell.conns} | {_fmt(cell.msgs_per_s, 0)} | {_fmt(cell.p50_ms)}"
            f" | {_fmt(cell.p99_ms)} | {cell.errors if not cell.note else '—'}"
            f" | {_fmt(cell.client_cpu_pct, 0)} | {_fmt(cell.server_cpu_pct, 0)} |"
        )
        if cell.note:
            notes.append(f"- {cell.server} x{cell.conns}: {cell.note}")
        elif cell.errors:
            kinds = dict(cell.failure_kinds, mismatches=cell.mismatches, naks=cell.naks)
            detail = ", ".join(f"{kind} {n}" for kind, n in kinds.items() if n)
            notes.append(f"- {cell.server} x{cell.conns} errors: {detail}")
    for label, reason in unavailable.items():
        notes.append(f"- {label}: not measured: {reason.splitlines()[0]}")
    if notes:
        lines += ["", *notes]

    # A server that failed part-way is listed in `unavailable`: its cells stay in the
    # table (with their errors) but a ratio against it would mean nothing.
    rates = {
        (c.server, c.conns): c.msgs_per_s
        for c in results
        if not c.note and c.server not in unavailable
    }
    ratio_lines = []
    for n in conns:
        refloop = rates.get(("refloop", n))
        if refloop is None:
            continue
        parts = [
            f"{letter} {refloop / rates[(base, n)]:.3f}"
            for letter, base in (("c/d", "durable"), ("c/b", "python-hl7"), ("c/a", "bare"))
            if rates.get((base, n))
        ]
        if parts:
            ratio_lines.append(f"- {n} conn{'s' if n != 1 else ''}: " + ", ".join(parts))
    if ratio_lines:
        lines += [
            "",
            "msgs/s ratios (c = refloop, d = durable ceiling, b = python-hl7, a = bare):",
            *ratio_lines,
        ]
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class SqlStats:
    """A storing server's SQL statements over its whole run (REFLOOP_SQL_STATS), by
    connection: ``inbox-writer`` (the group commits) and ``main`` (processing, and the
    timers, dispatcher and HTTP reads of the daemon)."""

    server: str
    stored: int  # inbox rows at the end
    processed: int  # inbox rows no longer ``received``
    by_label: dict[str, dict[str, int]]


def read_sql_stats(server: RunningServer, workdir: Path) -> SqlStats | None:
    """After the server stopped: its connections' counts and its inbox's row counts."""
    import sqlite3

    path = workdir / f"{server.name}-{SQL_STATS_FILE}"
    database = server.state / "refloop.db" if server.state else None
    if not path.exists() or database is None or not database.exists():
        return None
    by_label: dict[str, dict[str, int]] = {}
    for line in path.read_text().splitlines():
        item = json.loads(line)
        into = by_label.setdefault(str(item["label"]), Counter())
        for key in ("read", "write", "control", "rows"):
            into[key] += int(item[key])
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        stored, processed = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE status != 'received') FROM messages"
        ).fetchone()
    finally:
        conn.close()
    label = SERVER_LABELS[server.name]
    return SqlStats(label, int(stored), int(processed), {k: dict(v) for k, v in by_label.items()})


def _q(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else math.nan


def _ms(values: Sequence[float]) -> str:
    """p50 / p99 / max of ``values`` (seconds) in ms."""
    return f"p50 {_q(values, 0.5) * 1e3:.2f} / p99 {_q(values, 0.99) * 1e3:.2f} / max " + (
        f"{max(values) * 1e3:.1f}" if values else "-"
    )


def read_trace(server: RunningServer, workdir: Path) -> str | None:
    """``--trace``: where the storing server's ACK path spent its time (engine.store.trace),
    as text: the inbox writer's group commits (queueing, lock wait, the commit call,
    back on the loop), who held the write lock when a commit waited over 3 ms, the
    checkpointer's runs and the event loop's stalls. The daemon is the server's pid; a
    transaction of another pid is the processing worker's."""
    path = workdir / f"{server.name}-{TRACE_FILE}"
    if not path.exists():
        return None
    series: dict[tuple[int, str], list[list[float]]] = {}
    for line in path.read_text().splitlines():
        item = json.loads(line)
        series.setdefault((int(item["pid"]), str(item["series"])), []).extend(item["rows"])
    daemon = server.proc.pid
    batches = series.get((daemon, "inbox-batch"), [])
    if not batches:
        return None
    waits = [b[3] for b in batches]
    out = [
        f"{SERVER_LABELS[server.name]}: where the ACK path's time went (--trace, ms)",
        f"- inbox writer: {len(batches)} group commits, "
        f"{sum(b[1] for b in batches) / len(batches):.1f} messages each",
        f"  - oldest message queued {_ms([b[2] for b in batches])}",
        f"  - lock wait {_ms(waits)}; over 3 ms in "
        f"{100 * sum(w > 0.003 for w in waits) / len(waits):.1f} %",
        f"  - commit call (wait + inserts + COMMIT) {_ms([b[4] for b in batches])}",
        f"  - back on the event loop after it {_ms([b[5] for b in batches])}",
    ]
    own = series.get((daemon, "txn:inbox-writer:durable"), [])
    if own:
        out.append(
            f"  - COMMIT {_ms([r[3] for r in own])}; the database file changed during "
            f"{sum(1 for r in own if r[4])} (a checkpoint ran, by any connection)"
        )
    holders: list[tuple[float, float, str]] = []
    for (pid, name), rows in sorted(series.items()):
        if name.startswith("txn:") and pid != daemon:
            kind = "worker " + name.rsplit(":", 1)[1]
            holders.extend((r[0] + r[1], r[0] + r[1] + r[2], kind) for r in rows)
            out.append(
                f"- {kind} transactions: {len(rows)}; holding the lock {_ms([r[2] for r in rows])}"
                f"; their COMMIT {_ms([r[3] for r in rows])}"
            )
        elif name.startswith("txn:") and pid == daemon and "inbox-writer" not in name:
            out.append(
                f"- the daemon's own transactions ({name[4:]}): {len(rows)}; "
                f"BEGIN waited {_ms([r[1] for r in rows])}"
            )
    blame: Counter[str] = Counter()
    for b in batches:
        if b[3] > 0.003:
            over = {h[2] for h in holders if h[0] < b[0] + b[3] and h[1] > b[0]}
            blame[" + ".join(sorted(over)) or "no traced holder"] += 1
    if blame:
        out.append(
            "- lock waits over 3 ms, by who held the lock: "
            + ", ".join(f"{k} {v}" for k, v in blame.most_common())
        )
    for (pid, name), rows in series.items():
        copied = [r for r in rows if name == "checkpoint" and r[3] > 0]
        if copied:
            who = "daemon" if pid == daemon else str(pid)
            out.append(f"- checkpointer ({who}): {len(copied)} runs {_ms([r[1] for r in copied])}")
    late = [r[1] for r in series.get((daemon, "loop-late"), [])]
    if late:
        out.append(
            f"- event loop, lateness of a 1 ms sleep: {_ms(late)}; "
            f"over 5 ms {sum(x > 0.005 for x in late)} times"
        )
    return "\n".join(out)


def render_sql(stats: Sequence[SqlStats]) -> str:
    """Statements per message: the writer's per stored message, the rest per processed."""
    lines = [
        "SQL statements (whole run, every connection of the server process):",
        "",
        "| server | stored | processed | connection | per | reads | writes | control | total |",
        "|---|---:|---:|---|---|---:|---:|---:|---:|",
    ]
    for st in stats:
        for label, counts in sorted(st.by_label.items()):
            per_name, per = (
                ("stored", st.stored) if label == "inbox-writer" else ("processed", st.processed)
            )
            if not per:
                continue
            r, w, c = (counts.get(k, 0) / per for k in ("read", "write", "control"))
            lines.append(
                f"| {st.server} | {st.stored:,} | {st.processed:,} | {label} | {per_name}"
                f" | {r:.2f} | {w:.2f} | {c:.2f} | {r + w + c:.2f} |"
            )
    return "\n".join(lines)


def _metrics_text(server: RunningServer) -> str | None:
    """The daemon's /metrics exposition, None without HTTP or when it does not answer."""
    if server.http_port is None:
        return None
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://{HOST}:{server.http_port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except (urllib.error.URLError, OSError):
        return None
    return text


def processing_lag(server: RunningServer) -> int | None:
    """``refloop_processing_lag_messages`` from the daemon's /metrics."""
    text = _metrics_text(server)
    if text is None:
        return None
    for line in text.splitlines():
        if line.startswith("refloop_processing_lag_messages "):
            return int(float(line.split()[1]))
    return None


def writer_wait(server: RunningServer) -> str | None:
    """``refloop_inbox_writer_wait_seconds`` from the daemon's /metrics: how long its group
    commits waited for SQLite's write lock (held by the processing worker's slices)."""
    text = _metrics_text(server)
    if text is None:
        return None
    name = "refloop_inbox_writer_wait_seconds"
    buckets: dict[str, float] = {}
    count = total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[le] = float(line.rsplit(" ", 1)[1])
        elif line.startswith(name + "_count "):
            count = float(line.split()[1])
        elif line.startswith(name + "_sum "):
            total = float(line.split()[1])
    if not count:
        return None
    shares = ", ".join(
        f"<= {float(le) * 1000:g} ms {100 * buckets[le] / count:.1f} %"
        for le in ("0.0005", "0.002", "0.005", "0.01")
        if le in buckets
    )
    return (
        f"refloop inbox writer, wait for the SQLite write lock per group commit "
        f"({int(count)} commits): mean {1000 * total / count:.3f} ms; {shares}"
    )


def wait_caught_up(server: RunningServer, limit_s: float) -> tuple[int | None, float]:
    """Poll the lag until it is 0 or ``limit_s`` passed: (last lag, seconds waited)."""
    started = time.monotonic()
    lag = processing_lag(server)
    while lag and time.monotonic() - started < limit_s:
        time.sleep(0.25)
        lag = processing_lag(server)
    return lag, time.monotonic() - started


def run_sustain(server: RunningServer, tag: str, opts: argparse.Namespace) -> dict[str, Any]:
    """``--sustain``: from a caught-up daemon, ``--rate`` messages/s on ``--sustain-conns``
    connections for ``--sustain`` seconds; the processing lag when the load stops, and
    how long processing then takes to catch up."""
    before, waited = wait_caught_up(server, 120)
    cell = run_cell(server, opts.sustain_conns, tag, opts, seconds=opts.sustain, rate=opts.rate)
    lag_at_end = processing_lag(server)
    lag_after, drain_s = wait_caught_up(server, 120)
    return {
        "conns": opts.sustain_conns,
        "rate": opts.rate,
        "seconds": opts.sustain,
        "lag_before": before,
        "waited_before_s": round(waited, 1),
        "acked_per_s": cell.msgs_per_s,
        "p50_ms": cell.p50_ms,
        "p99_ms": cell.p99_ms,
        "errors": cell.errors,
        "lag_at_end": lag_at_end,
        "catch_up_s": round(drain_s, 1),
        "lag_after_catch_up": lag_after,
    }


def render_sustain(result: dict[str, Any]) -> str:
    return (
        f"Sustained: refloop at {result['rate']:g} msgs/s offered on {result['conns']} conns "
        f"for {result['seconds']:g} s: {_fmt(result['acked_per_s'], 0)} ACKed msgs/s, p50 "
        f"{_fmt(result['p50_ms'])} ms, p99 {_fmt(result['p99_ms'])} ms, errors "
        f"{result['errors']}; processing lag at the start {result['lag_before']} (after "
        f"waiting {result['waited_before_s']:g} s for 0), at the end {result['lag_at_end']}, "
        f"caught up {result['catch_up_s']:g} s later (lag then {result['lag_after_catch_up']})"
    )


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for dist in ("uvloop", "hl7", "aiorun", "refloop"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[dist] = metadata.version(dist)
    return found


def _parse_servers(text: str) -> list[ServerName]:
    names: list[ServerName] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        if item not in SERVER_ALIASES:
            raise argparse.ArgumentTypeError(
                f"unknown server {item!r}; choose from {', '.join(SERVER_ALIASES)}"
            )
        if SERVER_ALIASES[item] not in names:
            names.append(SERVER_ALIASES[item])
    if not names:
        raise argparse.ArgumentTypeError("no server given")
    return names


def _parse_conns(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from exc
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("connection counts must be positive integers")
    return counts


# ---------------------------------------------------------------------------
# Several nodes (--nodes): SQLite one node vs PostgreSQL 1/2/3 nodes, one client spread
# over the nodes' ports


def _pg_schema(base: str, run_id: str, nodes: int) -> tuple[str, str]:
    """A fresh schema on ``base`` for one configuration: (its URL, its name)."""
    import psycopg

    schema = f"bench_{run_id}_{nodes}n_{secrets.token_hex(2)}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}options=-csearch_path%3D{schema}&application_name={schema}", schema


def _drop_schema(base: str, schema: str) -> None:
    import psycopg

    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def _inbox_counts(store: str) -> tuple[int, int]:
    """(rows stored, rows still ``received``) in the store at ``store``."""
    if store.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(store, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*), count(*) FILTER (WHERE status = 'received') FROM messages"
            ).fetchone()
    else:
        import sqlite3

        conn2 = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=10)
        try:
            row = conn2.execute(
                "SELECT count(*), count(*) FILTER (WHERE status = 'received') FROM messages"
            ).fetchone()
        finally:
            conn2.close()
    assert row is not None
    return int(row[0]), int(row[1])


def _wait_drained(store: str, limit_s: float) -> tuple[int, float]:
    """Poll the rows still ``received`` until 0 or ``limit_s``: (last count, seconds)."""
    started = time.monotonic()
    left = _inbox_counts(store)[1]
    while left and time.monotonic() - started < limit_s:
        time.sleep(0.25)
        left = _inbox_counts(store)[1]
    return left, time.monotonic() - started


def run_node_config(
    workdir: Path, label: str, store: str, n: int, run_id: str, opts: argparse.Namespace
) -> dict[str, Any]:
    """Start ``n`` daemons on ``store`` (the first migrates), measure ``--nodes-conns``
    closed-loop connections spread over their ports, then (``--sustain``) half that rate
    paced for that long, and read the SQL statement counts after they stop."""
    servers: list[RunningServer] = []
    tag0 = f"-{run_id}-{label.lower()}-{n}"
    try:
        for i in range(n):
            servers.append(
                _start_refloop(workdir, opts.ready_timeout, store=store, tag=f"{tag0}-{i}")
            )
        ports = [sv.mllp_port for sv in servers]
        sqlite_file = "" if store else str(servers[0].state / "refloop.db")  # type: ignore[operator]
        where = store or sqlite_file
        cell = run_cell(servers[0], opts.nodes_conns, f"{run_id}n{n}{label[0]}", opts, ports=ports)
        result: dict[str, Any] = {
            "store": label,
            "nodes": n,
            "conns": opts.nodes_conns,
            "msgs_per_s": cell.msgs_per_s,
            "p50_ms": cell.p50_ms,
            "p99_ms": cell.p99_ms,
            "errors": cell.errors,
        }
        left, waited = _wait_drained(where, 300)
        result["drain_after_s"] = round(waited, 1)
        if opts.sustain and cell.msgs_per_s:
            rate = cell.msgs_per_s / 2
            paced = run_cell(
                servers[0],
                opts.nodes_conns,
                f"{run_id}s{n}{label[0]}",
                opts,
                seconds=opts.sustain,
                rate=rate,
                ports=ports,
            )
            lag_end = _inbox_counts(where)[1]
            drain0 = time.monotonic()
            left, catch_up = _wait_drained(where, 300)
            if lag_end:  # processing alone, no load: what the nodes process per second
                result["processing_per_s"] = round(
                    (lag_end - left) / max(time.monotonic() - drain0, 1e-3), 1
                )
            result.update(
                sustain_rate=round(rate, 1),
                sustain_acked_per_s=paced.msgs_per_s,
                sustain_p99_ms=paced.p99_ms,
                sustain_errors=paced.errors,
                lag_at_end=lag_end,
                catch_up_s=round(catch_up, 1),
                lag_after=left,
            )
    finally:
        for sv in servers:
            stop_server(sv.proc)
    stored, received = _inbox_counts(where)
    totals: Counter[str] = Counter()
    main: Counter[str] = Counter()
    for i in range(n):
        path = workdir / f"refloop{tag0}-{i}-{SQL_STATS_FILE}"
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            item = json.loads(line)
            for key in ("read", "write", "control"):
                totals[key] += int(item[key])
                if item["label"] == "main":
                    main[key] += int(item[key])
    processed = stored - received
    result["stored"] = stored
    result["processed"] = processed
    if processed:
        result["stmts_per_msg"] = round(sum(totals.values()) / processed, 1)
        result["main_stmts_per_msg"] = round(sum(main.values()) / processed, 1)
    return result


def render_nodes(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| store | nodes | conns | msgs/s | p50 ACK ms | p99 ACK ms | errors "
        "| statements / processed msg (all conns; processing conn) "
        "| sustained at half rate: ACKed/s, p99 ms | lag at end | caught up after "
        "| processing msgs/s (no load) |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|",
    ]
    for r in rows:
        sustained = (
            f"{_fmt(r['sustain_acked_per_s'], 0)} of {r['sustain_rate']:g}, "
            f"{_fmt(r['sustain_p99_ms'])}"
            if "sustain_rate" in r
            else "-"
        )
        lines.append(
            f"| {r['store']} | {r['nodes']} | {r['conns']} | {_fmt(r['msgs_per_s'], 0)} "
            f"| {_fmt(r['p50_ms'])} | {_fmt(r['p99_ms'])} | {r['errors']} "
            f"| {r.get('stmts_per_msg', '-')}; {r.get('main_stmts_per_msg', '-')} "
            f"| {sustained} | {r.get('lag_at_end', '-')} | {r.get('catch_up_s', '-')} s "
            f"| {_fmt(r.get('processing_per_s'), 0)} |"
        )
    return "\n".join(lines)


def nodes_main(opts: argparse.Namespace) -> int:
    """``--nodes 1,2,3 --store postgresql://…``: SQLite one node, then PostgreSQL with
    each node count, one table."""
    run_id = secrets.token_hex(2)
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    configs: list[tuple[str, int]] = [("SQLite", 1)] if not opts.no_sqlite else []
    configs += [("PostgreSQL", n) for n in opts.nodes]
    with tempfile.TemporaryDirectory(prefix="refloop-bench-") as tmp:
        workdir = Path(tmp)
        for label, n in configs:
            _progress(f"{label}, {n} node(s): starting")
            schema = ""
            store = ""
            if label == "PostgreSQL":
                store, schema = _pg_schema(opts.store, run_id, n)
            try:
                row = run_node_config(workdir, label, store, n, run_id, opts)
            finally:
                if schema:
                    _drop_schema(opts.store, schema)
            _progress(json.dumps(row))
            rows.append(row)
    load_after = os.getloadavg()
    print(
        f"refloop ingest + processing, SQLite vs PostgreSQL nodes "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, "
        f"routes {ROUTES.name}, window {opts.seconds:g} s, sustained {opts.sustain:g} s):\n"
    )
    print(render_nodes(rows))
    print(
        f"\nload average at start {load_before[0]:.2f} {load_before[1]:.2f} "
        f"{load_before[2]:.2f}, at end {load_after[0]:.2f} {load_after[1]:.2f} "
        f"{load_after[2]:.2f}"
    )
    if opts.json:
        opts.json.write_text(json.dumps({"nodes": rows}, indent=2) + "\n")
    return 0 if all(r["errors"] == 0 for r in rows) else 1


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ingest.py",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="Example: .venv/bin/python bench/ingest.py --servers bare,hl7 --seconds 2",
    )
    parser.add_argument(
        "--servers",
        type=_parse_servers,
        default=list(SERVER_NAMES),
        help="comma-separated subset of bare,hl7,durable,refloop (default: all four)",
    )
    parser.add_argument(
        "--conns",
        type=_parse_conns,
        default=[1, 16, 64],
        help="comma-separated connection counts (default: 1,16,64)",
    )
    parser.add_argument(
        "--seconds", type=float, default=5.0, help="measured window per cell (default: 5)"
    )
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="warm-up before each window (default: 1)"
    )
    parser.add_argument(
        "--ack-timeout",
        type=float,
        default=5.0,
        help="an ACK slower than this is an error and drops its connection (default: 5)",
    )
    parser.add_argument(
        "--ready-timeout",
        type=float,
        default=30.0,
        help="how long to wait for refloop's /readyz (default: 30)",
    )
    parser.add_argument(
        "--routes",
        type=Path,
        default=REPO / "routes.yaml",
        help="routes.yaml for refloop (default: the shipped one, which routes and tracks "
        "every ORM; bench/ingest-only.yaml measures ingest alone)",
    )
    parser.add_argument(
        "--refloop",
        type=Path,
        default=EXECUTABLE,
        help="the refloop executable for (c) (default: this checkout's .venv/bin/refloop; "
        "another checkout's measures its code against the same client and baselines)",
    )
    parser.add_argument(
        "--sustain",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="after refloop's cells, offer --rate msgs/s for this long and report the "
        "processing lag when the load stops (default: 0, no sustained run)",
    )
    parser.add_argument(
        "--rate", type=float, default=500.0, help="msgs/s offered in the sustained run (500)"
    )
    parser.add_argument(
        "--sustain-conns", type=int, default=16, help="connections of the sustained run (16)"
    )
    parser.add_argument(
        "--store",
        default="",
        metavar="URL",
        help="PostgreSQL server (postgresql://user@host/db) for --nodes: each "
        "configuration gets a fresh schema there, dropped afterwards",
    )
    parser.add_argument(
        "--nodes",
        type=_parse_conns,
        default=[],
        help="multi-node mode: SQLite one node, then PostgreSQL (--store) with each of "
        "these node counts (e.g. 1,2,3), one client spread over the nodes' ports; "
        "--sustain paces half the measured rate",
    )
    parser.add_argument(
        "--nodes-conns", type=int, default=16, help="connections in --nodes mode (16)"
    )
    parser.add_argument("--no-sqlite", action="store_true", help="--nodes: skip the SQLite row")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write raw results here")
    parser.add_argument(
        "--trace",
        action="store_true",
        help="the storing servers record where the ACK path's time goes (REFLOOP_TXN_TRACE: "
        "lock waits, COMMIT, checkpoints, event-loop stalls) and the report prints it",
    )
    opts = parser.parse_args(argv)
    if opts.seconds <= 0 or opts.warmup < 0 or opts.ack_timeout <= 0:
        parser.error("--seconds and --ack-timeout must be positive, --warmup non-negative")
    return opts


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def bench_main(argv: Sequence[str]) -> int:
    global ROUTES, EXECUTABLE, TRACE
    opts = _parse_args(argv)
    TRACE = opts.trace
    ROUTES = opts.routes.resolve()
    EXECUTABLE = opts.refloop.absolute()
    if opts.nodes:
        if not opts.store.startswith("postgresql://"):
            raise SystemExit("--nodes needs --store postgresql://…")
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        return nodes_main(opts)
    # Ctrl-C and SIGTERM take the same cleanup path (SIGINT may arrive ignored, e.g. in a
    # background job, so its default handler is installed explicitly).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    run_id = secrets.token_hex(2)  # keeps MSH-10 unique even if a state dir were reused
    results: list[CellResult] = []
    sql_stats: list[SqlStats] = []
    sustain: dict[str, Any] | None = None
    lock_wait: str | None = None
    traces: list[str] = []
    load_before = os.getloadavg()
    unavailable: dict[str, str] = {}
    client_failed = interrupted = False
    started = time.time()
    cells = itertools.count()
    with tempfile.TemporaryDirectory(prefix="refloop-bench-") as tmp:
        workdir = Path(tmp)
        try:
            for name in opts.servers:
                label = SERVER_LABELS[name]
                _progress(f"{label}: starting")
                try:
                    server = start_server(name, workdir, opts.ready_timeout)
                except BenchError as exc:
                    unavailable[label] = str(exc)
                    _progress(f"{label}: unavailable: {exc}")
                    continue
                try:
                    _progress(f"{label}: MLLP on {HOST}:{server.mllp_port}, pid {server.proc.pid}")
                    for conns in opts.conns:
                        tag = f"{run_id}{next(cells)}"
                        try:
                            cell = run_cell(server, conns, tag, opts)
                        except BenchError as exc:
                            client_failed = True
                            cell = _empty_cell(label, conns, str(exc))
                        results.append(cell)
                        _progress(
                            f"{label} x{conns}: {_fmt(cell.msgs_per_s, 0)} msgs/s, "
                            f"p99 {_fmt(cell.p99_ms)} ms, errors {cell.errors}"
                            + (f" ({cell.note})" if cell.note else "")
                        )
                        if server.proc.poll() is not None:
                            raise BenchError(
                                f"{label} exited with status {server.proc.returncode}\n"
                                f"{_log_tail(server.log_path)}"
                            )
                    if name == "refloop" and opts.sustain:
                        _progress(f"{label}: sustained run, {opts.rate:g} msgs/s")
                        sustain = run_sustain(server, f"{run_id}{next(cells)}", opts)
                        _progress(render_sustain(sustain))
                except BenchError as exc:
                    unavailable[label] = str(exc)
                    _progress(f"{label}: {exc}")
                finally:
                    if name == "refloop":
                        lock_wait = writer_wait(server)
                    stop_server(server.proc)
                    stats = read_sql_stats(server, workdir)
                    if stats is not None:
                        sql_stats.append(stats)
                    traced = read_trace(server, workdir) if TRACE else None
                    if traced is not None:
                        traces.append(traced)
        except KeyboardInterrupt:
            interrupted = True
            _progress("interrupted; servers stopped; partial results follow")

    load_after = os.getloadavg()
    print(render_report(results, unavailable, opts.conns))
    if sql_stats:
        print("\n" + render_sql(sql_stats))
    if sustain is not None:
        print("\n" + render_sustain(sustain))
    if lock_wait is not None:
        print("\n" + lock_wait)
    for traced in traces:
        print("\n" + traced)
    print(
        "\nload average (1/5/15 min) at the start: "
        + " / ".join(f"{x:.2f}" for x in load_before)
        + "; at the end: "
        + " / ".join(f"{x:.2f}" for x in load_after)
    )
    if opts.json:
        report = {
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "duration_s": round(time.time() - started, 1),
            "settings": {
                "servers": [SERVER_LABELS[n] for n in opts.servers],
                "conns": opts.conns,
                "seconds": opts.seconds,
                "warmup": opts.warmup,
                "ack_timeout": opts.ack_timeout,
                "message_bytes_without_msh10": _message_bytes_without_msh10(),
            },
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
            "versions": _versions(),
            "unavailable": unavailable,
            "interrupted": interrupted,
            "results": [asdict(cell) | {"errors": cell.errors} for cell in results],
            "sql": [asdict(st) for st in sql_stats],
            "sustain": sustain,
            "load_average": {"start": load_before, "end": load_after},
        }
        opts.json.write_text(json.dumps(report, indent=2) + "\n")
    if interrupted:
        return 130
    return 1 if unavailable or client_failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["_serve"]:
        if args[1] == "durable":
            run_durable_server(args[2])
        else:
            {"bare": run_bare_server, "hl7": run_hl7_server}[args[1]]()
        return 0
    if args[:1] == ["_client"]:
        client_main(args[1:])
        return 0
    return bench_main(args)


if __name__ == "__main__":
    sys.exit(main())
