"""The MLLP listener: frame, read MSH, store the exact bytes, then ACK.

Per frame: read MSH only (engine.hl7msg.read_msh), queue the bytes for the inbox's next
group commit, and write the ACK once the commit returns. ACKs on a connection go out in
the order their messages arrived, each in a single write. Nothing a peer sends can stop
the listener: framing errors close that one connection; unreadable messages are stored
as ``rejected`` and answered AR with an ERR segment.

ACK modes (HL7 v2.5.1 §2.9):
- ``original`` (default): one ACK per message, AA/AE/AR, after the commit (``on-commit``)
  or after processing (``on-processed``).
- ``enhanced``: when a message values MSH-15/MSH-16, a commit ACK (CA/CR) is sent as
  MSH-15 asks (AL/NE/ER/SU) and an application ACK (AA/AE/AR) as MSH-16 asks, once
  processing finishes. Messages without MSH-15/16 get original mode.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import ssl
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, cast

from engine.clock import Clock
from engine.config import MllpSource, TlsConfig
from engine.errors import MessageRejected, StoreError
from engine.hl7v2.ack import build_ack, next_control_id, wants_ack
from engine.hl7v2.message import (
    Batch,
    count_messages,
    read_msh,
    reply_header,
    split_messages,
    strip_preamble,
)
from engine.hl7v2.mllp import Framer, frame
from engine.ingest import proxy
from engine.ingest.processor import Outcome, Processor
from engine.metrics import Metrics
from engine.model import Inbound, MshInfo
from engine.store import AddResult, Inbox

log = logging.getLogger(__name__)

PAUSE_AT = 256  # unanswered frames on one connection before we stop reading from it
RESUME_AT = 64
SLICE_MESSAGES = 200  # batch messages read between two returns to the event loop
WRITE_HIGH = 64 * 1024  # unsent ACK bytes before the transport asks us to pause writing


def tls_context(cfg: TlsConfig) -> ssl.SSLContext:
    """A server TLS context: TLS 1.2+, optional required client certificates."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
    if cfg.ca_file:
        ctx.load_verify_locations(cfg.ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED if cfg.require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def _subject_cn(peercert: dict[str, Any] | None) -> str:
    if not peercert:
        return ""
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""


@dataclass(slots=True)
class _Reply:
    """One frame's answer, written when its turn comes and it is ready."""

    t0: float
    ready: bool = False
    payload: bytes | None = None  # None: nothing to send (e.g. MSH-15 NE)
    code: str = ""


@dataclass
class _Unit:
    """One message of a frame (a frame holds one, or several in a batch)."""

    inbound: Inbound
    ack: str  # AA or AR (known at the door)
    error: tuple[str, str, str] | None
    reply_msh: MshInfo | None = None  # what a NAK echoes when MSH could not be read
    result: AddResult | None = None
    outcome: Outcome | None = None
    done: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class MllpServer:
    """One MLLP source: its listening socket and its connections."""

    def __init__(
        self,
        source: MllpSource,
        inbox: Inbox,
        processor: Processor,
        clock: Clock,
        metrics: Metrics,
    ):
        self.source = source
        self.inbox = inbox
        self.processor = processor
        self.clock = clock
        self.metrics = metrics
        self.connections: set[_Connection] = set()
        self.handshaking: set[_Connection] = set()  # waiting for a PROXY header
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._ssl = tls_context(source.tls) if source.tls else None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self),
            self.source.host,
            self.source.port,
            ssl=self._ssl,
            ssl_handshake_timeout=10.0 if self._ssl else None,
            reuse_address=True,
            backlog=512,
        )
        self._sweeper = asyncio.create_task(self._sweep(), name=f"mllp-sweep-{self.source.name}")
        log.info(
            "%s: MLLP listening on %s:%d%s",
            self.source.name,
            self.source.host,
            self.port,
            " (TLS)" if self._ssl else "",
        )

    async def stop(self, drain: float = 10.0) -> None:
        """Stop accepting, give in-flight messages ``drain`` seconds to be ACKed, close."""
        if self._server is not None:
            self._server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain
        while any(c.replies for c in self.connections) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        for conn in [*self.connections, *self.handshaking]:
            conn.abort(graceful=True)
        if self._sweeper is not None:
            self._sweeper.cancel()
            try:
                await self._sweeper
            except asyncio.CancelledError:
                pass
        if self._server is not None:
            await self._server.wait_closed()

    async def _sweep(self) -> None:
        """Close idle connections, frames that never finish (slowloris) and peers that
        leave their ACKs unread."""
        while True:
            await asyncio.sleep(1.0)
            now = self.clock.monotonic()
            for conn in [*self.connections, *self.handshaking]:
                conn.check_timers(now)

    def admit(self, conn: _Connection, host: str) -> str:
        """Make room for a new connection from ``host``: past a limit, evict the oldest
        idle connection (that host's own first when its per-peer limit is reached).
        Returns why it must be refused, or "" when it may come in."""
        same = [c for c in self.connections if c.host == host]
        if len(same) >= self.source.max_connections_per_peer and not self._evict(same):
            return "per-peer"
        if len(self.connections) >= self.source.max_connections and not self._evict(
            list(self.connections)
        ):
            return "limit"
        return ""

    def _evict(self, candidates: list[_Connection]) -> bool:
        idle = [c for c in candidates if c.idle and not c.closing]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c.last_activity)
        log.info("%s: evicted (oldest idle connection; slots full)", oldest.peer)
        self.metrics.frame_errors.labels(self.source.name, "evicted").inc()
        oldest.abort()
        return True


class _Connection(asyncio.Protocol):
    def __init__(self, server: MllpServer):
        self.server = server
        self.source = server.source
        self.framer = Framer(server.source.max_frame_bytes)
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.host = "?"
        self.replies: deque[_Reply] = deque()
        self.last_activity = server.clock.monotonic()
        self.frame_started = 0.0
        self.write_paused_at = 0.0  # when the transport asked us to stop writing
        self.pauses: set[str] = set()  # why reading is paused: replies, writing, work
        self.backlog: deque[tuple[bytes, float]] = deque()  # frames behind a sliced one
        self.worker: asyncio.Task[None] | None = None
        self.closing = False  # no more reading; closes once every owed reply is written
        self.closed = False
        self.closed_at = 0.0  # monotonic time of a graceful close (it waits for the buffer)
        # a trusted load balancer's connection: bytes until the PROXY v2 header is read
        self.proxy_buf: bytearray | None = None
        self.proxy_since = 0.0

    @property
    def idle(self) -> bool:
        """Nothing owed to the peer and no frame in progress: safe to evict."""
        return not self.replies and not self.framer.in_frame and self.worker is None

    # -- connection lifecycle ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        try:
            self._admit(self.transport)
        except Exception:  # never let one connection's problem reach the loop
            log.exception("%s: error while accepting; closing", self.peer)
            self.closed = True
            self.transport.abort()

    def _admit(self, transport: asyncio.Transport) -> None:
        peername = transport.get_extra_info("peername")
        self.host = str(peername[0]) if peername else "?"
        self.peer = f"{self.host}:{peername[1]}" if peername else "?"
        if proxy.trusted(self.host, self.source.proxy_trusted):
            # the balancer speaks first: admission waits for the real client's address
            self.proxy_buf = bytearray()
            self.proxy_since = self.server.clock.monotonic()
            self.server.handshaking.add(self)
            return
        self._admit_host(transport)

    def _admit_host(self, transport: asyncio.Transport, *, balancer: bool = False) -> None:
        """Admit (or refuse) the connection by ``self.host``; ``balancer``: a trusted
        load balancer's own connection (PROXY LOCAL), which the allow-list does not gate."""
        host = self.host
        server = self.server
        refuse = ""
        if not balancer and not self.source.peer_allowed(host):
            refuse = "allowlist"
        elif self.source.tls and self.source.tls.allowed_subjects:
            cn = _subject_cn(transport.get_extra_info("peercert"))
            if cn not in self.source.tls.allowed_subjects:
                refuse = "subject"
        if not refuse:
            refuse = server.admit(self, host)
        if refuse:
            log.warning("%s: connection refused (%s)", self.peer, refuse)
            server.metrics.connections_refused.labels(self.source.name, refuse).inc()
            server.metrics.source_error_at.labels(self.source.name, f"refused-{refuse}").set(
                server.clock.now()
            )
            self.closed = True
            transport.abort()
            return
        server.connections.add(self)
        server.metrics.connections.labels(self.source.name).inc()
        # small buffers: pause_writing comes early, so an unread peer costs little
        transport.set_write_buffer_limits(high=WRITE_HIGH)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.proxy_buf and not self.closed:
            # (an empty connect-and-close is a plain TCP health check, not an error)
            log.warning("%s: closed before a complete PROXY header", self.peer)
            self._error("proxy")
        self.server.handshaking.discard(self)
        if self in self.server.connections:
            self.server.connections.discard(self)
            self.server.metrics.connections.labels(self.source.name).dec()
        self.closed = True
        if self.worker is not None:
            self.worker.cancel()

    def close(self) -> None:
        """Stop reading; close once every reply owed for frames already read is written
        (a frame that was read is always answered)."""
        if self.closed or self.transport is None:
            return
        self.closing = True
        self._pause("closing")
        if not self.replies and self.worker is None:
            self.abort(graceful=True)

    def abort(self, *, graceful: bool = False) -> None:
        """Close now, whatever is owed (stop past the drain, an unread peer, eviction)."""
        if self.transport is not None and not self.closed:
            self.closed = True
            if graceful:
                self.closed_at = self.server.clock.monotonic()
                self.transport.close()
            else:
                self.transport.abort()
            if self.worker is not None:
                self.worker.cancel()

    def check_timers(self, now: float) -> None:
        """The sweeper's per-connection check (HL7 peers that stall, not us)."""
        if self.closed:
            # a graceful close waits for the unsent ACKs to drain: a peer that never reads
            # them would keep the connection, and its slot, for ever
            if self.closed_at and now - self.closed_at > self.source.write_timeout:
                log.warning("%s: ACKs left unread after the close, dropping", self.peer)
                self._error("unread")
                self.closed_at = 0.0
                if self.transport is not None:
                    self.transport.abort()
            return
        if self.proxy_buf is not None:
            if now - self.proxy_since > self.source.frame_timeout:
                log.warning("%s: no complete PROXY header in time, closing", self.peer)
                self._error("proxy")
                self.abort()
            return
        if self.write_paused_at and now - self.write_paused_at > self.source.write_timeout:
            log.warning(
                "%s: ACKs left unread for %.0fs, closing", self.peer, now - self.write_paused_at
            )
            self._error("unread")
            self.abort()
        elif self.replies or self.worker is not None or self.closing:
            return  # waiting on us, not on the peer
        elif self.frame_started and now - self.frame_started > self.source.frame_timeout:
            log.warning(
                "%s: frame not finished in %.0fs, closing", self.peer, self.source.frame_timeout
            )
            self._error("timeout")
            self.close()
        elif now - self.last_activity > self.source.idle_timeout:
            log.info("%s: idle timeout, closing", self.peer)
            self._error("idle")
            self.close()

    def _error(self, kind: str) -> None:
        metrics = self.server.metrics
        metrics.frame_errors.labels(self.source.name, kind).inc()
        if kind != "idle":  # an idle close is housekeeping, not a problem
            metrics.source_error_at.labels(self.source.name, kind).set(self.server.clock.now())

    def _pause(self, reason: str) -> None:
        if not self.pauses and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self.pauses.add(reason)

    def _resume(self, reason: str) -> None:
        if reason not in self.pauses:
            return
        self.pauses.discard(reason)
        if not self.pauses and self.transport is not None and not self.closed:
            self.transport.resume_reading()

    # asyncio flow control: the peer is not reading its ACKs
    def pause_writing(self) -> None:
        self.write_paused_at = self.server.clock.monotonic() or 1e-9
        self._pause("writing")

    def resume_writing(self) -> None:
        self.write_paused_at = 0.0
        self._resume("writing")

    def _safe(self, fn: Callable[[Any], None]) -> Callable[[Any], None]:
        """Wrap a callback so an exception closes this connection instead of reaching the
        loop (where aiorun would stop the daemon). It closes now, not once every owed
        reply is written (close()): the reply the failed callback owed never becomes
        ready, and the sweeper leaves a connection that owes replies alone, so close()
        would hold the connection and its slot forever. Replies already written still
        go out (a graceful close); the sender resends the rest, stored ones are
        duplicates ACKed again."""

        def wrapper(arg: Any) -> None:
            try:
                fn(arg)
            except Exception:
                log.exception("%s: internal error; closing", self.peer)
                self.abort(graceful=True)

        return wrapper

    # -- reading -------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.closed or self.closing:
            return
        try:
            if self.proxy_buf is not None:
                data = self._proxy_header(data)
                if not data or self.closed:
                    return
            self._received(data)
        except Exception:  # a bug must cost one connection, not the daemon
            log.exception("%s: internal error; closing", self.peer)
            self.close()

    def _proxy_header(self, data: bytes) -> bytes:
        """Collect the trusted balancer's PROXY v2 header; once complete, take the real
        client's address and admit the connection. Returns the bytes after the header."""
        buf = self.proxy_buf
        assert buf is not None and self.transport is not None
        buf += data
        try:
            header = proxy.parse(buf)
        except proxy.ProxyHeaderError as exc:
            log.warning("%s: %s; closing", self.peer, exc)
            self.proxy_buf = None
            self.server.handshaking.discard(self)
            self._error("proxy")
            self.abort()
            return b""
        if header is None:
            return b""
        rest = bytes(buf[header.consumed :])
        self.proxy_buf = None
        self.server.handshaking.discard(self)
        if header.client is not None:
            via = self.peer
            self.host = header.client[0]
            self.peer = f"{self.host}:{header.client[1]}"
            log.debug("%s: via load balancer %s", self.peer, via)
        self._admit_host(self.transport, balancer=header.client is None)
        return rest

    def _received(self, data: bytes) -> None:
        clock = self.server.clock
        framer = self.framer
        was_in_frame = framer.in_frame
        frames = framer.decode(data)
        now = clock.monotonic()
        if frames or was_in_frame or framer.in_frame:
            # only frame bytes count as activity: stray bytes between frames (a newline
            # every few seconds) must not keep a connection slot forever
            self.last_activity = now
        if not framer.in_frame:
            self.frame_started = 0.0
        elif frames or not was_in_frame:
            # a frame began in this read; a frame that is still growing keeps its start
            # time, so trickling one byte at a time (slowloris) cannot reset the clock
            self.frame_started = now
        received_at = clock.now()
        for payload in frames:
            if self.worker is not None or self.backlog:
                self.backlog.append((payload, received_at))
            else:
                self._frame(payload, received_at)
        if framer.error is not None:
            exc = framer.error
            kind = "oversize" if "exceeds" in str(exc) else "garbage"
            log.warning("%s: %s; closing", self.peer, exc)
            self._error(kind)
            self.close()
        elif framer.stray_run > self.source.max_stray_bytes:
            log.warning("%s: %d bytes outside any frame; closing", self.peer, framer.stray_run)
            self._error("stray")
            self.close()
        if len(self.replies) >= PAUSE_AT:
            self._pause("replies")

    def _frame(self, payload: bytes, received_at: float) -> None:
        work = self._begin(payload, received_at)
        if work is not None:
            self._start_worker(work)

    def _begin(
        self, payload: bytes, received_at: float
    ) -> Callable[[], Coroutine[Any, Any, None]] | None:
        """Answer one frame. Whatever goes wrong reading it, the frame gets a reply (AR,
        stored ``rejected``); returns the sliced work a large batch still needs."""
        reply = _Reply(t0=self.server.clock.monotonic())
        self.replies.append(reply)
        try:
            return self._plan(payload, received_at, reply)
        except Exception:
            log.exception("%s: frame could not be read; rejecting it", self.peer)
            self._submit([self._unit(payload, received_at, "", failed=True)], reply, None)
            return None

    def _plan(
        self, payload: bytes, received_at: float, reply: _Reply
    ) -> Callable[[], Coroutine[Any, Any, None]] | None:
        """Submit a frame's messages; for a batch too big to read at once, return the
        coroutine function that reads it in slices."""
        body = strip_preamble(payload)
        if not _looks_batched(body):
            self._submit([self._unit(payload, received_at, "")], reply, batch_header=None)
            return None
        count = count_messages(body)
        if count > self.source.max_batch_messages:
            self._submit([self._too_big(payload, body, count, received_at)], reply, None)
            return None
        batch = split_messages(payload)
        if not batch.enveloped and (len(batch.messages) <= 1 or not body.startswith(b"MSH")):
            self._submit([self._unit(payload, received_at, "")], reply, batch_header=None)
            return None
        if not batch.messages:  # an envelope with no messages: an empty reply batch
            self._batch_reply([], reply, batch.header)
            return None
        if len(batch.messages) <= SLICE_MESSAGES:
            units = [self._unit(m, received_at, _ref(batch)) for m in batch.messages]
            self._submit(units, reply, batch_header=batch.header or b"BHS|^~\\&")
            return None
        return functools.partial(self._sliced, batch, received_at, reply)

    async def _sliced(self, batch: Batch, received_at: float, reply: _Reply) -> None:
        """Read a large batch a slice at a time, letting other connections' ACKs out
        between slices."""
        ref = _ref(batch)
        units: list[_Unit] = []
        for i in range(0, len(batch.messages), SLICE_MESSAGES):
            await asyncio.sleep(0)
            units += [
                self._unit(m, received_at, ref) for m in batch.messages[i : i + SLICE_MESSAGES]
            ]
        self._submit(units, reply, batch_header=batch.header or b"BHS|^~\\&")

    def _start_worker(self, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self._pause("work")
        self.worker = asyncio.create_task(self._work(work), name=f"mllp-slices-{self.peer}")

    async def _work(self, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run sliced work, then the frames that queued behind it, in arrival order."""
        try:
            await work()
            while self.backlog and not self.closed:
                more = self._begin(*self.backlog.popleft())
                if more is not None:
                    await more()
        except Exception:
            log.exception("%s: internal error; closing", self.peer)
            self.abort()
        finally:
            self.worker = None
            self._resume("work")
            if self.closing and not self.replies:
                self.abort(graceful=True)

    def _too_big(self, payload: bytes, body: bytes, count: int, received_at: float) -> _Unit:
        """The one unit that stands for a batch over ``max_batch_messages``: stored
        ``rejected`` (nothing a peer sent is lost) and answered AR."""
        limit = self.source.max_batch_messages
        reason = f"batch of {count} messages exceeds max_batch_messages ({limit}); split it"
        first = _first_msh(body)
        head = reply_header(body[first:]) if first >= 0 else None
        header = _batch_header(body)
        ref = _batch_control_id(header) if header else ""
        if head is not None and ref:
            head = dataclasses.replace(head, control_id=ref)
        log.warning("%s: rejected: batch of %d messages (max %d)", self.peer, count, limit)
        inbound = Inbound(
            source=self.source.name,
            peer=self.peer,
            raw=payload,
            received_at=received_at,
            msh=None,
            text_encoding=_fallback_codec(payload),
            reject=("AR", "207", "", reason),
            batch_ref=ref,
        )
        return _Unit(inbound=inbound, ack="AR", error=("207", "", reason), reply_msh=head)

    def _unit(
        self, raw: bytes, received_at: float, batch_ref: str, *, failed: bool = False
    ) -> _Unit:
        """One message, read at the door. Never raises: a message that cannot be read,
        for whatever reason, becomes a rejected unit (stored, answered AR)."""
        msh: MshInfo | None = None
        codec = _fallback_codec(raw)
        reject: tuple[str, str, str, str] | None = None
        if failed:
            reject = ("AR", "207", "", "message could not be read")
        else:
            try:
                msh, codec = read_msh(raw)
            except MessageRejected as exc:
                reject = (exc.ack, exc.code, exc.location, exc.reason)
            except Exception:  # a bug in reading must cost this message only (it is stored)
                log.exception("%s: message could not be read", self.peer)
                reject = ("AR", "207", "", "message could not be read")
        reply_msh = None
        if reject is not None:
            log.warning("%s: rejected: %s", self.peer, reject[3])
            try:
                reply_msh = reply_header(raw)
            except Exception:
                log.exception("%s: MSH could not be echoed", self.peer)
        inbound = Inbound(
            source=self.source.name,
            peer=self.peer,
            raw=raw,
            received_at=received_at,
            msh=msh,
            text_encoding=codec,
            reject=reject,
            batch_ref=batch_ref,
        )
        return _Unit(
            inbound=inbound,
            ack=reject[0] if reject else "AA",
            error=(reject[1], reject[2], reject[3]) if reject else None,
            reply_msh=reply_msh,
        )

    # -- committing and answering ----------------------------------------------------

    def _submit(self, units: list[_Unit], reply: _Reply, batch_header: bytes | None) -> None:
        inbox = self.server.inbox
        remaining = len(units)

        def committed(unit: _Unit, fut: asyncio.Future[AddResult]) -> None:
            nonlocal remaining
            if fut.cancelled() or fut.exception() is not None:
                # not stored (disk full, I/O error, locked; docs/operations.md): never AA.
                # AE (CE in enhanced mode) with ERR 207: nothing is wrong with the message,
                # the sender keeps it and sends again; AR would tell it not to
                unit.ack = "AE"
                unit.error = ("207", "", "message could not be stored; send again")
            else:
                unit.result = fut.result()
                self._count(unit)
            unit.done = True
            remaining -= 1
            if remaining == 0:
                self._after_commit(units, reply, batch_header)

        for unit in units:
            try:
                fut = inbox.add(unit.inbound, unit.ack)
            except StoreError:
                fut = asyncio.get_running_loop().create_future()
                fut.set_exception(StoreError("inbox closed"))
            fut.add_done_callback(self._safe(functools.partial(committed, unit)))

    def _count(self, unit: _Unit) -> None:
        m = self.server.metrics
        result = unit.result
        assert result is not None
        if result.duplicate:
            m.duplicates.labels(self.source.name).inc()
            if result.status == "rejected":
                unit.ack = "AR"
        else:
            msh = unit.inbound.msh
            m.messages_received.labels(
                self.source.name, m.type_label(msh.message_type if msh else "")
            ).inc()
            m.inbox_rows.set(self.server.inbox.rows)
        self.server.processor.notify()

    def _after_commit(self, units: list[_Unit], reply: _Reply, batch_header: bytes | None) -> None:
        if batch_header is not None:
            # batches: one reply batch of original-mode ACKs (HL7 v2.5.1 §2.10.3)
            self._maybe_wait_processing(
                units, lambda: self._batch_reply(units, reply, batch_header)
            )
            return
        unit = units[0]
        msh = unit.inbound.msh
        enhanced = self.source.ack_mode == "enhanced" and msh is not None and msh.enhanced
        if enhanced and msh is not None:
            code = {"AA": "CA", "AE": "CE"}.get(unit.ack, "CR")
            payload = (
                self._ack_bytes(unit, code)
                if wants_ack(msh.accept_ack_type or "AL", code)
                else None
            )
            self._ready(reply, payload, code)
            if unit.ack == "AA" and unit.result is not None and msh.app_ack_type not in ("", "NE"):
                self._application_ack(unit, msh)
            return
        self._maybe_wait_processing(units, lambda: self._single_reply(unit, reply))

    def _maybe_wait_processing(self, units: list[_Unit], then: Any) -> None:
        if self.source.ack_when != "on-processed":
            then()
            return
        waiting = [u for u in units if u.ack == "AA" and u.result is not None]
        if not waiting:
            then()
            return
        remaining = len(waiting)

        def processed(unit: _Unit, fut: asyncio.Future[Outcome]) -> None:
            nonlocal remaining
            if not fut.cancelled() and fut.exception() is None:
                unit.outcome = fut.result()
            remaining -= 1
            if remaining == 0:
                then()

        for unit in waiting:
            assert unit.result is not None
            self.server.processor.watch(unit.result.id).add_done_callback(
                self._safe(functools.partial(processed, unit))
            )

    def _final_code(self, unit: _Unit) -> str:
        if unit.ack != "AA":
            return unit.ack
        if unit.outcome is not None:
            if unit.outcome.app_ack != "AA":
                unit.error = ("207", "", unit.outcome.error or unit.outcome.status)
            return unit.outcome.app_ack
        return "AA"

    def _single_reply(self, unit: _Unit, reply: _Reply) -> None:
        code = self._final_code(unit)
        self._ready(reply, self._ack_bytes(unit, code), code)

    def _batch_reply(self, units: list[_Unit], reply: _Reply, header: bytes) -> None:
        acks = [self._ack_bytes(u, self._final_code(u)) for u in units]
        first = next((u.inbound.msh for u in units if u.inbound.msh), None)
        fs = first.field_sep if first else "|"
        enc = first.encoding_chars if first else "^~\\&"
        now = self.server.clock.now()
        ref = _batch_control_id(header)
        bhs = fs.join(["BHS", enc, "", "", "", "", "", "", "", "", next_control_id(now), ref])
        bts = fs.join(["BTS", str(len(acks))])
        payload = (bhs + "\r").encode() + b"".join(acks) + (bts + "\r").encode()
        codes = {self._final_code(u) for u in units}
        code = "AA" if codes == {"AA"} else ("AR" if "AR" in codes else "AE")
        self._ready(reply, payload, code)

    def _application_ack(self, unit: _Unit, msh: MshInfo) -> None:
        assert unit.result is not None
        fut = self.server.processor.watch(unit.result.id)

        def processed(f: asyncio.Future[Outcome]) -> None:
            if f.cancelled() or f.exception() is not None or self.closed:
                return
            outcome = f.result()
            code = outcome.app_ack
            if not wants_ack(msh.app_ack_type, code):
                return
            error = None if code == "AA" else ("207", "", outcome.error or outcome.status)
            data = build_ack(
                msh,
                code,
                now=self.server.clock.now(),
                error=error,
                codec=unit.inbound.text_encoding,
            )
            late = _Reply(t0=self.server.clock.monotonic(), ready=True, payload=data, code=code)
            self.replies.append(late)
            self._flush()

        fut.add_done_callback(self._safe(processed))

    def _ack_bytes(self, unit: _Unit, code: str) -> bytes:
        return build_ack(
            unit.inbound.msh or unit.reply_msh,
            code,
            now=self.server.clock.now(),
            error=unit.error if code not in ("AA", "CA") else None,
            codec=unit.inbound.text_encoding,
        )

    def _ready(self, reply: _Reply, payload: bytes | None, code: str) -> None:
        reply.payload = payload
        reply.code = code
        reply.ready = True
        self._flush()

    def _flush(self) -> None:
        """Write every ready reply at the head of the queue, in arrival order."""
        replies = self.replies
        transport = self.transport
        metrics = self.server.metrics
        now = self.server.clock.monotonic()
        while replies and replies[0].ready:
            reply = replies.popleft()
            if reply.payload is None or self.closed or transport is None:
                continue
            transport.write(frame(reply.payload))
            metrics.acks.labels(self.source.name, reply.code).inc()
            metrics.ack_latency.labels(self.source.name).observe(now - reply.t0)
        if len(replies) <= RESUME_AT:
            self._resume("replies")
        if self.closing and not replies and self.worker is None:
            self.abort(graceful=True)  # every owed reply is written: now close


def _looks_batched(body: bytes) -> bool:
    """A frame that opens with FHS/BHS, or holds a second MSH, is a batch."""
    if body[:3] in (b"FHS", b"BHS"):
        return True
    return body.find(b"\rMSH", 3) != -1 or body.find(b"\nMSH", 3) != -1


def _ref(batch: Batch) -> str:
    return _batch_control_id(batch.header) if batch.header else ""


def _first_msh(body: bytes) -> int:
    """Offset of the first segment that is MSH, or -1."""
    if body.startswith(b"MSH"):
        return 0
    hits = [i + 1 for i in (body.find(b"\rMSH"), body.find(b"\nMSH")) if i != -1]
    return min(hits) if hits else -1


def _batch_header(body: bytes) -> bytes:
    """The BHS segment (else FHS) of a batch, found without splitting the batch."""
    for tag in (b"BHS", b"FHS"):
        if body.startswith(tag):
            start = 0
        else:
            hits = [j + 1 for j in (body.find(b"\r" + tag), body.find(b"\n" + tag)) if j != -1]
            if not hits:
                continue
            start = min(hits)
        return body[start : _segment_end(body, start)]
    return b""


def _segment_end(body: bytes, start: int) -> int:
    ends = [e for e in (body.find(b"\r", start), body.find(b"\n", start)) if e != -1]
    return min(ends) if ends else len(body)


def _batch_control_id(header: bytes) -> str:
    """BHS-11 (batch control id) of a BHS/FHS segment, for BHS-12 of the reply."""
    text = header.decode("latin-1")
    if len(text) < 4:
        return ""
    parts = text.split(text[3])
    # BHS-1 is the separator, so BHS-n is parts[n-1]
    return parts[10] if len(parts) > 10 else ""


def _fallback_codec(raw: bytes) -> str:
    try:
        raw.decode("utf-8")
        return "utf-8"
    except UnicodeDecodeError:
        return "latin-1"
