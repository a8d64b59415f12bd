"""Building HL7 v2 acknowledgments by hand (HL7 v2.5.1 §2.9, §2.14.1 ERR, §2.15.8 MSA).

Strict in what we send: CR segment ends, the sender's own delimiters echoed back, MSH-3/4
and MSH-5/6 swapped, MSH-9 ``ACK^<trigger>^ACK``, MSH-12 echoed.
"""

from __future__ import annotations

import itertools
import os
from datetime import UTC, datetime
from typing import Final

from engine.model import MshInfo

# HL7 table 0008 acknowledgment codes.
ORIGINAL_CODES: Final = ("AA", "AE", "AR")
COMMIT_CODES: Final = {"AA": "CA", "AE": "CE", "AR": "CR"}

# HL7 table 0357 message error condition codes (the ones refloop sends).
ERROR_TEXT: Final[dict[str, str]] = {
    "0": "Message accepted",
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "103": "Table value not found",
    "200": "Unsupported message type",
    "201": "Unsupported event code",
    "202": "Unsupported processing id",
    "203": "Unsupported version id",
    "205": "Duplicate key identifier",
    "207": "Application internal error",
}

_DEFAULT_MSH: Final = MshInfo(
    field_sep="|",
    encoding_chars="^~\\&",
    sending_app="",
    sending_facility="",
    receiving_app="",
    receiving_facility="",
    timestamp="",
    message_type="",
    structure="",
    control_id="",
    processing_id="P",
    version="2.5.1",
    accept_ack_type="",
    app_ack_type="",
    charset="",
)

_counter = itertools.count(1)
_PREFIX: Final = f"RL{os.getpid() % 100000:05d}"


def next_control_id(now: float) -> str:
    """A control id for an outgoing ACK: unique within this process and across restarts
    (time-based prefix), at most 20 characters (MSH-10 is ST(20) in v2.5.1)."""
    return f"{_PREFIX[:4]}{int(now * 1000) % 10**10:010d}{next(_counter) % 10**6:06d}"


def _version_tuple(version: str) -> tuple[int, ...]:
    parts: list[int] = []
    for p in version.split("."):
        if not (p.isascii() and p.isdigit()):  # "³" and "٥" are digits to isdigit, not to int
            break
        parts.append(int(p))
    return tuple(parts) or (2, 5)


def build_ack(
    msh: MshInfo | None,
    code: str,
    *,
    now: float,
    error: tuple[str, str, str] | None = None,
    codec: str = "ascii",
) -> bytes:
    """Return the ACK message (without MLLP framing) for ``msh``.

    ``code`` is one of AA/AE/AR/CA/CE/CR. ``error`` is (0357 code, location, reason),
    where location is ``SEG^seq^field`` (e.g. ``MSH^1^9``); it becomes an ERR segment.
    With no readable MSH, the ACK uses default delimiters and an empty MSA-2.
    """
    m = msh or _DEFAULT_MSH
    fs = m.field_sep
    enc = m.encoding_chars if len(m.encoding_chars) >= 4 else "^~\\&"
    cs = enc[0]
    sc = enc[3]
    trigger = m.trigger
    ts = datetime.fromtimestamp(now, UTC).strftime("%Y%m%d%H%M%S") + "+0000"
    version = m.version or "2.5.1"
    msh_fields = [
        "MSH",
        enc,
        m.receiving_app,
        m.receiving_facility,
        m.sending_app,
        m.sending_facility,
        ts,
        "",
        f"ACK{cs}{trigger}{cs}ACK" if trigger else "ACK",
        next_control_id(now),
        m.processing_id or "P",
        version,
    ]
    segments = [fs.join(msh_fields)]
    msa = ["MSA", code, m.control_id]
    if error is not None:
        msa.append(_safe(error[2], fs, enc))
    segments.append(fs.join(msa))
    if error is not None:
        err_code, location, _reason = error
        text = ERROR_TEXT.get(err_code, "Application error")
        loc = location.replace("^", cs)
        severity = "E"
        if _version_tuple(version) >= (2, 5):
            # ERR-2 location (ERL), ERR-3 HL7 error code (CWE, table 0357), ERR-4 severity
            err = ["ERR", "", loc, f"{err_code}{cs}{text}{cs}HL70357", severity]
        else:
            # ERR-1 error code and location (ELD), used before v2.5
            err = ["ERR", f"{loc}{cs}{err_code}{sc}{text}{sc}HL70357"]
        segments.append(fs.join(err))
    return ("\r".join(segments) + "\r").encode(codec, errors="replace")


def _safe(text: str, fs: str, enc: str) -> str:
    """Keep delimiter characters out of free text we put in a field."""
    for ch in fs + enc:
        text = text.replace(ch, " ")
    return text[:80]


def ack_code(mode: str, ok_code: str) -> str:
    """Map an original-mode code to the code for ``mode`` ("original" or "commit")."""
    return COMMIT_CODES[ok_code] if mode == "commit" else ok_code


def wants_ack(rule: str, code: str) -> bool:
    """Whether an enhanced-mode ACK condition (HL7 table 0155: AL/NE/ER/SU) asks for
    an acknowledgment with ``code``. An empty rule is AL."""
    success = code in ("AA", "CA")
    if rule in ("", "AL"):
        return True
    if rule == "NE":
        return False
    if rule == "ER":
        return not success
    if rule == "SU":
        return success
    return True
