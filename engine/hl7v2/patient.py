"""Who a message is about, for people to find the referral: the patient's MRN, name and
birth date from PID (HL7 v2.5.1 §3.4.2) and, for FHIR, from a Patient resource.

Pure: no I/O. The values are PHI: they go to the referral row (engine.store.referral_search)
and to signed-in users, never to logs, metric labels or URLs.

- mrn: PID-3, the repetition whose CX.5 is ``MR``, else the first; FHIR: the identifier
  typed ``MR``, else the first.
- family: PID-5.1.1 (the first XPN repetition); FHIR: ``name[0].family``.
- given: PID-5.2, then PID-5.3 (middle) after a space; FHIR: ``name[0].given`` joined.
- birth_date: PID-7 as ``YYYY-MM-DD`` (a full date only); FHIR: ``birthDate`` likewise.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from engine.hl7v2.message import Message

_DATE: Final = re.compile(r"^(\d{4})-?(\d{2})-?(\d{2})")


@dataclass(frozen=True, slots=True)
class Demographics:
    mrn: str = ""
    family: str = ""
    given: str = ""
    birth_date: str = ""  # ISO date

    def __bool__(self) -> bool:
        return bool(self.mrn or self.family or self.given or self.birth_date)


def iso_date(value: str) -> str:
    """``YYYYMMDD…`` or ``YYYY-MM-DD…`` as ``YYYY-MM-DD``; "" for anything else (a year or
    a month alone is not a birth date to search by)."""
    m = _DATE.match(value.strip())
    if not m:
        return ""
    y, mo, d = m.groups()
    return f"{y}-{mo}-{d}" if "01" <= mo <= "12" and "01" <= d <= "31" else ""


def from_hl7(msg: Message) -> Demographics:
    """The first PID's patient (an empty :class:`Demographics` without PID)."""
    if not msg.has("PID"):
        return Demographics()
    ids = [i.strip() for i in msg.get_all("PID.3[*].1")]
    kinds = [k.strip().upper() for k in msg.get_all("PID.3[*].5")]
    mrn = next((i for i, k in zip(ids, kinds, strict=False) if k == "MR" and i), "")
    mrn = mrn or next((i for i in ids if i), "")
    given = " ".join(p for p in (msg.get("PID.5.2").strip(), msg.get("PID.5.3").strip()) if p)
    return Demographics(
        mrn=mrn,
        family=msg.get("PID.5.1.1").strip() or msg.get("PID.5.1").strip(),
        given=given,
        birth_date=iso_date(msg.get("PID.7.1")),
    )


def from_fhir(resource: Mapping[str, Any]) -> Demographics:
    """A Patient resource, or the Patient contained in ``resource`` (a ServiceRequest
    with ``contained``), or a Bundle's first Patient entry; else empty."""
    patient = _find_patient(resource)
    if patient is None:
        return Demographics()
    names = patient.get("name")
    name = names[0] if isinstance(names, list) and names and isinstance(names[0], dict) else {}
    given = name.get("given")
    idents = [i for i in patient.get("identifier") or () if isinstance(i, dict) and i.get("value")]
    typed = [i for i in idents if _is_mr(i)]
    chosen = (typed or idents or [{}])[0]
    return Demographics(
        mrn=str(chosen.get("value") or ""),
        family=str(name.get("family") or ""),
        given=" ".join(str(g) for g in given) if isinstance(given, list) else "",
        birth_date=iso_date(str(patient.get("birthDate") or "")),
    )


def _is_mr(identifier: Mapping[str, Any]) -> bool:
    kind = identifier.get("type")
    codings = kind.get("coding") if isinstance(kind, dict) else None
    return any(isinstance(c, dict) and c.get("code") == "MR" for c in codings or ())


def _find_patient(resource: Mapping[str, Any]) -> Mapping[str, Any] | None:
    if resource.get("resourceType") == "Patient":
        return resource
    for inner in resource.get("contained") or ():
        if isinstance(inner, dict) and inner.get("resourceType") == "Patient":
            return inner
    for entry in resource.get("entry") or ():
        inner = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(inner, dict) and inner.get("resourceType") == "Patient":
            return inner
    return None
