"""Dashboard and API users, their sessions and their API tokens.

Plain functions over an open connection (the caller owns the transaction). Secrets are
never stored: a password as its scrypt hash (``engine.web.auth``), a session id and an API
token as the SHA-256 of the random value (high-entropy tokens need no slow hash; a
database leak does not hand out live sessions).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from engine.store.referrals import Conn
from engine.store.sql import Schema, has_table

_SCHEMA: Final = (
    """CREATE TABLE users (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL UNIQUE,
        role TEXT NOT NULL,               -- coordinator | analyst | admin
        password_hash TEXT NOT NULL,      -- engine.web.auth.hash_password
        disabled INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    )""",
    """CREATE TABLE user_sessions (
        token_hash TEXT PRIMARY KEY,      -- sha256 hex of the cookie value
        user_id INTEGER NOT NULL REFERENCES users (id),
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL
    )""",
    "CREATE INDEX user_sessions_user ON user_sessions (user_id)",
    """CREATE TABLE api_tokens (
        token_hash TEXT PRIMARY KEY,      -- sha256 hex of the bearer token
        user_id INTEGER NOT NULL REFERENCES users (id),
        label TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL,
        last_used_at REAL
    )""",
    "CREATE INDEX api_tokens_user ON api_tokens (user_id)",
)


def migrate(db: Schema) -> None:
    """Schema: appended to ``engine.store.migrations.MIGRATIONS``."""
    for statement in _SCHEMA:
        db.execute(statement)


def users_table_exists(conn: Conn) -> bool:
    return has_table(conn, "users")


@dataclass(frozen=True, slots=True)
class UserRow:
    id: int
    name: str
    role: str
    password_hash: str
    disabled: bool
    created_at: float
    updated_at: float

    def as_dict(self) -> dict[str, Any]:
        """Everything but the password hash."""
        return {
            "id": self.id,
            "name": self.name,
            "role": self.role,
            "disabled": self.disabled,
            "created_at": self.created_at,
        }


_USER: Final = "id, name, role, password_hash, disabled, created_at, updated_at"


def _user(r: Sequence[Any]) -> UserRow:
    return UserRow(
        id=int(r[0]),
        name=str(r[1]),
        role=str(r[2]),
        password_hash=str(r[3]),
        disabled=bool(r[4]),
        created_at=float(r[5]),
        updated_at=float(r[6]),
    )


def add_user(conn: Conn, name: str, role: str, password_hash: str, now: float) -> int:
    """A new user; raises ``ValueError`` when the name is taken."""
    if get_by_name(conn, name) is not None:
        raise ValueError(f"user {name!r} exists")
    cur = conn.execute(
        "INSERT INTO users (name, role, password_hash, created_at, updated_at) "
        "VALUES (?, ?, ?, ?, ?) RETURNING id",
        (name, role, password_hash, now, now),
    )
    return int(cur.fetchone()[0])


def get_by_name(conn: Conn, name: str) -> UserRow | None:
    r = conn.execute(f"SELECT {_USER} FROM users WHERE name = ?", (name,)).fetchone()
    return _user(r) if r else None


def get(conn: Conn, user_id: int) -> UserRow | None:
    r = conn.execute(f"SELECT {_USER} FROM users WHERE id = ?", (user_id,)).fetchone()
    return _user(r) if r else None


def list_users(conn: Conn) -> list[UserRow]:
    return [_user(r) for r in conn.execute(f"SELECT {_USER} FROM users ORDER BY name")]


def set_disabled(conn: Conn, user_id: int, disabled: bool, now: float) -> None:
    """Disable (or enable) a user; disabling ends their sessions and revokes their
    tokens."""
    conn.execute(
        "UPDATE users SET disabled = ?, updated_at = ? WHERE id = ?",
        (int(disabled), now, user_id),
    )
    if disabled:
        conn.execute("DELETE FROM user_sessions WHERE user_id = ?", (user_id,))
        conn.execute("DELETE FROM api_tokens WHERE user_id = ?", (user_id,))


def set_password(conn: Conn, user_id: int, password_hash: str, now: float) -> None:
    conn.execute(
        "UPDATE users SET password_hash = ?, updated_at = ? WHERE id = ?",
        (password_hash, now, user_id),
    )
    conn.execute("DELETE FROM user_sessions WHERE user_id = ?", (user_id,))


# -- sessions ------------------------------------------------------------------


def add_session(conn: Conn, token_hash: str, user_id: int, now: float, expires_at: float) -> None:
    conn.execute(
        "INSERT INTO user_sessions (token_hash, user_id, created_at, expires_at) "
        "VALUES (?, ?, ?, ?)",
        (token_hash, user_id, now, expires_at),
    )


def session_user(conn: Conn, token_hash: str, now: float) -> UserRow | None:
    """The enabled user of an unexpired session."""
    r = conn.execute(
        f"SELECT {', '.join('u.' + c.strip() for c in _USER.split(','))} "
        "FROM user_sessions s JOIN users u ON u.id = s.user_id "
        "WHERE s.token_hash = ? AND s.expires_at > ? AND u.disabled = 0",
        (token_hash, now),
    ).fetchone()
    return _user(r) if r else None


def delete_session(conn: Conn, token_hash: str) -> None:
    conn.execute("DELETE FROM user_sessions WHERE token_hash = ?", (token_hash,))


def delete_expired_sessions(conn: Conn, now: float) -> int:
    return conn.execute("DELETE FROM user_sessions WHERE expires_at <= ?", (now,)).rowcount


# -- API tokens ------------------------------------------------------------------


def add_token(conn: Conn, token_hash: str, user_id: int, label: str, now: float) -> None:
    conn.execute(
        "INSERT INTO api_tokens (token_hash, user_id, label, created_at) VALUES (?, ?, ?, ?)",
        (token_hash, user_id, label, now),
    )


def token_user(conn: Conn, token_hash: str) -> UserRow | None:
    """The enabled user a bearer token belongs to."""
    r = conn.execute(
        f"SELECT {', '.join('u.' + c.strip() for c in _USER.split(','))} "
        "FROM api_tokens t JOIN users u ON u.id = t.user_id "
        "WHERE t.token_hash = ? AND u.disabled = 0",
        (token_hash,),
    ).fetchone()
    return _user(r) if r else None


def count_tokens(conn: Conn, user_id: int) -> int:
    r = conn.execute("SELECT count(*) FROM api_tokens WHERE user_id = ?", (user_id,)).fetchone()
    return int(r[0])
