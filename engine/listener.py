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
import functools
import logging
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from engine.ack import build_ack, next_control_id, wants_ack
from engine.clock import Clock
from engine.config import MllpSource, TlsConfig
from engine.errors import FramingError, MessageRejected, StoreError
from engine.hl7msg import read_msh, reply_header, split_messages, strip_preamble
from engine.metrics import Metrics
from engine.mllp import Framer, frame
from engine.model import Inbound, MshInfo
from engine.pipeline import Outcome, Processor
from engine.store import AddResult, Inbox

log = logging.getLogger(__name__)

PAUSE_AT = 256  # unanswered frames on one connection before we stop reading from it
RESUME_AT = 64


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
        for conn in list(self.connections):
            conn.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            try:
                await self._sweeper
            except asyncio.CancelledError:
                pass
        if self._server is not None:
            await self._server.wait_closed()

    async def _sweep(self) -> None:
        """Close idle connections and frames that never finish (slowloris)."""
        while True:
            await asyncio.sleep(1.0)
            now = self.clock.monotonic()
            for conn in list(self.connections):
                if conn.replies:
                    continue  # waiting on us, not on the peer
                if now - conn.last_activity > self.source.idle_timeout:
                    log.info("%s: idle timeout, closing", conn.peer)
                    self.metrics.frame_errors.labels(self.source.name, "idle").inc()
                    conn.close()
                elif conn.frame_started and now - conn.frame_started > self.source.frame_timeout:
                    log.warning(
                        "%s: frame not finished in %.0fs, closing",
                        conn.peer,
                        self.source.frame_timeout,
                    )
                    self.metrics.frame_errors.labels(self.source.name, "timeout").inc()
                    conn.close()


class _Connection(asyncio.Protocol):
    def __init__(self, server: MllpServer):
        self.server = server
        self.source = server.source
        self.framer = Framer(server.source.max_frame_bytes)
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.replies: deque[_Reply] = deque()
        self.last_activity = server.clock.monotonic()
        self.frame_started = 0.0
        self.paused = False
        self.closed = False

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
        host = str(peername[0]) if peername else "?"
        self.peer = f"{host}:{peername[1]}" if peername else "?"
        server = self.server
        refuse = ""
        if len(server.connections) >= self.source.max_connections:
            refuse = "limit"
        elif not self.source.peer_allowed(host):
            refuse = "allowlist"
        elif self.source.tls and self.source.tls.allowed_subjects:
            cn = _subject_cn(transport.get_extra_info("peercert"))
            if cn not in self.source.tls.allowed_subjects:
                refuse = "subject"
        if refuse:
            log.warning("%s: connection refused (%s)", self.peer, refuse)
            server.metrics.connections_refused.labels(self.source.name, refuse).inc()
            self.closed = True
            transport.abort()
            return
        server.connections.add(self)
        server.metrics.connections.labels(self.source.name).inc()

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.server.connections:
            self.server.connections.discard(self)
            self.server.metrics.connections.labels(self.source.name).dec()
        self.closed = True

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()

    def _safe(self, fn: Callable[[Any], None]) -> Callable[[Any], None]:
        """Wrap a callback so an exception closes this connection instead of reaching the
        loop (where aiorun would stop the daemon)."""

        def wrapper(arg: Any) -> None:
            try:
                fn(arg)
            except Exception:
                log.exception("%s: internal error; closing", self.peer)
                self.close()

        return wrapper

    # -- reading -------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            self._received(data)
        except Exception:  # a bug must cost one connection, not the daemon
            log.exception("%s: internal error; closing", self.peer)
            self.close()

    def _received(self, data: bytes) -> None:
        clock = self.server.clock
        self.last_activity = clock.monotonic()
        try:
            frames = self.framer.feed(data)
        except FramingError as exc:
            kind = "oversize" if "exceeds" in str(exc) else "garbage"
            log.warning("%s: %s; closing", self.peer, exc)
            self.server.metrics.frame_errors.labels(self.source.name, kind).inc()
            self.close()
            return
        if not self.framer.pending:
            self.frame_started = 0.0
        elif frames or not self.frame_started:
            # a frame began in this read; a frame that is still growing keeps its start
            # time, so trickling one byte at a time (slowloris) cannot reset the clock
            self.frame_started = self.last_activity
        for payload in frames:
            self._frame(payload, clock.now())
        if not self.paused and len(self.replies) >= PAUSE_AT and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def _frame(self, payload: bytes, received_at: float) -> None:
        reply = _Reply(t0=self.server.clock.monotonic())
        self.replies.append(reply)
        body = strip_preamble(payload)
        batch = split_messages(payload) if _looks_batched(body) else None
        if batch is None or (
            not batch.enveloped and (len(batch.messages) <= 1 or not body.startswith(b"MSH"))
        ):
            unit = self._unit(payload, received_at, "")
            self._submit([unit], reply, batch_header=None)
            return
        ref = _batch_control_id(batch.header) if batch.header else ""
        units = [self._unit(m, received_at, ref) for m in batch.messages]
        if not units:  # an envelope with no messages: an empty reply batch
            self._batch_reply([], reply, batch.header)
            return
        self._submit(units, reply, batch_header=batch.header or b"BHS|^~\\&")

    def _unit(self, raw: bytes, received_at: float, batch_ref: str) -> _Unit:
        try:
            msh, codec = read_msh(raw)
            error = None
            ack = "AA"
            reject = None
        except MessageRejected as exc:
            msh, codec = None, _fallback_codec(raw)
            error = (exc.code, exc.location, exc.reason)
            ack = exc.ack
            reject = (exc.ack, exc.code, exc.location, exc.reason)
            log.warning("%s: rejected: %s", self.peer, exc.reason)
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
            ack=ack,
            error=error,
            reply_msh=reply_header(raw) if msh is None else None,
        )

    # -- committing and answering ----------------------------------------------------

    def _submit(self, units: list[_Unit], reply: _Reply, batch_header: bytes | None) -> None:
        inbox = self.server.inbox
        remaining = len(units)

        def committed(unit: _Unit, fut: asyncio.Future[AddResult]) -> None:
            nonlocal remaining
            if fut.cancelled() or fut.exception() is not None:
                # not stored: reject so the sender tries again (HL7 v2.5.1 §2.9.2: AR for
                # reasons unrelated to the content, e.g. an internal error)
                unit.ack = "AR"
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
            code = "CA" if unit.ack == "AA" else "CR"
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
        if self.paused and len(replies) <= RESUME_AT and transport is not None and not self.closed:
            self.paused = False
            transport.resume_reading()


def _looks_batched(body: bytes) -> bool:
    """A frame that opens with FHS/BHS, or holds a second MSH, is a batch."""
    if body[:3] in (b"FHS", b"BHS"):
        return True
    return body.find(b"\rMSH", 3) != -1 or body.find(b"\nMSH", 3) != -1


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
