"""Backups and restores of the database, and the state lock that keeps a restore away
from a running daemon (docs/operations.md "Backups: the drill").

:func:`backup` copies the live file with SQLite's online backup API in one step: one read
transaction, so the copy is a consistent snapshot of the moment it began, and in WAL mode
the daemon's writer is never held off (readers do not block it). The copy is written
beside its destination under a ``.partial`` name, switched to a rollback journal (a
single self-contained file), fsync'd and renamed into place; then :func:`check` runs
``PRAGMA integrity_check`` and walks the audit chain on it.

:func:`restore` checks its source the same way first, then takes the state lock
exclusively (:class:`StateLock`: every running daemon holds it shared, so a restore can
never overwrite a database a daemon has open), keeps the current database as
``<file>.pre-restore-<UTC time>``, and copies the source in through the backup API, which
writes it as one transaction of the target (a crash midway leaves the old contents).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from engine.errors import StoreError
from engine.store import audit
from engine.store.migrations import MIGRATIONS
from engine.store.sql import has_table


@dataclass(frozen=True, slots=True)
class Check:
    """What :func:`check` found in a database file."""

    path: Path
    size: int  # bytes
    schema: int  # PRAGMA user_version
    messages: int  # inbox rows
    audit_rows: int | None  # None: no audit log (the daemon never ran with routes)

    def summary(self) -> str:
        audit_text = (
            "no audit log"
            if self.audit_rows is None
            else f"audit chain ok ({self.audit_rows} rows)"
        )
        return (
            f"{self.path}: {self.size / 1e6:.1f} MB, schema {self.schema}, "
            f"{self.messages} messages, integrity ok, {audit_text}"
        )


def check(path: Path) -> Check:
    """Open ``path`` read-only and prove it whole: ``PRAGMA integrity_check`` is ``ok``, its
    schema is one this refloop knows, and the audit chain verifies. Raises StoreError
    naming the first problem."""
    if not path.is_file():
        raise StoreError(f"no database at {path}")
    try:
        with contextlib.closing(
            sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
        ) as conn:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # a database?
            try:
                problems = [str(r[0]) for r in conn.execute("PRAGMA integrity_check(5)")]
            except sqlite3.DatabaseError as exc:  # a page too damaged to walk
                problems = [str(exc)]
            if problems != ["ok"]:
                raise StoreError(f"{path}: integrity check failed: {'; '.join(problems)}")
            schema = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if schema > len(MIGRATIONS):
                raise StoreError(
                    f"{path}: schema version {schema} is newer than this refloop "
                    f"({len(MIGRATIONS)})"
                )
            if not has_table(conn, "messages"):
                raise StoreError(f"{path}: not a refloop database (no messages table)")
            messages = int(conn.execute("SELECT count(*) FROM messages").fetchone()[0])
            audit_rows = None
            if has_table(conn, "audit"):
                result = audit.verify(conn)
                if not result.ok:
                    raise StoreError(f"{path}: audit row {result.bad_row}: {result.problem}")
                audit_rows = result.rows
    except sqlite3.DatabaseError as exc:  # not a database, encrypted, truncated, ...
        raise StoreError(f"{path}: cannot read it as a database: {exc}") from None
    return Check(path, path.stat().st_size, schema, messages, audit_rows)


def backup_name(now: float) -> str:
    """``refloop-YYYYmmddTHHMMSSZ.db``: the file a backup into a directory writes."""
    return time.strftime("refloop-%Y%m%dT%H%M%SZ.db", time.gmtime(now))


def backup(source: Path, dest: Path, *, now: float) -> Check:
    """Copy the database at ``source`` (the daemon may be running) to ``dest`` (a file
    that must not exist yet, or a directory: ``dest/refloop-<UTC time>.db``), then
    :func:`check` the copy. A copy that fails its check is renamed ``<name>.failed`` and
    StoreError says so."""
    if not source.is_file():
        raise StoreError(f"no database at {source}")
    target = dest / backup_name(now) if dest.is_dir() else dest
    if target.exists():
        raise StoreError(f"{target} exists; refloop backup never overwrites a file")
    if not target.parent.is_dir():
        raise StoreError(f"no directory {target.parent}")
    partial = target.with_name(target.name + ".partial")
    _copy(source, partial)
    os.replace(partial, target)
    _fsync_dir(target.parent)
    try:
        return check(target)
    except StoreError as exc:
        failed = target.with_name(target.name + ".failed")
        os.replace(target, failed)
        raise StoreError(f"{exc} (the copy is kept as {failed})") from None


def _copy(source: Path, partial: Path) -> None:
    """The online backup of ``source`` into a new file ``partial`` (0600), as one
    self-contained, fsync'd file in rollback-journal mode."""
    partial.unlink(missing_ok=True)
    os.close(os.open(partial, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    try:
        with (
            contextlib.closing(sqlite3.connect(f"file:{source}?mode=ro", uri=True)) as src,
            contextlib.closing(sqlite3.connect(partial, isolation_level=None)) as dst,
        ):
            src.execute("PRAGMA busy_timeout = 10000")
            src.backup(dst)  # one step: a consistent snapshot (pages=-1)
            dst.execute("PRAGMA journal_mode = DELETE")
        with partial.open("rb+") as f:
            os.fsync(f.fileno())
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- the state lock -------------------------------------------------------------------


def lock_path(db_path: Path) -> Path:
    """The lock file of the database at ``db_path`` (``refloop.db.lock`` beside it)."""
    return db_path.with_name(db_path.name + ".lock")


class StateLock:
    """An ``flock`` on ``<db>.lock``: a running daemon holds it shared
    (:meth:`shared`), a restore exclusively (:meth:`exclusive`). The kernel drops it when
    the process ends, however it ends (kill -9 included), so it never goes stale. The
    file holds the pid of the last daemon that took it, for messages only."""

    def __init__(self, db_path: Path):
        self.path = lock_path(db_path)
        self._fd: int | None = None

    def shared(self) -> None:
        """For the daemon: StoreError when a restore holds the lock."""
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(
                f"a restore is replacing {self.path.with_suffix('')}; start refloop once it is done"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def exclusive(self) -> None:
        """For a restore: StoreError naming the daemon when one holds the lock."""
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = self.path.read_text(errors="replace").strip() or "?"
            raise StoreError(
                f"refloop is running on {self.path.with_suffix('')} (pid {pid}); stop it first "
                "(systemctl stop refloop)"
            ) from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)


@contextlib.contextmanager
def exclusive(db_path: Path) -> Iterator[StateLock]:
    lock = StateLock(db_path)
    lock.exclusive()
    try:
        yield lock
    finally:
        lock.release()


@dataclass(frozen=True, slots=True)
class Restored:
    source: Check
    target: Check
    kept: Path | None  # the database that was there before, or None when there was none


def restore(source: Path, db_path: Path, *, now: float) -> Restored:
    """Replace the database at ``db_path`` with the backup at ``source``: check the
    source, take the state lock exclusively (StoreError while a daemon runs on it), keep
    the current file as ``<name>.pre-restore-<UTC time>``, copy the source in, check the
    result."""
    source_check = check(source)
    if source.resolve() == db_path.resolve():
        raise StoreError(f"{source} is the database itself")
    with exclusive(db_path):
        kept = None
        if db_path.exists():
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
            kept = db_path.with_name(f"{db_path.name}.pre-restore-{stamp}")
            if kept.exists():
                raise StoreError(f"{kept} exists; try again in a second")
            _copy(db_path, kept)
        else:
            db_path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(db_path, os.O_CREAT | os.O_WRONLY, 0o600))
        with (
            contextlib.closing(sqlite3.connect(f"file:{source}?mode=ro", uri=True)) as src,
            contextlib.closing(sqlite3.connect(db_path, isolation_level=None)) as dst,
        ):
            src.backup(dst)  # one transaction of the target: all of it or none
            dst.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return Restored(source_check, check(db_path), kept)
