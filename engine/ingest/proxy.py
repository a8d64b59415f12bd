"""PROXY protocol version 2 (haproxy proxy-protocol.txt, section 2.2), receiving side.

A TCP load balancer in front of several refloop nodes opens its own connection to a node;
with ``send-proxy-v2`` it first writes a binary header that names the real client. The
listener reads that header only from addresses listed in ``proxy_protocol.trusted``
(docs/scale-out.md); from anyone else the same bytes are stray bytes before a frame.

Header layout (all integers in network byte order)::

    12 bytes  signature  0D 0A 0D 0A 00 0D 0A 51 55 49 54 0A
     1 byte   version (high nibble, must be 2) and command (low nibble: 0 LOCAL, 1 PROXY)
     1 byte   address family (high nibble: 0 UNSPEC, 1 INET, 2 INET6, 3 UNIX) and
              transport (low nibble: 0 UNSPEC, 1 STREAM, 2 DGRAM)
     2 bytes  length of what follows (addresses, then TLVs, which we skip)
    addresses INET: src 4, dst 4, src port 2, dst port 2 (12 bytes);
              INET6: src 16, dst 16, src port 2, dst port 2 (36 bytes)

LOCAL (the balancer's own health check) keeps the connection's real endpoints and ignores
the address block. PROXY must carry INET or INET6 over STREAM: MLLP is TCP, so anything
else (UNSPEC, UNIX, DGRAM) is refused. A version 1 text header (``PROXY TCP4 ...``) is
refused too: configure the balancer for version 2.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Final

SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
HEADER_LEN: Final = 16  # signature, version/command, family/transport, length
_ADDR_LEN: Final = {0x11: 12, 0x21: 36}  # INET/STREAM, INET6/STREAM


class ProxyHeaderError(ValueError):
    """The header is malformed or not acceptable; the connection must be closed."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed header. ``client`` is None for LOCAL (keep the real endpoints)."""

    consumed: int  # bytes of the stream the header took
    client: tuple[str, int] | None
    server: tuple[str, int] | None = None


def parse(buf: bytes | bytearray) -> ProxyHeader | None:
    """Parse a header at the start of ``buf``. None: not complete yet (read more).
    Raises :class:`ProxyHeaderError` as soon as the bytes cannot become a valid header."""
    head = bytes(buf[: len(SIGNATURE)])
    if not SIGNATURE.startswith(head):
        if b"PROXY".startswith(head[:5]):
            raise ProxyHeaderError("PROXY protocol version 1 header; version 2 is required")
        raise ProxyHeaderError("no PROXY protocol v2 signature")
    if len(buf) < HEADER_LEN:
        return None
    ver_cmd, fam, length = struct.unpack_from("!BBH", buf, 12)
    if ver_cmd >> 4 != 2:
        raise ProxyHeaderError(f"unsupported PROXY protocol version {ver_cmd >> 4}")
    command = ver_cmd & 0x0F
    if command not in (0, 1):
        raise ProxyHeaderError(f"unknown PROXY command {command}")
    total = HEADER_LEN + length
    if command == 1:
        need = _ADDR_LEN.get(fam)
        if need is None:
            raise ProxyHeaderError(
                f"PROXY family/transport 0x{fam:02x} not supported (TCP over IPv4/IPv6 only)"
            )
        if length < need:
            raise ProxyHeaderError(f"address block of {length} bytes, {need} needed")
    if len(buf) < total:
        return None
    if command == 0:
        return ProxyHeader(consumed=total, client=None)
    block = bytes(buf[HEADER_LEN : HEADER_LEN + _ADDR_LEN[fam]])
    if fam == 0x11:
        src, dst, sport, dport = struct.unpack("!4s4sHH", block)
    else:
        src, dst, sport, dport = struct.unpack("!16s16sHH", block)
    return ProxyHeader(
        consumed=total,
        client=(str(ipaddress.ip_address(src)), sport),
        server=(str(ipaddress.ip_address(dst)), dport),
    )


def trusted(host: str, networks: tuple[str, ...]) -> bool:
    """Whether the connection's own peer address is a trusted load balancer."""
    if not networks:
        return False
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(addr in ipaddress.ip_network(net, strict=False) for net in networks)
