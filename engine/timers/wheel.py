"""A hierarchical hashed timer wheel: pure, in memory, no clock reads.

Time is passed in as float epoch seconds and bucketed into integer ticks counted from
``start``. Level ``L`` has ``slots`` buckets, each ``slots**L`` ticks wide; a timer sits in
the lowest level whose current rotation contains its tick, and moves down a level when that
rotation reaches its bucket (the cascade). Timers beyond the top level's rotation wait in an
overflow table keyed by top-level rotation. ``advance`` jumps straight from one occupied
bucket to the next, so a year of empty one-second ticks costs a few bucket scans, not 31
million loop turns.

A dict ``key -> (due, key)`` is the source of truth; buckets hold those same tuples, and a
tuple counts only while the dict still points at it. Cancel and reschedule therefore touch
only the dict (O(1)); stale tuples are dropped when their bucket is reached, or all at once
when they outnumber the live ones.

No sequence number is stored (it would cost ~30 bytes a timer): where a timer is filed is a
function of its tick and the current tick alone, so timers with the same due time always
share a bucket, appended in insertion order, and every move and a stable sort keep that order.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Hashable
from heapq import heapify, heappop, heappush
from operator import itemgetter
from typing import Final

Entry = tuple[float, Hashable]  # (due, key)

# Compact when stale tuples exceed both this floor and the live count: amortized O(1) per
# cancel, and memory stays within about twice the live set.
_COMPACT_FLOOR: Final = 4096
_due_of: Final = itemgetter(0)


class TimerWheel:
    """Pending timers keyed by any hashable; see the module docstring for the layout."""

    __slots__ = (
        "_cur",
        "_dead",
        "_event",
        "_live",
        "_near",
        "_overflow",
        "_rotations",
        "_slots",
        "_span",
        "_stale",
        "_start",
        "_tick",
        "_wheels",
        "_widths",
    )

    def __init__(self, start: float, tick: float = 1.0, slots: int = 256, levels: int = 4) -> None:
        if not (math.isfinite(start) and math.isfinite(tick) and tick > 0):
            raise ValueError("start must be finite and tick a finite positive number")
        if slots < 2 or levels < 1:
            raise ValueError("a wheel needs at least 2 slots and 1 level")
        self._start = start
        self._tick = tick
        self._slots = slots
        self._widths = [slots**level for level in range(levels)]  # ticks per bucket
        self._span = slots**levels  # ticks per top-level rotation
        self._wheels: list[list[list[Entry]]] = [[[] for _ in range(slots)] for _ in range(levels)]
        self._overflow: dict[int, list[Entry]] = {}  # top-level rotation -> timers in it
        self._rotations: list[int] = []  # heap of the _overflow keys
        self._near: list[Entry] = []  # tick <= _cur: released, fire once due <= now
        self._live: dict[Hashable, Entry] = {}
        self._dead = 0  # stale tuples still held somewhere
        self._cur = 0  # every tick <= _cur has been released to _near
        self._event: int | None = None  # next tick with an occupied bucket (cached)
        self._stale = False  # _event must be recomputed by a scan

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, key: object) -> bool:
        return key in self._live

    def schedule(self, key: Hashable, due: float) -> None:
        """Fire ``key`` at ``due``; a pending ``key`` is moved (it counts as a new insertion
        for tie ordering). A due time already past fires on the next :meth:`advance`."""
        if not math.isfinite(due):
            raise ValueError("due must be a finite number of epoch seconds")
        entry = (due, key)
        if self._live.get(key) is not None:
            self._dead += 1
        self._live[key] = entry
        event = self._place(entry)
        if not self._stale and event is not None and (self._event is None or event < self._event):
            self._event = event
        self._maybe_compact()

    def cancel(self, key: Hashable) -> bool:
        """Forget ``key``; True if it was pending."""
        if self._live.pop(key, None) is None:
            return False
        self._dead += 1
        self._maybe_compact()
        return True

    def advance(self, now: float) -> list[tuple[float, Hashable]]:
        """Return, and forget, every pending ``(due, key)`` with ``due <= now``, sorted by
        due time and then insertion order. Cost grows with the timers returned and the
        occupied buckets reached (a higher-level bucket's timers are refiled one level down
        then), never with the number pending. Moving ``now`` backwards is harmless."""
        target = self._tick_of(now)
        ready: list[Entry] = []
        while target > self._cur:
            event = self._next_event()
            if event is None or event > target:
                self._cur = target  # nothing occupied in between: jump over the empty span
                break
            self._cur = event
            self._release(event, ready)
        if not ready and not self._near:
            return []
        live = self._live
        ready.extend(self._near)
        held = len(ready)
        ready = [e for e in ready if live.get(e[1]) is e]
        self._dead -= held - len(ready)
        ready.sort(key=_due_of)  # stable: equal due times keep insertion order
        split = bisect_right(ready, now, key=_due_of)
        fired, self._near = ready[:split], ready[split:]
        for _, key in fired:
            del live[key]
        return fired

    def next_due(self) -> float | None:
        """The exact earliest pending due time, or None. Scans forward bucket by bucket
        (at most ``slots * levels`` buckets) and stops at the first holding a live timer."""
        best = self._earliest(self._near)
        if best is not None:
            return best  # _near holds only ticks <= _cur, earlier than anything in a bucket
        # Levels cover consecutive, increasing time ranges, as do the buckets inside one.
        for width, wheel in zip(self._widths, self._wheels, strict=True):
            for slot in range(self._cur // width % self._slots + 1, self._slots):
                best = self._earliest(wheel[slot])
                if best is not None:
                    return best
        while self._rotations:
            best = self._earliest(self._overflow[self._rotations[0]])
            if best is not None:
                return best
            self._dead -= len(self._overflow.pop(heappop(self._rotations)))  # all stale
        return None

    def horizon(self) -> float:
        """End of the span the levels cover, counted from the current tick. A caller that
        keeps far timers in a database loads those due before this and refills as it moves
        (it never moves back). Later timers are still accepted: they wait in the overflow
        table until the top level's rotation reaches them."""
        return self._start + (self._cur + self._span) * self._tick

    def _tick_of(self, when: float) -> int:
        # Division and floor are both monotonic, so due <= now implies tick(due) <= tick(now).
        return math.floor((when - self._start) / self._tick)

    def _earliest(self, entries: list[Entry]) -> float | None:
        live = self._live
        return min((e[0] for e in entries if live.get(e[1]) is e), default=None)

    def _place(self, entry: Entry) -> int | None:
        """File ``entry`` relative to ``_cur``; return the tick its bucket is reached, or None
        when it was released to ``_near`` at once."""
        tick, cur = self._tick_of(entry[0]), self._cur
        if tick <= cur:
            self._near.append(entry)
            return None
        for width, wheel in zip(self._widths, self._wheels, strict=True):
            rotation = width * self._slots
            if tick // rotation == cur // rotation:
                wheel[tick // width % self._slots].append(entry)
                return tick // width * width
        rotation = tick // self._span
        if rotation not in self._overflow:
            self._overflow[rotation] = []
            heappush(self._rotations, rotation)
        self._overflow[rotation].append(entry)
        return rotation * self._span

    def _next_event(self) -> int | None:
        if self._stale:
            self._event, self._stale = self._scan(), False
        return self._event

    def _scan(self) -> int | None:
        # A bucket at or behind the current digit of its level is always empty (placement
        # never targets it), so the first occupied one ahead, lowest level first, is next.
        cur = self._cur
        for width, wheel in zip(self._widths, self._wheels, strict=True):
            rotation = width * self._slots
            for slot in range(cur // width % self._slots + 1, self._slots):
                if wheel[slot]:
                    return cur // rotation * rotation + slot * width
        return self._rotations[0] * self._span if self._rotations else None

    def _release(self, tick: int, ready: list[Entry]) -> None:
        """``_cur`` has just reached ``tick``: pull in overflow, cascade, release level 0."""
        self._stale = True
        while self._rotations and self._rotations[0] <= tick // self._span:
            for entry in self._overflow.pop(heappop(self._rotations)):
                self._refile(entry)
        for width, wheel in reversed(list(zip(self._widths, self._wheels, strict=True))):
            slot = tick // width % self._slots
            bucket = wheel[slot]
            if not bucket:
                continue
            wheel[slot] = []
            if width == 1:
                ready.extend(bucket)  # stale tuples are filtered by advance
                continue
            for entry in bucket:
                self._refile(entry)

    def _refile(self, entry: Entry) -> None:
        if self._live.get(entry[1]) is entry:
            self._place(entry)
        else:
            self._dead -= 1

    def _maybe_compact(self) -> None:
        if self._dead <= _COMPACT_FLOOR or self._dead <= len(self._live):
            return
        live = self._live
        for wheel in self._wheels:
            wheel[:] = [[e for e in bucket if live.get(e[1]) is e] for bucket in wheel]
        self._near = [e for e in self._near if live.get(e[1]) is e]
        overflow = {r: [e for e in es if live.get(e[1]) is e] for r, es in self._overflow.items()}
        self._overflow = {r: es for r, es in overflow.items() if es}
        self._rotations = list(self._overflow)
        heapify(self._rotations)
        self._dead = 0
