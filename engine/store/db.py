"""Opening the SQLite database and migrating its schema.

One connection, owned by the event loop's thread; every transaction is a synchronous
BEGIN … COMMIT with no await inside, so transactions never interleave. WAL mode lets the
CLI read while the daemon writes. The file is created 0600: it holds PHI.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

import sqlite_utils

from engine.errors import StoreError

Migration = Callable[[sqlite_utils.Database], None]
Conn = (
    sqlite3.Connection
)  # the connection type other packages name (only the store imports sqlite3)
DatabaseError = sqlite3.Error  # what a failed statement raises


@contextlib.contextmanager
def savepoint(conn: Conn, name: str) -> Iterator[None]:
    """A nested unit inside an open transaction: on an exception only its own writes are
    rolled back (and the exception goes on)."""
    conn.execute(f"SAVEPOINT {name}")
    try:
        yield
    except BaseException:
        conn.execute(f"ROLLBACK TO {name}")
        conn.execute(f"RELEASE {name}")
        raise
    conn.execute(f"RELEASE {name}")


def has_table(conn: Conn, name: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
    ).fetchone()
    return row is not None


def has_column(conn: Conn, table: str, column: str) -> bool:
    row = conn.execute(
        "SELECT count(*) FROM pragma_table_info(?) WHERE name = ?", (table, column)
    ).fetchone()
    return bool(row and row[0])


def _m1_inbox(db: sqlite_utils.Database) -> None:
    db.table("messages").create(
        {
            "id": int,
            "received_at": float,  # epoch seconds (UTC)
            "source": str,
            "peer": str,
            "sending_app": str,
            "sending_facility": str,
            "receiving_app": str,
            "receiving_facility": str,
            "control_id": str,
            "message_type": str,  # TYPE^TRIGGER
            "version": str,
            "charset": str,  # the codec the bytes decode with
            "raw": bytes,  # exactly the bytes received
            "sha256": bytes,
            "status": str,  # received | routed | filtered | error | rejected
            "ack_code": str,
            "error": str,  # reason; never PHI
            "duplicates": int,  # identical resends ACKed again, not stored again
            "flags": str,  # e.g. control-id-reused
            "route": str,
            "processed_at": float,
            "batch_ref": str,
        },
        pk="id",
        not_null={"received_at", "source", "raw", "status"},
        defaults={
            "peer": "",
            "sending_app": "",
            "sending_facility": "",
            "receiving_app": "",
            "receiving_facility": "",
            "control_id": "",
            "message_type": "",
            "version": "",
            "charset": "",
            "ack_code": "",
            "error": "",
            "duplicates": 0,
            "flags": "",
            "route": "",
            "batch_ref": "",
        },
    )
    # dedupe lookups on the ACK path, and the CLI's / API's metadata filters
    db.table("messages").create_index(["control_id"], index_name="messages_control_id")
    db.table("messages").create_index(["received_at"], index_name="messages_received_at")
    db.table("messages").create_index(["message_type", "id"], index_name="messages_type")
    # processing cursors and other small facts
    db.table("meta").create({"key": str, "value": str}, pk="key")


def _m2_decisions(db: sqlite_utils.Database) -> None:
    from engine.store.decisions import migrate

    migrate(db)


def _m3_referrals(db: sqlite_utils.Database) -> None:
    from engine.store.referrals import migrate

    migrate(db)


def _m4_audit(db: sqlite_utils.Database) -> None:
    from engine.store.audit import migrate

    migrate(db)


def _m5_outbox_dispatch(db: sqlite_utils.Database) -> None:
    from engine.store.outbox import migrate

    migrate(db)


def _m6_specialists(db: sqlite_utils.Database) -> None:
    from engine.store.specialists import migrate

    migrate(db)


def _m_users(db: sqlite_utils.Database) -> None:
    from engine.store.users import migrate

    migrate(db)


def _m_closure_report(db: sqlite_utils.Database) -> None:
    from engine.store.report import migrate

    migrate(db)


def _m_patient_phone(db: sqlite_utils.Database) -> None:
    # the nudge caps look up a patient's contacts across referrals by phone
    # (store.timers.patient_contacts): without it each nudge scanned every patient nudge
    db.execute("CREATE INDEX referrals_patient_phone ON referrals (patient_phone)")


def _m_browse_indexes(db: sqlite_utils.Database) -> None:
    # the worklist (dashboard, /api/referrals: store.worklist.search_referrals) lists open
    # referrals, by specialty or not, or all referrals, oldest first: without these each
    # request read every referral and sorted it. The open ones are a partial index (the
    # query's ``status != 'closed'`` selects it), so they cost nothing once closed.
    db.execute("CREATE INDEX referrals_open ON referrals (opened_at) WHERE status != 'closed'")
    db.execute(
        "CREATE INDEX referrals_open_specialty ON referrals (lower(specialty), opened_at) "
        "WHERE status != 'closed'"
    )
    db.execute("CREATE INDEX referrals_opened ON referrals (opened_at)")
    # the message browser's status filter (newest first): without it a status with few or
    # no rows (received, rejected) read the whole inbox
    db.execute("CREATE INDEX messages_status ON messages (status, id)")


def _m_outbox_message_id(db: sqlite_utils.Database) -> None:
    from engine.store.outbox import migrate_message_id

    migrate_message_id(db)


def _m_tasks_queue(db: sqlite_utils.Database) -> None:
    from engine.store.tasks import migrate

    migrate(db)


def _m_referral_keys(db: sqlite_utils.Database) -> None:
    # a placer number is unique only within its assigning authority (EI.2): two practices
    # may both send order 10482 (docs/referral-states.md, "Keys"); and the FHIR requester
    # of a referral, to address the write-back Communication (docs/fhir.md)
    # (a database created since has them from _m3_referrals)
    columns = db["referrals"].columns_dict
    for column in ("placer_authority", "referring_reference"):
        if column not in columns:
            db.execute(f"ALTER TABLE referrals ADD COLUMN {column} TEXT NOT NULL DEFAULT ''")


def _m_bigmsg_message_raw(db: sqlite_utils.Database) -> None:
    from engine.store.inbox import migrate_raw

    migrate_raw(db)


MIGRATIONS: Final[list[Migration]] = [
    _m1_inbox,
    _m2_decisions,
    _m3_referrals,
    _m4_audit,
    _m5_outbox_dispatch,
    _m6_specialists,
    _m_users,
    _m_closure_report,
    _m_patient_phone,
    _m_browse_indexes,
    _m_outbox_message_id,
    _m_tasks_queue,
    _m_referral_keys,
    _m_bigmsg_message_raw,
]


class Database:
    """The SQLite connection plus the helpers every store module uses."""

    def __init__(self, conn: sqlite3.Connection, path: str, synchronous: str = "full"):
        self.conn = conn
        self.path = path
        self.synchronous = synchronous
        self._level = synchronous

    def _sync(self, durable: bool) -> None:
        level = self.synchronous if durable else "normal"
        if level != self._level:
            self.conn.execute(f"PRAGMA synchronous = {level.upper()}")
            self._level = level

    @contextlib.contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE … COMMIT, or ROLLBACK on any exception.

        ``durable=False`` commits without an fsync (WAL, ``synchronous=NORMAL``): the
        transaction survives a crash of the process but, on power loss, only once a later
        durable commit has fsync'd the WAL — which holds every earlier frame, so one fsync
        makes all the non-durable commits before it durable too. Processing uses it: its
        input is already durable in the inbox and it can be re-derived; anything that
        leaves the building (outbox sends) starts with a durable commit.
        """
        conn = self.conn
        self._sync(durable)
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # also when COMMIT itself failed (disk full, I/O error)
                conn.execute("ROLLBACK")
            raise

    def get_meta(self, key: str, default: str = "") -> str:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return str(row[0]) if row else default

    def set_meta(self, key: str, value: str) -> None:
        """Write a meta value; call inside a transaction."""
        self.conn.execute(
            "INSERT INTO meta(key, value) VALUES(?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def close(self) -> None:
        self.conn.close()


def open_database(
    path: str | os.PathLike[str],
    *,
    synchronous: str = "full",
    readonly: bool = False,
    migrations: list[Migration] | None = None,
) -> Database:
    """Open (creating 0600 if needed) and migrate the database at ``path``.

    ``synchronous=full`` makes every COMMIT durable against power loss before it returns
    (an fsync of the WAL); ``normal`` survives a process crash but may lose the last
    transactions on power loss. See docs/listener.md.
    """
    p = Path(path)
    if readonly:
        if not p.exists():
            raise StoreError(f"no database at {p}")
        conn = sqlite3.connect(f"file:{p}?mode=ro", uri=True, isolation_level=None)
    else:
        p.parent.mkdir(parents=True, exist_ok=True)
        if not p.exists():
            fd = os.open(p, os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)
        conn = sqlite3.connect(str(p), isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        if not readonly:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {'FULL' if synchronous == 'full' else 'NORMAL'}")
            conn.execute("PRAGMA foreign_keys = ON")
            _migrate(conn, migrations if migrations is not None else MIGRATIONS)
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise StoreError(f"cannot open database {p}: {exc}") from exc
    return Database(conn, str(p), synchronous)


def _migrate(conn: sqlite3.Connection, migrations: list[Migration]) -> None:
    current = conn.execute("PRAGMA user_version").fetchone()[0]
    if current > len(migrations):
        raise StoreError(
            f"database schema version {current} is newer than this refloop ({len(migrations)})"
        )
    db = sqlite_utils.Database(conn)
    for version in range(current, len(migrations)):
        conn.execute("BEGIN IMMEDIATE")
        try:
            migrations[version](db)
            conn.execute(f"PRAGMA user_version = {version + 1}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
