"""A small MLLP client: send messages, read their ACKs. Used by ``refloop send``,
``forward:`` actions and the tests."""

from __future__ import annotations

import asyncio
import re
import ssl
from dataclasses import dataclass

from engine.errors import EngineError, MessageRejected
from engine.hl7v2.message import Message, reply_header, split_messages
from engine.hl7v2.mllp import Framer, frame

_LINE_ENDS = re.compile(rb"\r\n|\n|\r")


def normalise(message: bytes) -> bytes:
    """CR segment terminators, as HL7 v2.5.1 §2.5.1 requires on the wire; trailing blank
    lines dropped, one final CR kept."""
    return _LINE_ENDS.sub(b"\r", message).rstrip(b"\r") + b"\r"


@dataclass(frozen=True, slots=True)
class AckResult:
    control_id: str  # of the message sent
    code: str  # MSA-1 of the answer, or "" when none came
    text: str  # MSA-3 / ERR text, or why there is no answer


class MllpClient:
    """One connection; :meth:`send` waits for each message's ACK in turn."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float):
        self.reader = reader
        self.writer = writer
        self.timeout = timeout
        self.framer = Framer()
        self._frames: list[bytes] = []

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        timeout: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> MllpClient:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=ssl_context), timeout
            )
        except (OSError, TimeoutError) as exc:
            raise EngineError(f"cannot connect to {host}:{port}: {exc}") from exc
        return cls(reader, writer, timeout)

    async def read_frame(self) -> bytes | None:
        while not self._frames:
            data = await asyncio.wait_for(self.reader.read(65536), self.timeout)
            if not data:
                return None
            self._frames.extend(self.framer.feed(data))
        return self._frames.pop(0)

    async def send(self, message: bytes, *, expect_reply: bool = True) -> AckResult:
        header = reply_header(message)  # MSH-10 even of a message the server will reject
        control_id = header.control_id if header else ""
        try:
            self.writer.write(frame(message))
            await self.writer.drain()
        except OSError as exc:
            return AckResult(control_id, "", f"send failed: {exc}")
        if not expect_reply:
            return AckResult(control_id, "", "no acknowledgment requested")
        try:
            reply = await self.read_frame()
        except TimeoutError:
            return AckResult(control_id, "", f"no ACK within {self.timeout:.0f}s")
        except OSError as exc:
            return AckResult(control_id, "", f"connection lost: {exc}")
        if reply is None:
            return AckResult(control_id, "", "connection closed without an ACK")
        return AckResult(control_id, *ack_code(reply))

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except Exception:  # the peer may already have gone; nothing left to do
            pass


def ack_code(reply: bytes) -> tuple[str, str]:
    """(MSA-1, text) of an ACK frame; a batch reply answers with its worst code."""
    try:
        if reply.lstrip().startswith((b"BHS", b"FHS")):
            # each ACK read with its own delimiters; a batch with no ACK is no answer
            codes = [Message(ack).get("MSA.1") for ack in split_messages(reply).messages]
            if not codes:
                return "", "reply batch holds no ACKs"
            worst = "AA"
            for c in codes:
                if c in ("AR", "CR") or (c in ("AE", "CE") and worst not in ("AR", "CR")):
                    worst = c
            return worst, f"batch of {len(codes)} ACKs"
        msg = Message(reply)
        return msg.get("MSA.1"), msg.get("ERR.3.2") or msg.get("MSA.3")
    except MessageRejected:
        return "", "unreadable reply"
