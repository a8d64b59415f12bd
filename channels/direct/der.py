"""A small reader for DER (and the BER forms CMS senders use) — just enough to walk a CMS
``SignedData`` (RFC 5652) and check its signature with ``cryptography`` primitives.

Why not a library: ``cryptography`` (50.x) signs, encrypts and decrypts PKCS#7 but has no
CMS signature *verification*; asn1crypto has had no release since 2022 and pyasn1 would pull
a second ASN.1 stack in for five structures. Reading TLVs is ~70 lines and fully tested.

Contract: :func:`read` returns one element and the offset after it, raising
:class:`DerError` on truncated or malformed input (never ``IndexError``). Indefinite lengths
(BER, X.690 §8.1.3.6, as ``openssl smime -sign -stream`` writes) are accepted; ``raw`` then
holds the exact bytes as received, which is what the signature checks need.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

# X.690 universal tags used by CMS.
INTEGER: Final = 0x02
OCTET_STRING: Final = 0x04
OID: Final = 0x06
SEQUENCE: Final = 0x30
SET: Final = 0x31
MAX_DEPTH: Final = 64


class DerError(ValueError):
    """The bytes are not a well-formed DER/BER element."""


@dataclass(frozen=True, slots=True)
class Tlv:
    """One element: ``tag`` is the identifier octet (class, constructed bit and number),
    ``content`` the value octets (for indefinite lengths: without the end-of-contents),
    ``raw`` the whole encoding as received."""

    tag: int
    content: bytes
    raw: bytes
    indefinite: bool = False

    @property
    def constructed(self) -> bool:
        return bool(self.tag & 0x20)

    def children(self) -> list[Tlv]:
        """The elements inside a constructed element."""
        if not self.constructed:
            raise DerError("primitive element has no children")
        out: list[Tlv] = []
        pos = 0
        while pos < len(self.content):
            child, pos = read(self.content, pos)
            out.append(child)
        return out

    def octets(self) -> bytes:
        """The value of an OCTET STRING, joining BER constructed segments."""
        if not self.constructed:
            return self.content
        return b"".join(c.octets() for c in self.children())

    def oid(self) -> str:
        """Dotted form of an OBJECT IDENTIFIER (X.690 §8.19)."""
        if self.tag != OID or not self.content:
            raise DerError("not an OBJECT IDENTIFIER")
        arcs: list[int] = []
        value = 0
        for byte in self.content:
            value = (value << 7) | (byte & 0x7F)
            if not byte & 0x80:
                arcs.append(value)
                value = 0
        first = min(arcs[0] // 40, 2)
        return ".".join(str(a) for a in (first, arcs[0] - 40 * first, *arcs[1:]))

    def integer(self) -> int:
        if self.tag != INTEGER:
            raise DerError("not an INTEGER")
        return int.from_bytes(self.content, "big", signed=True)


def read(data: bytes, pos: int = 0, _depth: int = 0) -> tuple[Tlv, int]:
    """Read the element starting at ``pos``; return it and the offset just past it."""
    if _depth > MAX_DEPTH:
        raise DerError("nesting too deep")
    start = pos
    if pos + 2 > len(data):
        raise DerError("truncated element")
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise DerError("high tag numbers are not used by CMS")
    length = data[pos + 1]
    pos += 2
    if length == 0x80:  # indefinite: children until end-of-contents (00 00)
        if not tag & 0x20:
            raise DerError("indefinite length on a primitive element")
        inner = pos
        while True:
            if pos + 2 > len(data):
                raise DerError("missing end-of-contents")
            if data[pos] == 0 and data[pos + 1] == 0:
                return Tlv(tag, data[inner:pos], data[start : pos + 2], True), pos + 2
            _child, pos = read(data, pos, _depth + 1)
    if length & 0x80:
        n = length & 0x7F
        if n > 4 or pos + n > len(data):
            raise DerError("bad length")
        length = int.from_bytes(data[pos : pos + n], "big")
        pos += n
    end = pos + length
    if end > len(data):
        raise DerError("truncated element")
    return Tlv(tag, data[pos:end], data[start:end]), end


def parse(data: bytes) -> Tlv:
    """The single element that ``data`` holds; trailing bytes are an error."""
    tlv, end = read(data)
    if end != len(data):
        raise DerError("trailing bytes after element")
    return tlv
