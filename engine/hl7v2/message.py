"""Reading HL7 v2 messages: MSH only on the ACK path, everything else lazily.

python-hl7's full parse costs ~2 ms a message (reference/performance-limits.md), so the hot
path never builds a tree: :func:`read_msh` splits the MSH segment alone, and
:class:`Message` splits a segment only when a route asks for one of its fields.

Be liberal in what we accept: CR, LF or CRLF segment ends, any delimiters MSH-1/MSH-2
declare, a UTF-8 BOM, MSH-18 charsets with a latin-1 fallback, Z-segments, escapes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Final

from engine.errors import MessageRejected
from engine.model import MshInfo

UTF8_BOM: Final = b"\xef\xbb\xbf"
# Segment terminator is CR (HL7 v2.5.1 §2.5.1); LF and CRLF are accepted on input.
_SEGMENT_END = re.compile(rb"\r\n|\r|\n")
# Batch envelope segments (HL7 v2.5.1 §2.10.3).
_ENVELOPE: Final = (b"FHS", b"BHS", b"BTS", b"FTS")
_MESSAGE_CODE = re.compile(r"[A-Z0-9]{3}")

# MSH-18 values (HL7 table 0211) mapped to Python codecs. Unknown values fall back to
# UTF-8-then-latin-1, the same as an absent MSH-18.
CHARSETS: Final[dict[str, str]] = {
    "ASCII": "ascii",
    "UNICODE UTF-8": "utf-8",
    "UTF-8": "utf-8",
    "UNICODE": "utf-8",
    "8859/1": "latin-1",
    "8859/15": "iso8859-15",
    "8859/2": "iso8859-2",
    "8859/5": "iso8859-5",
    "8859/7": "iso8859-7",
    "8859/9": "iso8859-9",
    "WINDOWS-1252": "cp1252",
    "CP1252": "cp1252",
}


def strip_preamble(raw: bytes) -> bytes:
    """Drop a UTF-8 BOM and leading whitespace some senders put before MSH."""
    if raw.startswith(UTF8_BOM):
        raw = raw[3:]
    return raw.lstrip(b" \t\r\n")


def choose_codec(raw: bytes, declared: str) -> str:
    """The codec that decodes ``raw``: MSH-18 when it names a known charset and the
    bytes fit it, else UTF-8 when they are valid UTF-8, else latin-1 (which decodes
    anything, so nothing accepted is ever undecodable)."""
    if raw.isascii():
        return "ascii"
    codec = CHARSETS.get(declared.strip().upper())
    if codec and codec != "ascii":
        try:
            raw.decode(codec)
            return codec
        except UnicodeDecodeError:
            pass
    try:
        raw.decode("utf-8")
        return "utf-8"
    except UnicodeDecodeError:
        return "latin-1"


def read_msh(raw: bytes) -> tuple[MshInfo, str]:
    """Read MSH from one message's bytes; returns (MshInfo, codec).

    Raises :class:`MessageRejected` (AR) when MSH is missing or its delimiters, MSH-9 or
    MSH-10 are unusable. The reason never quotes field values.
    """
    fields, fs, enc, codec = _split_msh(raw)

    def f(n: int) -> str:  # MSH-n; MSH-1 is the separator itself, so MSH-n is fields[n-1]
        return fields[n - 1] if len(fields) >= n else ""

    msh9 = f(9).split(enc[0])
    msg_type = msh9[0].strip().upper()
    trigger = msh9[1].strip().upper() if len(msh9) > 1 else ""
    if not msg_type:
        raise MessageRejected(
            "MSH-9 message type is empty", code="101", location="MSH^1^9", ack="AR"
        )
    if not _MESSAGE_CODE.fullmatch(msg_type) or (trigger and not _MESSAGE_CODE.fullmatch(trigger)):
        raise MessageRejected(
            "MSH-9 message type is not a valid code", code="200", location="MSH^1^9", ack="AR"
        )
    if not f(10).strip():
        raise MessageRejected(
            "MSH-10 message control id is empty", code="101", location="MSH^1^10", ack="AR"
        )
    message_type = f"{msg_type}^{trigger}" if trigger else msg_type
    structure = msh9[2].strip() if len(msh9) > 2 else ""
    return _msh_info(fields, fs, enc, message_type, structure), codec


def reply_header(raw: bytes) -> MshInfo | None:
    """MSH as far as it reads without :func:`read_msh`'s checks of MSH-9 and MSH-10
    (``message_type`` left empty): what a NAK echoes — delimiters, MSH-3..6, MSH-10,
    MSH-12 — so the sender can match it to its message by MSA-2 (HL7 v2.5.1
    §2.15.8.2). None when MSH or its delimiters are unusable."""
    try:
        fields, fs, enc, _codec = _split_msh(raw)
    except MessageRejected:
        return _loose_header(raw)
    return _msh_info(fields, fs, enc, "", "")


_DEFAULT_ENC: Final = "^~\\&"


def _loose_header(raw: bytes) -> MshInfo | None:
    """MSH read with only MSH-1 trusted (MSH-2 unusable): the fields the separator
    delimits, echoed with the default encoding characters, so MSA-2 still names the
    sender's MSH-10 (HL7 v2.5.1 §2.15.8.2). None when MSH-1 is unusable too."""
    body = strip_preamble(raw)
    end = _SEGMENT_END.search(body)
    seg = (body[: end.start()] if end else body).decode("latin-1")
    if not seg.startswith("MSH") or len(seg) < 4:
        return None
    fs = seg[3]
    if fs.isalnum() or fs in " \t":
        return None
    fields = seg.split(fs)
    # keep the reply parseable: no field may carry one of the reply's own delimiters
    reply_fs = fs if fs not in _DEFAULT_ENC else "|"
    clean = [_strip_delims(v, reply_fs + _DEFAULT_ENC) for v in fields]
    return _msh_info(clean, reply_fs, _DEFAULT_ENC, "", "")


def _strip_delims(value: str, delims: str) -> str:
    for ch in delims:
        value = value.replace(ch, "")
    return value


def _split_msh(raw: bytes) -> tuple[list[str], str, str, str]:
    """MSH's fields (``fields[n-1]`` is MSH-n), separator, encoding characters and codec.

    Raises :class:`MessageRejected` when MSH is missing or its delimiters are unusable.
    """
    body = strip_preamble(raw)
    if not body.startswith(b"MSH") or len(body) < 8:
        raise MessageRejected(
            "message does not start with an MSH segment", code="100", location="MSH", ack="AR"
        )
    end = _SEGMENT_END.search(body)
    seg_bytes = body[: end.start()] if end else body
    msh18 = _raw_field(seg_bytes, 18)
    codec = choose_codec(raw, msh18.decode("latin-1"))  # raw: a BOM makes it UTF-8
    seg = seg_bytes.decode(codec, errors="replace")
    if len(seg) < 4:
        # a bare ``MSH`` segment: the body is long enough, the segment is not
        raise MessageRejected(
            "MSH-1 field separator is missing", code="101", location="MSH^1^1", ack="AR"
        )
    fs = seg[3]
    if fs.isalnum() or fs in " \t":
        raise MessageRejected(
            "MSH-1 field separator is not usable", code="102", location="MSH^1^1", ack="AR"
        )
    fields = seg.split(fs)
    enc = _collapse_repeats(fields[1]) if len(fields) > 1 else ""
    if (
        not 2 <= len(enc) <= 5
        or len(set(enc)) != len(enc)
        or fs in enc
        or any(c.isalnum() for c in enc)
    ):
        raise MessageRejected(
            "MSH-2 encoding characters are missing, repeated or alphanumeric",
            code="102",
            location="MSH^1^2",
            ack="AR",
        )
    return fields, fs, enc, codec


def _msh_info(fields: list[str], fs: str, enc: str, message_type: str, structure: str) -> MshInfo:
    def f(n: int) -> str:
        return fields[n - 1] if len(fields) >= n else ""

    cs = enc[0]
    return MshInfo(
        field_sep=fs,
        encoding_chars=enc,
        sending_app=f(3),
        sending_facility=f(4),
        receiving_app=f(5),
        receiving_facility=f(6),
        timestamp=f(7),
        message_type=message_type,
        structure=structure,
        control_id=f(10).strip(),
        processing_id=f(11).split(cs)[0],
        version=f(12).split(cs)[0].strip(),
        accept_ack_type=f(15).strip().upper(),
        app_ack_type=f(16).strip().upper(),
        charset=f(18).split(enc[1])[0].strip(),
    )


def _collapse_repeats(enc: str) -> str:
    """``^~\\\\&`` (a doubled escape character, as JSON-escaped samples carry) reads as
    ``^~\\&``: adjacent repeats collapse. Anything still ambiguous is rejected."""
    out = enc[:1]
    for ch in enc[1:]:
        if ch != out[-1]:
            out += ch
    return out


def _raw_field(seg: bytes, n: int) -> bytes:
    """MSH-n of an undecoded MSH segment (only used to find MSH-18 before decoding)."""
    if len(seg) < 4:
        return b""
    parts = seg.split(seg[3:4])
    return parts[n - 1] if len(parts) >= n else b""


# ---------------------------------------------------------------------------
# Splitting files and batch frames into messages


@dataclass(frozen=True, slots=True)
class Batch:
    """A frame or file cut into messages. ``header`` is the BHS (or FHS) segment, if any."""

    messages: tuple[bytes, ...]
    header: bytes = b""
    enveloped: bool = False  # FHS/BHS present


def count_messages(body: bytes) -> int:
    """How many messages (segments starting with MSH) ``body`` holds, counted without
    splitting it (a cheap cap check before :func:`split_messages`)."""
    return int(body.startswith(b"MSH")) + body.count(b"\rMSH") + body.count(b"\nMSH")


def split_messages(data: bytes) -> Batch:
    """Cut bytes holding one or more messages at each MSH, keeping every message's exact
    bytes (terminators included). FHS/BHS/BTS/FTS envelope segments are set aside; text
    that is not a segment before the first MSH (e.g. comments in a sample file) is
    dropped. Returns the messages in order.
    """
    body = strip_preamble(data)
    starts: list[int] = []
    header = b""
    enveloped = False
    envelope_spans: list[tuple[int, int]] = []
    pos = 0
    n = len(body)
    while pos < n:
        m = _SEGMENT_END.search(body, pos)
        seg_end = m.start() if m else n
        nxt = m.end() if m else n
        tag = body[pos : pos + 3]
        if tag == b"MSH" and pos + 3 < n:
            starts.append(pos)
        elif tag in _ENVELOPE and (pos + 3 == seg_end or not body[pos + 3 : pos + 4].isalnum()):
            enveloped = True
            envelope_spans.append((pos, nxt))
            if tag in (b"BHS", b"FHS") and (tag == b"BHS" or not header):
                header = body[pos:seg_end]
        pos = nxt
    messages: list[bytes] = []
    spans = [s for s, _e in envelope_spans]  # ascending, like ``starts``
    j = 0
    for i, start in enumerate(starts):
        stop = starts[i + 1] if i + 1 < len(starts) else n
        # a trailing BTS/FTS (or the next batch's BHS) is not part of the message; both
        # lists ascend, so one pointer walks the spans (linear, not messages x spans)
        while j < len(spans) and spans[j] <= start:
            j += 1
        if j < len(spans) and spans[j] < stop:
            stop = spans[j]
        messages.append(body[start:stop])
    return Batch(messages=tuple(messages), header=header, enveloped=enveloped)


# ---------------------------------------------------------------------------
# Lazy access by terse path: PID.3.1, OBR.25, PRD(RT).7, OBX[2].5, PID.3[2].1

_PATH = re.compile(
    r"""^(?P<seg>[A-Z][A-Z0-9]{2})
        (?:\((?P<qual>[^)]*)\))?
        (?:\[(?P<occ>\d+)\])?
        (?:\.(?P<field>\d+)
          (?:\[(?P<rep>\d+|\*)\])?
          (?:\.(?P<comp>\d+)
            (?:\.(?P<sub>\d+))?
          )?
        )?$""",
    re.VERBOSE,
)


@dataclass(frozen=True, slots=True)
class TersePath:
    """A parsed terse path. Numbers are 1-based as in the standard; 0 means "not given"."""

    segment: str
    qualifier: str = ""  # PRD(RT): the PRD whose first field's first component is RT
    occurrence: int = 0  # OBX[2]: the 2nd OBX; 0 = the first
    field: int = 0
    repetition: int = 0  # PID.3[2]; 0 = the first; -1 = all ("[*]")
    component: int = 0
    subcomponent: int = 0
    text: str = ""

    @classmethod
    def parse(cls, text: str) -> TersePath:
        m = _PATH.match(text.strip())
        if not m:
            raise ValueError(
                f"bad terse path {text!r}: expected SEG[(QUAL)][[n]].field[[rep]][.comp[.sub]]"
            )
        rep = m["rep"]
        return cls(
            segment=m["seg"],
            qualifier=m["qual"] or "",
            occurrence=int(m["occ"] or 0),
            field=int(m["field"] or 0),
            repetition=-1 if rep == "*" else int(rep or 0),
            component=int(m["comp"] or 0),
            subcomponent=int(m["sub"] or 0),
            text=text.strip(),
        )


class Message:
    """One HL7 v2 message, decoded once and split only as far as it is read.

    Values returned by :meth:`get` are unescaped text (HL7 v2.5.1 §2.7).
    """

    __slots__ = ("__dict__", "_field_cache", "_idx", "_standard", "codec", "msh", "text")

    def __init__(self, raw: bytes, msh: MshInfo | None = None, codec: str | None = None):
        if msh is None or codec is None:
            msh, codec = read_msh(raw)
        self.msh = msh
        self.codec = codec
        self.text = strip_preamble(raw).decode(codec, errors="replace")
        # segment name -> indexes into segments, built on the first read
        self._idx: dict[str, list[int]] | None = None
        # each segment is split into fields once, however many paths read it
        self._field_cache: dict[str, list[str]] = {}
        # ``^`` and ``&`` as component and subcomponent separators (most messages):
        # whole fields need no re-joining
        enc = msh.encoding_chars
        self._standard = enc[:1] == "^" and enc[3:4] == "&"

    @cached_property
    def segments(self) -> tuple[str, ...]:
        # CR, LF or CRLF ends (str methods: several times faster than the regex here)
        text = self.text.replace("\r\n", "\r").replace("\n", "\r")
        return tuple(s for s in text.split("\r") if s.strip())

    @property
    def _index(self) -> dict[str, list[int]]:
        idx = self._idx
        if idx is None:
            idx = self._idx = {}
            for i, seg in enumerate(self.segments):
                idx.setdefault(seg[:3], []).append(i)
        return idx

    def has(self, segment: str) -> bool:
        return segment in self._index

    def segment_names(self) -> list[str]:
        return [s[:3] for s in self.segments]

    def fields(self, seg_text: str) -> list[str]:
        """Fields of a segment numbered as the standard does: result[n] is field n.
        For MSH, result[1] is the field separator and result[2] the encoding characters."""
        cache = self._field_cache
        parts = cache.get(seg_text)
        if parts is None:
            fs = self.msh.field_sep
            parts = seg_text.split(fs)
            if parts[0] == "MSH":
                parts = ["MSH", fs, *parts[1:]]
            cache[seg_text] = parts
        return parts

    def _segments_for(self, path: TersePath) -> list[str]:
        found = [self.segments[i] for i in self._index.get(path.segment, ())]
        if path.qualifier:
            cs = self.msh.component_sep
            found = [
                s for s in found if (self.fields(s)[1:2] or [""])[0].split(cs)[0] == path.qualifier
            ]
        if path.occurrence:
            return found[path.occurrence - 1 : path.occurrence]
        return found

    def get_all(self, path: TersePath | str) -> list[str]:
        """Every value the path names, across segment occurrences (when no [n] is given)
        and field repetitions (when [*] is given)."""
        p = TersePath.parse(path) if isinstance(path, str) else path
        out: list[str] = []
        segs = self._segments_for(p)
        if p.field == 0:
            return [s for s in segs]
        for seg in segs:
            fields = self.fields(seg)
            if p.field >= len(fields):
                continue
            value = fields[p.field]
            if p.segment == "MSH" and p.field <= 2:
                out.append(value)
                continue
            enc = self.msh.encoding_chars
            rs = enc[1] if len(enc) > 1 else ""
            if not rs:
                chosen = [value]
            elif p.repetition == -1:
                chosen = value.split(rs)
            elif p.repetition <= 1:
                chosen = [value.partition(rs)[0]]
            else:
                chosen = value.split(rs, p.repetition)[p.repetition - 1 : p.repetition]
            for rep in chosen:
                v = rep
                if p.component:
                    # split no further than the component asked for
                    comps = v.split(enc[0], p.component)
                    v = comps[p.component - 1] if p.component <= len(comps) else ""
                    if p.subcomponent and len(enc) > 3:
                        subs = v.split(enc[3], p.subcomponent)
                        v = subs[p.subcomponent - 1] if p.subcomponent <= len(subs) else ""
                        out.append(self.unescape(v))
                        continue
                out.append(self._composite(v))
            if p.occurrence == 0 and p.repetition != -1 and out:
                # no [n]: the first segment occurrence that has the field answers
                break
        return out

    def get(self, path: TersePath | str, default: str = "") -> str:
        """The first value the path names, or ``default``."""
        values = self.get_all(path)
        return values[0] if values else default

    def _composite(self, value: str) -> str:
        """A whole field or component, unescaped, with its components joined by ``^`` and
        its subcomponents by ``&`` whatever delimiters the message declares, so that
        ``hl7_name``, ``ids()`` and routes read ``PID.5`` alike from ``|^~\\&`` and
        ``#@%*!`` senders, and without trailing empty components. Standard delimiters
        take the plain path (same result)."""
        # trailing delimiters are optional (HL7 v2.5.1 §2.5.3): ``NW^^`` reads as ``NW``
        if self._standard:
            return self.unescape(value.rstrip("^&"))
        enc = self.msh.encoding_chars
        cs = enc[0]
        ss = enc[3] if len(enc) > 3 else ""
        value = value.rstrip(cs + ss)
        if cs not in value and (not ss or ss not in value):
            return self.unescape(value)
        return "^".join(
            "&".join(self.unescape(s) for s in (c.split(ss) if ss else (c,)))
            for c in value.split(cs)
        )

    def unescape(self, value: str) -> str:
        """Replace HL7 escape sequences (HL7 v2.5.1 §2.7.4) with the characters they stand for."""
        enc = self.msh.encoding_chars
        esc = enc[2] if len(enc) > 2 else ""
        if not esc or esc not in value:
            return value
        return unescape(value, self.msh.field_sep, enc)


def unescape(value: str, field_sep: str, enc: str) -> str:
    """HL7 escape sequences: \\F\\ \\S\\ \\T\\ \\R\\ \\E\\ \\Xhh..\\ \\.br\\; \\H\\ and \\N\\
    (highlighting) are dropped; unknown sequences are kept as sent."""
    cs, rs, esc = enc[0], enc[1], enc[2]
    sub = enc[3] if len(enc) > 3 else "&"
    table = {"F": field_sep, "S": cs, "T": sub, "R": rs, "E": esc, ".br": "\n", "H": "", "N": ""}
    out: list[str] = []
    i = 0
    n = len(value)
    while i < n:
        ch = value[i]
        if ch == esc:
            j = value.find(esc, i + 1)
            if j == -1:
                out.append(value[i:])
                break
            code = value[i + 1 : j]
            if code in table:
                out.append(table[code])
            elif code[:1] == "X" and len(code) > 1 and len(code) % 2 == 1:
                try:
                    out.append(bytes.fromhex(code[1:]).decode("latin-1"))
                except ValueError:
                    out.append(value[i : j + 1])
            else:
                out.append(value[i : j + 1])
            i = j + 1
        else:
            out.append(ch)
            i += 1
    return "".join(out)
