"""The specialist directory: who the practice refers to and how each office is reached.

One row per specialist, keyed by NPI and/or a local id (at least one). Rows come from an
operator import (``refloop specialists import``, source ``import``), an operator's entry by
hand (``refloop specialists set``, source ``operator``) and from referrals
(PRD with role RT, ORC-12 / OBR-16 style fields the routes extract; source
``referral``). A referral only fills what the directory does not know yet: an
operator's curated address, fax number or certificate is never overwritten by a
message.

Plain functions over an open connection, called inside the caller's transaction;
nothing here commits. Only this package runs SQL.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from engine.store.referrals import Conn
from engine.store.sql import Schema, has_table

FIELDS: Final = (
    "npi",
    "local_id",
    "name",
    "organisation",
    "specialty",
    "direct_address",
    "fax",
    "phone",
    "preferred_channel",
    "certificate",
)

_SCHEMA: Final = (
    """CREATE TABLE specialists (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        npi TEXT NOT NULL DEFAULT '',
        local_id TEXT NOT NULL DEFAULT '',
        name TEXT NOT NULL DEFAULT '',
        organisation TEXT NOT NULL DEFAULT '',
        specialty TEXT NOT NULL DEFAULT '',
        direct_address TEXT NOT NULL DEFAULT '',   -- lower-cased
        fax TEXT NOT NULL DEFAULT '',              -- E.164
        phone TEXT NOT NULL DEFAULT '',
        preferred_channel TEXT NOT NULL DEFAULT 'auto',  -- auto | direct | fax
        certificate TEXT NOT NULL DEFAULT '',      -- PEM: the Direct encryption certificate
        source TEXT NOT NULL,                      -- import | referral
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    )""",
    "CREATE UNIQUE INDEX specialists_npi ON specialists (npi) WHERE npi != ''",
    "CREATE UNIQUE INDEX specialists_local_id ON specialists (local_id) WHERE local_id != ''",
    "CREATE INDEX specialists_direct ON specialists (direct_address)",
)


def migrate(db: Schema) -> None:
    """Schema: appended to ``engine.store.migrations.MIGRATIONS``."""
    for statement in _SCHEMA:
        db.execute(statement)


@dataclass(frozen=True, slots=True)
class SpecialistRow:
    id: int
    npi: str
    local_id: str
    name: str
    organisation: str
    specialty: str
    direct_address: str
    fax: str
    phone: str
    preferred_channel: str
    certificate: str
    source: str
    created_at: float
    updated_at: float


_COLUMNS: Final = "id, " + ", ".join(FIELDS) + ", source, created_at, updated_at"


def _row(r: Sequence[Any]) -> SpecialistRow:
    text = [str(v) for v in r[1:12]]
    return SpecialistRow(
        id=int(r[0]),
        npi=text[0],
        local_id=text[1],
        name=text[2],
        organisation=text[3],
        specialty=text[4],
        direct_address=text[5],
        fax=text[6],
        phone=text[7],
        preferred_channel=text[8],
        certificate=text[9],
        source=text[10],
        created_at=float(r[12]),
        updated_at=float(r[13]),
    )


def find(conn: Conn, *, npi: str = "", local_id: str = "") -> SpecialistRow | None:
    """The row with this NPI, else with this local id."""
    for column, value in (("npi", npi), ("local_id", local_id)):
        if value:
            # ``!= ''`` as in the partial unique indexes, so SQLite can use them (without it
            # each referral's look-up read the whole directory)
            r = conn.execute(
                f"SELECT {_COLUMNS} FROM specialists WHERE {column} = ? AND {column} != ''",
                (value,),
            ).fetchone()
            if r is not None:
                return _row(r)
    return None


def find_by_address(conn: Conn, direct_address: str) -> SpecialistRow | None:
    """The (most recently updated) row with this Direct address."""
    if not direct_address:
        return None
    r = conn.execute(
        f"SELECT {_COLUMNS} FROM specialists WHERE direct_address = ? "
        "ORDER BY updated_at DESC, id DESC LIMIT 1",
        (direct_address.strip().lower(),),
    ).fetchone()
    return _row(r) if r else None


def certificate_for(conn: Conn, direct_address: str) -> str:
    """The PEM certificate the directory holds for a Direct address ('' if none)."""
    r = conn.execute(
        "SELECT certificate FROM specialists WHERE direct_address = ? AND certificate != '' "
        "ORDER BY updated_at DESC, id DESC LIMIT 1",
        (direct_address.strip().lower(),),
    ).fetchone()
    return str(r[0]) if r else ""


def upsert(conn: Conn, values: Mapping[str, str], *, source: str, now: float) -> int:
    """Write one specialist (``values``: :data:`FIELDS`, NPI or local id required).

    ``source="import"`` (the operator's file) and ``source="operator"`` (one entry by hand,
    ``refloop specialists set``) set every given field: the operator's word is the truth;
    ``source="referral"`` only fills fields that are empty. Returns the row id."""
    npi, local_id = values.get("npi", ""), values.get("local_id", "")
    if not npi and not local_id:
        raise ValueError("a specialist needs an NPI or a local id")
    existing = find(conn, npi=npi, local_id=local_id)
    given = {k: v for k, v in values.items() if k in FIELDS and v}
    if existing is None:
        cols = [*given, "source", "created_at", "updated_at"]
        cur = conn.execute(
            f"INSERT INTO specialists ({', '.join(cols)}) "
            f"VALUES ({', '.join('?' * len(cols))}) RETURNING id",
            (*given.values(), source, now, now),
        )
        return int(cur.fetchone()[0])
    if source == "referral":
        given = {k: v for k, v in given.items() if not getattr(existing, k)}
    changes = {k: v for k, v in given.items() if getattr(existing, k) != v}
    if changes:
        sets = ", ".join(f"{k} = ?" for k in changes)
        extra = ", source = ?" if source != "referral" else ""
        args: list[Any] = [*changes.values(), *([source] if extra else []), now, existing.id]
        conn.execute(f"UPDATE specialists SET {sets}{extra}, updated_at = ? WHERE id = ?", args)
    return existing.id


def listing(conn: Conn, *, limit: int = 0) -> list[SpecialistRow]:
    sql = f"SELECT {_COLUMNS} FROM specialists ORDER BY name, id"
    args: list[Any] = []
    if limit:
        sql += " LIMIT ?"
        args.append(limit)
    return [_row(r) for r in conn.execute(sql, args).fetchall()]


def table_exists(conn: Conn) -> bool:
    return has_table(conn, "specialists")
