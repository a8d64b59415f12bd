"""The specialist directory as the engine uses it: the CSV import, the views the CLI
shows, what a referral teaches the directory, and the routing rule for the packet.

Routing rule (docs/direct.md, "Which channel"): the packet goes by **Direct** when the
specialist has a Direct address **and** the directory holds an encryption certificate for
it (and the office did not ask for fax); else by **e-fax** when there is a fax number;
else a coordinator task "no way to reach the specialist". The fallback after a failed or
unanswered Direct send applies the same rule without Direct.

CSV import (``refloop specialists import FILE.csv``): header row with the columns of
:data:`COLUMNS` (``npi`` or ``local_id`` and ``name`` required). Every row is checked
first (NPI check digit, Direct address syntax, fax number, certificate), and any problem
refuses the whole file with one line per problem naming ``FILE:LINE``; otherwise all rows
are written in one transaction (never half an import).
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from channels.direct.smime import bound_to
from engine.clock import Clock, isoformat
from engine.errors import ConfigError, StoreError
from engine.store import audit as audit_store
from engine.store import specialists as store
from engine.store.db import Database
from engine.store.referrals import Conn
from engine.store.specialists import SpecialistRow

COLUMNS: Final = store.FIELDS
PREFERRED: Final = ("", "auto", "direct", "fax")
# NPI check digit: Luhn over the 9 digits prefixed with 80840 (the card issuer prefix for
# health applications), CMS "Requirements for NPI check digit" (2005).
NPI_PREFIX: Final = "80840"
_ADDRESS: Final = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@([A-Za-z0-9-]+\.)+[A-Za-z]{2,}$")
_PEM: Final = "-----BEGIN CERTIFICATE-----"
NO_WAY_TEMPLATE: Final = "no-way-to-reach-specialist"

PacketChannel = Literal["direct", "fax", "task"]


# ---------------------------------------------------------------------------
# Field rules (pure)


def npi_valid(npi: str) -> bool:
    """Ten digits whose last is the Luhn check digit of ``80840`` + the first nine."""
    if len(npi) != 10 or not npi.isdigit():
        return False
    digits = [int(c) for c in NPI_PREFIX + npi[:9]]
    total = 0
    for i, d in enumerate(reversed(digits)):  # double every second digit from the right
        if i % 2 == 0:
            d *= 2
            d = d - 9 if d > 9 else d
        total += d
    return (10 - total % 10) % 10 == int(npi[9])


def direct_address_valid(address: str) -> bool:
    """``local@domain.tld`` (Direct addresses are RFC 5321 mailboxes)."""
    return bool(_ADDRESS.fullmatch(address.strip())) and len(address) <= 254


def normalise_fax(number: str) -> str:
    """A fax number as E.164 (``+15555550100``), or '' when it is not one. Punctuation
    is dropped; ten digits are read as a NANP number (+1)."""
    text = number.strip()
    plus = text.startswith("+")
    digits = re.sub(r"[\s().\-/]", "", text.lstrip("+"))
    if not digits.isdigit():
        return ""
    if not plus:
        if len(digits) == 10:
            digits = "1" + digits
        elif not (len(digits) == 11 and digits.startswith("1")):
            return ""
    if not 8 <= len(digits) <= 15 or digits.startswith("0"):
        return ""
    return "+" + digits


def load_certificate(value: str, base: Path) -> x509.Certificate:
    """Inline PEM, or the path of a PEM file (relative paths from ``base``). Raises
    ``ValueError`` with a short reason."""
    text = value.strip()
    if _PEM in text:
        data = text.encode()
    else:
        path = Path(text)
        if not path.is_absolute():
            path = base / path
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read certificate file {text} ({exc.strerror})") from None
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise ValueError("not a PEM certificate") from None


def certificate_summary(pem: str) -> dict[str, str] | None:
    if not pem:
        return None
    try:
        cert = x509.load_pem_x509_certificate(pem.encode())
    except ValueError:
        return {"error": "unreadable"}
    der = cert.public_bytes(serialization.Encoding.DER)
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "not_after": cert.not_valid_after_utc.isoformat().replace("+00:00", "Z"),
        "sha256": hashlib.sha256(der).hexdigest(),
    }


# ---------------------------------------------------------------------------
# CSV import


@dataclass(frozen=True, slots=True)
class ImportSummary:
    rows: int
    added: int
    updated: int
    unchanged: int


def _check_row(raw: Mapping[str, str], base: Path, now: float) -> tuple[dict[str, str], list[str]]:
    """One CSV row → (values, problems as ``column: message``)."""
    row = {k: (raw.get(k) or "").strip() for k in COLUMNS}
    problems: list[str] = []
    if not row["npi"] and not row["local_id"]:
        problems.append("npi: an NPI or a local_id is required")
    if row["npi"] and not npi_valid(row["npi"]):
        problems.append("npi: not a valid NPI (10 digits with the Luhn check digit)")
    if not row["name"]:
        problems.append("name: is required")
    if row["direct_address"]:
        if not direct_address_valid(row["direct_address"]):
            problems.append("direct_address: not a Direct address (local@domain)")
        row["direct_address"] = row["direct_address"].lower()
    if row["fax"]:
        fax = normalise_fax(row["fax"])
        if not fax:
            problems.append("fax: not a fax number (E.164, e.g. +15555550100)")
        row["fax"] = fax
    if row["preferred_channel"] not in PREFERRED:
        problems.append("preferred_channel: must be auto, direct or fax")
    row["preferred_channel"] = row["preferred_channel"] or "auto"
    if row["certificate"]:
        try:
            cert = load_certificate(row["certificate"], base)
        except ValueError as exc:
            problems.append(f"certificate: {exc}")
        else:
            row["certificate"] = cert.public_bytes(serialization.Encoding.PEM).decode()
            if not row["direct_address"]:
                problems.append("certificate: needs a direct_address")
            elif not bound_to(cert, row["direct_address"]):
                problems.append("certificate: is not issued for this direct_address")
            if cert.not_valid_after_utc.timestamp() <= now:
                problems.append("certificate: has expired")
    if row["preferred_channel"] == "direct" and not (row["direct_address"] and row["certificate"]):
        problems.append("preferred_channel: direct needs a direct_address and a certificate")
    if row["preferred_channel"] == "fax" and not row["fax"]:
        problems.append("preferred_channel: fax needs a fax number")
    return row, problems


def read_csv(path: Path, *, now: float) -> list[dict[str, str]]:
    """Read and check every row; raises :class:`ConfigError` listing every problem as
    ``FILE:LINE: column: message`` (nothing is written)."""
    problems: list[str] = []
    rows: list[dict[str, str]] = []
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read ({type(exc).__name__})") from None
    reader = csv.reader(text.splitlines(keepends=True))
    try:
        header = [h.strip().lower() for h in next(reader)]
    except StopIteration:
        raise ConfigError(f"{path}:1: empty file (a header row is required)") from None
    except csv.Error as exc:
        raise ConfigError(f"{path}:1: {exc}") from None
    unknown = [h for h in header if h not in COLUMNS]
    if unknown:
        problems.append(f"{path}:1: unknown column(s) {', '.join(unknown)}")
    if "name" not in header or not ({"npi", "local_id"} & set(header)):
        problems.append(f"{path}:1: the header needs name and npi or local_id")
    if len(set(header)) != len(header):
        problems.append(f"{path}:1: a column appears twice")
    seen: dict[tuple[str, str], int] = {}
    line = reader.line_num + 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            problems.append(f"{path}:{line}: {exc}")
            break
        if not any(c.strip() for c in cells):
            line = reader.line_num + 1
            continue
        if len(cells) > len(header):
            problems.append(f"{path}:{line}: more cells than the header has columns")
        row, found = _check_row(dict(zip(header, cells, strict=False)), path.parent, now)
        problems += [f"{path}:{line}: {p}" for p in found]
        for key in ("npi", "local_id"):
            if row[key]:
                first = seen.setdefault((key, row[key]), line)
                if first != line:
                    problems.append(f"{path}:{line}: {key}: same as line {first}")
        rows.append(row)
        line = reader.line_num + 1
    if problems:
        raise ConfigError(problems)
    return rows


def import_csv(db: Database, path: Path, clock: Clock, *, actor: str = "operator") -> ImportSummary:
    """Check the whole file, then write every row in one transaction (audited)."""
    now = clock.now()
    rows = read_csv(path, now=now)
    added = updated = 0
    with db.transaction() as conn:
        for row in rows:
            before = store.find(conn, npi=row["npi"], local_id=row["local_id"])
            store.upsert(conn, row, source="import", now=now)
            after = store.find(conn, npi=row["npi"], local_id=row["local_id"])
            if before is None:
                added += 1
            elif after != before:
                updated += 1
        audit_store.append(
            conn,
            at=isoformat(now),
            actor=actor,
            action="specialists-import",
            referral_id=None,
            message_id=None,
            detail={"rows": len(rows), "added": added, "updated": updated},
        )
    return ImportSummary(len(rows), added, updated, len(rows) - added - updated)


# ---------------------------------------------------------------------------
# One entry by hand


SETTABLE: Final = ("name", "organisation", "specialty", "direct_address", "fax", "phone",
                   "preferred_channel")  # fmt: skip


def set_specialist(
    db: Database, key: str, values: Mapping[str, str], clock: Clock, *, actor: str = "operator"
) -> dict[str, Any]:
    """Record what a coordinator learnt about one office (``refloop specialists set``):
    typically the fax number they found when they faxed a packet by hand, so the next
    referral to that office goes by itself (docs/direct.md, "Which channel"). ``key`` is
    the NPI or local id; a specialist not in the directory yet is added (a valid NPI is
    taken as the NPI, anything else as a local id; ``name`` is then required). The
    fields are checked as an import checks them; the entry is the operator's word
    (source ``operator``: a referral never overwrites it). Audited
    (``specialist-set``). Raises :class:`ConfigError` listing every problem."""
    key = key.strip()
    unknown = sorted(set(values) - set(SETTABLE))
    if unknown:
        raise ConfigError(f"cannot set {', '.join(unknown)}")
    given = {k: v.strip() for k, v in values.items() if v is not None and v.strip()}
    if not key:
        raise ConfigError("give the specialist's NPI or local id")
    if not given:
        raise ConfigError("nothing to set (give --fax, --direct-address, --name, ...)")
    now = clock.now()
    with db.transaction() as conn:
        if not store.table_exists(conn):
            raise StoreError(
                "this database has no specialist directory yet (start refloop run once)"
            )
        existing = store.find(conn, npi=key, local_id=key)
        ids = (
            {"npi": existing.npi, "local_id": existing.local_id}
            if existing
            else ({"npi": key, "local_id": ""} if npi_valid(key) else {"npi": "", "local_id": key})
        )
        row = {k: "" for k in COLUMNS}
        if existing is not None:
            row.update({k: str(getattr(existing, k)) for k in COLUMNS if k != "certificate"})
        row.update(ids)
        row.update(given)
        row["certificate"] = ""  # checked apart: a set never touches the certificate
        checked, problems = _check_row(row, Path("."), now)
        if existing is not None and existing.certificate:
            # the preferred-channel rule sees the certificate the directory holds
            problems = [p for p in problems if not p.startswith("preferred_channel: direct")]
        if problems:
            raise ConfigError(problems)
        write = {**ids, **{k: checked[k] for k in given}}
        rid = store.upsert(conn, write, source="operator", now=now)
        audit_store.append(
            conn,
            at=isoformat(now),
            actor=actor,
            action="specialist-set",
            referral_id=None,
            message_id=None,
            detail={"specialist": rid, "fields": sorted(given)},
        )
        after = store.find(conn, npi=ids["npi"], local_id=ids["local_id"])
    assert after is not None
    return as_dict(after)


# ---------------------------------------------------------------------------
# Views (CLI, API)


def as_dict(row: SpecialistRow, *, full: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": row.id,
        "npi": row.npi,
        "local_id": row.local_id,
        "name": row.name,
        "organisation": row.organisation,
        "specialty": row.specialty,
        "direct_address": row.direct_address,
        "fax": row.fax,
        "phone": row.phone,
        "preferred_channel": row.preferred_channel,
        "has_certificate": bool(row.certificate),
        "source": row.source,
        "updated_at": isoformat(row.updated_at),
    }
    if full:
        out["certificate"] = certificate_summary(row.certificate)
        out["created_at"] = isoformat(row.created_at)
    return out


def list_specialists(db: Database, *, limit: int = 0) -> list[dict[str, Any]]:
    if not store.table_exists(db.conn):
        raise StoreError("this database has no specialist directory yet (start refloop run once)")
    return [as_dict(r) for r in store.listing(db.conn, limit=limit)]


def show_specialist(db: Database, key: str) -> dict[str, Any] | None:
    """One specialist by NPI, local id or Direct address."""
    if not store.table_exists(db.conn):
        raise StoreError("this database has no specialist directory yet (start refloop run once)")
    row = store.find(db.conn, npi=key, local_id=key) or store.find_by_address(db.conn, key)
    return as_dict(row, full=True) if row else None


# ---------------------------------------------------------------------------
# Referrals teach the directory; the routing rule


def learn_from_referral(conn: Conn, details: Mapping[str, Any], now: float) -> None:
    """Fill the directory from a referral's specialist details (PRD(RT) and the like);
    only fields the directory does not know yet, and only with an NPI to key them."""
    npi = str(details.get("specialist_npi") or "").strip()
    if not npi:
        return
    address = str(details.get("specialist_direct_address") or "").strip().lower()
    values = {
        "npi": npi,
        "name": str(details.get("specialist_name") or ""),
        "organisation": str(details.get("specialist_organisation") or ""),
        "specialty": str(details.get("specialty") or ""),
        "direct_address": address if direct_address_valid(address) else "",
        "fax": normalise_fax(str(details.get("specialist_fax") or "")),
        "phone": str(details.get("specialist_phone") or ""),
    }
    store.upsert(conn, values, source="referral", now=now)


@dataclass(frozen=True, slots=True)
class PacketRoute:
    """Where the packet goes: ``channel`` and the address on it (``""`` for a task), and
    ``why`` (a code for the timeline: ``direct``, ``fax``, ``no-certificate``, ...)."""

    channel: PacketChannel
    address: str
    why: str


def _directory_entry(conn: Conn, details: Mapping[str, Any]) -> tuple[SpecialistRow | None, str]:
    """The referral's specialist in the directory (by NPI, else by the referral's Direct
    address) and their Direct address (the directory's, else the referral's)."""
    npi = str(details.get("specialist_npi") or "").strip()
    referral_address = str(details.get("specialist_direct_address") or "").strip().lower()
    entry = store.find(conn, npi=npi) if npi else None
    if entry is None and referral_address:
        entry = store.find_by_address(conn, referral_address)
    return entry, (entry.direct_address if entry else "") or referral_address


def direct_address(conn: Conn, details: Mapping[str, Any]) -> str:
    """The specialist's Direct address for a referral as the routing rule reads it ('' if
    none): where its packet goes by Direct, so the one address that may answer it."""
    return _directory_entry(conn, details)[1]


def packet_route(
    conn: Conn,
    details: Mapping[str, Any],
    *,
    without_direct: bool = False,
    served: Collection[str] | None = None,
) -> PacketRoute:
    """The routing rule for the specialist packet (module docstring). ``served``: the
    channel names something serves (None: all); a ``direct`` or ``fax`` channel routes.yaml
    does not configure is treated as absent (why ``no-channel`` when that leaves none)."""

    def serves(channel: str) -> bool:
        return served is None or channel in served

    entry, address = _directory_entry(conn, details)
    cert = ""
    if address:
        cert = (entry.certificate if entry and entry.direct_address == address else "") or (
            store.certificate_for(conn, address)
        )
    fax = (entry.fax if entry else "") or normalise_fax(str(details.get("specialist_fax") or ""))
    by_fax = bool(fax) and serves("fax")
    prefers_fax = entry is not None and entry.preferred_channel == "fax" and by_fax
    if not without_direct and address and cert and not prefers_fax and serves("direct"):
        return PacketRoute("direct", address, "direct")
    if by_fax:
        return PacketRoute("fax", fax, "fax")
    if without_direct:
        return PacketRoute("task", "", "direct-failed-no-fax")
    if fax or (address and cert):
        return PacketRoute("task", "", "no-channel")
    return PacketRoute("task", "", "no-certificate" if address else "no-address")


def certificate_lookup(db: Database) -> Callable[[str], x509.Certificate | None]:
    """``DirectChannel(certificate_for=...)``: the directory's certificate for a Direct
    address, read at send time (an import takes effect without a restart)."""

    def lookup(address: str) -> x509.Certificate | None:
        pem = store.certificate_for(db.conn, address)
        if not pem:
            return None
        try:
            return x509.load_pem_x509_certificate(pem.encode())
        except ValueError:
            return None

    return lookup
