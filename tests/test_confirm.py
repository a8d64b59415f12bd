"""Confirmation link tokens: signed, expiring, URL-safe, no PHI."""

from __future__ import annotations

import re

import pytest

from channels.confirm import TokenError, check_token, confirm_url, make_token

KEY = b"k" * 32
OTHER = b"o" * 32
NOW = 1_800_000_000.0


def test_round_trip() -> None:
    token = make_token("ref-42", NOW + 3600, KEY)
    assert check_token(token, KEY, NOW) == "ref-42"
    assert re.fullmatch(r"[A-Za-z0-9._-]+", token)
    assert confirm_url("https://r.example/", token) == f"https://r.example/confirm/{token}"


def test_expired_at_the_second() -> None:
    token = make_token("ref-42", NOW, KEY)
    assert check_token(token, KEY, NOW - 1) == "ref-42"
    with pytest.raises(TokenError) as err:
        check_token(token, KEY, NOW)
    assert err.value.reason == "expired"


def _flip(token: str, part: int) -> str:
    parts = token.split(".")
    s = parts[part]
    parts[part] = s[:-1] + ("A" if s[-1] != "A" else "B")
    return ".".join(parts)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda t: _flip(t, 3), "bad-signature"),
        (lambda t: _flip(t, 1), "bad-signature"),
        (lambda t: t.replace(t.split(".")[2], str(int(NOW + 10**6))), "bad-signature"),
        (lambda t: "v2" + t[2:], "malformed"),
        (lambda t: t + ".x", "malformed"),
        (lambda t: "", "malformed"),
        (lambda t: "v1.%%%.1.x", "malformed"),
        (lambda t: "v1." + "A" * 600 + ".1.x", "malformed"),
    ],
    ids=["mac", "referral", "extended-expiry", "version", "extra-part", "empty", "bad-b64", "huge"],
)
def test_tampering_is_refused(mutate, reason: str) -> None:  # type: ignore[no-untyped-def]
    token = make_token("ref-42", NOW + 3600, KEY)
    with pytest.raises(TokenError) as err:
        check_token(mutate(token), KEY, NOW)
    assert err.value.reason == reason


def test_wrong_key_and_rotation() -> None:
    token = make_token("ref-42", NOW + 3600, OTHER)
    with pytest.raises(TokenError):
        check_token(token, KEY, NOW)
    assert check_token(token, KEY, NOW, old_keys=[OTHER]) == "ref-42"


def test_short_key_and_empty_id_rejected() -> None:
    with pytest.raises(ValueError):
        make_token("ref-42", NOW, b"short")
    with pytest.raises(ValueError):
        make_token("", NOW, KEY)
