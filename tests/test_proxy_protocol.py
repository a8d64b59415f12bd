"""PROXY protocol v2 on the MLLP listener (haproxy proxy-protocol.txt, section 2.2).

Headers are written out byte by byte from the spec, not built by the code under test;
the engine runs in-process on 127.0.0.1 port 0 and a raw socket plays the balancer.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from helpers import Peer, Reply, hl7, mllp_port, peer, query, run, running_engine

from engine.config import ConfigError
from engine.hl7v2.mllp import frame
from engine.ingest import proxy

pytestmark = pytest.mark.store  # every test here uses the store

SIG = bytes.fromhex("0d0a0d0a000d0a515549540a")  # "\r\n\r\n\0\r\nQUIT\n"
# v2 PROXY, AF_INET STREAM, 12 bytes: 192.0.2.10:40000 -> 10.0.0.5:2575
V4 = SIG + bytes.fromhex("21 11 000c c000020a 0a000005 9c40 0a0f")
# v2 PROXY, AF_INET6 STREAM, 36 bytes: [2001:db8::7]:50001 -> [2001:db8::1]:2575
V6 = SIG + bytes.fromhex(
    "21 21 0024 20010db8000000000000000000000007 20010db8000000000000000000000001 c351 0a0f"
)
# v2 LOCAL (health check), AF_UNSPEC, no address block
LOCAL = SIG + bytes.fromhex("20000000")
# v2 PROXY over AF_INET with a 7-byte TLV after the addresses (type 0x04 NOOP, len 4)
V4_TLV = SIG + bytes.fromhex("21 11 0013 c000020a 0a000005 9c40 0a0f 04 0004 00000000")
V1 = b"PROXY TCP4 192.0.2.10 10.0.0.5 40000 2575\r\n"

TRUSTED = {"proxy_protocol": {"trusted": ["127.0.0.1/32"]}}


def stored_peers(state: Path) -> list[str]:
    return [r[0] for r in query(state / "refloop.db", "SELECT peer FROM messages ORDER BY id")]


def counter(engine: Any, name: str, **labels: str) -> float:
    value = engine.metrics.registry.get_sample_value(name, {"source": "ehr", **labels})
    return float(value or 0.0)


# -- the parser against the spec's bytes ------------------------------------------


def test_parse_spec_examples() -> None:
    assert proxy.parse(V4) == proxy.ProxyHeader(28, ("192.0.2.10", 40000), ("10.0.0.5", 2575))
    assert proxy.parse(V6) == proxy.ProxyHeader(52, ("2001:db8::7", 50001), ("2001:db8::1", 2575))
    assert proxy.parse(LOCAL) == proxy.ProxyHeader(16, None)
    assert proxy.parse(V4_TLV) == proxy.ProxyHeader(35, ("192.0.2.10", 40000), ("10.0.0.5", 2575))
    # bytes after the header are not the header's
    assert proxy.parse(V4 + b"\x0bMSH").consumed == 28  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (V1, "version 1"),
        (b"\x0bMSH|^~\\&|", "signature"),
        (SIG + bytes.fromhex("11110000"), "protocol version 1"),  # version nibble 1
        (SIG + bytes.fromhex("22110000"), "command"),
        (SIG + bytes.fromhex("21000000"), "family"),  # PROXY over AF_UNSPEC
        (SIG + bytes.fromhex("21310000"), "family"),  # AF_UNIX
        (SIG + bytes.fromhex("2112000c"), "family"),  # AF_INET over DGRAM
        (SIG + bytes.fromhex("2111000b") + bytes(11), "address block"),  # too short
        (SIG + bytes.fromhex("21210020") + bytes(32), "address block"),
    ],
)
def test_parse_refuses(data: bytes, why: str) -> None:
    with pytest.raises(proxy.ProxyHeaderError, match=why):
        proxy.parse(data)


def test_every_prefix_is_incomplete_or_refused_never_wrong() -> None:
    for header in (V4, V6, LOCAL, V4_TLV):
        for n in range(1, len(header)):
            assert proxy.parse(header[:n]) is None, (header, n)
    # flipping any byte of the fixed part is refused at once or read as some other
    # valid header, never misparsed as longer than the bytes given
    for i in range(16):
        for bit in range(8):
            bad = bytearray(V4)
            bad[i] ^= 1 << bit
            try:
                got = proxy.parse(bytes(bad))
            except proxy.ProxyHeaderError:
                continue
            assert got is None or got.consumed <= len(bad)


def test_trusted_config_is_validated_with_line() -> None:
    from helpers import config

    with pytest.raises(ConfigError, match=r"test-routes.yaml:\d+ .*trusted.*not an IP"):
        config(proxy_protocol={"trusted": ["lb.example"]})
    with pytest.raises(ConfigError, match=r"test-routes.yaml:\d+ .*trusted"):
        config(proxy_protocol={"trusted": []})
    with pytest.raises(ConfigError, match=r"test-routes.yaml:\d+ .*unknown|not allowed|sends"):
        config(proxy_protocol={"trusted": ["10.0.0.0/8"], "sends": 1})
    assert config(proxy_protocol={"trusted": ["10.0.0.0/8", "::1"]}).sources[0].proxy_trusted == (
        "10.0.0.0/8",
        "::1",
    )


# -- over real sockets -------------------------------------------------------------


async def ask_after(port: int, header: bytes, control: str, pieces: int = 1) -> Reply | None:
    p = await Peer.connect(port)
    try:
        step = max(1, len(header) // pieces)
        for i in range(0, len(header), step):
            await p.write(header[i : i + step])
            await asyncio.sleep(0)
        await p.send(hl7(control))
        raw = await p.recv()
        return None if raw is None else Reply.parse(raw)
    finally:
        await p.close()


def test_trusted_balancer_real_client_address(tmp_path: Path) -> None:
    async def go() -> None:
        async with running_engine(tmp_path, **TRUSTED) as engine:
            port = mllp_port(engine)
            for header, cid, pieces in [
                (V4, "P4", 1),
                (V6, "P6", 1),
                (V4_TLV, "PT", 1),
                (V4, "BYTEWISE", len(V4)),  # header one byte per write
                (LOCAL, "LOCAL", 1),
            ]:
                reply = await ask_after(port, header, cid, pieces)
                assert reply is not None and reply.code == "AA", cid
            # the header and the first frame in one write
            p = await Peer.connect(port)
            await p.write(V4 + frame(hl7("SAME-WRITE")))
            assert Reply.parse(await p.recv() or b"").code == "AA"
            await p.close()
            assert counter(engine, "refloop_frame_errors_total", kind="proxy") == 0

    run(go())
    peers = stored_peers(tmp_path)
    v4 = "192.0.2.10:40000"
    assert peers[:4] == [v4, "2001:db8::7:50001", v4, v4]
    assert peers[4].startswith("127.0.0.1:")  # LOCAL keeps the balancer's own address
    assert peers[5] == "192.0.2.10:40000"


def test_real_address_drives_allowlist_and_per_peer_limit(tmp_path: Path) -> None:
    async def go() -> None:
        async with running_engine(
            tmp_path, allow_peers=["192.0.2.0/24"], max_connections_per_peer=1, **TRUSTED
        ) as engine:
            port = mllp_port(engine)
            # the balancer itself (127.0.0.1) is not in allow_peers, its client is
            assert (await ask_after(port, V4, "OK")).code == "AA"  # type: ignore[union-attr]
            # the balancer's own health check (LOCAL) is trusted, not gated by allow_peers
            assert (await ask_after(port, LOCAL, "CHECK")).code == "AA"  # type: ignore[union-attr]
            # a client outside the allow-list, relayed by the trusted balancer: refused
            outside = SIG + bytes.fromhex("2111000c c6336407 0a000005 9c40 0a0f")
            assert await ask_after(port, outside, "NO") is None
            assert counter(engine, "refloop_connections_refused_total", reason="allowlist") == 1
            # per-peer limit counts the real client: a busy connection from 192.0.2.10
            async with peer(port) as busy:
                await busy.write(V4 + b"\x0bMSH|")  # a frame in progress: not evictable
                await asyncio.sleep(0.2)
                other = SIG + bytes.fromhex("2111000c c000020b 0a000005 9c41 0a0f")
                assert (await ask_after(port, other, "OTHER")).code == "AA"  # type: ignore[union-attr]
                assert await ask_after(port, V4, "SAME") is None
                n = counter(engine, "refloop_connections_refused_total", reason="per-peer")
                assert n == 1

    run(go())
    peers = stored_peers(tmp_path)
    assert peers[0] == "192.0.2.10:40000" and peers[1].startswith("127.0.0.1:")
    assert peers[2:] == ["192.0.2.11:40001"]


@pytest.mark.parametrize(
    "data",
    [V1, b"\x0b" + b"MSH|" + b"x" * 40, SIG + bytes.fromhex("21000000"), b"hello\r\n"],
    ids=["v1-text", "mllp-without-header", "proxy-unspec", "junk"],
)
def test_trusted_peer_without_valid_header_is_closed(tmp_path: Path, data: bytes) -> None:
    async def go() -> None:
        async with running_engine(tmp_path, **TRUSTED) as engine:
            async with peer(mllp_port(engine)) as p:
                await p.write(data)
                assert await p.closed_by_server()
            assert counter(engine, "refloop_frame_errors_total", kind="proxy") == 1

    run(go())
    assert stored_peers(tmp_path) == []


def test_truncated_headers_fuzz(tmp_path: Path) -> None:
    """Every proper prefix of each header, then the peer hangs up: nothing stored, each
    counted once; a plain connect-and-close (TCP health check) is not an error."""

    async def go() -> None:
        async with running_engine(tmp_path, **TRUSTED) as engine:
            port = mllp_port(engine)
            cuts = 0
            for header in (V4, V6, LOCAL):
                for n in range(1, len(header)):
                    p = await Peer.connect(port)
                    await p.write(header[:n])
                    await p.close()
                    cuts += 1
            empty = await Peer.connect(port)
            await empty.close()
            for _ in range(100):
                if counter(engine, "refloop_frame_errors_total", kind="proxy") >= cuts:
                    break
                await asyncio.sleep(0.05)
            assert counter(engine, "refloop_frame_errors_total", kind="proxy") == cuts
            # and the listener still serves
            assert (await ask_after(port, V4, "AFTER")).code == "AA"  # type: ignore[union-attr]

    run(go())
    assert stored_peers(tmp_path) == ["192.0.2.10:40000"]


def test_header_that_never_completes_times_out(tmp_path: Path) -> None:
    async def go() -> None:
        async with running_engine(tmp_path, frame_timeout=1, **TRUSTED) as engine:
            async with peer(mllp_port(engine)) as p:
                await p.write(V4[:20])
                assert await p.closed_by_server(timeout=5)
            assert counter(engine, "refloop_frame_errors_total", kind="proxy") == 1

    run(go())


def test_untrusted_peer_header_is_not_honoured(tmp_path: Path) -> None:
    """From an address outside ``trusted`` the header is stray bytes before a frame."""

    async def go() -> None:
        async with running_engine(
            tmp_path, proxy_protocol={"trusted": ["192.0.2.99/32"]}
        ) as engine:
            port = mllp_port(engine)
            for header in (V4, V1):
                async with peer(port) as p:
                    await p.write(header)
                    assert (await p.ask(hl7("UNTRUSTED"))).code == "AA"
            assert counter(engine, "refloop_frame_errors_total", kind="proxy") == 0

    run(go())
    assert all(peer.startswith("127.0.0.1:") for peer in stored_peers(tmp_path))


def test_proxy_protocol_with_tls_is_not_yet_supported(pki: Any) -> None:
    from helpers import config, tls_source

    with pytest.raises(ConfigError, match=r"test-routes.yaml:\d+ .*proxy_protocol.*not yet"):
        config(tls=tls_source(pki), proxy_protocol={"trusted": ["10.0.0.0/8"]})
