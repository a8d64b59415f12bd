"""Authenticating to a FHIR server: SMART Backend Services or a static bearer token.

SMART Backend Services (SMART App Launch 2.x, "Backend Services"): POST
``grant_type=client_credentials`` to the token endpoint with a ``client_assertion`` JWT
signed by our private key (RS384 or ES384), claims ``iss = sub = client_id``, ``aud`` =
the token URL, ``exp`` at most five minutes ahead and a unique ``jti``. There is no
refresh token: a new assertion is minted when the token nears expiry.

Tokens are cached until :data:`REFRESH_MARGIN` seconds before ``expires_in`` runs out;
concurrent callers share one token request. :func:`send` adds the token and, on a 401,
drops it and tries exactly once more with a new one.

PyJWT signs and encodes the assertion (it owns the JOSE details: base64url, the raw
``r || s`` form of ECDSA signatures that JWS needs, header and claim encoding) on top of
``cryptography``; hand-rolling JWS is where subtle interop bugs live.

No token, key or assertion is ever logged or put in an error message.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Mapping
from typing import Any, Final, Protocol

import httpx
import jwt

from engine.clock import Clock, WallClock
from engine.config import FhirAuth
from engine.errors import EngineError

log = logging.getLogger(__name__)

# SMART Backend Services: "exp ... no more than five minutes in the future".
ASSERTION_LIFETIME: Final = 300
REFRESH_MARGIN: Final = 60.0  # renew this long before the token expires
DEFAULT_EXPIRES_IN: Final = 300.0  # when the token response has no expires_in
CLIENT_ASSERTION_TYPE: Final = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


class AuthError(EngineError):
    """A token could not be obtained. The reason is safe to log (no secret)."""


class Auth(Protocol):
    """What the poller and write-back use to authorise a request."""

    async def headers(self, client: httpx.AsyncClient) -> Mapping[str, str]: ...

    def invalidate(self) -> None:
        """The server refused the current credential (401): get a new one next time."""


class NoAuth:
    async def headers(self, client: httpx.AsyncClient) -> Mapping[str, str]:
        return {}

    def invalidate(self) -> None:
        pass


class BearerAuth:
    """A static bearer token from configuration."""

    def __init__(self, token: str):
        self._token = token

    def __repr__(self) -> str:
        return "BearerAuth(token=***)"

    async def headers(self, client: httpx.AsyncClient) -> Mapping[str, str]:
        return {"Authorization": f"Bearer {self._token}"}

    def invalidate(self) -> None:
        pass  # nothing to renew: the 401 reaches the caller


class SmartBackendAuth:
    """Client-credentials tokens with a signed JWT assertion, cached until shortly before
    they expire."""

    def __init__(self, cfg: FhirAuth, *, clock: Clock | None = None):
        if cfg.type != "smart":
            raise ValueError("SmartBackendAuth needs auth type smart")
        self.cfg = cfg
        self.clock = clock or WallClock()
        self._token = ""
        self._expires_at = 0.0
        self._lock = asyncio.Lock()
        self.requests = 0  # token requests made (metrics and tests)

    def __repr__(self) -> str:
        return f"SmartBackendAuth(client_id={self.cfg.client_id!r}, token=***)"

    def assertion(self) -> str:
        """A fresh signed client assertion (SMART Backend Services, "Authenticating")."""
        now = int(self.clock.now())
        claims = {
            "iss": self.cfg.client_id,
            "sub": self.cfg.client_id,
            "aud": self.cfg.token_url,
            "exp": now + ASSERTION_LIFETIME,
            "iat": now,
            "jti": uuid.uuid4().hex,
        }
        headers: dict[str, Any] = {"typ": "JWT"}
        if self.cfg.key_id:
            headers["kid"] = self.cfg.key_id
        try:
            return jwt.encode(claims, self.cfg.key, algorithm=self.cfg.alg, headers=headers)
        except (ValueError, TypeError, jwt.PyJWTError) as exc:
            raise AuthError(f"cannot sign the client assertion ({type(exc).__name__})") from None

    async def headers(self, client: httpx.AsyncClient) -> Mapping[str, str]:
        return {"Authorization": f"Bearer {await self.token(client)}"}

    async def token(self, client: httpx.AsyncClient) -> str:
        if self._valid():
            return self._token
        async with self._lock:
            if self._valid():  # another caller renewed it while we waited
                return self._token
            await self._fetch(client)
            return self._token

    def invalidate(self) -> None:
        self._token = ""
        self._expires_at = 0.0

    def _valid(self) -> bool:
        return bool(self._token) and self.clock.now() < self._expires_at - REFRESH_MARGIN

    async def _fetch(self, client: httpx.AsyncClient) -> None:
        form = {
            "grant_type": "client_credentials",
            "scope": self.cfg.scope,
            "client_assertion_type": CLIENT_ASSERTION_TYPE,
            "client_assertion": self.assertion(),
        }
        self.requests += 1
        try:
            response = await client.post(
                self.cfg.token_url, data=form, headers={"Accept": "application/json"}
            )
        except httpx.HTTPError as exc:
            raise AuthError(f"token request failed: {type(exc).__name__}") from None
        if response.status_code != 200:
            # RFC 6749 §5.2: error and error_description are meant for the client
            error = ""
            try:
                body = response.json()
                error = str(body.get("error", ""))[:80] if isinstance(body, dict) else ""
            except ValueError:
                pass
            raise AuthError(f"token endpoint answered {response.status_code} {error}".strip())
        try:
            body = response.json()
            token = str(body["access_token"])
            expires_in = float(body.get("expires_in", DEFAULT_EXPIRES_IN))
        except (ValueError, KeyError, TypeError):
            raise AuthError("token endpoint answered without an access_token") from None
        self._token = token
        self._expires_at = self.clock.now() + expires_in
        log.info("%s: new access token, valid %ds", self.cfg.client_id, int(expires_in))


def make_auth(cfg: FhirAuth, *, clock: Clock | None = None) -> Auth:
    """The :class:`Auth` for a source's ``auth`` settings."""
    if cfg.type == "smart":
        return SmartBackendAuth(cfg, clock=clock)
    if cfg.type == "bearer":
        return BearerAuth(cfg.token)
    return NoAuth()


async def send(
    client: httpx.AsyncClient,
    auth: Auth,
    method: str,
    url: str,
    **kwargs: Any,
) -> httpx.Response:
    """One authorised request; on 401, renew the credential and try once more."""
    extra: dict[str, str] = dict(kwargs.pop("headers", None) or {})
    for attempt in (1, 2):
        headers = {**extra, **(await auth.headers(client))}
        response = await client.request(method, url, headers=headers, **kwargs)
        if response.status_code != 401 or attempt == 2:
            return response
        log.info("%s %s: 401, renewing the access token once", method, _path(url))
        auth.invalidate()
    raise AssertionError("unreachable")  # pragma: no cover


def _path(url: str) -> str:
    """The URL without its query (search parameters may hold identifiers)."""
    return url.split("?", 1)[0]
