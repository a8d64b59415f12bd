"""The audit log: append-only and hash-chained.

Each row says what happened (``action``), to which referral, caused by which message or
actor, and when, with a small JSON ``detail`` of codes and statuses. It never holds
free text from a message or an operator (no names, reasons or notes).

Chain: ``hash = sha256(prev_hash + "\\n" + canonical JSON of the row's other columns)``,
``prev_hash`` of the first row is 64 zeros. Canonical JSON is ``json.dumps`` with sorted
keys, ``(",", ":")`` separators and ``ensure_ascii=False``, UTF-8 encoded. The id is part of
the hashed content, so moving a row's content to another id breaks the chain too. The
newest row's id and hash are also kept in ``meta`` (``audit_head``) so that cutting rows
off the end is noticed. Triggers refuse UPDATE and DELETE.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from engine.canonical import canonical_text
from engine.store.referrals import Conn
from engine.store.sql import POSTGRESQL, Schema, dialect

GENESIS: Final = "0" * 64
HEAD_KEY: Final = "audit_head"

_SCHEMA: Final = (
    """CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at TEXT NOT NULL,                 -- UTC ISO-8601 with microseconds
        actor TEXT NOT NULL,              -- message | operator:<login> | system | auto-link
        action TEXT NOT NULL,             -- an event kind, parked, linked, ...
        referral_id INTEGER,
        message_id INTEGER,
        detail TEXT NOT NULL,             -- canonical JSON: codes, statuses, effects
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    )""",
    "CREATE INDEX audit_at ON audit (at)",
    """CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
       BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END""",
    """CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
       BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END""",
)


def migrate(db: Schema) -> None:
    """Schema: appended to ``engine.store.migrations.MIGRATIONS``."""
    for statement in _SCHEMA:
        db.execute(statement)


@dataclass(frozen=True, slots=True)
class AuditRow:
    id: int
    at: str
    actor: str
    action: str
    referral_id: int | None
    message_id: int | None
    detail: Mapping[str, Any]
    prev_hash: str
    hash: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "at": self.at,
            "actor": self.actor,
            "action": self.action,
            "referral_id": self.referral_id,
            "message_id": self.message_id,
            "detail": dict(self.detail),
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


def canonical(value: Any) -> str:
    """The chain's JSON form (engine.canonical.canonical_text)."""
    return canonical_text(value)


def row_hash(
    prev_hash: str,
    *,
    id: int,
    at: str,
    actor: str,
    action: str,
    referral_id: int | None,
    message_id: int | None,
    detail: Mapping[str, Any],
) -> str:
    body = canonical(
        {
            "id": id,
            "at": at,
            "actor": actor,
            "action": action,
            "referral_id": referral_id,
            "message_id": message_id,
            "detail": dict(detail),
        }
    )
    return hashlib.sha256(f"{prev_hash}\n{body}".encode()).hexdigest()


def append(
    conn: Conn,
    *,
    at: str,
    actor: str,
    action: str,
    referral_id: int | None,
    message_id: int | None,
    detail: Mapping[str, Any],
) -> int:
    """Append one row to the chain; call inside the transaction that did the thing."""
    new_id, prev = _next(conn)
    digest = row_hash(
        prev,
        id=new_id,
        at=at,
        actor=actor,
        action=action,
        referral_id=referral_id,
        message_id=message_id,
        detail=detail,
    )
    conn.execute(
        "INSERT INTO audit (id, at, actor, action, referral_id, message_id, detail, prev_hash, "
        "hash) VALUES (?,?,?,?,?,?,?,?,?)",
        (new_id, at, actor, action, referral_id, message_id, canonical(dict(detail)), prev, digest),
    )
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?) "
        "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        (HEAD_KEY, f"{new_id}:{digest}"),
    )
    return new_id


def _next(conn: Conn) -> tuple[int, str]:
    """The next row's id and its ``prev_hash``."""
    if dialect(conn) == POSTGRESQL:
        # Several connections (nodes) write: the head row is the chain's lock, held until
        # COMMIT, and it names the last row (identity values have gaps, so the id is the
        # head's + 1, not the sequence's). The first append creates it (one statement
        # per append once it exists: a round trip each on PostgreSQL).
        head = conn.execute(
            "SELECT value FROM meta WHERE key = ? FOR UPDATE", (HEAD_KEY,)
        ).fetchone()
        if head is None:
            conn.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
                (HEAD_KEY, f"0:{GENESIS}"),
            )
            head = conn.execute(
                "SELECT value FROM meta WHERE key = ? FOR UPDATE", (HEAD_KEY,)
            ).fetchone()
        head_id, _, head_hash = str(head[0]).partition(":")
        return int(head_id) + 1, head_hash
    # the newest row's hash and the sequence, in one statement. AUTOINCREMENT never
    # reuses an id, and a rolled-back insert rolls back the sequence too, so the next id
    # is the sequence value + 1.
    last, seq = conn.execute(
        "SELECT (SELECT hash FROM audit ORDER BY id DESC LIMIT 1), "
        "(SELECT seq FROM sqlite_sequence WHERE name = 'audit')"
    ).fetchone()
    return (int(seq) + 1 if seq is not None else 1), (str(last) if last is not None else GENESIS)


def rows(conn: Conn, *, since: str | None = None, after_id: int = 0) -> Iterator[AuditRow]:
    """Audit rows in id order; ``since`` keeps rows whose ``at`` is at or after it (ISO),
    ``after_id`` those after that row (a page of an export starts at its row, instead of
    reading every row before it)."""
    sql = (
        "SELECT id, at, actor, action, referral_id, message_id, detail, prev_hash, hash FROM audit"
    )
    where: list[str] = []
    args: list[Any] = []
    if since:
        where.append("at >= ?")
        args.append(since)
    if after_id:
        where.append("id > ?")
        args.append(after_id)
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY id"
    for r in conn.execute(sql, args):
        yield _row(r)


def _row(r: tuple[Any, ...]) -> AuditRow:
    return AuditRow(
        id=int(r[0]),
        at=str(r[1]),
        actor=str(r[2]),
        action=str(r[3]),
        referral_id=None if r[4] is None else int(r[4]),
        message_id=None if r[5] is None else int(r[5]),
        detail=json.loads(r[6]),
        prev_hash=str(r[7]),
        hash=str(r[8]),
    )


@dataclass(frozen=True, slots=True)
class Verification:
    """The outcome of :func:`verify`: ``bad_row`` is the first row that fails (None if all
    pass), ``problem`` says why."""

    rows: int
    bad_row: int | None = None
    problem: str = ""

    @property
    def ok(self) -> bool:
        return self.bad_row is None and not self.problem


def verify(conn: Conn) -> Verification:
    """Walk the chain in id order and report the first row that does not hold."""
    prev_id = 0
    prev_hash = GENESIS
    count = 0
    for r in conn.execute(
        "SELECT id, at, actor, action, referral_id, message_id, detail, prev_hash, hash "
        "FROM audit ORDER BY id"
    ):
        count += 1
        row_id = int(r[0])
        if row_id != prev_id + 1:
            return Verification(count, row_id, f"row(s) {prev_id + 1}..{row_id - 1} are missing")
        if str(r[7]) != prev_hash:
            return Verification(count, row_id, f"prev_hash does not match row {prev_id}'s hash")
        try:
            detail = json.loads(r[6])
        except (TypeError, ValueError):
            return Verification(count, row_id, "detail is not JSON")
        expected = row_hash(
            prev_hash,
            id=row_id,
            at=str(r[1]),
            actor=str(r[2]),
            action=str(r[3]),
            referral_id=None if r[4] is None else int(r[4]),
            message_id=None if r[5] is None else int(r[5]),
            detail=detail,
        )
        if expected != str(r[8]) or canonical(detail) != r[6]:
            return Verification(count, row_id, "contents do not match the row's hash")
        prev_id, prev_hash = row_id, str(r[8])
    head = conn.execute("SELECT value FROM meta WHERE key = ?", (HEAD_KEY,)).fetchone()
    if head is not None:
        head_id, _, head_hash = str(head[0]).partition(":")
        if int(head_id) <= prev_id and (int(head_id), head_hash) != (prev_id, prev_hash):
            return Verification(count, prev_id, "the recorded head does not match the last row")
        if int(head_id) > prev_id:
            return Verification(
                count,
                prev_id + 1,
                f"row(s) {prev_id + 1}..{head_id} are missing: the chain ends at row {prev_id}, "
                f"the recorded head is row {head_id}",
            )
    return Verification(count)
