"""Routing must not depend on how a message is encoded.

Every corpus message the shipped routes.yaml routes is re-encoded in ways HL7 v2 says
mean the same thing — other segment terminators, other delimiters (with data that
collides escaped), a trailing Z-segment, a UTF-8 BOM, other charsets, trailing empty
fields and components — and must get the same decision: status, routes, reason, the
summarised actions (fingerprints included: they digest the whole event) and the actions
themselves. A few variants also go through the real listener: the ACK answers the
message's MSH-10 in the sender's delimiters and the inbox keeps the exact bytes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import CORPUS, mllp_port, query, run

from engine import config
from engine.app import Engine
from engine.hl7v2.client import MllpClient
from engine.hl7v2.message import UTF8_BOM, Message, TersePath, read_msh, split_messages
from engine.hl7v2.mllp import frame
from engine.model import StoredMessage
from engine.routing.compile import compile_config
from engine.routing.decide import decide_stored
from engine.routing.summary import summarise
from engine.routing.table import RouteTable

if not CORPUS.is_dir():  # every corpus message must be checked: a missing corpus fails
    raise RuntimeError(f"shared HL7 corpus not found at {CORPUS} (clone beside ../shared)")

ROOT = Path(__file__).resolve().parent.parent
TABLE: RouteTable = compile_config(config.load(ROOT / "routes.yaml"))
RECEIVED_AT = 1_767_225_600.0  # the fallback event time, the same for every variant


def decision(raw: bytes) -> dict[str, Any]:
    """What the shipped routes decide for ``raw`` as an inbox row from source ``ehr``."""
    row = StoredMessage(7, RECEIVED_AT, "ehr", "", "", "", "", "", "", raw, "", "received", "", "")
    d = decide_stored(TABLE, row)
    return {
        "status": d.status,
        "routes": d.routes,
        "reason": d.reason,
        "summary": summarise(d),
        "actions": d.actions,
    }


def corpus_messages() -> Iterator[tuple[str, bytes]]:
    """Each corpus file cut into messages as test_corpus / test_routes cut them."""
    for p in sorted(CORPUS.rglob("*")):
        if not p.is_file() or p.name.startswith("."):
            continue
        data = p.read_bytes()
        for i, m in enumerate(split_messages(data).messages or (data,), 1):
            yield f"{p.relative_to(CORPUS)}#{i}", m


DECISIONS: dict[str, dict[str, Any]] = {name: decision(raw) for name, raw in corpus_messages()}
ROUTED: dict[str, bytes] = {
    name: raw for name, raw in corpus_messages() if DECISIONS[name]["status"] == "routed"
}


# ---------------------------------------------------------------------------
# A small, independent HL7 v2 reader and writer for re-encoding (HL7 v2.5.1 §2.5-2.7)

_SEG_END = re.compile(r"\r\n|\r|\n")
_SEG_END_BYTES = re.compile(rb"\r\n|\r|\n")
# Escape sequences the reader interprets without reference to the delimiters: they are
# carried over as escape sequences (written with the new escape character).
_VERBATIM_ESCAPE = re.compile(r"\.br|H|N|X(?:[0-9A-Fa-f]{2})+")


@dataclass(frozen=True)
class Delims:
    fs: str  # field separator (MSH-1)
    cs: str  # component
    rs: str  # repetition
    esc: str  # escape
    ss: str  # subcomponent

    @classmethod
    def of(cls, fs: str, enc: str) -> Delims:
        return cls(fs, enc[0], enc[1], enc[2], enc[3])

    @property
    def enc(self) -> str:  # MSH-2
        return self.cs + self.rs + self.esc + self.ss


# A decoded leaf (one subcomponent): literal text pieces and ("esc", code) sequences.
Piece = tuple[str, str]  # ("text", literal) | ("esc", code)
Leaf = list[Piece]
Field = list[list[list[Leaf]]]  # repetitions → components → subcomponents → leaf


def unescape_leaf(value: str, d: Delims) -> Leaf:
    """HL7 v2.5.1 §2.7: \\F\\ \\S\\ \\T\\ \\R\\ \\E\\ stand for the delimiters; .br, H, N and
    Xhh are kept as sequences; anything else (an unknown or unterminated sequence) is
    literal text, as engine.hl7msg keeps it."""
    table = {"F": d.fs, "S": d.cs, "T": d.ss, "R": d.rs, "E": d.esc}
    out: Leaf = []
    i = 0
    while i < len(value):
        j = value.find(d.esc, i)
        if j == -1:
            out.append(("text", value[i:]))
            break
        if j > i:
            out.append(("text", value[i:j]))
        k = value.find(d.esc, j + 1)
        if k == -1:
            out.append(("text", value[j:]))
            break
        code = value[j + 1 : k]
        if code in table:
            out.append(("text", table[code]))
        elif _VERBATIM_ESCAPE.fullmatch(code):
            out.append(("esc", code))
        else:
            out.append(("text", value[j : k + 1]))
        i = k + 1
    return out


def escape_leaf(leaf: Leaf, d: Delims) -> str:
    codes = {d.fs: "F", d.cs: "S", d.ss: "T", d.rs: "R", d.esc: "E"}
    out: list[str] = []
    for kind, text in leaf:
        if kind == "esc":
            assert not set(text) & set(d.fs + d.enc), text
            out.append(f"{d.esc}{text}{d.esc}")
        else:
            out.extend(f"{d.esc}{codes[ch]}{d.esc}" if ch in codes else ch for ch in text)
    return "".join(out)


@dataclass
class Parsed:
    """A message as decoded values: MSH-1/MSH-2 are not kept (they are the delimiters
    themselves); ``segments`` is (name, [field 1, field 2, ...]) with MSH's fields
    starting at MSH-3."""

    delims: Delims
    segments: list[tuple[str, list[Field]]]


def parse(text: str) -> Parsed:
    assert text.startswith("MSH"), text[:20]
    fs = text[3]
    first = _SEG_END.split(text, maxsplit=1)[0]
    enc = first.split(fs)[1]
    # The corpus declares ^~\& or ^~\&# (v2.7's truncation character, which the reader
    # does not interpret: it is data like any other character).
    assert len(enc) in (4, 5) and len(set(enc)) == len(enc), enc
    d = Delims.of(fs, enc)
    segments: list[tuple[str, list[Field]]] = []
    for seg in _SEG_END.split(text):
        if not seg.strip():
            continue
        parts = seg.split(fs)
        name, raw_fields = parts[0], parts[2:] if parts[0] == "MSH" else parts[1:]
        fields = [
            [
                [[unescape_leaf(sub, d) for sub in comp.split(d.ss)] for comp in rep.split(d.cs)]
                for rep in f.split(d.rs)
            ]
            for f in raw_fields
        ]
        segments.append((name, fields))
    return Parsed(d, segments)


def write(p: Parsed, d: Delims, end: str = "\r") -> str:
    lines = []
    for name, fields in p.segments:
        parts = [
            d.rs.join(
                d.cs.join(d.ss.join(escape_leaf(leaf, d) for leaf in comp) for comp in rep)
                for rep in f
            )
            for f in fields
        ]
        if name == "MSH":
            lines.append(d.fs.join(["MSH", d.enc, *parts]))
        else:
            lines.append(d.fs.join([name, *parts]))
    return "".join(line + end for line in lines)


def codec_of(raw: bytes) -> str:
    return read_msh(raw)[1]


def reencode(raw: bytes, fs: str, enc: str, end: str = "\r") -> bytes:
    codec = codec_of(raw)
    return write(parse(raw.decode(codec)), Delims.of(fs, enc), end).encode(codec)


# ---------------------------------------------------------------------------
# Variants: raw bytes → bytes that HL7 says mean the same


def segments_of(raw: bytes) -> list[bytes]:
    return [s for s in _SEG_END_BYTES.split(raw) if s.strip()]


def terminators(end: bytes, final: bool = True) -> Callable[[bytes], bytes]:
    def variant(raw: bytes) -> bytes:
        joined = end.join(segments_of(raw))
        return joined + end if final else joined

    return variant


def delimiters(fs: str, enc: str, end: str = "\r") -> Callable[[bytes], bytes]:
    return lambda raw: reencode(raw, fs, enc, end)


def end_of(raw: bytes) -> bytes:
    m = _SEG_END_BYTES.search(raw)
    return m.group() if m else b"\r"


def z_segment(raw: bytes) -> bytes:
    end = end_of(raw)
    body = raw if _SEG_END_BYTES.search(raw[-2:]) else raw + end
    fs = raw[3:4]
    return body + b"ZXX" + fs + b"1" + fs + b"anything" + end


def bom(raw: bytes) -> bytes:
    return UTF8_BOM + raw


def combined(raw: bytes) -> bytes:
    """BOM + other delimiters + LF + a Z-segment, all at once."""
    return bom(z_segment(reencode(raw, "#", "@%*!", "\n")))


def _map_fields(
    raw: bytes,
    fn: Callable[[str, str, Delims], str],
    seg_fn: Callable[[list[str], int], list[str]] | None = None,
) -> bytes:
    """Apply ``fn(field text, segment name, delims)`` to every field but MSH-1/MSH-2,
    keeping the original delimiters and terminators; ``seg_fn`` rewrites the list of
    fields of each segment."""
    codec = codec_of(raw)
    text = raw.decode(codec)
    fs = text[3]
    enc = _SEG_END.split(text, maxsplit=1)[0].split(fs)[1]
    d = Delims.of(fs, enc)
    out: list[str] = []
    pos = 0
    for m in [*_SEG_END.finditer(text), None]:
        stop = m.start() if m else len(text)
        seg = text[pos:stop]
        if seg.strip():
            parts = seg.split(fs)
            skip = 2 if parts[0] == "MSH" else 1
            fields = parts[:skip] + [fn(f, parts[0], d) for f in parts[skip:]]
            if seg_fn is not None:
                fields = seg_fn(fields, skip)
            seg = fs.join(fields)
        out.append(seg + (m.group() if m else ""))
        if m is None:
            break
        pos = m.end()
    return "".join(out).encode(codec)


def _rstrip_empty(items: list[str]) -> list[str]:
    while len(items) > 1 and items[-1] == "":
        items.pop()
    return items


def strip_trailing(raw: bytes) -> bytes:
    """``PID|1||X^^^~|||`` → ``PID|1||X``: trailing empty subcomponents, components,
    repetitions and fields dropped, as HL7 v2.5.1 §2.5.3 lets a sender do."""

    def field(f: str, _seg: str, d: Delims) -> str:
        reps = [
            d.cs.join(
                _rstrip_empty([d.ss.join(_rstrip_empty(c.split(d.ss))) for c in r.split(d.cs)])
            )
            for r in f.split(d.rs)
        ]
        return d.rs.join(_rstrip_empty(reps))

    def seg(fields: list[str], skip: int) -> list[str]:
        while len(fields) > skip and fields[-1] == "":
            fields.pop()
        return fields

    return _map_fields(raw, field, seg)


def pad_trailing_fields(raw: bytes) -> bytes:
    """Three empty fields more at the end of every segment: absent fields read as ''."""
    return _map_fields(raw, lambda f, _s, _d: f, lambda fields, _skip: [*fields, "", "", ""])


def pad_trailing_components(raw: bytes) -> bytes:
    """Two empty components more on every repetition of every field (``ORC|NW^^``, MSH-10
    too), two empty subcomponents more on every component that already has
    subcomponents: trailing delimiters are optional (HL7 v2.5.1 §2.5.3), so the reader
    drops them from whole-field values and an absent component reads as ''."""

    def field(f: str, _seg: str, d: Delims) -> str:
        reps = []
        for r in f.split(d.rs):
            if r:
                comps = [c + d.ss * 2 if d.ss in c else c for c in r.split(d.cs)]
                r = d.cs.join(comps) + d.cs * 2
            reps.append(r)
        return d.rs.join(reps)

    return _map_fields(raw, field)


VARIANTS: dict[str, Callable[[bytes], bytes]] = {
    "cr": terminators(b"\r"),
    "lf": terminators(b"\n"),
    "crlf": terminators(b"\r\n"),
    "no-final-terminator": terminators(b"\r", final=False),
    "delims-hash": delimiters("#", "@%*!"),  # MSH#@%*!#...
    "delims-shuffled": delimiters("|", "&\\~^"),  # ^ is now the subcomponent separator
    "delims-caret-fs": delimiters("^", "|~\\&"),  # | is now the component separator
    "z-segment": z_segment,
    "bom": bom,
    "bom-delims-lf-z": combined,
    "trailing-fields-added": pad_trailing_fields,
    "trailing-empties-stripped": strip_trailing,
    "trailing-components-added": pad_trailing_components,
}
DELIMITER_VARIANTS = [v for v in VARIANTS if v.startswith("delims-")]


def test_corpus_has_routed_messages() -> None:
    assert len(ROUTED) >= 100, len(ROUTED)
    # the re-encoder round-trips: same delimiters, same text (terminators aside)
    for name, raw in ROUTED.items():
        codec = codec_of(raw)
        text = raw.decode(codec)
        p = parse(text)
        assert write(p, p.delims) == "".join(
            s + "\r" for s in _SEG_END.split(_mask_truncation(text, p)) if s.strip()
        ), name


def _mask_truncation(text: str, p: Parsed) -> str:
    """MSH-2 as the writer writes it (without a v2.7 truncation character)."""
    fs = text[3]
    declared = _SEG_END.split(text, maxsplit=1)[0].split(fs)[1]
    return text.replace(f"MSH{fs}{declared}{fs}", f"MSH{fs}{p.delims.enc}{fs}", 1)


CASES = [(name, v) for name in ROUTED for v in VARIANTS]


@pytest.mark.parametrize(("name", "variant"), CASES, ids=[f"{n}:{v}" for n, v in CASES])
def test_variant_decides_alike(name: str, variant: str) -> None:
    raw = ROUTED[name]
    assert decision(VARIANTS[variant](raw)) == DECISIONS[name]


DELIM_CASES = [(name, v) for name in ROUTED for v in DELIMITER_VARIANTS]


@pytest.mark.parametrize(("name", "variant"), DELIM_CASES, ids=[f"{n}:{v}" for n, v in DELIM_CASES])
def test_variant_reads_same_values(name: str, variant: str) -> None:
    """The reader's promise behind the decisions: every field, component and subcomponent
    of every segment reads the same, unescaped, whatever the delimiters (whole fields and
    components with ``^`` and ``&`` inside)."""
    raw = ROUTED[name]
    before, after = Message(raw), Message(VARIANTS[variant](raw))
    assert before.segment_names() == after.segment_names()
    parsed = parse(raw.decode(before.codec))
    shapes: dict[str, set[tuple[int, int, int]]] = {}
    for seg, fields in parsed.segments:
        if not re.fullmatch(r"[A-Z][A-Z0-9]{2}", seg):
            continue
        shape = shapes.setdefault(seg, set())
        first = 3 if seg == "MSH" else 1
        for n, f in enumerate(fields, first):
            shape.add((n, 0, 0))
            for rep in f:
                for c, comp in enumerate(rep, 1):
                    shape.update((n, c, s) for s in range(len(comp) + 1))
    checked = 0
    for seg, shape in shapes.items():
        for n, c, s in sorted(shape):
            # [*]: every repetition of every occurrence of the segment, in order
            path = TersePath(seg, field=n, repetition=-1, component=c, subcomponent=s)
            assert after.get_all(path) == before.get_all(path), (seg, n, c, s)
            checked += 1
    assert checked > 10


def test_composite_values_read_with_standard_separators() -> None:
    """The bug these variants found: a whole field (``PID.5``, ``PRD(RP).2``, a PID-3
    repetition) came back in the sender's delimiters, so ``hl7_name`` (which splits on
    ``^`` and ``&``) named the referring provider ``POWELL@ROBERT@@@DR@MD`` and ``ids()``
    (which cut CX-4 at ``&``) kept ``WDL!52D0391886!CLIA`` as the authority when a
    sender declared ``#@%*!``. Whole fields and components now read with ``^`` and
    ``&`` whatever the delimiters. (Being unescaped text, a whole field's data ``^`` or
    ``&`` reads like a separator — as it always did from ``|^~\\&`` senders; component
    and subcomponent paths have no such ambiguity.)"""
    msg = Message(
        b"MSH#!@%*#S#F#R#F#20260301120000##ADT!A04#M7#P#2.5\r"
        b"PID#1##12345!!!HOSP*1.2.3*ISO@678!!!OTHER##DOE%S%X^Y&Z!JOHN!A\r"
    )
    assert msg.get("PID.3") == "12345^^^HOSP&1.2.3&ISO"
    assert msg.get_all("PID.3[*]") == ["12345^^^HOSP&1.2.3&ISO", "678^^^OTHER"]
    assert msg.get("PID.3.4") == "HOSP&1.2.3&ISO"
    assert msg.get("PID.3.4.2") == "1.2.3"
    assert msg.get("PID.5") == "DOE!X^Y&Z^JOHN^A"  # %S% is the sender's "!" as data
    assert msg.get("PID.5.1") == "DOE!X^Y&Z"

    ref = decision(VARIANTS["delims-hash"](ROUTED["fhir-converter/REF-I12-01.hl7#1"]))
    event = ref["actions"][0].event
    assert (event.referring.name, event.specialist.name) == ("ROBERT POWELL", "PAUL McWILLIAMS")
    oru = ROUTED["cdc-dex-hl7/2.3.1_HL7_Test_File_with_HHS_Data.txt#1"]
    event = decision(VARIANTS["delims-hash"](oru))["actions"][0].event
    assert event.ids.patient_ids == ("abc123^^^WDL",)


# ---------------------------------------------------------------------------
# Charsets: the same text in UTF-8, ISO 8859-1 (declared or not) and with a BOM


def with_charset(raw: bytes, msh18: str, codec: str) -> bytes:
    """The message with ``ü`` added to MSH-4.1, MSH-6.1 and PID-5.1 (the sending and
    receiving facility feed the identifiers) and MSH-18 set, encoded with ``codec``."""
    text = raw.decode(codec_of(raw))
    fs, cs = text[3], text[4]

    def add_u(value: str) -> str:  # ü after the first component
        first, sep, rest = value.partition(cs)
        return first + "ü" + sep + rest

    out = []
    for seg in _SEG_END.split(text):
        parts = seg.split(fs)
        if parts[0] == "MSH":
            parts += [""] * (18 - len(parts))
            parts[3], parts[5] = add_u(parts[3]), add_u(parts[5])  # parts[n-1] is MSH-n
            parts[17] = msh18
        elif parts[0] == "PID" and len(parts) > 5:
            parts[5] = add_u(parts[5])
        out.append(fs.join(parts))
    return "\r".join(out).encode(codec)


CHARSETS: dict[str, Callable[[bytes], bytes]] = {
    "8859-1-declared": lambda raw: with_charset(raw, "8859/1", "latin-1"),
    "8859-1-undeclared": lambda raw: with_charset(raw, "", "latin-1"),
    "windows-1252": lambda raw: with_charset(raw, "WINDOWS-1252", "cp1252"),
    "utf-8-undeclared-bom": lambda raw: UTF8_BOM + with_charset(raw, "", "utf-8"),
}
CHARSET_CASES = [(name, v) for name, raw in ROUTED.items() if raw.isascii() for v in CHARSETS]


@pytest.mark.parametrize(
    ("name", "variant"), CHARSET_CASES, ids=[f"{n}:{v}" for n, v in CHARSET_CASES]
)
def test_charset_variant_decides_alike(name: str, variant: str) -> None:
    raw = ROUTED[name]
    utf8 = with_charset(raw, "UNICODE UTF-8", "utf-8")
    expected = decision(utf8)
    assert expected["status"] == "routed"
    # decoded, not merely consistent: the facility in the identifiers has its ü
    facility = {s["keys"].get("sending_facility", "ü") for s in expected["summary"]}
    assert all("ü" in f for f in facility), facility
    assert decision(CHARSETS[variant](raw)) == expected


# ---------------------------------------------------------------------------
# Through the listener: ACK and inbox for a few variants of a few messages

LISTENER_MESSAGES = [
    "fhir-converter/REF-I12-01.hl7#1",
    "fhir-converter/ORM-O01-01.hl7#1",
    "fhir-converter/SIU-S12-01.hl7#1",
    "fhir-converter/ORU-R01-01.hl7#1",  # carries \T\ escapes
    "fhir-converter/ADT-A04-01.hl7#1",
]
LISTENER_VARIANTS: dict[str, Callable[[bytes], bytes]] = {
    "original": lambda raw: raw,
    "delims-hash": VARIANTS["delims-hash"],
    "delims-shuffled": VARIANTS["delims-shuffled"],
    "lf": VARIANTS["lf"],
    "8859-1-declared": CHARSETS["8859-1-declared"],
    "bom": VARIANTS["bom"],
}


def shipped_config() -> config.Config:
    """The shipped routes.yaml with the listener on port 0, no HTTP, and ACKs sent once
    the message is routed (so the ACK also says routing succeeded)."""
    doc = yaml.safe_load((ROOT / "routes.yaml").read_text("utf-8"))
    doc["http"] = {"enabled": False}
    doc["store"] = {"file": "refloop.db", "synchronous": "normal"}
    doc["sources"] = {
        "ehr": {"type": "mllp", "host": "127.0.0.1", "port": 0, "ack_when": "on-processed"}
    }
    return config.loads(
        yaml.safe_dump(doc, sort_keys=False), file=str(ROOT / "routes.yaml"), env={}
    )


def _msh_of(reply: bytes) -> tuple[str, str, list[str]]:
    """(field separator, MSH-2, MSA fields) of an ACK, read without engine code."""
    text = reply.decode("latin-1")
    assert text.startswith("MSH"), reply[:40]
    fs = text[3]
    segs = [s for s in text.split("\r") if s]
    assert "\n" not in text, "ACK segments end with CR"
    msa = next(s for s in segs if s.startswith("MSA")).split(fs)
    return fs, segs[0].split(fs)[1], msa


@dataclass(frozen=True)
class Delivery:
    variant: str
    sent: bytes
    reply: bytes | None
    stored: tuple[Any, ...]  # (raw, status, route, charset) of its inbox row


@pytest.fixture(scope="module")
def delivered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Delivery]]:
    """One engine with the shipped routes; every variant of every listener message sent
    over one MllpClient connection, each waiting for its ACK."""
    state = tmp_path_factory.mktemp("listener")
    sends = [
        (name, variant, fn(ROUTED[name]))
        for name in LISTENER_MESSAGES
        for variant, fn in LISTENER_VARIANTS.items()
    ]

    async def go() -> list[bytes | None]:
        engine = Engine(shipped_config(), state, drain_seconds=2.0)
        await engine.start()
        replies: list[bytes | None] = []
        try:
            client = await MllpClient.connect("127.0.0.1", mllp_port(engine), timeout=10)
            try:
                for _name, _variant, message in sends:
                    # MllpClient.send reports MSA-1 only; the ACK's bytes are read here
                    client.writer.write(frame(message))
                    await client.writer.drain()
                    replies.append(await client.read_frame())
            finally:
                await client.close()
        finally:
            await engine.stop()
        return replies

    replies = run(go())
    rows = query(
        state / "refloop.db",
        "SELECT raw, status, route, charset "
        "FROM messages JOIN message_raw ON message_id = id ORDER BY id",
    )
    assert len(rows) == len(sends), "one inbox row per message sent"
    out: dict[str, list[Delivery]] = {}
    for (name, variant, message), reply, row in zip(sends, replies, rows, strict=True):
        out.setdefault(name, []).append(Delivery(variant, message, reply, row))
    return out


@pytest.mark.parametrize("name", LISTENER_MESSAGES)
def test_listener_acks_variants_and_stores_exact_bytes(
    delivered: dict[str, list[Delivery]], name: str
) -> None:
    expected_route = ",".join(DECISIONS[name]["routes"])
    for d in delivered[name]:
        msh, _codec = read_msh(d.sent)
        assert d.reply is not None, f"{d.variant}: closed without an ACK"
        fs, enc, msa = _msh_of(d.reply)
        # ack_when: on-processed: AA means stored *and* routed without error
        assert msa[1] == "AA", f"{d.variant}: {d.reply!r}"
        assert msa[2] == msh.control_id, d.variant
        # docs/listener.md: every ACK is written with the sender's delimiters
        assert (fs, enc) == (msh.field_sep, msh.encoding_chars), d.variant
        raw, status, route, charset = d.stored
        assert raw == d.sent, f"{d.variant}: stored bytes differ from those sent"
        assert (status, route) == ("routed", expected_route), d.variant
        if d.variant == "8859-1-declared":
            assert charset == "latin-1"
            # the ACK echoes MSH-4 (now MSH-6) in the message's charset
            assert "ü" in d.reply.decode("latin-1").split("\r")[0].split(fs)[5]
