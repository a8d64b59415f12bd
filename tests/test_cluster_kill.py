"""Issue 17 stage 3, the proof: three real ``refloop run --store postgresql://…`` daemons
on one PostgreSQL schema, a stream of referrals, bookings and reports over 8 MLLP
connections spread across their ports (with identical resends), and ``kill -9`` of one
node mid-stream: the holder of the singletons lease (pollers, the timer wheel) or a plain
node. Clients whose connection dropped reconnect to a live node and resend every frame
not yet ACKed; the killed node restarts halfway through what is left.

Escalation timers fire within seconds (the ``dermatology`` cadence of this test's
routes.yaml: first nudge 2 s after the referral opened … close 40 s), and the outbox
drains into a fake provider: a real HTTP server on loopback behind three webhook
channels, which records every request and answers a repeated ``Idempotency-Key`` with its
first answer, as real providers do.

Checked afterwards, in the database and at the provider:

* every ACKed control id is stored exactly once, and every message was processed;
* per referral the same end state (statuses, pending timers, outbox rows, audit actions)
  as one daemon alone fed the same stream (the reference run, once per module), and the
  end state the stream calls for (group by group, by hand);
* each outbox key reached the provider once; a repeat only for a send the kill cut (its
  row was claimed by the killed node), counted and bounded by what that node could have
  had in flight;
* no timer fired twice (one acted-or-moot audit row per timer key);
* ``refloop audit verify`` passes; nothing is left ``sending``.

PostgreSQL only: skipped without ``REFLOOP_TEST_STORE=postgresql://…``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Final

import psycopg
import pytest
from helpers import HOST, Daemon, drop_pg_schema, make_pg_schema, refloop, shipped_routes
from test_referral_keys import message

from engine.hl7v2.mllp import Framer, frame

TEST_STORE = os.environ.get("REFLOOP_TEST_STORE", "")
pytestmark = [
    pytest.mark.store,
    pytest.mark.skipif(
        not TEST_STORE.startswith("postgresql"), reason="PostgreSQL only (REFLOOP_TEST_STORE)"
    ),
]

REFERRALS = 900  # a third each: never booked (fast timers), booked, booked and reported
CONNECTIONS = 8
WINDOW = 4  # frames in flight per connection
RESEND_EVERY = 25  # about one frame in 25 is sent twice, identically
# store.lease_seconds: outbox claims and the singletons lease. Short, so the killed node's
# claims come back soon, but not so short that a live node's event loop, stalled by a
# loaded 2-core machine, loses its leases mid-send (each such send is a repeat too)
LEASE = 10
SEED = 17
DRAIN = 150.0  # seconds for timers to fire and the outbox to drain after the stream
# the killed node may have had this many sends in flight: 3 channels x concurrency 4
CUT_BOUND = 3 * 4


# -- the stream ------------------------------------------------------------------------


def _ref(k: int) -> tuple[str, bytes]:
    fast = k % 3 == 0  # dermatology: the fast cadence; the others are cardiology (days)
    code = "REFDERM^Dermatology referral^L" if fast else "REFCARD^Cardiology referral^L"
    cid = f"R{k:05d}"
    return cid, message(
        cid,
        "REF^I12^REF_I12",
        "NORTHSIDE",
        "HUB",
        f"RF1|P^Pending^HL70283|R^Routine^HL70280|Med||O|P{k:05d}^NORTH_EHR|20260105",
        f"PID|1||M{k:05d}^^^NORTHSIDE^MR||Doe^Jane||19700101|F",
        f"OBR|1|P{k:05d}^NORTH_EHR||{code}",
    )


def _siu(k: int) -> tuple[str, bytes]:
    """Booked for a day years ahead: no appointment timer falls due during the test."""
    cid = f"S{k:05d}"
    when = "20350120090000"
    sch = ["SCH", f"A{k:05d}", f"A{k:05d}"] + [""] * 8 + [f"^^^{when}"]
    sch += [""] * 13 + ["Booked", f"P{k:05d}^NORTH_EHR"]
    return cid, message(
        cid,
        "SIU^S12^SIU_S12",
        "CARDIO",
        "NORTHSIDE",
        "|".join(sch),
        f"PID|1||M{k:05d}^^^NORTHSIDE^MR||Doe^Jane",
        "RGS|1",
        f"AIS|1||CONSULT^Consult|{when}",
    )


def _oru(k: int) -> tuple[str, bytes]:
    cid = f"O{k:05d}"
    return cid, message(
        cid,
        "ORU^R01^ORU_R01",
        "CARDIO",
        "NORTHSIDE",
        f"PID|1||M{k:05d}^^^NORTHSIDE^MR||Doe^Jane",
        f"OBR|1|P{k:05d}^NORTH_EHR|F{k:05d}|CONSULT^Consult note|||20350120100000" + "|" * 18 + "F",
    )


def stream() -> list[list[tuple[str, bytes]]]:
    """Per connection, its frames in order: its referrals' REF^I12s, then their bookings,
    then their reports (each ACKed on-processed, so a referral exists before its booking
    is sent), with about one frame in ``RESEND_EVERY`` repeated at once."""
    rng = random.Random(SEED)
    per: list[list[tuple[str, bytes]]] = []
    for c in range(CONNECTIONS):
        ks = range(c, REFERRALS, CONNECTIONS)
        frames = [_ref(k) for k in ks]
        frames += [_siu(k) for k in ks if k % 3 != 0]
        frames += [_oru(k) for k in ks if k % 3 == 2]
        out: list[tuple[str, bytes]] = []
        for f in frames:
            out.append(f)
            if rng.randrange(RESEND_EVERY) == 0:
                out.append(f)
        per.append(out)
    return per


# -- the fake provider ------------------------------------------------------------------


@dataclass
class Provider:
    """A real HTTP server on loopback: records each POST's Idempotency-Key and answers a
    repeated key with the id it gave the first time."""

    server: ThreadingHTTPServer
    requests: Counter[str] = field(default_factory=Counter)
    answers: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server.server_address[1]}/hook"


@contextlib.contextmanager
def provider() -> Iterator[Provider]:
    box: list[Provider] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            key = self.headers.get("Idempotency-Key") or ""
            p = box[0]
            with p.lock:
                p.requests[key] += 1
                answer = p.answers.setdefault(key, f"prov-{len(p.answers) + 1}")
            body = json.dumps({"id": answer}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with contextlib.suppress(OSError):  # the node was killed before the answer
                self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer((HOST, 0), Handler)
    server.daemon_threads = True
    box.append(Provider(server))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    try:
        yield box[0]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


# -- routes.yaml -------------------------------------------------------------------------


def _local_noon_zone() -> str:
    """An Etc/GMT zone where it is about noon now, so the contact window (and the date
    line) never defers a nudge during the test, whenever it runs."""
    hour = time.gmtime().tm_hour
    offset = hour - 12  # Etc/GMT+h is UTC-h: local = UTC - h
    offset = max(-12, min(11, offset))
    return "Etc/GMT" if offset == 0 else f"Etc/GMT{offset:+d}"


def routes(path: Path, url: str, hook: str, *, store_url: str = "") -> Path:
    secret = path.parent / "hook.secret"
    secret.write_text("kill-test-secret")
    hook_channel = {"type": "webhook", "url": hook, "secret": f"${{file:{secret}}}"}
    store: dict[str, Any] = {"lease_seconds": LEASE, "pool": {"min": 2, "max": 4}}
    if store_url:
        store["url"] = store_url
    return shipped_routes(
        path,
        ack_when="on-processed",
        store=store,
        channels={"portal": hook_channel, "task": hook_channel, "coordinator": hook_channel},
        escalation={
            "specialties": {
                "dermatology": {
                    "first_nudge": 2,
                    "second_nudge": 4,
                    "coordinator_task": 6,
                    "outreach": 8,
                    # long after the nudge: a nudge whose send the kill cut is sent
                    # again once its lease ran out (LEASE), before the close cancels it
                    "attempt_close": 4 * LEASE,
                }
            },
            "contact": {
                "window": "00:00-23:59",
                "per_day": 24,
                "per_week": 100,
                "default_time_zone": _local_noon_zone(),
            },
        },
    )


# -- the clients -------------------------------------------------------------------------


@dataclass
class Cluster:
    daemons: list[Daemon]
    live: list[Daemon]
    acks: int = 0
    acked: set[str] = field(default_factory=set)
    reconnects: int = 0
    # the chaos run: past ``hold_at`` ACKs the connections send nothing new until the
    # killed node is back (``rejoined``), so the restart always lands mid-stream (a
    # fast run once finished the stream during the node's start: restarted at 1875 of 1875)
    hold_at: int = 1 << 30
    rejoined: bool = True

    def holding(self) -> bool:
        return not self.rejoined and self.acks >= self.hold_at


async def _connection(idx: int, frames: list[tuple[str, bytes]], cluster: Cluster) -> None:
    """Send ``frames`` in order, WINDOW in flight; when the node goes away, reconnect to a
    live node and resend every frame not ACKed yet."""
    todo: deque[tuple[str, bytes]] = deque(frames)
    tries = 0
    while todo:
        live = list(cluster.live)
        node = live[(idx + tries) % len(live)]
        tries += 1
        try:
            reader, writer = await asyncio.open_connection(HOST, node.mllp)
        except OSError:
            await asyncio.sleep(0.2)
            continue
        framer = Framer(1 << 24)
        got: deque[bytes] = deque()
        pending: deque[tuple[str, bytes]] = deque()
        try:
            while todo or pending:
                while len(pending) < WINDOW and todo and not cluster.holding():
                    item = todo.popleft()
                    writer.write(frame(item[1]))
                    pending.append(item)
                if not pending:  # held until the killed node is back
                    await asyncio.sleep(0.05)
                    continue
                await writer.drain()
                while not got:
                    data = await asyncio.wait_for(reader.read(65536), 90)
                    if not data:
                        raise ConnectionResetError("closed")
                    got.extend(framer.feed(data))
                reply = got.popleft().decode(errors="replace")
                cid, _raw = pending.popleft()
                msa = next(s for s in reply.split("\r") if s.startswith("MSA|")).split("|")
                assert msa[2] == cid, (msa, cid)
                assert msa[1] == "AA", (msa, cid)
                cluster.acks += 1
                cluster.acked.add(cid)
        except (OSError, TimeoutError, ConnectionError):
            todo.extendleft(reversed(pending))  # every frame not ACKed goes again
            cluster.reconnects += 1
        finally:
            writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()


async def _feed(
    cluster: Cluster,
    per: list[list[tuple[str, bytes]]],
    victim: str = "",
    schema_url: str = "",
) -> dict[str, Any]:
    total = sum(len(f) for f in per)
    out: dict[str, Any] = {}

    async def chaos() -> None:
        if not victim:
            return
        while cluster.acks < total * 2 // 5:
            await asyncio.sleep(0.05)
        cluster.hold_at, cluster.rejoined = total * 9 // 10, False
        target = _pick(cluster, victim, schema_url)
        out["holder_before"] = _holder(schema_url)
        assert target.proc is not None
        out["killed_node"] = f"{socket.gethostname()}:{target.proc.pid}"
        await asyncio.to_thread(target.kill)  # SIGKILL
        out["killed_at_acks"] = cluster.acks
        with psycopg.connect(schema_url) as conn:  # the sends the kill cut
            out["cut"] = {
                str(r[0])
                for r in conn.execute(
                    "SELECT idempotency_key FROM outbox WHERE status = 'sending' "
                    "AND claimed_by = %s",
                    (out["killed_node"],),
                )
            }
        cluster.live.remove(target)
        while cluster.acks < total * 7 // 10:
            await asyncio.sleep(0.05)
        await asyncio.to_thread(target.start, 60.0)
        cluster.live.append(target)
        out["restarted_at_acks"] = cluster.acks
        cluster.rejoined = True

    await asyncio.gather(
        chaos(), *(_connection(i, frames, cluster) for i, frames in enumerate(per))
    )
    return out


def _holder(url: str) -> str:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT holder FROM leases WHERE name = 'singletons'").fetchone()
    return str(row[0]) if row else ""


def _pick(cluster: Cluster, victim: str, url: str) -> Daemon:
    holder = _holder(url)
    by_node = {f"{socket.gethostname()}:{d.proc.pid}": d for d in cluster.live if d.proc}
    assert holder in by_node, (holder, list(by_node))
    if victim == "holder":
        return by_node[holder]
    return next(d for n, d in by_node.items() if n != holder)


# -- reading the outcome -------------------------------------------------------------------


def _wait_settled(url: str, daemons: list[Daemon], timeout: float = DRAIN) -> None:
    """Until nothing is left to do: every message processed, no timer due, every fast
    (never booked) referral closed, no outbox row pending or sending."""
    deadline = time.monotonic() + timeout
    last: tuple[Any, ...] = ()
    while time.monotonic() < deadline:
        with psycopg.connect(url) as conn:
            last = tuple(
                conn.execute(q, (time.time(),) if "%s" in q else ()).fetchone()[0]  # type: ignore[index]
                for q in (
                    "SELECT count(*) FROM messages WHERE status = 'received'",
                    "SELECT count(*) FROM timers WHERE due <= %s",
                    "SELECT count(*) FROM referrals WHERE specialty_category = 'Dermatology' "
                    "AND status != 'closed'",
                    "SELECT count(*) FROM outbox WHERE status IN ('pending', 'sending')",
                )
            )
        if last == (0, 0, 0, 0):
            return
        time.sleep(0.5)
    tails = "\n\n".join(d.log_tail(30) for d in daemons)
    raise AssertionError(f"not settled (received, due timers, open, outbox): {last}\n{tails}")


SENT_OR_CANCELLED: Final = "sent|cancelled"


def _end_state(url: str) -> dict[str, Any]:
    """Per referral (by placer number), what must not depend on who processed what."""
    state: dict[str, Any] = {}
    with psycopg.connect(url) as conn:
        ids = {}
        for rid, placer, status, patient, specialist, reason in conn.execute(
            "SELECT id, placer_number, status, patient_status, specialist_status, close_reason "
            "FROM referrals"
        ):
            ids[rid] = placer
            state[placer] = {
                "status": (status, patient, specialist, reason),
                "timers": [],
                "outbox": [],
                "audit": [],
            }
        for rid, kind, attempt in conn.execute("SELECT referral_id, kind, attempt FROM timers"):
            state[ids[rid]]["timers"].append((kind, attempt))
        for rid, channel, template, status in conn.execute(
            "SELECT referral_id, channel, template, status FROM outbox"
        ):
            state[ids[rid]]["outbox"].append((channel, template, status))
        for rid, action, detail in conn.execute(
            "SELECT referral_id, action, detail FROM audit WHERE referral_id IS NOT NULL"
        ):
            d = json.loads(detail)
            result = d.get("result", "") if action.startswith("timer:") else ""
            state[ids[rid]]["audit"].append((action, result))
    for s in state.values():
        if s["status"][0] == "closed":
            # a staff task still queued when the referral closes is cancelled; whether the
            # dispatcher had sent it first depends on timing, not on the stream
            s["outbox"] = [
                (c, t, SENT_OR_CANCELLED if c == "task" and st in ("sent", "cancelled") else st)
                for c, t, st in s["outbox"]
            ]
        for k in ("timers", "outbox", "audit"):
            s[k].sort()
    return state


def _expired(daemons: list[Daemon], killed: str) -> set[int]:
    """Outbox ids whose lease, held by a node other than the killed one, ran out
    mid-send (the reaper's warning in the logs: that node stalled)."""
    found: set[int] = set()
    for d in daemons:
        for line in d.log_path.read_text(errors="replace").splitlines():
            if "expired mid-send" in line and f" lease of {killed} " not in line:
                found.add(int(line.split("outbox ", 1)[1].split(":", 1)[0]))
    return found


def _diff(got: dict[str, Any], want: dict[str, Any]) -> dict[str, Any]:
    """What differs in one referral's end state: (here, in the reference)."""
    out: dict[str, Any] = {}
    for k in want:
        if got[k] != want[k]:
            if isinstance(want[k], list):
                g, w = Counter(got[k]), Counter(want[k])
                out[k] = (sorted((g - w).elements()), sorted((w - g).elements()))
            else:
                out[k] = (got[k], want[k])
    return out


def _audit_verify(routes_path: Path, state_dir: Path) -> None:
    out = refloop("audit", "verify", "--routes", str(routes_path), "--state", str(state_dir))
    assert out.returncode == 0, out.stdout.decode() + out.stderr.decode()


def _stop(daemons: list[Daemon]) -> None:
    for d in daemons:
        if d.proc is not None and d.proc.poll() is None:
            d.signal(signal.SIGTERM)
    for d in daemons:
        if d.proc is not None:
            assert d.wait(60) == 0, d.log_tail()


# -- the reference: one daemon, no kill ------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("reference")
    url, schema = make_pg_schema(TEST_STORE)
    try:
        with provider() as hook:
            path = routes(tmp / "routes.yaml", url, hook.url)
            d = Daemon(state_dir=tmp / "state", log_path=tmp / "daemon.log", routes=path)
            d.store = url
            try:
                d.start(60.0)
                cluster = Cluster([d], [d])
                asyncio.run(_feed(cluster, stream()))
                _wait_settled(url, [d])
                _stop([d])
            finally:
                d.kill()
        yield _end_state(url)
    finally:
        drop_pg_schema(TEST_STORE, schema)


def test_reference_run_ends_as_the_stream_says(reference: dict[str, Any]) -> None:
    """The single-node run itself, against what the stream calls for (by hand, from
    docs/escalation.md and docs/referral-states.md): no channel reaches the specialist,
    so every referral gets the "no way to reach the specialist" task at once; a referral
    never booked gets the first nudge by portal (no SMS consent), the second nudge's slot
    is voice (no voice channel, no call task: nothing sent), the 14- and 30-day tasks
    merge into the task queued within the hour, and the 60-day step closes it; a booking
    cancels the not-booked timers and starts the specialist follow-up and the report
    request; a report closes the referral."""
    assert len(reference) == REFERRALS
    # the packet task of a referral that closed: sent, or cancelled if still queued
    packet_task = ("task", "no-way-to-reach-specialist", SENT_OR_CANCELLED)
    for k in range(REFERRALS):
        s = reference[f"P{k:05d}"]
        if k % 3 == 0:
            assert s["status"] == ("closed", "nudged", "not-sent", "no-response"), s
            assert s["timers"] == [], s
            assert s["outbox"] == sorted([("portal", "first_nudge", "sent"), packet_task]), s
            fired = [a for a in s["audit"] if a[0].startswith("timer:")]
            assert fired == [
                ("timer:attempt-close", "acted"),
                ("timer:coordinator-task", "acted"),
                ("timer:first-nudge", "acted"),
                ("timer:outreach", "acted"),
                ("timer:second-nudge", "acted"),
            ], s
        elif k % 3 == 1:
            assert s["status"] == ("patient-booked", "booked", "not-sent", ""), s
            assert s["timers"] == [("report-request", 1), ("specialist-followup", 1)], s
            assert s["outbox"] == [("task", "no-way-to-reach-specialist", "sent")], s
            assert s["audit"] == [("appointment-booked", ""), ("referral-created", "")], s
        else:
            assert s["status"] == ("closed", "booked", "report-received", "report-received"), s
            assert s["timers"] == [] and s["outbox"] == [packet_task], s
            assert [a for a, _ in s["audit"]] == [
                "appointment-booked",
                "referral-created",
                "report-received",
            ], s


# -- the proof ---------------------------------------------------------------------------------


@pytest.mark.parametrize("victim", ["holder", "plain"])
def test_kill_9_one_of_three_nodes_mid_stream(
    victim: str, reference: dict[str, Any], tmp_path: Path
) -> None:
    url, schema = make_pg_schema(TEST_STORE)
    daemons: list[Daemon] = []
    try:
        with provider() as hook:
            path = routes(tmp_path / "routes.yaml", url, hook.url)
            for n in "abc":
                d = Daemon(
                    state_dir=tmp_path / f"state-{n}", log_path=tmp_path / f"{n}.log", routes=path
                )
                d.store = url
                d.start(60.0)
                daemons.append(d)
            per = stream()
            cluster = Cluster(daemons, list(daemons))
            chaos = asyncio.run(_feed(cluster, per, victim, url))
            # the victim was who it should be, and the kill came mid-stream
            assert (chaos["holder_before"] == chaos["killed_node"]) == (victim == "holder")
            total = sum(len(f) for f in per)
            assert 0 < chaos["killed_at_acks"] < chaos["restarted_at_acks"] < total
            _wait_settled(url, daemons)
            _stop(daemons)
            requests = Counter(hook.requests)
        cli_routes = routes(tmp_path / "cli.yaml", url, "http://127.0.0.1:9/none", store_url=url)
        _audit_verify(cli_routes, tmp_path / "no-state")

        sent = {cid for frames in per for cid, _ in frames}
        resent = sum(len(f) for f in per) - len(sent)
        with psycopg.connect(url) as conn:
            stored: dict[str, int] = dict(
                conn.execute("SELECT control_id, count(*) FROM messages GROUP BY control_id")
            )
            statuses: Counter[str] = Counter(
                dict(conn.execute("SELECT status, count(*) FROM messages GROUP BY status"))
            )
            duplicates = conn.execute("SELECT sum(duplicates) FROM messages").fetchone()
            outbox = conn.execute("SELECT idempotency_key, status, id FROM outbox").fetchall()
            leftover = conn.execute(
                "SELECT count(*) FROM outbox WHERE status = 'sending'"
            ).fetchone()
            fires = Counter(
                (rid, json.loads(detail)["timer"])
                for rid, detail in conn.execute(
                    "SELECT referral_id, detail FROM audit WHERE action LIKE 'timer:%%'"
                )
                if json.loads(detail)["result"] != "deferred"
            )
        # every ACKed control id stored exactly once; every message processed
        assert cluster.acked == sent
        assert set(stored) == sent and set(stored.values()) == {1}
        assert statuses["received"] == 0 and sum(statuses.values()) == len(sent), statuses
        assert duplicates is not None and duplicates[0] >= resent
        # per referral the same end state as one node alone
        end = _end_state(url)
        assert end.keys() == reference.keys()
        differ = [p for p in reference if end[p] != reference[p]]
        if differ:  # the first one's audit trail says what happened twice or not at all
            with psycopg.connect(url) as conn:
                trail = conn.execute(
                    "SELECT a.id, a.actor, a.action, a.detail FROM audit a "
                    "JOIN referrals r ON r.id = a.referral_id WHERE r.placer_number = %s "
                    "ORDER BY a.id",
                    (differ[0],),
                ).fetchall()
            raise AssertionError(
                (len(differ), [_diff(end[p], reference[p]) for p in differ[:3]], trail)
            )
        # each outbox key delivered once; a repeat only for a send the kill cut
        delivered = {key for key, status, _ in outbox if status == "sent"}
        assert set(requests) == delivered
        repeats = {key: n - 1 for key, n in requests.items() if n > 1}
        # a repeat is a send whose lease ran out mid-send: cut by the kill (its row was
        # the killed node's claim), or a live node that stalled past its lease, which
        # then logged it ("expired mid-send") and counts as lease lost
        cut = chaos["cut"]
        assert len(cut) <= CUT_BOUND, cut
        expired = _expired(daemons, chaos["killed_node"])
        stalled = {key for key, _, oid in outbox if oid in expired}
        unexplained = set(repeats) - cut - stalled
        assert not unexplained, (unexplained, repeats)
        # no timer fired twice; nothing left sending
        assert fires and max(fires.values()) == 1, [k for k, n in fires.items() if n > 1][:5]
        assert leftover is not None and leftover[0] == 0
        print(
            f"\nkill {victim}: {len(sent)} messages (+{resent} resends), "
            f"{cluster.reconnects} reconnects, killed at {chaos['killed_at_acks']} ACKs, "
            f"restarted at {chaos['restarted_at_acks']}, {len(delivered)} sends, "
            f"{sum(repeats.values())} repeated ({len(set(repeats) & cut)} cut by the kill, "
            f"{len(set(repeats) - cut)} after a live node stalled), {len(fires)} timers fired"
        )
    finally:
        for d in daemons:
            d.kill()
        drop_pg_schema(TEST_STORE, schema)


# -- the black box of docs/scale-out.md ------------------------------------------------------


def _send(port: int, frames: list[tuple[str, bytes]]) -> list[str]:
    """Each frame on one connection; the ACK codes (MSA-1), in order."""

    async def go() -> list[str]:
        reader, writer = await asyncio.open_connection(HOST, port)
        framer, codes = Framer(1 << 24), []
        try:
            for _cid, raw in frames:
                writer.write(frame(raw))
                await writer.drain()
                got: list[bytes] = []
                while not got:
                    data = await asyncio.wait_for(reader.read(65536), 30)
                    assert data, "connection closed"
                    got = framer.feed(data)
                codes.append(got[0].decode().split("MSA|", 1)[1].split("|", 1)[0])
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        return codes

    return asyncio.run(go())


def test_two_daemons_then_one_killed_as_the_docs_say(tmp_path: Path) -> None:
    """docs/scale-out.md, "Two nodes by hand": two ``refloop run --store`` daemons on
    different ports, messages sent to both, ``refloop referrals list --json`` sees every
    referral; the lease holder killed with kill -9, the other keeps ACKing and takes the
    timers over (the referrals received after the kill are nudged and closed)."""
    url, schema = make_pg_schema(TEST_STORE)
    daemons: list[Daemon] = []
    try:
        with provider() as hook:
            path = routes(tmp_path / "routes.yaml", url, hook.url)
            cli = routes(tmp_path / "cli.yaml", url, hook.url, store_url=url)
            for n in "ab":
                d = Daemon(tmp_path / f"state-{n}", tmp_path / f"{n}.log", routes=path)
                d.store = url
                d.start(60.0)
                daemons.append(d)
            a, b = daemons
            first = [_ref(k) for k in range(0, 12, 3)]  # four never-booked referrals
            assert _send(a.mllp, first[:2]) == ["AA", "AA"]
            assert _send(b.mllp, first[2:]) == ["AA", "AA"]

            def listed() -> list[str]:
                out = refloop(
                    "referrals", "list", "--json", "--limit", "0",
                    "--routes", str(cli), "--state", str(tmp_path / "none"),
                )  # fmt: skip
                assert out.returncode == 0, out.stderr.decode()
                return sorted(r["placer_number"] for r in json.loads(out.stdout))

            assert listed() == ["P00000", "P00003", "P00006", "P00009"]
            holder = _holder(url)
            victim, survivor = (a, b) if a.proc and holder.endswith(f":{a.proc.pid}") else (b, a)
            victim.kill()  # SIGKILL
            later = [_ref(k) for k in range(12, 24, 3)]
            assert _send(survivor.mllp, later) == ["AA"] * 4
            assert len(listed()) == 8
            _wait_settled(url, [survivor], timeout=4 * LEASE + 60)
            _stop([survivor])
        with psycopg.connect(url) as conn:
            closed = conn.execute(
                "SELECT count(*) FROM referrals WHERE status = 'closed' "
                "AND close_reason = 'no-response'"
            ).fetchone()
            new_holder = _holder(url)
        assert closed is not None and closed[0] == 8
        assert survivor.proc is not None and new_holder.endswith(f":{survivor.proc.pid}")
        _audit_verify(cli, tmp_path / "none")
    finally:
        for d in daemons:
            d.kill()
        drop_pg_schema(TEST_STORE, schema)
