"""Users and access for the dashboard and the JSON API: password hashing, sessions,
CSRF tokens, the login rate limit, API bearer tokens and roles.

- Passwords: ``hashlib.scrypt`` (RFC 7914) with n=2**14, r=8, p=1 — memory-hard (16 MiB
  per guess), in the standard library, so no native dependency to ship. Stored as
  ``scrypt$n$r$p$salt$hash`` (base64), so the cost can rise later without a migration.
- Sessions: a random 32-byte cookie value; the store keeps its SHA-256 only. The CSRF
  token is an HMAC of the session value (synchronizer token derived from the session:
  nothing more to store, and it changes with every login).
- Login rate limit: :data:`LOGIN_FAILURES` failures per username + client address within
  :data:`LOGIN_WINDOW` seconds lock that pair out until the oldest failure ages out
  (in memory: a restart forgets, which is fine for a throttle). An attempt is counted
  before its password is hashed, so concurrent guesses cannot all slip under the limit.
- API: ``Authorization: Bearer <token>``, a per-user token (``refloop users token``).

Roles (:data:`PERMISSIONS`): ``coordinator`` works the referral worklist and its actions;
``analyst`` reads messages, the outbox, the audit log and the report, and reprocesses
a message (a replay through the current routes, a retry of its outbox rows); ``admin`` does
everything, including managing users.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import logging
import secrets
from collections import deque
from dataclasses import dataclass
from typing import Final, Literal, get_args

from engine.clock import Clock
from engine.errors import EngineError
from engine.store import users as store
from engine.store.db import Database

log = logging.getLogger(__name__)

Role = Literal["coordinator", "analyst", "admin"]
ROLES: Final[tuple[Role, ...]] = get_args(Role)
Permission = Literal[
    "referrals", "act", "messages", "reprocess", "outbox", "audit", "report", "users"
]
PERMISSIONS: Final[dict[Permission, frozenset[Role]]] = {
    "referrals": frozenset({"coordinator", "admin"}),  # worklist, referral pages (PHI)
    "act": frozenset({"coordinator", "admin"}),  # close, book, decline, link, retry
    "messages": frozenset({"analyst", "admin"}),  # message browser, raw messages
    # replay a message through the current routes, retry the outbox rows its routes queued
    "reprocess": frozenset({"analyst", "admin"}),
    "outbox": frozenset({"coordinator", "analyst", "admin"}),  # outbox, dead letters, tasks
    "audit": frozenset({"analyst", "admin"}),
    "report": frozenset({"coordinator", "analyst", "admin"}),
    "users": frozenset({"admin"}),
}

# RFC 7914 §2 parameters; n * r * 128 bytes = 16 MiB of memory per hash.
SCRYPT_N: Final = 2**14
SCRYPT_R: Final = 8
SCRYPT_P: Final = 1
SCRYPT_MAXMEM: Final = 64 * 1024 * 1024
MIN_PASSWORD: Final = 10
SESSION_SECONDS: Final = 8 * 3600.0
LOGIN_FAILURES: Final = 5
LOGIN_WINDOW: Final = 15 * 60.0
SESSION_COOKIE: Final = "refloop_session"
NAME_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789._-@")


class AuthError(EngineError):
    """A user-management request that cannot be done (bad name, short password, ...)."""


class RateLimited(AuthError):
    def __init__(self, retry_after: float):
        super().__init__("too many failed logins; try again later")
        self.retry_after = retry_after


# -- passwords -------------------------------------------------------------------


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=n, r=r, p=p, maxmem=SCRYPT_MAXMEM, dklen=32
    )
    b64 = base64.b64encode
    return f"scrypt${n}${r}${p}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return False
        expected = base64.b64decode(digest)
        got = hashlib.scrypt(
            password.encode(),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            maxmem=SCRYPT_MAXMEM,
            dklen=len(expected),
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


@functools.cache
def _dummy_hash() -> str:
    """A hash to check against when the user does not exist, so timing does not tell."""
    return hash_password(secrets.token_hex(8))


def stored_hash(user: store.UserRow | None) -> str:
    """The user's password hash, or a dummy one (so an unknown name costs the same)."""
    return user.password_hash if user is not None else _dummy_hash()


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_name(name: str) -> str:
    name = name.strip().lower()
    if not (1 <= len(name) <= 64) or not set(name) <= NAME_CHARS:
        raise AuthError("user names are 1-64 of a-z 0-9 . _ - @")
    return name


def check_role(role: str) -> Role:
    if role not in ROLES:
        raise AuthError(f"role must be one of {', '.join(ROLES)}")
    return role


def check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise AuthError(f"passwords are at least {MIN_PASSWORD} characters")


# -- who is asking ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller. ``name`` goes into the audit log as ``user:<name>``."""

    name: str
    role: Role
    via: Literal["session", "token", "config"]
    session: str = ""  # the session cookie value (for the CSRF token); "" for bearer callers

    @property
    def actor(self) -> str:
        return f"user:{self.name}"

    def may(self, permission: Permission) -> bool:
        return self.role in PERMISSIONS[permission]

    @property
    def csrf(self) -> str:
        return csrf_token(self.session)


def csrf_token(session: str) -> str:
    return hmac.new(session.encode(), b"refloop-csrf", hashlib.sha256).hexdigest()


def csrf_ok(principal: Principal, given: str) -> bool:
    return bool(principal.session) and hmac.compare_digest(principal.csrf, given or "")


class LoginLimiter:
    """Failed logins per (username, client address) in a sliding window."""

    def __init__(self, clock: Clock, *, limit: int = LOGIN_FAILURES, window: float = LOGIN_WINDOW):
        self.clock = clock
        self.limit = limit
        self.window = window
        self._failures: dict[tuple[str, str], deque[float]] = {}

    def _recent(self, key: tuple[str, str]) -> deque[float]:
        now = self.clock.now()
        q = self._failures.get(key)
        if q is None:
            return deque()
        while q and q[0] <= now - self.window:
            q.popleft()
        if not q:
            del self._failures[key]
        return q

    def reserve(self, name: str, address: str) -> None:
        """Count an attempt for the pair *before* its password is checked, or raise
        :class:`RateLimited` while the pair is locked out. Reserving first (no ``await``
        between the check and the count) is what makes the limit hold under concurrent
        requests: 40 parallel guesses see the count rise one by one, so only
        :attr:`limit` of them reach the KDF. A success then forgets the pair."""
        q = self._recent((name, address))
        if len(q) >= self.limit:
            raise RateLimited(q[0] + self.window - self.clock.now())
        if len(self._failures) > 100_000:  # bound memory under a spray of names
            self._failures.clear()
        self._failures.setdefault((name, address), deque()).append(self.clock.now())

    def succeeded(self, name: str, address: str) -> None:
        self._failures.pop((name, address), None)


class Auth:
    """Users, sessions and tokens over the store, with an injectable clock."""

    def __init__(self, db: Database, clock: Clock, *, limiter: LoginLimiter | None = None):
        self.db = db
        self.clock = clock
        self.limiter = limiter or LoginLimiter(clock)

    # -- users (also used by the CLI) --

    def add_user(self, name: str, role: str, password: str) -> store.UserRow:
        name, role = check_name(name), check_role(role)
        check_password(password)
        hashed = hash_password(password)
        with self.db.transaction() as conn:
            try:
                uid = store.add_user(conn, name, role, hashed, self.clock.now())
            except ValueError as exc:
                raise AuthError(str(exc)) from None
            user = store.get(conn, uid)
        assert user is not None
        return user

    def set_disabled(self, name: str, disabled: bool = True) -> store.UserRow:
        with self.db.transaction() as conn:
            user = store.get_by_name(conn, check_name(name))
            if user is None:
                raise AuthError(f"no user {name!r}")
            store.set_disabled(conn, user.id, disabled, self.clock.now())
            updated = store.get(conn, user.id)
        assert updated is not None
        return updated

    def new_token(self, name: str, label: str = "") -> str:
        """A new API bearer token for ``name`` (shown once; only its hash is kept)."""
        token = "rl_" + secrets.token_urlsafe(32)
        with self.db.transaction() as conn:
            user = store.get_by_name(conn, check_name(name))
            if user is None or user.disabled:
                raise AuthError(f"no enabled user {name!r}")
            store.add_token(conn, token_hash(token), user.id, label, self.clock.now())
        return token

    def users(self) -> list[store.UserRow]:
        return store.list_users(self.db.conn)

    # -- logging in --

    def login(self, name: str, password: str, address: str) -> tuple[Principal, str] | None:
        """Check a password; a (principal, session cookie value) or None. Raises
        :class:`RateLimited` when this name + address has failed too often.
        (The dashboard runs the same three steps with the KDF off the event loop.)"""
        key, user = self.begin_login(name, address)
        ok = verify_password(password, stored_hash(user))
        return self.finish_login(key, address, user, ok)

    def begin_login(self, name: str, address: str) -> tuple[str, store.UserRow | None]:
        """The rate-limit reservation (the attempt counts as failed until
        :meth:`finish_login` says otherwise) and the user lookup: (limiter key, user or None)."""
        key = name.strip().lower()[:64]
        self.limiter.reserve(key, address)
        return key, store.get_by_name(self.db.conn, key)

    def finish_login(
        self, key: str, address: str, user: store.UserRow | None, ok: bool
    ) -> tuple[Principal, str] | None:
        """Record the outcome; on success a new session (principal, cookie value)."""
        if user is None or not ok or user.disabled or user.role not in ROLES:
            # the attempt was counted by begin_login's reservation
            log.warning("%s: login refused", address)
            return None
        self.limiter.succeeded(key, address)
        session = secrets.token_urlsafe(32)
        now = self.clock.now()
        with self.db.transaction() as conn:
            store.delete_expired_sessions(conn, now)
            store.add_session(conn, token_hash(session), user.id, now, now + SESSION_SECONDS)
        return Principal(user.name, check_role(user.role), "session", session), session

    def logout(self, session: str) -> None:
        with self.db.transaction() as conn:
            store.delete_session(conn, token_hash(session))

    def from_session(self, session: str) -> Principal | None:
        if not session or len(session) > 200:
            return None
        user = store.session_user(self.db.conn, token_hash(session), self.clock.now())
        if user is None or user.role not in ROLES:
            return None
        return Principal(user.name, check_role(user.role), "session", session)

    def from_token(self, token: str) -> Principal | None:
        if not token or len(token) > 200:
            return None
        user = store.token_user(self.db.conn, token_hash(token))
        if user is None or user.role not in ROLES:
            return None
        return Principal(user.name, check_role(user.role), "token")
