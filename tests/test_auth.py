"""engine.web.auth without HTTP: scrypt hashes, sessions and API tokens stored hashed, the
login rate limit on a virtual clock, CSRF tokens, roles; and ``refloop users``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from engine.cli.main import main
from engine.clock import VirtualClock
from engine.store.db import open_database
from engine.web.auth import (
    PERMISSIONS,
    SESSION_SECONDS,
    Auth,
    AuthError,
    LoginLimiter,
    RateLimited,
    csrf_ok,
    hash_password,
    token_hash,
    verify_password,
)

PASSWORD = "correct horse battery"


@pytest.fixture
def auth(store_url: str) -> Iterator[Auth]:
    db = open_database(store_url)
    yield Auth(db, VirtualClock())
    db.close()


def test_scrypt_hash_round_trip_and_format() -> None:
    stored = hash_password(PASSWORD)
    kind, n, r, p, _salt, _digest = stored.split("$")
    assert (kind, n, r, p) == ("scrypt", str(2**14), "8", "1")
    assert verify_password(PASSWORD, stored)
    assert not verify_password(PASSWORD + "!", stored)
    assert hash_password(PASSWORD) != stored  # salted
    for broken in ("", "scrypt$1$2", "bcrypt$x$y$z$a$b", stored.replace("scrypt", "plain")):
        assert not verify_password(PASSWORD, broken)


def test_users_sessions_and_tokens_are_stored_hashed(auth: Auth) -> None:
    user = auth.add_user("Casey", "coordinator", PASSWORD)
    assert user.name == "casey" and user.password_hash.startswith("scrypt$")
    with pytest.raises(AuthError):
        auth.add_user("casey", "admin", PASSWORD)
    with pytest.raises(AuthError):
        auth.add_user("eve", "root", PASSWORD)
    with pytest.raises(AuthError):
        auth.add_user("eve", "admin", "short")
    with pytest.raises(AuthError):
        auth.add_user("bad name!", "admin", PASSWORD)

    result = auth.login("casey", PASSWORD, "10.0.0.1")
    assert result is not None
    principal, session = result
    assert principal.actor == "user:casey" and principal.may("act") and not principal.may("users")
    token = auth.new_token("casey", "job")
    dump = "\n".join(
        repr(row)
        for table in ("users", "user_sessions", "api_tokens")
        for row in auth.db.conn.execute(f"SELECT * FROM {table}").fetchall()
    )
    assert session not in dump and token not in dump and PASSWORD not in dump
    assert token_hash(session) in dump and token_hash(token) in dump

    assert auth.from_session(session) == principal
    assert auth.from_token(token) is not None and auth.from_token("rl_nope") is None
    assert csrf_ok(principal, principal.csrf) and not csrf_ok(principal, "x")
    assert auth.from_token(token).csrf != principal.csrf  # type: ignore[union-attr]

    auth.clock.advance(SESSION_SECONDS + 1)  # type: ignore[attr-defined]
    assert auth.from_session(session) is None
    auth.set_disabled("casey")
    assert auth.from_token(token) is None
    assert auth.login("casey", PASSWORD, "10.0.0.1") is None


def test_login_rate_limit_per_user_and_address() -> None:
    clock = VirtualClock()
    limiter = LoginLimiter(clock, limit=5, window=900)
    for _ in range(5):
        limiter.reserve("casey", "10.0.0.1")  # counted before the password is checked
    with pytest.raises(RateLimited) as exc:
        limiter.reserve("casey", "10.0.0.1")
    assert exc.value.retry_after == pytest.approx(900)
    limiter.reserve("casey", "10.0.0.2")  # another address
    limiter.reserve("ana", "10.0.0.1")  # another user
    clock.advance(600)
    with pytest.raises(RateLimited):
        limiter.reserve("casey", "10.0.0.1")
    clock.advance(301)
    limiter.reserve("casey", "10.0.0.1")


def test_unknown_users_fail_like_wrong_passwords(auth: Auth) -> None:
    for _ in range(5):
        assert auth.login("nobody", PASSWORD, "10.0.0.9") is None
    with pytest.raises(RateLimited):
        auth.login("nobody", PASSWORD, "10.0.0.9")


def test_roles() -> None:
    assert PERMISSIONS["users"] == {"admin"}
    assert "analyst" not in PERMISSIONS["referrals"] and "analyst" in PERMISSIONS["messages"]
    assert "coordinator" in PERMISSIONS["act"] and "coordinator" not in PERMISSIONS["messages"]


@pytest.mark.store
def test_users_cli(tmp_path: Path) -> None:
    runner = CliRunner()
    routes = tmp_path / "routes.yaml"  # names no store file: the default, refloop.db
    routes.write_text("version: 1\n")
    state = ["--state", str(tmp_path / "state"), "--routes", str(routes)]
    added = runner.invoke(
        main, ["users", "add", "ada", "--role", "admin", "--password-stdin", "--token", *state],
        input=f"{PASSWORD}\n",
    )  # fmt: skip
    assert added.exit_code == 0, added.output
    assert "user ada added (admin)" in added.output and "rl_" in added.output
    prompted = runner.invoke(
        main, ["users", "add", "ana", "--role", "analyst", *state],
        input=f"{PASSWORD}\n{PASSWORD}\n",
    )  # fmt: skip
    assert prompted.exit_code == 0, prompted.output
    dup = runner.invoke(
        main, ["users", "add", "ada", "--role", "admin", "--password-stdin", *state],
        input=f"{PASSWORD}\n",
    )  # fmt: skip
    assert dup.exit_code == 1 and "exists" in dup.output
    short = runner.invoke(
        main, ["users", "add", "bo", "--role", "admin", "--password-stdin", *state], input="x\n"
    )
    assert short.exit_code == 1 and "at least 10" in short.output
    token = runner.invoke(main, ["users", "token", "ana", "--label", "job", *state])
    assert token.exit_code == 0 and token.output.startswith("rl_")
    assert runner.invoke(main, ["users", "disable", "ana", *state]).exit_code == 0
    listing = runner.invoke(main, ["users", "list", *state])
    assert "ada" in listing.output and "disabled" in listing.output
    assert "scrypt" not in listing.output
    js = runner.invoke(main, ["users", "list", "--json", *state])
    assert '"role": "analyst"' in js.output and "password" not in js.output
    assert runner.invoke(main, ["users", "token", "ana", *state]).exit_code == 1
