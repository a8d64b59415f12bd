"""Referral storage: referrals, their events, parked events, prior-auth work items,
timers and the transactional outbox.

The narrow interface the tracker uses (and a PostgreSQL implementation would provide):
plain functions over an open connection, called **inside the caller's transaction**;
nothing here commits. Values cross this boundary as the frozen rows below or as plain
JSON-able dicts; SQL stays in this module.

Timers and outbox rows are only written here (the timer and dispatch issues read them):
each has a UNIQUE key, so writing one twice changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from engine.canonical import canonical_text, digest
from engine.errors import StoreError
from engine.store import notify
from engine.store.referral_filter import ReferralFilter
from engine.store.referral_filter import where as referral_where
from engine.store.referral_search import PATIENT_COLUMNS
from engine.store.sql import POSTGRESQL, Conn, dialect, has_table

__all__ = ["Conn"]  # the connection type callers pass in (only the store names a driver)

# Columns a referral row keeps besides its keys, state and times. Details (providers,
# specialty, reason, ...) and contact fields move per field, latest event time wins.
DETAIL_COLUMNS: Final = (
    "specialty",
    "specialty_category",
    "reason",
    "priority",
    "needed_by",
    "referring_name",
    "referring_npi",
    "referring_organisation",
    "referring_direct_address",
    "referring_fax",
    "referring_phone",
    "specialist_name",
    "specialist_npi",
    "specialist_organisation",
    "specialist_direct_address",
    "specialist_fax",
    "specialist_phone",
    "referring_reference",
    "patient_phone",
    "sms_consent",
    "portal",
    "language",
    "time_zone",
)
# A new referral's details before any event states one (the columns' defaults).
BLANK_DETAILS: Final[Mapping[str, Any]] = {
    name: None if name in ("sms_consent", "portal") else "" for name in DETAIL_COLUMNS
}

_SCHEMA: Final = (
    """CREATE TABLE referrals (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        sending_facility TEXT NOT NULL DEFAULT '',
        placer_number TEXT NOT NULL,
        placer_authority TEXT NOT NULL DEFAULT '',  -- EI.2 of the placer number, if stated
        state TEXT NOT NULL,              -- engine.tracking.states.to_dict as JSON
        status TEXT NOT NULL,             -- derived from state, kept for queries
        patient_status TEXT NOT NULL,
        specialist_status TEXT NOT NULL,
        close_reason TEXT NOT NULL DEFAULT '',
        specialty TEXT NOT NULL DEFAULT '',
        specialty_category TEXT NOT NULL DEFAULT '',
        reason TEXT NOT NULL DEFAULT '',
        priority TEXT NOT NULL DEFAULT '',
        needed_by TEXT NOT NULL DEFAULT '',
        referring_name TEXT NOT NULL DEFAULT '',
        referring_npi TEXT NOT NULL DEFAULT '',
        referring_organisation TEXT NOT NULL DEFAULT '',
        referring_direct_address TEXT NOT NULL DEFAULT '',
        referring_fax TEXT NOT NULL DEFAULT '',
        referring_phone TEXT NOT NULL DEFAULT '',
        specialist_name TEXT NOT NULL DEFAULT '',
        specialist_npi TEXT NOT NULL DEFAULT '',
        specialist_organisation TEXT NOT NULL DEFAULT '',
        specialist_direct_address TEXT NOT NULL DEFAULT '',
        specialist_fax TEXT NOT NULL DEFAULT '',
        specialist_phone TEXT NOT NULL DEFAULT '',
        referring_reference TEXT NOT NULL DEFAULT '',  -- FHIR requester (Practitioner/…)
        patient_phone TEXT NOT NULL DEFAULT '',
        sms_consent INTEGER,              -- NULL: never stated
        portal INTEGER,
        language TEXT NOT NULL DEFAULT '',
        time_zone TEXT NOT NULL DEFAULT '',
        versions TEXT NOT NULL DEFAULT '{}',  -- per detail column: [event time, message id]
        opened_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        closed_at REAL,
        UNIQUE (sending_facility, placer_number)
    )""",
    "CREATE INDEX referrals_placer ON referrals (placer_number)",
    "CREATE INDEX referrals_status ON referrals (status, opened_at)",
    "CREATE INDEX referrals_specialty ON referrals (specialty)",
    """CREATE TABLE referral_fillers (
        referral_id INTEGER NOT NULL REFERENCES referrals (id),
        filler_number TEXT NOT NULL,
        PRIMARY KEY (referral_id, filler_number)
    )""",
    "CREATE INDEX referral_fillers_number ON referral_fillers (filler_number)",
    """CREATE TABLE referral_patients (
        referral_id INTEGER NOT NULL REFERENCES referrals (id),
        patient_id TEXT NOT NULL,         -- as received: id^^^authority
        PRIMARY KEY (referral_id, patient_id)
    )""",
    "CREATE INDEX referral_patients_id ON referral_patients (patient_id)",
    """CREATE TABLE patient_merges (
        retired_id TEXT PRIMARY KEY,
        surviving_id TEXT NOT NULL,
        message_id INTEGER,
        merged_at REAL NOT NULL
    )""",
    """CREATE TABLE referral_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        referral_id INTEGER NOT NULL REFERENCES referrals (id),
        kind TEXT NOT NULL,
        message_id INTEGER,               -- NULL for operator and internal events
        fingerprint TEXT NOT NULL,        -- sha256 of the whole event
        source TEXT NOT NULL,             -- message | operator | internal | link
        actor TEXT NOT NULL,
        occurred_at REAL NOT NULL,        -- the event's own time
        recorded_at REAL NOT NULL,
        changed INTEGER NOT NULL,
        status TEXT NOT NULL,             -- overall status after the event
        patient_status TEXT NOT NULL,
        specialist_status TEXT NOT NULL,
        effects TEXT NOT NULL DEFAULT '[]',
        detail TEXT NOT NULL DEFAULT '{}',  -- the event's key fields (ids, appointment, report)
        UNIQUE (referral_id, message_id, kind, fingerprint)
    )""",
    "CREATE INDEX referral_events_referral ON referral_events (referral_id, id)",
    """CREATE TABLE parked (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        message_id INTEGER,
        kind TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        event TEXT NOT NULL,              -- the whole event as JSON, to re-apply on link
        why TEXT NOT NULL,                -- no-match | ambiguous | no-placer-number
        sending_facility TEXT NOT NULL DEFAULT '',
        placer_number TEXT NOT NULL DEFAULT '',
        parked_at REAL NOT NULL,
        status TEXT NOT NULL DEFAULT 'parked',  -- parked | linked | expired (retention)
        referral_id INTEGER REFERENCES referrals (id),
        linked_at REAL,
        linked_by TEXT NOT NULL DEFAULT '',
        UNIQUE (message_id, kind, fingerprint)
    )""",
    "CREATE INDEX parked_status ON parked (status, id)",
    "CREATE INDEX parked_placer ON parked (placer_number)",
    """CREATE TABLE parked_fillers (
        parked_id INTEGER NOT NULL REFERENCES parked (id),
        filler_number TEXT NOT NULL,
        PRIMARY KEY (parked_id, filler_number)
    )""",
    "CREATE INDEX parked_fillers_number ON parked_fillers (filler_number)",
    """CREATE TABLE prior_auth (
        referral_id INTEGER PRIMARY KEY REFERENCES referrals (id),
        status TEXT NOT NULL,             -- required | pending | approved | denied
        hold_packet INTEGER NOT NULL DEFAULT 0,   -- the route holds the packet until approval
        packet_held INTEGER NOT NULL DEFAULT 0,   -- a send-packet is waiting for approval
        auth_number TEXT NOT NULL DEFAULT '',
        decided_version TEXT NOT NULL DEFAULT '',  -- [event time, message id] of the outcome
        decided_by TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    )""",
    "CREATE INDEX prior_auth_status ON prior_auth (status)",
    """CREATE TABLE timers (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        referral_id INTEGER NOT NULL REFERENCES referrals (id),
        kind TEXT NOT NULL,
        due REAL NOT NULL,
        attempt INTEGER NOT NULL DEFAULT 1,
        key TEXT NOT NULL UNIQUE,
        created_at REAL NOT NULL
    )""",
    "CREATE INDEX timers_due ON timers (due)",
    "CREATE INDEX timers_referral ON timers (referral_id, kind)",
    """CREATE TABLE outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        referral_id INTEGER REFERENCES referrals (id),
        channel TEXT NOT NULL,
        template TEXT NOT NULL,
        payload TEXT NOT NULL DEFAULT '{}',
        idempotency_key TEXT NOT NULL UNIQUE,
        due REAL NOT NULL,
        status TEXT NOT NULL DEFAULT 'pending',  -- pending | sent | cancelled | dead
        attempts INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    )""",
    "CREATE INDEX outbox_due ON outbox (status, due)",
    "CREATE INDEX outbox_referral ON outbox (referral_id, status)",
)


def migrate(db: Any) -> None:
    """Schema: appended to ``engine.store.migrations.MIGRATIONS`` (runs inside its transaction)."""
    for statement in _SCHEMA:
        db.execute(statement)


def referral_tables_exist(conn: Conn) -> bool:
    """False on a database from before these tables (opened read-only, not migrated)."""
    return has_table(conn, "referrals") and has_table(conn, "audit")


# ---------------------------------------------------------------------------
# Referrals


@dataclass(frozen=True, slots=True)
class ReferralRow:
    """A referral as stored. ``details`` holds :data:`DETAIL_COLUMNS`; ``state`` is the
    state machine's dict (``engine.tracking.states.to_dict``)."""

    id: int
    sending_facility: str
    placer_number: str
    state: dict[str, Any]
    status: str
    patient_status: str
    specialist_status: str
    close_reason: str
    details: Mapping[str, Any]
    versions: Mapping[str, list[Any]]
    opened_at: float
    updated_at: float
    closed_at: float | None
    filler_numbers: tuple[str, ...] = ()
    patient_ids: tuple[str, ...] = ()

    @property
    def specialty(self) -> str:
        return str(self.details.get("specialty") or "")


_REF_COLUMNS: Final = (
    "id, sending_facility, placer_number, state, status, patient_status, specialist_status, "
    "close_reason, versions, opened_at, updated_at, closed_at, " + ", ".join(DETAIL_COLUMNS)
)


def _referral(conn: Conn, r: Sequence[Any]) -> ReferralRow:
    rid = int(r[0])
    # the filler numbers and patient ids in one read (a round trip each on PostgreSQL)
    keys: dict[str, list[str]] = {"f": [], "p": []}
    for kind, value in conn.execute(
        "SELECT 'f', filler_number FROM referral_fillers WHERE referral_id = ?1 "
        "UNION ALL SELECT 'p', patient_id FROM referral_patients WHERE referral_id = ?1 "
        "ORDER BY 1, 2",
        (rid,),
    ):
        keys[str(kind)].append(str(value))
    return ReferralRow(
        id=rid,
        sending_facility=str(r[1]),
        placer_number=str(r[2]),
        state=json.loads(r[3]),
        status=str(r[4]),
        patient_status=str(r[5]),
        specialist_status=str(r[6]),
        close_reason=str(r[7]),
        versions=json.loads(r[8]),
        opened_at=float(r[9]),
        updated_at=float(r[10]),
        closed_at=None if r[11] is None else float(r[11]),
        details=dict(zip(DETAIL_COLUMNS, r[12:], strict=True)),
        filler_numbers=tuple(keys["f"]),
        patient_ids=tuple(keys["p"]),
    )


def lock_referral(conn: Conn, referral_id: int) -> None:
    """Take referral ``referral_id`` for a read-modify-write (read the row, compute in
    Python, write it back) until the caller's transaction ends: two writers (processing,
    a webhook, a timer, an operator; on a cluster, on different nodes) must not both read
    the old state and the last one win. Call it first, inside the transaction.

    SQLite: every write transaction is BEGIN IMMEDIATE (``Database.transaction``), which
    excludes every other writer until COMMIT, so there is nothing more to take; this only
    refuses to run outside a transaction (where the read and the write would not be
    atomic). PostgreSQL (READ COMMITTED): ``SELECT id FROM referrals WHERE id = %s FOR
    UPDATE``, held to COMMIT; a second writer waits there, then reads the new state."""
    if not conn.in_transaction:
        raise StoreError(f"referral {referral_id}: read-modify-write outside a transaction")
    if dialect(conn) == POSTGRESQL:
        conn.execute("SELECT id FROM referrals WHERE id = ? FOR UPDATE", (referral_id,))


def get_referral_locked(conn: Conn, referral_id: int) -> ReferralRow | None:
    """:func:`lock_referral` and :func:`get_referral` in one statement: the row read
    ``FOR UPDATE`` on PostgreSQL (READ COMMITTED reads the newest version once the lock
    is held: a round trip less per read-modify-write), inside a transaction on both."""
    if not conn.in_transaction:
        raise StoreError(f"referral {referral_id}: read-modify-write outside a transaction")
    lock = " FOR UPDATE OF referrals" if dialect(conn) == POSTGRESQL else ""
    r = conn.execute(
        f"SELECT {_REF_COLUMNS} FROM referrals WHERE id = ?{lock}", (referral_id,)
    ).fetchone()
    return _referral(conn, r) if r else None


def get_referral(conn: Conn, referral_id: int) -> ReferralRow | None:
    r = conn.execute(
        f"SELECT {_REF_COLUMNS} FROM referrals WHERE id = ?", (referral_id,)
    ).fetchone()
    return _referral(conn, r) if r else None


def insert_referral(
    conn: Conn,
    *,
    sending_facility: str,
    placer_number: str,
    state: dict[str, Any],
    statuses: tuple[str, str, str, str],
    opened_at: float,
    now: float,
    placer_authority: str = "",
    details: Mapping[str, Any] | None = None,
    versions: Mapping[str, list[Any]] | None = None,
    closed_at: float | None = None,
    patient: Mapping[str, str] | None = None,
) -> int:
    """A new referral row; ``statuses`` = (status, patient, specialist, close reason);
    ``placer_authority`` is the placer number's EI.2 as the creating message stated it;
    ``details`` (:data:`DETAIL_COLUMNS`) and their ``versions``, and ``patient``
    (``referral_search.patient_columns``), as the creating event states them."""
    extra = {**(details or {}), **(patient or {})}
    for name in extra:
        if name not in DETAIL_COLUMNS and name not in PATIENT_COLUMNS:
            raise ValueError(f"not a referral detail or patient column: {name}")
    names = ", ".join(("", *extra)) if extra else ""
    cur = conn.execute(
        "INSERT INTO referrals (sending_facility, placer_number, placer_authority, state, "
        "status, patient_status, specialist_status, close_reason, versions, opened_at, "
        f"updated_at, closed_at{names}) VALUES ({', '.join('?' * (12 + len(extra)))}) "
        "RETURNING id",
        (
            sending_facility,
            placer_number,
            placer_authority,
            _dumps(state),
            *statuses,
            _dumps(dict(versions or {})),
            opened_at,
            now,
            closed_at,
            *extra.values(),
        ),
    )
    return int(cur.fetchone()[0])


def learn_placer_authority(conn: Conn, referral_id: int, placer_authority: str) -> None:
    """Record the placer number's EI.2 of a referral that had none (created before it
    was recorded, or by a message that did not state it)."""
    conn.execute(
        "UPDATE referrals SET placer_authority = ? WHERE id = ? AND placer_authority = ''",
        (placer_authority, referral_id),
    )


def update_referral(
    conn: Conn,
    referral_id: int,
    *,
    state: dict[str, Any] | None = None,
    statuses: tuple[str, str, str, str] | None = None,
    details: Mapping[str, Any] | None = None,
    versions: Mapping[str, list[Any]] | None = None,
    opened_at: float | None = None,
    updated_at: float | None = None,
    closed_at: float | None = None,
) -> None:
    """Write the given parts of a referral row (``None`` leaves a part as it is)."""
    sets: list[str] = []
    args: list[Any] = []
    if state is not None:
        sets.append("state = ?")
        args.append(_dumps(state))
    if statuses is not None:
        sets.append("status = ?, patient_status = ?, specialist_status = ?, close_reason = ?")
        args.extend(statuses)
    for name, value in (details or {}).items():
        if name not in DETAIL_COLUMNS:
            raise ValueError(f"not a referral detail column: {name}")
        sets.append(f"{name} = ?")
        args.append(value)
    if versions is not None:
        sets.append("versions = ?")
        args.append(_dumps(dict(versions)))
    for name, value in (
        ("opened_at", opened_at),
        ("updated_at", updated_at),
        ("closed_at", closed_at),
    ):
        if value is not None:
            sets.append(f"{name} = ?")
            args.append(value)
    if sets:
        conn.execute(f"UPDATE referrals SET {', '.join(sets)} WHERE id = ?", (*args, referral_id))


def find_by_key(conn: Conn, sending_facility: str, placer_number: str) -> int | None:
    """The referral with exactly this natural key."""
    r = conn.execute(
        "SELECT id FROM referrals WHERE sending_facility = ? AND placer_number = ?",
        (sending_facility, placer_number),
    ).fetchone()
    return int(r[0]) if r else None


def find_by_placer(conn: Conn, placer_number: str) -> list[int]:
    """Referrals with this placer number under any sending facility."""
    rows = conn.execute(
        "SELECT id FROM referrals WHERE placer_number = ? ORDER BY id", (placer_number,)
    )
    return [int(r[0]) for r in rows]


def placer_candidates(conn: Conn, placer_number: str) -> list[tuple[int, str, str]]:
    """(id, sending facility, placer authority) of every referral with this placer
    number, oldest first (the tracker picks the one the message's practice owns)."""
    rows = conn.execute(
        "SELECT id, sending_facility, placer_authority FROM referrals WHERE placer_number = ? "
        "ORDER BY id",
        (placer_number,),
    )
    return [(int(r[0]), str(r[1]), str(r[2])) for r in rows]


def find_open_by_patient(conn: Conn, patient_ids: Iterable[str]) -> list[int]:
    """Open referrals of any of these patient ids (any specialty), oldest first."""
    ids = sorted(set(patient_ids))
    if not ids:
        return []
    rows = conn.execute(
        "SELECT DISTINCT r.id FROM referral_patients p JOIN referrals r ON r.id = p.referral_id "
        f"WHERE p.patient_id IN ({','.join('?' * len(ids))}) AND r.status != 'closed' "
        "ORDER BY r.id",
        ids,
    )
    return [int(r[0]) for r in rows]


def find_by_fillers(conn: Conn, filler_numbers: Iterable[str]) -> list[int]:
    numbers = sorted(set(filler_numbers))
    if not numbers:
        return []
    rows = conn.execute(
        "SELECT DISTINCT referral_id FROM referral_fillers WHERE filler_number IN "
        f"({','.join('?' * len(numbers))}) ORDER BY referral_id",
        numbers,
    )
    return [int(r[0]) for r in rows]


def find_by_patient(
    conn: Conn, patient_ids: Iterable[str], specialty: str, since: float, until: float
) -> list[tuple[int, str]]:
    """(id, status) of referrals for any of these patient ids in this specialty
    (case-insensitive), opened between ``since`` and ``until``."""
    ids = sorted(set(patient_ids))
    if not ids or not specialty:
        return []
    rows = conn.execute(
        "SELECT DISTINCT r.id, r.status FROM referrals r "
        "JOIN referral_patients p ON p.referral_id = r.id "
        f"WHERE p.patient_id IN ({','.join('?' * len(ids))}) "
        "AND lower(r.specialty) = lower(?) AND r.opened_at BETWEEN ? AND ? ORDER BY r.id",
        (*ids, specialty, since, until),
    )
    return [(int(r[0]), str(r[1])) for r in rows]


def add_fillers(conn: Conn, referral_id: int, filler_numbers: Iterable[str]) -> list[str]:
    """Record filler numbers; returns the ones that were new."""
    added = []
    for number in sorted(set(filler_numbers)):
        cur = conn.execute(
            "INSERT INTO referral_fillers (referral_id, filler_number) VALUES (?, ?) "
            "ON CONFLICT DO NOTHING",
            (referral_id, number),
        )
        if cur.rowcount:
            added.append(number)
    return added


def add_patient_ids(conn: Conn, referral_id: int, patient_ids: Iterable[str]) -> None:
    for pid in sorted(set(patient_ids)):
        conn.execute(
            "INSERT INTO referral_patients (referral_id, patient_id) VALUES (?, ?) "
            "ON CONFLICT DO NOTHING",
            (referral_id, pid),
        )


def surviving_id(conn: Conn, patient_id: str) -> str:
    """Follow recorded merges (ADT^A40) from ``patient_id`` to the identifier in use now."""
    seen = {patient_id}
    current = patient_id
    while True:
        r = conn.execute(
            "SELECT surviving_id FROM patient_merges WHERE retired_id = ?", (current,)
        ).fetchone()
        if r is None or str(r[0]) in seen:
            return current
        current = str(r[0])
        seen.add(current)


def record_merge(
    conn: Conn, retired_id: str, surviving: str, message_id: int | None, now: float
) -> list[int]:
    """Record a merge and move every referral from ``retired_id`` to ``surviving``;
    returns the ids of the referrals that moved."""
    conn.execute(
        "INSERT INTO patient_merges (retired_id, surviving_id, message_id, merged_at) "
        "VALUES (?,?,?,?) ON CONFLICT(retired_id) DO UPDATE SET "
        "surviving_id = excluded.surviving_id",
        (retired_id, surviving, message_id, now),
    )
    moved = [
        int(r[0])
        for r in conn.execute(
            "SELECT referral_id FROM referral_patients WHERE patient_id = ? ORDER BY referral_id",
            (retired_id,),
        )
    ]
    for rid in moved:
        conn.execute(
            "DELETE FROM referral_patients WHERE referral_id = ? AND patient_id = ?",
            (rid, retired_id),
        )
        add_patient_ids(conn, rid, [surviving])
    return moved


def list_referrals(
    conn: Conn,
    *,
    status: str | None = None,
    specialty: str | None = None,
    opened_before: float | None = None,
    prior_auth: str | None = None,
    limit: int = 50,
) -> list[ReferralRow]:
    """Referrals, newest first. ``opened_before`` selects referrals that are not closed
    and were opened before that time. ``limit`` 0 means all. (The filter is
    engine.store.referral_filter's, as the worklist's.)"""
    flt = ReferralFilter(
        status=status,
        open_only=opened_before is not None,
        specialty=specialty,
        opened_before=opened_before,
        prior_auth=prior_auth,
    )
    clause, args = referral_where(flt)
    sql = f"SELECT {_REF_COLUMNS} FROM referrals{clause} ORDER BY id DESC"
    if limit:
        sql += " LIMIT ?"
        args.append(limit)
    return [_referral(conn, r) for r in conn.execute(sql, args).fetchall()]


def count_by_status(conn: Conn) -> dict[str, int]:
    rows = conn.execute("SELECT status, count(*) FROM referrals GROUP BY status")
    return {str(r[0]): int(r[1]) for r in rows}


# ---------------------------------------------------------------------------
# Referral events (the timeline)


@dataclass(frozen=True, slots=True)
class EventRow:
    id: int
    referral_id: int
    kind: str
    message_id: int | None
    source: str
    actor: str
    occurred_at: float
    recorded_at: float
    changed: bool
    status: str
    patient_status: str
    specialist_status: str
    effects: tuple[str, ...]
    detail: Mapping[str, Any]


def event_recorded(
    conn: Conn, referral_id: int, message_id: int | None, kind: str, fingerprint: str
) -> bool:
    """True when this very event from this message is already in the referral's timeline."""
    if message_id is None:
        return False
    r = conn.execute(
        "SELECT 1 FROM referral_events WHERE referral_id = ? AND message_id = ? AND kind = ? "
        "AND fingerprint = ?",
        (referral_id, message_id, kind, fingerprint),
    ).fetchone()
    return r is not None


def insert_note(
    conn: Conn, row: ReferralRow, kind: str, detail: Mapping[str, Any], now: float
) -> None:
    """A recorded-only timeline entry (``changed`` false) on referral ``row``: something
    refloop decided not to send, kept where the coordinator and the simulator see it."""
    insert_event(
        conn,
        referral_id=row.id,
        kind=kind,
        message_id=None,
        fingerprint=digest({"kind": kind, **detail, "at": now}),
        source="internal",
        actor="system",
        occurred_at=now,
        recorded_at=now,
        changed=False,
        statuses=(row.status, row.patient_status, row.specialist_status),
        effects=(),
        detail=dict(detail),
    )


def insert_event(
    conn: Conn,
    *,
    referral_id: int,
    kind: str,
    message_id: int | None,
    fingerprint: str,
    source: str,
    actor: str,
    occurred_at: float,
    recorded_at: float,
    changed: bool,
    statuses: tuple[str, str, str],
    effects: Sequence[str],
    detail: Mapping[str, Any],
) -> int:
    cur = conn.execute(
        "INSERT INTO referral_events (referral_id, kind, message_id, fingerprint, source, actor, "
        "occurred_at, recorded_at, changed, status, patient_status, specialist_status, effects, "
        "detail) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?) RETURNING id",
        (
            referral_id,
            kind,
            message_id,
            fingerprint,
            source,
            actor,
            occurred_at,
            recorded_at,
            int(changed),
            *statuses,
            _dumps(list(effects)),
            _dumps(dict(detail)),
        ),
    )
    return int(cur.fetchone()[0])


def message_events(conn: Conn, message_id: int) -> list[tuple[int, int, str, str, bool]]:
    """What one inbox message did to referrals: (event id, referral id, kind, status
    after, changed) in the order recorded (via ``referral_events_message``)."""
    rows = conn.execute(
        "SELECT id, referral_id, kind, status, changed FROM referral_events "
        "WHERE message_id = ? ORDER BY id",
        (message_id,),
    ).fetchall()
    return [(int(r[0]), int(r[1]), str(r[2]), str(r[3]), bool(r[4])) for r in rows]


def message_parked(conn: Conn, message_id: int) -> list[ParkedRow]:
    """The events of one inbox message that matched no referral (via ``parked_message``)."""
    rows = conn.execute(
        f"SELECT {_PARKED_COLUMNS} FROM parked WHERE message_id = ? ORDER BY id", (message_id,)
    ).fetchall()
    return [_parked(conn, r) for r in rows]


def migrate_message_indexes(db: Any) -> None:
    """The message view's look-ups by inbox message (partial: operator events have none)."""
    db.execute(
        "CREATE INDEX referral_events_message ON referral_events (message_id) "
        "WHERE message_id IS NOT NULL"
    )
    db.execute("CREATE INDEX parked_message ON parked (message_id) WHERE message_id IS NOT NULL")


def timeline(conn: Conn, referral_id: int) -> list[EventRow]:
    """A referral's events in the order they were recorded."""
    rows = conn.execute(
        "SELECT id, referral_id, kind, message_id, source, actor, occurred_at, recorded_at, "
        "changed, status, patient_status, specialist_status, effects, detail "
        "FROM referral_events WHERE referral_id = ? ORDER BY id",
        (referral_id,),
    ).fetchall()
    return [
        EventRow(
            id=int(r[0]),
            referral_id=int(r[1]),
            kind=str(r[2]),
            message_id=None if r[3] is None else int(r[3]),
            source=str(r[4]),
            actor=str(r[5]),
            occurred_at=float(r[6]),
            recorded_at=float(r[7]),
            changed=bool(r[8]),
            status=str(r[9]),
            patient_status=str(r[10]),
            specialist_status=str(r[11]),
            effects=tuple(json.loads(r[12])),
            detail=json.loads(r[13]),
        )
        for r in rows
    ]


# ---------------------------------------------------------------------------
# Parked events


@dataclass(frozen=True, slots=True)
class ParkedRow:
    id: int
    message_id: int | None
    kind: str
    fingerprint: str
    event: dict[str, Any]
    why: str
    sending_facility: str
    placer_number: str
    filler_numbers: tuple[str, ...]
    parked_at: float
    status: str
    referral_id: int | None
    linked_at: float | None
    linked_by: str


_PARKED_COLUMNS: Final = (
    "id, message_id, kind, fingerprint, event, why, sending_facility, placer_number, "
    "parked_at, status, referral_id, linked_at, linked_by"
)


def _parked(conn: Conn, r: Sequence[Any]) -> ParkedRow:
    pid = int(r[0])
    fillers = tuple(
        str(x[0])
        for x in conn.execute(
            "SELECT filler_number FROM parked_fillers WHERE parked_id = ? ORDER BY filler_number",
            (pid,),
        )
    )
    return ParkedRow(
        id=pid,
        message_id=None if r[1] is None else int(r[1]),
        kind=str(r[2]),
        fingerprint=str(r[3]),
        event=json.loads(r[4]),
        why=str(r[5]),
        sending_facility=str(r[6]),
        placer_number=str(r[7]),
        filler_numbers=fillers,
        parked_at=float(r[8]),
        status=str(r[9]),
        referral_id=None if r[10] is None else int(r[10]),
        linked_at=None if r[11] is None else float(r[11]),
        linked_by=str(r[12]),
    )


def park(
    conn: Conn,
    *,
    message_id: int | None,
    kind: str,
    fingerprint: str,
    event: Mapping[str, Any],
    why: str,
    sending_facility: str,
    placer_number: str,
    filler_numbers: Iterable[str],
    now: float,
) -> tuple[int, bool]:
    """Park an event; returns (parked id, True if it was new). Parking the same event
    from the same message again returns the existing row."""
    r = conn.execute(
        "SELECT id FROM parked WHERE message_id IS ? AND kind = ? AND fingerprint = ?",
        (message_id, kind, fingerprint),
    ).fetchone()
    if r is not None:
        return int(r[0]), False
    cur = conn.execute(
        "INSERT INTO parked (message_id, kind, fingerprint, event, why, sending_facility, "
        "placer_number, parked_at) VALUES (?,?,?,?,?,?,?,?) RETURNING id",
        (
            message_id,
            kind,
            fingerprint,
            _dumps(dict(event)),
            why,
            sending_facility,
            placer_number,
            now,
        ),
    )
    pid = int(cur.fetchone()[0])
    for number in sorted(set(filler_numbers)):
        conn.execute(
            "INSERT INTO parked_fillers (parked_id, filler_number) VALUES (?, ?) "
            "ON CONFLICT DO NOTHING",
            (pid, number),
        )
    return pid, True


def get_parked(conn: Conn, parked_id: int) -> ParkedRow | None:
    r = conn.execute(f"SELECT {_PARKED_COLUMNS} FROM parked WHERE id = ?", (parked_id,)).fetchone()
    return _parked(conn, r) if r else None


def list_parked(conn: Conn, *, include_linked: bool = False, limit: int = 0) -> list[ParkedRow]:
    sql = f"SELECT {_PARKED_COLUMNS} FROM parked"
    args: list[Any] = []
    if not include_linked:
        sql += " WHERE status = 'parked'"
    sql += " ORDER BY id"
    if limit:
        sql += " LIMIT ?"
        args.append(limit)
    return [_parked(conn, r) for r in conn.execute(sql, args).fetchall()]


def parked_candidates(
    conn: Conn, placer_number: str, filler_numbers: Iterable[str]
) -> list[ParkedRow]:
    """Still-parked events naming this placer number or any of these filler numbers."""
    numbers = sorted(set(filler_numbers))
    # one indexed look-up per way of matching (an OR under ``status = 'parked'`` made
    # SQLite read every parked event on each referral message)
    sql = f"SELECT {_PARKED_COLUMNS} FROM parked WHERE placer_number = ? AND status = 'parked'"
    args: list[Any] = [placer_number]
    if numbers:
        sql += (
            f" UNION SELECT {_PARKED_COLUMNS} FROM parked WHERE id IN (SELECT parked_id "
            f"FROM parked_fillers WHERE filler_number IN ({','.join('?' * len(numbers))})) "
            "AND status = 'parked'"
        )
        args.extend(numbers)
    sql += " ORDER BY id"
    return [_parked(conn, r) for r in conn.execute(sql, args).fetchall()]


def mark_linked(conn: Conn, parked_id: int, referral_id: int, actor: str, now: float) -> None:
    conn.execute(
        "UPDATE parked SET status = 'linked', referral_id = ?, linked_at = ?, linked_by = ? "
        "WHERE id = ?",
        (referral_id, now, actor, parked_id),
    )


def count_parked(conn: Conn) -> int:
    r = conn.execute("SELECT count(*) FROM parked WHERE status = 'parked'").fetchone()
    return int(r[0])


# ---------------------------------------------------------------------------
# Prior-authorization work items


@dataclass(frozen=True, slots=True)
class PriorAuthRow:
    referral_id: int
    status: str
    hold_packet: bool
    packet_held: bool
    auth_number: str
    decided_version: tuple[float, int] | None
    decided_by: str
    created_at: float
    updated_at: float


def get_prior_auth(conn: Conn, referral_id: int) -> PriorAuthRow | None:
    r = conn.execute(
        "SELECT referral_id, status, hold_packet, packet_held, auth_number, decided_version, "
        "decided_by, created_at, updated_at FROM prior_auth WHERE referral_id = ?",
        (referral_id,),
    ).fetchone()
    if r is None:
        return None
    version = json.loads(r[5]) if r[5] else None
    return PriorAuthRow(
        referral_id=int(r[0]),
        status=str(r[1]),
        hold_packet=bool(r[2]),
        packet_held=bool(r[3]),
        auth_number=str(r[4]),
        decided_version=(float(version[0]), int(version[1])) if version else None,
        decided_by=str(r[6]),
        created_at=float(r[7]),
        updated_at=float(r[8]),
    )


def ensure_prior_auth(conn: Conn, referral_id: int, *, hold_packet: bool, now: float) -> None:
    """Open the referral's prior-auth work item (status ``required``) if it has none;
    a route asking to hold the packet turns holding on."""
    conn.execute(
        "INSERT INTO prior_auth (referral_id, status, hold_packet, created_at, updated_at) "
        "VALUES (?, 'required', ?, ?, ?) ON CONFLICT(referral_id) DO UPDATE SET "
        "hold_packet = CASE WHEN excluded.hold_packet > prior_auth.hold_packet "
        "THEN excluded.hold_packet ELSE prior_auth.hold_packet END",
        (referral_id, int(hold_packet), now, now),
    )


def update_prior_auth(
    conn: Conn,
    referral_id: int,
    *,
    now: float,
    status: str | None = None,
    packet_held: bool | None = None,
    auth_number: str | None = None,
    decided_version: tuple[float, int] | None = None,
    decided_by: str | None = None,
) -> None:
    sets = ["updated_at = ?"]
    args: list[Any] = [now]
    for name, value in (
        ("status", status),
        ("packet_held", None if packet_held is None else int(packet_held)),
        ("auth_number", auth_number),
        ("decided_version", None if decided_version is None else _dumps(list(decided_version))),
        ("decided_by", decided_by),
    ):
        if value is not None:
            sets.append(f"{name} = ?")
            args.append(value)
    conn.execute(
        f"UPDATE prior_auth SET {', '.join(sets)} WHERE referral_id = ?", (*args, referral_id)
    )


# ---------------------------------------------------------------------------
# Timers and the outbox (write API; the timer and dispatch issues consume them)


@dataclass(frozen=True, slots=True)
class TimerRow:
    id: int
    referral_id: int
    kind: str
    due: float
    attempt: int
    key: str


def schedule_timer(
    conn: Conn, referral_id: int, kind: str, due: float, attempt: int, key: str, *, now: float = 0.0
) -> None:
    """Schedule (or move) the timer named ``key``; one row per key."""
    conn.execute(
        "INSERT INTO timers (referral_id, kind, due, attempt, key, created_at) "
        "VALUES (?,?,?,?,?,?) ON CONFLICT(key) DO UPDATE SET due = excluded.due, "
        "attempt = excluded.attempt",
        (referral_id, kind, due, attempt, key, now),
    )


def schedule_timers(
    conn: Conn, timers: Sequence[tuple[int, str, float, int, str]], *, now: float = 0.0
) -> None:
    """:func:`schedule_timer` for each (referral id, kind, due, attempt, key), in order,
    as one statement."""
    if timers:
        conn.executemany(
            "INSERT INTO timers (referral_id, kind, due, attempt, key, created_at) "
            "VALUES (?,?,?,?,?,?) ON CONFLICT(key) DO UPDATE SET due = excluded.due, "
            "attempt = excluded.attempt",
            [(*timer, now) for timer in timers],
        )


def cancel_timers(conn: Conn, referral_id: int, kinds: Iterable[str] | None = None) -> int:
    """Delete the referral's timers (only ``kinds`` when given); returns how many."""
    if kinds is None:
        cur = conn.execute("DELETE FROM timers WHERE referral_id = ?", (referral_id,))
    else:
        names = sorted(set(kinds))
        if not names:
            return 0
        cur = conn.execute(
            f"DELETE FROM timers WHERE referral_id = ? AND kind IN ({','.join('?' * len(names))})",
            (referral_id, *names),
        )
    return int(cur.rowcount)


def timers_for(conn: Conn, referral_id: int) -> list[TimerRow]:
    rows = conn.execute(
        "SELECT id, referral_id, kind, due, attempt, key FROM timers WHERE referral_id = ? "
        "ORDER BY due, key",
        (referral_id,),
    ).fetchall()
    return [
        TimerRow(int(r[0]), int(r[1]), str(r[2]), float(r[3]), int(r[4]), str(r[5])) for r in rows
    ]


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    referral_id: int | None
    channel: str
    template: str
    payload: str
    idempotency_key: str
    due: float
    status: str


def enqueue_outbox(
    conn: Conn,
    referral_id: int | None,
    channel: str,
    template: str,
    payload_json: str,
    idempotency_key: str,
    due: float,
    *,
    now: float = 0.0,
) -> bool:
    """Queue one outbound item; returns False when the key was already queued."""
    cur = conn.execute(
        "INSERT INTO outbox (referral_id, channel, template, payload, idempotency_key, "
        "due, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
        (referral_id, channel, template, payload_json, idempotency_key, due, now, now),
    )
    if cur.rowcount:
        notify.mark(conn, notify.OUTBOX)  # other nodes' dispatchers, once per commit
    return bool(cur.rowcount)


def unused_key(conn: Conn, key: str) -> str:
    """``key`` when no outbox row has it, else ``key#n`` for the smallest unused ``n`` >= 2:
    the n-th time one escalation step is queued for a referral (a patient branch restarted
    by a no-show, a booked branch by a new booking). The caller's transaction claims the
    timer that asks for it, so the same firing never asks twice."""
    taken = {
        str(r[0])
        for r in conn.execute(
            "SELECT idempotency_key FROM outbox WHERE idempotency_key = ? "
            "OR (idempotency_key >= ? AND idempotency_key < ?)",
            (key, f"{key}#", f"{key}$"),
        ).fetchall()
    }
    if key not in taken:
        return key
    n = 2
    while f"{key}#{n}" in taken:
        n += 1
    return f"{key}#{n}"


def count_outbox(conn: Conn, referral_id: int, key_prefix: str) -> int:
    """How many outbox rows of this referral have keys starting with ``key_prefix``."""
    r = conn.execute(
        "SELECT count(*) FROM outbox WHERE referral_id = ? AND substr(idempotency_key, 1, ?) = ?",
        (referral_id, len(key_prefix), key_prefix),
    ).fetchone()
    return int(r[0])


def cancel_outbox(conn: Conn, referral_id: int, *, now: float = 0.0) -> int:
    """Cancel the referral's outbox rows that have not been sent; returns how many."""
    cur = conn.execute(
        "UPDATE outbox SET status = 'cancelled', updated_at = ? "
        "WHERE referral_id = ? AND status = 'pending'",
        (now, referral_id),
    )
    return int(cur.rowcount)


def cancel_pending(
    conn: Conn, referral_id: int, templates: Iterable[str], *, now: float = 0.0
) -> int:
    """Cancel the referral's rows of ``templates`` that have not been sent (still
    ``pending``: due later, held for the contact window, or waiting to retry)."""
    names = sorted(set(templates))
    if not names:
        return 0
    cur = conn.execute(
        f"UPDATE outbox SET status = 'cancelled', updated_at = ? WHERE referral_id = ? "
        f"AND status = 'pending' AND template IN ({','.join('?' * len(names))})",
        (now, referral_id, *names),
    )
    return int(cur.rowcount)


def outbox_for(conn: Conn, referral_id: int) -> list[OutboxRow]:
    rows = conn.execute(
        "SELECT id, referral_id, channel, template, payload, idempotency_key, due, status "
        "FROM outbox WHERE referral_id = ? ORDER BY id",
        (referral_id,),
    ).fetchall()
    return [
        OutboxRow(
            int(r[0]),
            None if r[1] is None else int(r[1]),
            str(r[2]),
            str(r[3]),
            str(r[4]),
            str(r[5]),
            float(r[6]),
            str(r[7]),
        )
        for r in rows
    ]


def _dumps(value: Any) -> str:
    return canonical_text(value)
