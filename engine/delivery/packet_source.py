"""Read a referral-carrying HL7 v2 message (REF^I12, ORM^O01, OMG^O19) into the
:class:`~engine.model.PacketData` the specialist packet shows.

This lives in ``engine/`` because channels never read HL7 (STYLE.md, Layers); the PDF is
rendered by :mod:`channels.packet`. Pure: no I/O, no clock.

Where each field comes from (HL7 v2.5.1-v2.8 chapters 4 and 11), first non-empty wins.
The reason, urgency and needed-by date the route recorded on the referral replace these
(``engine.delivery.packet``); this order, the shipped routes' own, is the fallback:

| field          | REF                      | ORM / OMG                                   |
|----------------|--------------------------|---------------------------------------------|
| referral_id    | RF1-6                    | ORC-2, OBR-2                                |
| reason         | OBR-31, RF1-10 (t. 0336) | OBR-31, ORC-16, DG1-4 / DG1-3, then OBR-4   |
| urgency        | RF1-2 (table 0280)       | TQ1-9, ORC-7.6, OBR-27.6, OBR-5             |
| referring      | PRD(RP)                  | ORC-12 / ORC-14, OBR-16 / OBR-17            |
| specialist     | PRD(RT)                  | —                                           |
| notes          | every NTE-3              | every NTE-3                                 |
| observations   | OBX text values          | OBX text values                             |
| attachments    | OBX ED base64 PDFs       | OBX ED base64 PDFs (byte-exact)             |
| insurance      | every IN1                | every IN1                                   |
"""

from __future__ import annotations

import base64
import binascii
from typing import Final

from engine.hl7v2.message import Message
from engine.model import Attachment, Insurance, PacketData, Provider

DEFAULT_CONFIRMATION: Final = (
    "Please confirm receipt of this referral by replying to this message, "
    "or call the referring office."
)
# HL7 table 0280 (referral priority) and table 0485 / 0027 (order priority) → our three.
_URGENCY: Final[dict[str, str]] = {
    "S": "stat",
    "STAT": "stat",
    "A": "urgent",
    "ASAP": "urgent",
    "U": "urgent",
    "URGENT": "urgent",
    "P": "routine",
    "R": "routine",
    "ROUTINE": "routine",
    "T": "routine",
    "C": "routine",
}
# OBX-2 value types whose OBX-5 is shown as text (HL7 table 0125).
_TEXT_TYPES: Final = frozenset({"ST", "TX", "FT", "NM", "SN", "CE", "CWE", "CNE", "DT", "TS"})
_PDF_MAGIC: Final = b"%PDF-"


def packet_data_from_hl7(
    raw: bytes,
    *,
    confirmation_line: str = DEFAULT_CONFIRMATION,
    confirmation_url: str = "",
) -> PacketData:
    """The packet for one message. Raises :class:`~engine.errors.MessageRejected` only
    when MSH is unreadable; missing fields are left empty, never guessed."""
    msg = Message(raw)
    ed_docs, observations = _observations(msg)
    return PacketData(
        referral_id=_first(msg, "RF1.6.1", "ORC.2.1", "OBR.2.1"),
        message_type=msg.msh.message_type,
        referral_date=_iso_date(_first(msg, "RF1.7", "ORC.9", "MSH.7")),
        specialty=_first(msg, "RF1.3.2", "RF1.3.1", "OBR.24"),
        service=_first(msg, "OBR.4.2", "OBR.4.1"),
        reason=_first(
            msg,
            "OBR.31.2",
            "OBR.31.1",
            "RF1.10.2",
            "RF1.10.1",
            "ORC.16.2",
            "ORC.16.1",
            "DG1.4",
            "DG1.3.2",
            "DG1.3.1",
            "OBR.4.2",
            "OBR.4.1",
        ),
        urgency=_URGENCY.get(
            _first(msg, "RF1.2.1", "TQ1.9.1", "ORC.7.6", "OBR.27.6", "OBR.5").upper(), "routine"
        ),
        needed_by=_iso_date(_first(msg, "RF1.8")),
        patient_name=_person(msg, "PID.5"),
        patient_birth_date=_iso_date(_first(msg, "PID.7")),
        patient_sex=_first(msg, "PID.8"),
        patient_ids=tuple(f"{pid.split('^')[0]}" for pid in msg.get_all("PID.3[*]") if pid),
        patient_phone=_phone(msg, "PID.13"),
        referring=_referring(msg),
        specialist=_prd(msg, "RT"),
        diagnoses=_diagnoses(msg),
        notes=tuple(n for n in _each(msg, "NTE", "3") if n.strip()),
        observations=observations,
        insurance=_insurance(msg),
        confirmation_line=confirmation_line,
        confirmation_url=confirmation_url,
        attachments=ed_docs,
    )


def _first(msg: Message, *paths: str) -> str:
    """The first non-empty value among ``paths``."""
    for p in paths:
        v = msg.get(p).strip()
        if v:
            return v
    return ""


def _each(msg: Message, segment: str, path: str) -> list[str]:
    """``segment[n].path`` for every occurrence of ``segment``, in order."""
    count = msg.segment_names().count(segment)
    return [msg.get(f"{segment}[{i}].{path}") for i in range(1, count + 1)]


def _iso_date(value: str) -> str:
    digits = value.strip()[:8]
    if len(digits) == 8 and digits.isdigit():
        return f"{digits[:4]}-{digits[4:6]}-{digits[6:]}"
    return ""


def _person(msg: Message, path: str, offset: int = 0) -> str:
    """XPN (or the name part of XCN when ``offset`` is 1) as "Prefix Given Middle Family
    Suffix, Degree"."""

    def comp(n: int) -> str:
        return msg.get(f"{path}.{n + offset}.1").strip()

    family, given, middle, suffix, prefix, degree = (comp(n) for n in range(1, 7))
    name = " ".join(p for p in (prefix, given, middle, family, suffix) if p)
    return f"{name}, {degree}" if name and degree else name


def _phone(msg: Message, path: str) -> str:
    """XTN: unformatted number (comp 12, v2.7+), else formatted (comp 1), else
    area + local (comps 6, 7)."""
    for candidate in (msg.get(f"{path}.12"), msg.get(f"{path}.1")):
        if candidate.strip():
            return candidate.strip()
    area, local = msg.get(f"{path}.6").strip(), msg.get(f"{path}.7").strip()
    return f"({area}) {local}" if area and local else local


def _prd(msg: Message, role: str) -> Provider:
    seg = f"PRD({role})"
    if not msg.get(f"{seg}.1"):
        return Provider()
    return Provider(
        name=_person(msg, f"{seg}.2"),
        npi=msg.get(f"{seg}.7.1").strip(),
        organisation=(
            msg.get(f"{seg}.4.9") or msg.get(f"{seg}.4.4") or msg.get(f"{seg}.10")
        ).strip(),
        phone=_phone(msg, f"{seg}.5"),
    )


def _referring(msg: Message) -> Provider:
    prd = _prd(msg, "RP")
    if prd.name:
        return prd
    for who, phone in (("ORC.12", "ORC.14"), ("OBR.16", "OBR.17")):
        if msg.get(f"{who}.2") or msg.get(f"{who}.1"):
            return Provider(
                name=_person(msg, who, offset=1),
                npi=msg.get(f"{who}.1").strip(),
                phone=_phone(msg, phone),
            )
    return Provider()


def _diagnoses(msg: Message) -> tuple[str, ...]:
    out = []
    count = msg.segment_names().count("DG1")
    for i in range(1, count + 1):
        code = msg.get(f"DG1[{i}].3.1").strip()
        text = (msg.get(f"DG1[{i}].3.2") or msg.get(f"DG1[{i}].4")).strip()
        line = " ".join(p for p in (code, text) if p)
        if line:
            out.append(line)
    return tuple(out)


def _observations(msg: Message) -> tuple[tuple[Attachment, ...], tuple[str, ...]]:
    docs: list[Attachment] = []
    lines: list[str] = []
    count = msg.segment_names().count("OBX")
    for i in range(1, count + 1):
        seg = f"OBX[{i}]"
        vtype = msg.get(f"{seg}.2").strip().upper()
        if vtype == "ED":
            data = _ed_pdf(msg, seg)
            if data is not None:
                docs.append(
                    Attachment(
                        filename=f"document-{len(docs) + 1}.pdf",
                        content_type="application/pdf",
                        data=data,
                    )
                )
            continue
        if vtype not in _TEXT_TYPES:
            continue
        label = (msg.get(f"{seg}.3.2") or msg.get(f"{seg}.3.1")).strip()
        if vtype in ("CE", "CWE", "CNE"):
            values = [msg.get(f"{seg}.5.2") or msg.get(f"{seg}.5.1")]
        else:
            values = msg.get_all(f"{seg}.5[*]")
        value = " ".join(v.strip() for v in values if v.strip())
        unit = msg.get(f"{seg}.6.1").strip()
        if value:
            lines.append(f"{label}: {value}{' ' + unit if unit else ''}" if label else value)
    return tuple(docs), tuple(lines)


def _ed_pdf(msg: Message, seg: str) -> bytes | None:
    """OBX-5 ED (source^type^subtype^encoding^data) holding a base64 PDF, decoded."""
    if msg.get(f"{seg}.5.4").strip().upper() not in ("BASE64", "B64"):
        return None
    text = "".join(msg.get(f"{seg}.5.5").split())
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    if msg.get(f"{seg}.5.3").strip().upper() == "PDF" or data.startswith(_PDF_MAGIC):
        return data if data.startswith(_PDF_MAGIC) else None
    return None


def _insurance(msg: Message) -> tuple[Insurance, ...]:
    out = []
    count = msg.segment_names().count("IN1")
    for i in range(1, count + 1):
        seg = f"IN1[{i}]"
        out.append(
            Insurance(
                plan=(msg.get(f"{seg}.2.2") or msg.get(f"{seg}.2.1")).strip(),
                company=msg.get(f"{seg}.4.1").strip(),
                group_number=msg.get(f"{seg}.8.1").strip(),
                policy_number=msg.get(f"{seg}.36.1").strip(),
                insured=_person(msg, f"{seg}.16"),
            )
        )
    return tuple(out)
