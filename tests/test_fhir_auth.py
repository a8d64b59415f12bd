"""SMART Backend Services and bearer auth against the loopback server's token endpoint,
which verifies each client assertion (signature, audience, expiry, jti uniqueness)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fhir_server import FhirServer, make_service_request
from helpers import run

from engine.clock import VirtualClock
from engine.config import FhirAuth, FhirQuery, FhirSource, loads
from engine.errors import ConfigError
from engine.ingest.fhir import FhirPoller
from engine.ingest.smart_auth import AuthError, BearerAuth, SmartBackendAuth, send
from engine.store import Inbox, open_database


def keypair(alg: str) -> tuple[str, str]:
    """(private PEM, public PEM) for RS384 or ES384."""
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if alg == "RS384":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private, public


def now_clock() -> VirtualClock:
    """A virtual clock starting at the real time: the token endpoint checks ``exp``
    against its own wall clock."""
    return VirtualClock(start=time.time())


def smart(server: FhirServer, private: str, alg: str) -> FhirAuth:
    return FhirAuth(
        type="smart",
        client_id="refloop-test",
        token_url=server.token_url,
        key=private,
        alg=alg,  # type: ignore[arg-type]
        key_id="k1",
        scope="system/ServiceRequest.read",
    )


@pytest.mark.parametrize("alg", ["RS384", "ES384"])
def test_token_is_obtained_verified_and_reused(alg: str) -> None:
    async def body() -> None:
        private, public = keypair(alg)
        async with FhirServer(require_auth=True) as server, httpx.AsyncClient() as client:
            server.register_client("refloop-test", public, alg)
            auth = SmartBackendAuth(smart(server, private, alg), clock=now_clock())
            for _ in range(3):
                r = await send(client, auth, "GET", f"{server.base}/ServiceRequest")
                assert r.status_code == 200
            assert server.token_requests == 1 and auth.requests == 1
            assert server.token_rejections == []

    run(body())


def test_token_is_renewed_shortly_before_expiry() -> None:
    async def body() -> None:
        private, public = keypair("ES384")
        # start in the past so that the moves below end at the real time (the token
        # endpoint checks iat/exp against its wall clock)
        clock = VirtualClock(start=time.time() - 260)
        async with FhirServer(require_auth=True, token_lifetime=300) as server:
            server.register_client("refloop-test", public, "ES384")
            async with httpx.AsyncClient() as client:
                auth = SmartBackendAuth(smart(server, private, "ES384"), clock=clock)
                first = await auth.token(client)
                clock.advance(200)
                assert await auth.token(client) == first
                clock.advance(60)  # within the refresh margin of expires_in
                second = await auth.token(client)
                assert second != first and server.token_requests == 2
                assert len(server.seen_jti) == 2  # a fresh jti per assertion

    run(body())


def test_expired_token_reauthenticates_exactly_once_on_401() -> None:
    async def body() -> None:
        private, public = keypair("RS384")
        async with FhirServer(require_auth=True) as server, httpx.AsyncClient() as client:
            server.register_client("refloop-test", public, "RS384")
            auth = SmartBackendAuth(smart(server, private, "RS384"), clock=now_clock())
            assert (await send(client, auth, "GET", f"{server.base}/Task")).status_code == 200
            server.expire_tokens()  # the server revoked it early
            r = await send(client, auth, "GET", f"{server.base}/Task")
            assert r.status_code == 200 and server.token_requests == 2
            # a server that refuses even the new token: one retry, then the 401 stands
            server.require_auth = True
            server.tokens.clear()
            server.clients.clear()  # and no new token can be had
            with pytest.raises(AuthError, match="401"):
                await send(client, auth, "GET", f"{server.base}/Task")
            assert server.token_requests == 3

    run(body())


@pytest.mark.store
def test_poller_uses_smart_auth_end_to_end(tmp_path: Path) -> None:
    async def body() -> None:
        private, public = keypair("ES384")
        async with FhirServer(require_auth=True) as server, httpx.AsyncClient() as client:
            server.register_client("refloop-test", public, "ES384")
            for n in range(5):
                server.put(make_service_request(n))
            db = open_database(tmp_path / "db.sqlite")
            try:
                src = FhirSource(
                    name="epic",
                    base_url=server.base,
                    auth=smart(server, private, "ES384"),
                    resources=(FhirQuery("ServiceRequest"),),
                    page_size=2,
                )
                auth = SmartBackendAuth(src.auth, clock=now_clock())
                poller = FhirPoller(src, db, Inbox(db), client=client, auth=auth)
                assert await poller.poll_once() == 5
                server.expire_tokens()
                server.put(make_service_request(9))
                server.tick()
                assert await poller.poll_once() == 1
                assert server.token_requests == 2
            finally:
                db.close()

    run(body())


@pytest.mark.parametrize(
    ("tamper", "why"),
    [
        ("wrong-key", "InvalidSignatureError"),
        ("wrong-audience", "InvalidAudienceError"),
        ("replayed-jti", "jti replay"),
        ("expired", "ExpiredSignatureError"),
    ],
    ids=["wrong-key", "wrong-audience", "replayed-jti", "expired"],
)
def test_token_endpoint_refuses_bad_assertions(tamper: str, why: str) -> None:
    async def body() -> None:
        private, public = keypair("RS384")
        other, _ = keypair("RS384")
        async with FhirServer() as server, httpx.AsyncClient() as client:
            server.register_client("refloop-test", public, "RS384")
            cfg = smart(server, other if tamper == "wrong-key" else private, "RS384")
            if tamper == "wrong-audience":
                cfg = FhirAuth(**{**_fields(cfg), "token_url": server.token_url + "?x"})
            clock = VirtualClock(start=1_000_000.0) if tamper == "expired" else None
            auth = SmartBackendAuth(cfg, clock=clock)
            if tamper == "replayed-jti":
                assertion = auth.assertion()
                form = {
                    "grant_type": "client_credentials",
                    "client_assertion_type": (
                        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
                    ),
                    "client_assertion": assertion,
                }
                assert (await client.post(server.token_url, data=form)).status_code == 200
                assert (await client.post(server.token_url, data=form)).status_code == 401
            else:
                with pytest.raises(AuthError, match="token endpoint answered 401"):
                    await auth.token(client)
            assert server.token_rejections == [why]

    run(body())


def _fields(cfg: FhirAuth) -> dict[str, object]:
    return {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}


def test_no_token_or_key_reaches_logs_or_reprs(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        private, public = keypair("ES384")
        async with FhirServer(require_auth=True) as server, httpx.AsyncClient() as client:
            server.register_client("refloop-test", public, "ES384")
            auth = SmartBackendAuth(smart(server, private, "ES384"), clock=now_clock())
            with caplog.at_level(logging.DEBUG):
                await send(client, auth, "GET", f"{server.base}/Task")
                server.expire_tokens()
                await send(client, auth, "GET", f"{server.base}/Task")
            token = await auth.token(client)
            secrets = [token, *server.tokens, private.splitlines()[1]]
            text = caplog.text + repr(auth) + repr(auth.cfg) + repr(BearerAuth("s3cr3t"))
            assert not any(s in text for s in secrets)
            assert "s3cr3t" not in text

    run(body())


def test_bearer_token_is_sent() -> None:
    async def body() -> None:
        server = FhirServer(require_auth=True, static_token="abc")
        async with server, httpx.AsyncClient() as client:
            r = await send(client, BearerAuth("abc"), "GET", f"{server.base}/Task")
            assert r.status_code == 200
            r = await send(client, BearerAuth("nope"), "GET", f"{server.base}/Task")
            assert r.status_code == 401

    run(body())


SOURCE = """
version: 1
sources:
  epic:
    type: fhir
    base_url: https://fhir.example.org/R4
    auth:
      type: smart
      client_id: abc
      token_url: https://fhir.example.org/oauth2/token
      key: ${{file:{key}}}
      alg: {alg}
    subscription: {{secret: "${{env:SUB_SECRET}}"}}
    write_back: {{task: true}}
    resources:
      - type: ServiceRequest
        params: {{category: "http://snomed.info/sct|3457005"}}
      - Appointment
"""


def test_config_reads_a_fhir_source(tmp_path: Path) -> None:
    private, _ = keypair("ES384")
    key = tmp_path / "k.pem"
    key.write_text(private)
    cfg = loads(SOURCE.format(key=key, alg="ES384"), env={"SUB_SECRET": "xyz"})
    (src,) = cfg.fhir_sources
    assert src.auth.type == "smart" and src.auth.alg == "ES384" and src.auth.key.startswith("---")
    assert src.subscription_secret == "xyz" and src.write_back.task
    assert src.resources[0].params == (("category", "http://snomed.info/sct|3457005"),)
    assert cfg.sources == ()
    assert "xyz" not in repr(src) and "PRIVATE" not in repr(src)


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        ("alg: ES384", "routes.yaml:11 sources.epic.auth.key: ES384 needs an EC P-384 private key"),
        (
            "alg: HS256",
            "routes.yaml:12 sources.epic.auth.alg: must be one of RS384, ES384, not 'HS256'",
        ),
        (
            "color: blue",
            "routes.yaml:13 sources.epic.auth.color: unknown key",
        ),
    ],
    ids=["key-alg-mismatch", "bad-alg", "unknown-key"],
)
def test_config_errors_name_file_line_and_key(tmp_path: Path, edit: str, problem: str) -> None:
    private, _ = keypair("RS384")
    key = tmp_path / "k.pem"
    key.write_text(private)
    text = SOURCE.format(key=key, alg="RS384").replace("alg: RS384", edit, 1)
    if edit.startswith("color"):
        text = text.replace("color: blue", "alg: RS384\n      color: blue", 1)
    with pytest.raises(ConfigError) as exc:
        loads(text, env={"SUB_SECRET": "x"})
    assert problem in exc.value.problems


def test_config_refuses_literal_secrets() -> None:
    text = """
version: 1
sources:
  athena:
    type: fhir
    base_url: https://api.example.com/fhir/r4
    auth: {type: bearer, token: literally-a-token}
"""
    with pytest.raises(ConfigError) as exc:
        loads(text)
    assert exc.value.problems == [
        "routes.yaml:7 sources.athena.auth.token: secrets never live in routes.yaml: "
        "use ${env:NAME} or ${file:/path}"
    ]
