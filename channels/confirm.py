"""Signed, expiring confirmation links for the referral packet: ``/confirm/<token>``.

Token: ``v1.<referral id, base64url>.<expiry, epoch seconds>.<HMAC-SHA256, base64url>``,
URL-safe without padding. The MAC covers the version, the referral id and the expiry, keyed
with a secret of at least 32 bytes from ``${file:}``. The referral id is refloop's opaque
key, never a patient identifier, so the token carries no PHI. Checks are constant-time;
old keys can be listed during a rotation.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Sequence
from typing import Final, Literal

from engine.errors import EngineError

VERSION: Final = "v1"
MIN_KEY_BYTES: Final = 32
MAX_TOKEN_CHARS: Final = 512

TokenFailure = Literal["malformed", "bad-signature", "expired"]


class TokenError(EngineError):
    """A confirmation token was refused; ``reason`` is safe to show and log."""

    def __init__(self, reason: TokenFailure):
        super().__init__(reason)
        self.reason: TokenFailure = reason


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: bytes, referral_id: str, expires: int) -> bytes:
    msg = f"{VERSION}\x00{referral_id}\x00{expires}".encode()
    return hmac.new(key, msg, hashlib.sha256).digest()


def make_token(referral_id: str, expires_at: float, key: bytes) -> str:
    """A token naming ``referral_id`` that :func:`check_token` accepts until
    ``expires_at`` (epoch seconds)."""
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"confirmation key must be at least {MIN_KEY_BYTES} bytes")
    if not referral_id:
        raise ValueError("referral id is empty")
    expires = int(expires_at)
    mac = _mac(key, referral_id, expires)
    return f"{VERSION}.{_b64(referral_id.encode())}.{expires}.{_b64(mac)}"


def check_token(token: str, key: bytes, now: float, *, old_keys: Sequence[bytes] = ()) -> str:
    """The referral id a valid, unexpired token names. Raises :class:`TokenError`
    (``malformed``, ``bad-signature`` or ``expired``; the signature is checked first, so
    an expired token is only reported as such when it is genuine)."""
    if len(token) > MAX_TOKEN_CHARS:
        raise TokenError("malformed")
    parts = token.split(".")
    if len(parts) != 4 or parts[0] != VERSION or not parts[2].isdigit():
        raise TokenError("malformed")
    try:
        referral_id = _unb64(parts[1]).decode()
        mac = _unb64(parts[3])
    except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
        raise TokenError("malformed") from exc
    expires = int(parts[2])
    if not any(hmac.compare_digest(mac, _mac(k, referral_id, expires)) for k in (key, *old_keys)):
        raise TokenError("bad-signature")
    if now >= expires:
        raise TokenError("expired")
    return referral_id


def confirm_url(base_url: str, token: str) -> str:
    """``https://refloop.example/confirm/<token>`` for the packet's confirmation line."""
    return f"{base_url.rstrip('/')}/confirm/{token}"
