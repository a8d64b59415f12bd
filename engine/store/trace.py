"""Where the ACK path's time goes (bench/ingest.py's diagnosis, off by default).

Set ``REFLOOP_TXN_TRACE`` to a file name and each process appends, when its store closes,
one JSON line per traced series: the store transactions of each connection (time to
BEGIN, time holding the write lock, time in COMMIT, and whether a WAL checkpoint ran
meanwhile: the database file, which only a checkpoint writes in WAL mode, changed during
the COMMIT), the inbox writer's per-message phases, and the daemon's event-loop stalls.
Figures only: never a statement, a parameter or a message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
from typing import Final

TRACE_ENV: Final = "REFLOOP_TXN_TRACE"

_lock = threading.Lock()
_series: dict[str, list[list[float]]] = {}


def enabled() -> bool:
    return bool(os.environ.get(TRACE_ENV))


def record(series: str, *values: float) -> None:
    """Append one row of figures to ``series`` (this process)."""
    with _lock:
        _series.setdefault(series, []).append(list(values))


def db_stamp(path: str) -> int:
    """The database file's modification time (ns), 0 when it cannot be read."""
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return 0


def flush() -> None:
    """Append what this process recorded to the trace file and forget it."""
    path = os.environ.get(TRACE_ENV)
    if not path:
        return
    with _lock:
        series = dict(_series)
        _series.clear()
    if not series:
        return
    with contextlib.suppress(OSError), open(path, "a", encoding="utf-8") as f:
        for name, rows in series.items():
            f.write(json.dumps({"pid": os.getpid(), "series": name, "rows": rows}) + "\n")


async def watch_loop() -> None:
    """How late the event loop runs a 1 ms sleep, every time (a stall: callbacks that
    held the loop, or the process waiting for a CPU): series ``loop-late``."""
    while True:
        t0 = time.perf_counter()
        await asyncio.sleep(0.001)
        record("loop-late", t0, time.perf_counter() - t0 - 0.001)
