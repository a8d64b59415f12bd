"""WAL checkpoints off the ACK path (SQLite).

SQLite's automatic checkpoint runs inside the COMMIT of whichever connection's commit
finds the WAL over ``wal_autocheckpoint`` pages (1000 by default): it copies the WAL's
pages into the database file and fsyncs both before that COMMIT returns. When the inbox
writer's group commit is that connection, every message of the batch waits for the
checkpoint before its ACK: measured in bench/ingest.py, a commit that ran a checkpoint
took 5-10 ms on average against 1.8 ms for one that did not, and the processing
worker's ~14 rows per message make the WAL reach the threshold several times a second
(docs/performance.md, issue 18).

So the daemon's connections (the inbox writer's, the daemon's own, the worker's) run
with ``wal_autocheckpoint = 0`` (:func:`no_autocheckpoint`), and a :class:`Checkpointer`
thread on a connection of its own runs a PASSIVE checkpoint every
:data:`CHECKPOINT_SECONDS`: it takes no lock a writer needs (a commit goes on meanwhile),
copies what no reader still needs, and the next writer starts the WAL over once all of
it is copied. The WAL is bounded by what the store writes in that interval (under the
heaviest bench load about 12 MB) unless a reader holds a snapshot that long, as with
SQLite's own checkpoints. Durability is unchanged: a checkpoint only copies committed,
already durable (or, for non-durable commits, crash-safe) frames.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from typing import Final

from engine.store import trace

log = logging.getLogger(__name__)

CHECKPOINT_SECONDS: Final = 0.5  # how often the thread checkpoints what was committed
# The WAL file's size kept when a writer starts it over after a checkpoint: SQLite reuses
# the file from its start and never shrinks it by itself, so one burst (or one reader
# that held a snapshot through a few checkpoints) would leave it at its high-water mark
# for good. About what SQLite's own checkpoints let it reach (1,000 pages of 4 KiB).
WAL_KEEP_BYTES: Final = 4 * 1024 * 1024


def no_autocheckpoint(conn: sqlite3.Connection) -> None:
    """No checkpoint in this connection's commits: the :class:`Checkpointer` runs them;
    and the WAL truncated back to :data:`WAL_KEEP_BYTES` when this connection starts it
    over."""
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    conn.execute(f"PRAGMA journal_size_limit = {WAL_KEEP_BYTES}")


class Checkpointer:
    """A thread that runs ``PRAGMA wal_checkpoint(PASSIVE)`` every ``interval`` seconds
    on its own connection to ``path``, and once more when stopped."""

    def __init__(self, path: str, interval: float = CHECKPOINT_SECONDS):
        self.path = path
        self.interval = interval
        self.runs = 0  # checkpoints that copied frames (tests, metrics)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wal-checkpoint", daemon=True)
        self._failed = ""  # the last error logged (one line per kind, not per run)

    def start(self) -> Checkpointer:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Checkpoint what is left, then end the thread."""
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            log.error("WAL checkpoints: cannot open the database (%s)", exc)
            return
        try:
            while not self._stop.wait(self.interval):
                self.checkpoint(conn)
            self.checkpoint(conn)
        finally:
            conn.close()

    def checkpoint(self, conn: sqlite3.Connection) -> None:
        started = time.perf_counter()
        try:
            _, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:  # a full disk, an I/O error: the WAL keeps it meanwhile
            if str(exc) != self._failed:
                log.warning("WAL checkpoint failed (%s); trying again", exc)
                self._failed = str(exc)
            return
        self._failed = ""
        if trace.enabled():
            trace.record("checkpoint", started, time.perf_counter() - started, frames, copied)
        if copied > 0:
            self.runs += 1
