"""The one clock. Nothing else in refloop reads the time.

Production uses :class:`WallClock`; tests and the simulator use :class:`VirtualClock`,
which only moves when told to.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the Unix epoch (UTC)."""

    def monotonic(self) -> float:
        """A clock for measuring intervals; never goes backwards."""


class WallClock:
    """The real time."""

    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


class VirtualClock:
    """A clock that stands still until :meth:`advance` or :meth:`set` moves it."""

    def __init__(self, start: float = 1_767_225_600.0):  # 2026-01-01T00:00:00Z
        self._now = float(start)

    def now(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a virtual clock only moves forward")
        self._now += seconds

    def set(self, when: float) -> None:
        if when < self._now:
            raise ValueError("a virtual clock only moves forward")
        self._now = when


def isoformat(ts: float) -> str:
    """UTC ISO-8601 with microseconds and a Z, sortable as text: 2026-11-28T04:06:28.123456Z."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_iso(text: str) -> float:
    """Inverse of :func:`isoformat`; also accepts dates and times without a zone (taken as UTC)."""
    t = text.strip().replace("Z", "+00:00")
    dt = datetime.fromisoformat(t)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()
