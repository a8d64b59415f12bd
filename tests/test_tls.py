"""MLLP over TLS with client certificates, with certificates made at run time.

Peers: Python's ssl module, and ``openssl s_client`` as an independent implementation.
A trusted client certificate gets its ACK; a missing or untrusted one is refused at the
handshake; a trusted one whose CN is not allowed is refused; plain TCP to the TLS port is
closed. Through all of it the listener keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import ssl
from pathlib import Path

import pytest
import yaml
from helpers import (
    HOST,
    WAIT,
    Daemon,
    Peer,
    Pki,
    Reply,
    hl7,
    mllp_port,
    peer,
    query,
    refloop,
    run,
    running_engine,
    tls_source,
)

from engine.hl7v2.mllp import Framer, frame

pytestmark = pytest.mark.store  # every test here uses the store

ALLOWED = ("good-client",)


def stored(state: Path) -> list[str]:
    return [cid for (cid,) in query(state / "refloop.db", "SELECT control_id FROM messages")]


async def refused(port: int, ctx: ssl.SSLContext) -> bool:
    """Whether the server refuses this client: the handshake fails (TLS 1.2 reports a
    client-certificate failure there) or, with TLS 1.3, where the client finishes its
    side first, the connection dies before any ACK."""
    try:
        p = await Peer.connect(port, ssl_context=ctx)
    except (ssl.SSLError, ConnectionResetError):
        return True
    try:
        with contextlib.suppress(ssl.SSLError, ConnectionResetError, BrokenPipeError):
            await p.send(hl7("SHOULD-NOT-STORE"))
        return await p.closed_by_server()
    finally:
        await p.close()


def test_trusted_client_certificate_gets_its_ack(tmp_path: Path, pki: Pki) -> None:
    async def go() -> Reply:
        tls = tls_source(pki, allowed_subjects=ALLOWED)
        async with (
            running_engine(tmp_path, tls=tls) as e,
            peer(mllp_port(e), ssl_context=pki.client_context("good-client")) as p,
        ):
            assert p.writer.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
            return await p.ask(hl7("TLS-1"))

    reply = run(go())
    assert (reply.code, reply.control_id) == ("AA", "TLS-1")
    assert stored(tmp_path) == ["TLS-1"]


REFUSED = {
    # (client certificate, client's highest TLS version)
    "no-client-cert-tls1.3": (None, ssl.TLSVersion.TLSv1_3),
    "no-client-cert-tls1.2": (None, ssl.TLSVersion.TLSv1_2),
    "untrusted-ca-tls1.3": ("rogue", ssl.TLSVersion.TLSv1_3),
    "untrusted-ca-tls1.2": ("rogue", ssl.TLSVersion.TLSv1_2),
    "cn-not-allowed": ("other-client", ssl.TLSVersion.TLSv1_3),
}


@pytest.mark.parametrize("case", REFUSED.values(), ids=REFUSED.keys())
def test_client_is_refused(
    tmp_path: Path, pki: Pki, case: tuple[str | None, ssl.TLSVersion]
) -> None:
    client, version = case

    async def go() -> None:
        async with running_engine(tmp_path, tls=tls_source(pki, allowed_subjects=ALLOWED)) as e:
            port = mllp_port(e)
            assert await refused(port, pki.client_context(client, max_version=version))
            # the listener is still up for a good client
            async with peer(port, ssl_context=pki.client_context("good-client")) as p:
                assert (await p.ask(hl7("AFTER"))).code == "AA"
            if client == "other-client":
                reason = {"source": "ehr", "reason": "subject"}
                sample = e.metrics.registry.get_sample_value(
                    "refloop_connections_refused_total", reason
                )
                assert sample == 1

    run(go())
    assert stored(tmp_path) == ["AFTER"]


def test_handshake_requires_client_cert_even_without_subject_list(tmp_path: Path, pki: Pki) -> None:
    async def go() -> None:
        async with running_engine(tmp_path, tls=tls_source(pki)) as e:
            port = mllp_port(e)
            assert await refused(port, pki.client_context(None))
            async with peer(port, ssl_context=pki.client_context("other-client")) as p:
                assert (await p.ask(hl7("ANY-CN"))).code == "AA"

    run(go())


def test_server_only_tls_when_client_certs_are_not_required(tmp_path: Path, pki: Pki) -> None:
    async def go() -> None:
        tls = tls_source(pki, require_client_cert=False)
        async with (
            running_engine(tmp_path, tls=tls) as e,
            peer(mllp_port(e), ssl_context=pki.client_context(None)) as p,
        ):
            assert (await p.ask(hl7("NO-CERT"))).code == "AA"

    run(go())


def test_plain_tcp_to_tls_port_is_closed_and_listener_stays_up(tmp_path: Path, pki: Pki) -> None:
    async def go() -> None:
        async with running_engine(tmp_path, tls=tls_source(pki, allowed_subjects=ALLOWED)) as e:
            port = mllp_port(e)
            async with peer(port) as plain:
                await plain.send(hl7("PLAIN"))
                assert await plain.closed_by_server()
            async with peer(port, ssl_context=pki.client_context("good-client")) as p:
                assert (await p.ask(hl7("TLS-AFTER"))).code == "AA"

    run(go())
    assert stored(tmp_path) == ["TLS-AFTER"]


# ---------------------------------------------------------------------------
# openssl s_client: an independent TLS peer


async def s_client(port: int, pki: Pki, client: str | None, message: bytes) -> bytes | None:
    """Pipe one framed message through ``openssl s_client``; return the frame that comes
    back on its stdout, or None when the connection ended without one."""
    args = ["-connect", f"{HOST}:{port}", "-CAfile", str(pki.ca), "-quiet"]
    args += ["-verify_return_error"]
    if client is not None:
        cert, key = pki.clients[client]
        args += ["-cert", str(cert), "-key", str(key)]
    proc = await asyncio.create_subprocess_exec(
        "openssl",
        "s_client",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    framer = Framer()
    reply: bytes | None = None
    try:
        proc.stdin.write(frame(message))
        await proc.stdin.drain()
        while reply is None:
            data = await asyncio.wait_for(proc.stdout.read(65536), WAIT)
            if not data:
                break
            frames = framer.feed(data)
            reply = frames[0] if frames else None
    finally:
        proc.stdin.close()
        if proc.returncode is None:
            proc.terminate()
        await asyncio.wait_for(proc.communicate(), WAIT)
    return reply


needs_openssl = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="the openssl command-line tool is not installed"
)


@needs_openssl
def test_openssl_s_client_with_trusted_cert_gets_ack(tmp_path: Path, pki: Pki) -> None:
    async def go() -> bytes | None:
        async with running_engine(tmp_path, tls=tls_source(pki, allowed_subjects=ALLOWED)) as e:
            return await s_client(mllp_port(e), pki, "good-client", hl7("OPENSSL-1"))

    raw = run(go())
    assert raw is not None, "no ACK on s_client's stdout"
    reply = Reply.parse(raw)
    assert (reply.code, reply.control_id) == ("AA", "OPENSSL-1")
    assert stored(tmp_path) == ["OPENSSL-1"]


@needs_openssl
@pytest.mark.parametrize("client", [None, "rogue", "other-client"], ids=["none", "rogue", "cn"])
def test_openssl_s_client_without_acceptable_cert_is_refused(
    tmp_path: Path, pki: Pki, client: str | None
) -> None:
    async def go() -> bytes | None:
        async with running_engine(tmp_path, tls=tls_source(pki, allowed_subjects=ALLOWED)) as e:
            reply = await s_client(mllp_port(e), pki, client, hl7("OPENSSL-2"))
            async with peer(mllp_port(e), ssl_context=pki.client_context("good-client")) as p:
                assert (await p.ask(hl7("AFTER"))).code == "AA"
            return reply

    assert run(go()) is None
    assert stored(tmp_path) == ["AFTER"]


# ---------------------------------------------------------------------------
# The daemon (uvloop) with TLS, driven by `refloop send`


@pytest.mark.slow
def test_daemon_tls_with_refloop_send(tmp_path: Path, pki: Pki, daemon: Daemon) -> None:
    routes = yaml.safe_load((daemon.routes).read_text())
    routes["sources"]["ehr"]["tls"] = tls_source(pki, allowed_subjects=ALLOWED)
    daemon.routes = tmp_path / "routes.yaml"
    daemon.routes.write_text(yaml.safe_dump(routes))
    daemon.start()
    message = tmp_path / "m.hl7"
    message.write_bytes(hl7("DAEMON-TLS"))

    def send(client: str) -> tuple[int, str]:
        cert, key = pki.clients[client]
        result = refloop(
            "send",
            "--port",
            str(daemon.mllp),
            "--timeout",
            "5",
            "--tls-ca",
            str(pki.ca),
            "--tls-cert",
            str(cert),
            "--tls-key",
            str(key),
            str(message),
        )
        return result.returncode, result.stdout.decode()

    code, out = send("good-client")
    assert code == 0, out
    assert out.rstrip().endswith("DAEMON-TLS\tAA")
    code, out = send("other-client")
    assert code == 1
    assert "AA" not in out
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0, daemon.log_tail()
    assert stored(daemon.state_dir) == ["DAEMON-TLS"]
