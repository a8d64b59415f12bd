"""MLLP framing: bytes in, frames out. Knows nothing about HL7 beyond the block bytes.

Minimal Lower Layer Protocol (HL7 v2.5.1 Appendix C.4.3): <VT> payload <FS><CR>.
"""

from __future__ import annotations

from typing import Final

from engine.errors import FramingError

START_BLOCK: Final = b"\x0b"  # <VT>, HL7 v2 Appendix C.4.3
END_BLOCK: Final = b"\x1c"  # <FS>
CARRIAGE_RETURN: Final = b"\x0d"  # <CR>
DEFAULT_MAX_FRAME: Final = 16 * 1024 * 1024


def frame(payload: bytes) -> bytes:
    """Wrap one payload for the wire."""
    return START_BLOCK + payload + END_BLOCK + CARRIAGE_RETURN


class Framer:
    """Incremental MLLP decoder for one connection.

    Tolerates what real peers send: frames split across reads, several frames in one
    read, a missing <CR> after <FS>, and stray bytes (e.g. a lone <CR> or keep-alive
    newlines) between frames, which are counted in :attr:`stray` (over the connection's
    life) and :attr:`stray_run` (since the last frame) and dropped. A frame larger than
    ``max_frame``, or more than ``max_frame`` bytes of garbage in a row with no start
    block, sets :attr:`error`: the frames completed before it are still returned, and the
    caller answers them, then closes the connection.

    Each byte is scanned once (the end-block search resumes where the last read stopped),
    so a large frame arriving in many reads costs linear time.
    """

    __slots__ = (
        "_buf",
        "_garbage",
        "_in_frame",
        "_scanned",
        "error",
        "max_frame",
        "stray",
        "stray_run",
    )

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME):
        self.max_frame = max_frame
        self._buf = bytearray()
        self._in_frame = False
        self._scanned = 0  # bytes of _buf already searched for END_BLOCK
        self._garbage = 0  # stray bytes since the last start block
        self.stray = 0  # stray bytes over the connection's life
        self.stray_run = 0  # stray bytes since the last complete frame
        self.error: FramingError | None = None

    @property
    def pending(self) -> int:
        """Bytes held for an unfinished frame."""
        return len(self._buf)

    @property
    def in_frame(self) -> bool:
        """A start block was read and its frame is not finished."""
        return self._in_frame

    def feed(self, data: bytes) -> list[bytes]:
        """Add bytes; return the frames they complete, in order. Raises
        :class:`FramingError` on a framing error (frames completed in the same call are
        lost: use :meth:`decode` to keep them)."""
        frames = self.decode(data)
        if self.error is not None:
            raise self.error
        return frames

    def decode(self, data: bytes) -> list[bytes]:
        """Add bytes; return the frames they complete, in order, up to a framing error,
        which sets :attr:`error`. After that nothing more is decoded."""
        frames: list[bytes] = []
        if self.error is not None:
            return frames
        try:
            self._feed(data, frames)
        except FramingError as exc:
            self.error = exc
            self._buf.clear()
        return frames

    def _stray(self, n: int) -> None:
        self.stray += n
        self.stray_run += n
        self._garbage += n

    def _feed(self, data: bytes, frames: list[bytes]) -> None:
        buf = self._buf
        buf += data
        while buf:
            if not self._in_frame:
                start = buf.find(START_BLOCK)
                if start == -1:
                    self._stray(len(buf))
                    buf.clear()
                    if self._garbage > self.max_frame:
                        raise FramingError("no MLLP start block in the stream")
                    break
                if start:
                    self._stray(start)
                    del buf[:start]
                del buf[:1]
                self._garbage = 0
                self._scanned = 0
                self._in_frame = True
            end = buf.find(END_BLOCK, self._scanned)
            if end == -1:
                self._scanned = len(buf)
                if len(buf) > self.max_frame:
                    raise FramingError(f"frame exceeds {self.max_frame} bytes")
                break
            if end > self.max_frame:
                raise FramingError(f"frame exceeds {self.max_frame} bytes")
            payload = bytes(buf[:end])
            restart = payload.rfind(START_BLOCK)
            if restart != -1:
                # a new start block inside a frame: the earlier partial frame was abandoned
                # by the peer (never ACKed, so it will be resent); keep the newest one
                self.stray += restart + 1
                payload = payload[restart + 1 :]
            frames.append(payload)
            self.stray_run = 0
            cut = end + 1
            if len(buf) > cut and buf[cut : cut + 1] == CARRIAGE_RETURN:
                cut += 1
            del buf[:cut]
            self._scanned = 0
            self._in_frame = False
