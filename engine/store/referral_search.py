"""Finding referrals: the patient columns of a referral row, the search box (``q``) and
keyset paging with sortable columns, for the worklist (dashboard, ``/api/referrals``)
and ``refloop referrals list`` alike.

A search (:func:`q_clause`) splits the text into words (whitespace and commas); every
word must match one of, each answered by an index:

- the placer number or a filler number (exactly; as typed or upper-case),
- the patient's MRN (exactly) or a PID-3 / FHIR patient id (``MRN`` or ``MRN^^^AUTH``),
- the start of the patient's family or given name (case and accents ignored),
- the patient's birth date (``YYYY-MM-DD``, ``YYYYMMDD`` or ``MM/DD/YYYY``),
- the start of the specialty, specialist name or organisation (case ignored), or the
  specialist's NPI;

and the whole text, as one phrase, also matches the start of a specialty, specialist,
organisation or name ("internal med", "van der berg").

Paging is by key, never OFFSET: a page starts after (or ends before) a referral id, and
the sort key of that referral is read from its row, so a cursor holds no patient data.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import sqlite_utils

from engine.store.paging import Page, and_where
from engine.store.sql import Conn

_RANK: Final = "(CASE priority WHEN 'stat' THEN 0 WHEN 'urgent' THEN 1 ELSE 2 END)"
PATIENT_COLUMNS: Final = (
    "patient_mrn",
    "patient_family",
    "patient_given",
    "patient_birth_date",
    "patient_family_key",
    "patient_given_key",
)
_INDEXES: Final = (
    "CREATE INDEX IF NOT EXISTS referrals_patient_mrn ON referrals (patient_mrn)",
    "CREATE INDEX IF NOT EXISTS referrals_patient_family ON referrals (patient_family_key)",
    "CREATE INDEX IF NOT EXISTS referrals_patient_given ON referrals (patient_given_key)",
    "CREATE INDEX IF NOT EXISTS referrals_patient_birth ON referrals (patient_birth_date)",
    "CREATE INDEX IF NOT EXISTS referrals_specialty_nocase ON referrals (specialty COLLATE NOCASE)",
    "CREATE INDEX IF NOT EXISTS referrals_specialist_name ON referrals "
    "(specialist_name COLLATE NOCASE)",
    "CREATE INDEX IF NOT EXISTS referrals_specialist_org ON referrals "
    "(specialist_organisation COLLATE NOCASE)",
    "CREATE INDEX IF NOT EXISTS referrals_specialist_npi ON referrals (specialist_npi)",
    # the open worklist in priority order reads only this (covering: every column of
    # the sort key), not the referral rows: 55,000 open of 1M in ~50 ms (bench/search.py)
    "CREATE INDEX IF NOT EXISTS referrals_open_priority ON referrals "
    "(priority, opened_at, needed_by, status) WHERE status != 'closed'",
    # the specialty filter is ``specialty = ? COLLATE NOCASE`` now (referrals_specialty_nocase):
    # this one served ``lower(specialty)`` and only misled the planner
    "DROP INDEX IF EXISTS referrals_open_specialty",
    # closed referrals in priority order (a worklist that shows all): the equality on
    # status, then the order, so the walk needs no sort (and no statistics to be chosen)
    f"CREATE INDEX IF NOT EXISTS referrals_status_priority ON referrals (status, {_RANK}, "
    "opened_at)",
)
_TOP: Final = "\U0010ffff"  # sorts after every other character: the end of a prefix range
_WORD: Final = re.compile(r"[^\s,;]+")
_US_DATE: Final = re.compile(r"^(\d{1,2})/(\d{1,2})/(\d{4})$")
_ISO_DATE: Final = re.compile(r"^(\d{4})-?(\d{2})-?(\d{2})$")
MAX_WORDS: Final = 8


def migrate(db: sqlite_utils.Database, backfill: Any = None) -> None:
    """Add the patient columns and the search indexes. ``backfill(raw) -> Demographics``
    (engine.hl7v2.patient) fills the columns of existing referrals from the message that
    opened each one."""
    columns = db["referrals"].columns_dict
    for column in PATIENT_COLUMNS:
        if column not in columns:
            db.execute(f"ALTER TABLE referrals ADD COLUMN {column} TEXT NOT NULL DEFAULT ''")
    for statement in _INDEXES:
        db.execute(statement)
    if backfill is None:
        return
    conn = db.conn
    rows = conn.execute(
        "SELECT e.referral_id, min(e.message_id) FROM referral_events e "
        "WHERE e.kind = 'referral-created' AND e.message_id IS NOT NULL GROUP BY e.referral_id"
    ).fetchall()
    for rid, mid in rows:
        raw = conn.execute("SELECT raw FROM message_raw WHERE message_id = ?", (mid,)).fetchone()
        if raw is None:
            continue
        try:
            found = backfill(bytes(raw[0]))
        except Exception:  # an unreadable old message just stays unsearchable by name
            continue
        set_patient(conn, int(rid), found)


# Letters NFKD leaves whole (no base letter + mark to split off), spelled as a person
# typing on a plain keyboard would: Øster as "oster", Łukasz as "lukasz", Đorđe as "dorde"
_UNSPLIT: Final = str.maketrans(
    {"Ø": "O", "ø": "o", "Ł": "L", "ł": "l", "Đ": "D", "đ": "d", "Ð": "D", "ð": "d",
     "Æ": "AE", "æ": "ae", "Œ": "OE", "œ": "oe", "Þ": "TH", "þ": "th", "Ħ": "H", "ħ": "h",
     "ı": "i", "Ŧ": "T", "ŧ": "t"}
)  # fmt: skip


def normalise(text: str) -> str:
    """The search key of a name: accents stripped (NFKD, combining marks dropped; the
    letters of :data:`_UNSPLIT` spelled plain), case folded, every run of other than
    letters and digits one space."""
    decomposed = unicodedata.normalize("NFKD", text.translate(_UNSPLIT))
    plain = "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()
    return " ".join("".join(c if c.isalnum() else " " for c in plain).split())


def migrate_category_index(db: Any) -> None:
    """The specialty filter matches the derived specialty (``specialty_category``) too
    (engine.store.referral_filter): its index, as ``referrals_specialty_nocase``."""
    db.execute(
        "CREATE INDEX IF NOT EXISTS referrals_category_nocase ON referrals "
        "(specialty_category COLLATE NOCASE)"
    )


def migrate_rekey(db: Any) -> None:
    """Recompute the name keys of referrals whose name holds a letter outside ASCII (the
    keys of names with Ø, Ł, Đ, Æ ... missed those letters before :data:`_UNSPLIT`)."""
    conn = db.conn
    rows = conn.execute(
        "SELECT id, patient_family, patient_given FROM referrals "
        "WHERE patient_family != '' OR patient_given != ''"
    ).fetchall()
    for rid, family, given in rows:
        if str(family).isascii() and str(given).isascii():
            continue
        conn.execute(
            "UPDATE referrals SET patient_family_key = ?, patient_given_key = ? WHERE id = ?",
            (normalise(str(family))[:200], normalise(str(given))[:200], rid),
        )


def patient_columns(patient: Any) -> dict[str, str]:
    """The referral columns ``patient`` (engine.hl7v2.patient.Demographics) states, and
    the search keys of its names; an empty value is left out."""
    columns = {
        column: str(value)[:200]
        for column, value in (
            ("patient_mrn", patient.mrn),
            ("patient_family", patient.family),
            ("patient_given", patient.given),
            ("patient_birth_date", patient.birth_date),
        )
        if value
    }
    if patient.family:
        columns["patient_family_key"] = normalise(patient.family)[:200]
    if patient.given:
        columns["patient_given_key"] = normalise(patient.given)[:200]
    return columns


def set_patient(conn: Conn, referral_id: int, patient: Any) -> None:
    """Write what ``patient`` (engine.hl7v2.patient.Demographics) states: an empty value
    leaves the stored one (a later message that leaves PID-7 out keeps the birth date)."""
    write_patient(conn, referral_id, patient_columns(patient))


def write_patient(conn: Conn, referral_id: int, columns: Mapping[str, str]) -> None:
    """Write ``columns`` (:func:`patient_columns`) where they differ from the stored ones."""
    sets = [f"{column} = ?" for column in columns]
    args = list(columns.values())
    if sets:
        # only when something differs: most messages of a referral repeat its patient
        differs = " OR ".join(f"{column} IS NOT ?" for column in columns)
        conn.execute(
            f"UPDATE referrals SET {', '.join(sets)} WHERE id = ? AND ({differs})",
            (*args, referral_id, *args),
        )


@dataclass(frozen=True, slots=True)
class Patient:
    mrn: str
    family: str
    given: str
    birth_date: str

    @property
    def name(self) -> str:
        """``Family, Given`` (or whichever part is known)."""
        return ", ".join(p for p in (self.family, self.given) if p)


def patients(conn: Conn, referral_ids: Iterable[int]) -> dict[int, Patient]:
    ids = sorted(set(referral_ids))
    out: dict[int, Patient] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        for r in conn.execute(
            "SELECT id, patient_mrn, patient_family, patient_given, patient_birth_date "
            f"FROM referrals WHERE id IN ({','.join('?' * len(chunk))})",
            chunk,
        ):
            out[int(r[0])] = Patient(str(r[1]), str(r[2]), str(r[3]), str(r[4]))
    return out


# ---------------------------------------------------------------------------
# The search box


def as_date(word: str) -> str:
    """A word that is a date (``YYYY-MM-DD``, ``YYYYMMDD``, ``MM/DD/YYYY``) as ISO; else ""."""
    m = _ISO_DATE.match(word)
    if m:
        y, mo, d = m.groups()
    else:
        u = _US_DATE.match(word)
        if not u:
            return ""
        mo, d, y = u.group(1).zfill(2), u.group(2).zfill(2), u.group(3)
    return f"{y}-{mo}-{d}" if "01" <= mo <= "12" and "01" <= d <= "31" else ""


def words(q: str) -> list[str]:
    return _WORD.findall(q)[:MAX_WORDS]


def _prefix(column: str, value: str, args: list[Any], *, nocase: bool = False) -> str:
    coll = " COLLATE NOCASE" if nocase else ""
    args.extend((value, value + _TOP))
    return f"SELECT id FROM referrals WHERE {column}{coll} >= ? AND {column}{coll} < ?"


def _word(word: str, args: list[Any]) -> str:
    """The ids one word matches (a UNION of indexed look-ups)."""
    parts: list[str] = []
    exact = sorted({word, word.upper()})
    marks = ",".join("?" * len(exact))
    parts.append(f"SELECT id FROM referrals WHERE placer_number IN ({marks})")
    args.extend(exact)
    parts.append(f"SELECT referral_id FROM referral_fillers WHERE filler_number IN ({marks})")
    args.extend(exact)
    parts.append("SELECT id FROM referrals WHERE patient_mrn = ?")
    args.append(word)
    # PID-3 as stored: "id^^^authority" (or a FHIR "Patient/…" reference)
    parts.append(
        "SELECT referral_id FROM referral_patients WHERE patient_id = ? "
        "OR (patient_id >= ? AND patient_id < ?)"
    )
    args.extend((word, word + "^", word + "^" + _TOP))
    key = normalise(word)
    if key:
        parts.append(_prefix("patient_family_key", key, args))
        parts.append(_prefix("patient_given_key", key, args))
    day = as_date(word)
    if day:
        parts.append("SELECT id FROM referrals WHERE patient_birth_date = ?")
        args.append(day)
    parts.append(_phrase_parts(word, args, names=False))
    parts.append("SELECT id FROM referrals WHERE specialist_npi = ?")
    args.append(word)
    return " UNION ".join(parts)


def _phrase_parts(phrase: str, args: list[Any], *, names: bool = True) -> str:
    parts = [
        _prefix("specialty", phrase, args, nocase=True),
        _prefix("specialist_name", phrase, args, nocase=True),
        _prefix("specialist_organisation", phrase, args, nocase=True),
    ]
    key = normalise(phrase)
    if names and key:
        parts.append(_prefix("patient_family_key", key, args))
        parts.append(_prefix("patient_given_key", key, args))
    return " UNION ".join(parts)


def q_clause(q: str) -> tuple[str, list[Any]]:
    """``(condition on referrals.id, args)`` for the search text ``q`` ("" when it has
    no words)."""
    found = words(q)
    if not found:
        return "", []
    args: list[Any] = []
    each = " AND ".join(f"id IN ({_word(w, args)})" for w in found)
    if len(found) == 1:
        return each, args
    phrase = " ".join(found)
    return f"(({each}) OR id IN ({_phrase_parts(phrase, args)}))", args


# ---------------------------------------------------------------------------
# Sorting and keyset paging


@dataclass(frozen=True, slots=True)
class Sort:
    """A sort: ascending key expressions over ``referrals`` (the id last); ``descending``
    reverses the whole key."""

    name: str
    keys: tuple[str, ...]
    descending: bool = False


# Closed referrals in priority order: all of them come after every open one, never
# overdue, so by rank, then oldest first (referrals_status_priority serves it).
_CLOSED_KEYS: Final = (_RANK, "opened_at", "id")


def _priority_keys(now: float, targets: dict[str, float]) -> tuple[str, ...]:
    return (f"(NOT {overdue_sql(now, targets)})", "(status = 'closed')", *_CLOSED_KEYS)


def overdue_sql(now: float, targets: dict[str, float]) -> str:
    """SQL truth of "overdue at ``now``": not closed, and open longer than its priority's
    target (``targets`` in days; an unknown or missing priority is routine) or past its
    needed-by date (UTC)."""
    import datetime as dt

    today = dt.datetime.fromtimestamp(now, dt.UTC).date().isoformat()
    stat = float(targets.get("stat", 2.0))
    urgent = float(targets.get("urgent", 7.0))
    routine = float(targets.get("routine", 30.0))
    return (
        "(status != 'closed' AND ("
        f"opened_at < {float(now)!r} - 86400.0 * (CASE priority WHEN 'stat' THEN {stat!r} "
        f"WHEN 'urgent' THEN {urgent!r} ELSE {routine!r} END) "
        f"OR (needed_by != '' AND substr(needed_by, 1, 10) < '{today}')))"
    )


SORTS: Final = (
    "priority",
    "id",
    "opened",
    "placer",
    "patient",
    "birth_date",
    "specialty",
    "status",
    "days",
    "needed_by",
)


def sort_of(name: str, now: float, targets: dict[str, float]) -> Sort:
    """``name`` is one of :data:`SORTS`, ``-`` before it for descending."""
    descending = name.startswith("-")
    base = name.lstrip("-") or "priority"
    keys: tuple[str, ...]
    if base == "priority":
        keys = _priority_keys(now, targets)
    elif base == "id":
        keys = ("id",)
    elif base == "opened":
        keys = ("opened_at", "id")
    elif base == "placer":
        keys = ("placer_number", "id")
    elif base == "patient":
        keys = ("patient_family_key", "patient_given_key", "id")
    elif base == "birth_date":
        keys = ("patient_birth_date", "id")
    elif base == "specialty":
        keys = ("specialty COLLATE NOCASE", "id")
    elif base == "status":
        keys = ("status", "opened_at", "id")
    elif base == "days":
        keys = (f"(coalesce(closed_at, {float(now)!r}) - opened_at)", "id")
    elif base == "needed_by":
        keys = ("needed_by", "id")
    else:
        raise ValueError(f"sort must be one of {', '.join(SORTS)} (- before it: descending)")
    return Sort(base, keys, descending)


def page(
    conn: Conn,
    where: str,
    args: Sequence[Any],
    sort: Sort,
    *,
    limit: int,
    after: int | None = None,
    before: int | None = None,
    closed: bool = True,
    walk: bool = True,
) -> Page:
    """Ids of the referrals ``where`` selects (`` WHERE …`` or ""), ``limit`` of them in
    ``sort`` order: the first ones, those after referral ``after`` or those before
    referral ``before`` in that order. An id that is no referral is ignored. ``closed``
    False says ``where`` selects no closed referral; ``walk`` False that it selects few
    (a search), so they are found first and then sorted, never walked in order."""
    if sort.name == "priority" and not sort.descending and closed:
        return _priority_page(
            conn, where, args, sort, limit=limit, after=after, before=before, walk=walk
        )
    keys = ", ".join(sort.keys)
    forward, backward = ("<", ">") if sort.descending else (">", "<")
    order_up = ", ".join(f"{k} {'DESC' if sort.descending else 'ASC'}" for k in sort.keys)
    order_down = ", ".join(f"{k} {'ASC' if sort.descending else 'DESC'}" for k in sort.keys)
    anchor_of = f"(SELECT {keys} FROM referrals WHERE id = ?)"

    def exists(rid: int | None) -> bool:
        return (
            rid is not None
            and conn.execute("SELECT 1 FROM referrals WHERE id = ?", (rid,)).fetchone() is not None
        )

    total = int(conn.execute(f"SELECT count(*) FROM referrals{where}", args).fetchone()[0])
    if exists(before):
        sql = (
            f"SELECT id FROM referrals{and_where(where, f'({keys}) {backward} {anchor_of}')} "
            f"ORDER BY {order_down} LIMIT ?"
        )
        ids = [int(r[0]) for r in conn.execute(sql, (*args, before, limit))][::-1]
    else:
        cond, extra = (f"({keys}) {forward} {anchor_of}", [after]) if exists(after) else ("", [])
        sql = (
            f"SELECT id FROM referrals{and_where(where, cond) if cond else where} "
            f"ORDER BY {order_up} LIMIT ?"
        )
        ids = [int(r[0]) for r in conn.execute(sql, (*args, *extra, limit))]
    if not ids:
        return Page([], total, 0)
    sql = f"SELECT count(*) FROM referrals{and_where(where, f'({keys}) {backward} {anchor_of}')}"
    earlier = int(conn.execute(sql, (*args, ids[0])).fetchone()[0])
    return Page(ids, total, earlier + 1)


def _status_of(conn: Conn, rid: int | None) -> str | None:
    if rid is None:
        return None
    r = conn.execute("SELECT status FROM referrals WHERE id = ?", (rid,)).fetchone()
    return None if r is None else str(r[0])


def _priority_page(
    conn: Conn,
    where: str,
    args: Sequence[Any],
    sort: Sort,
    *,
    limit: int,
    after: int | None,
    before: int | None,
    walk: bool,
) -> Page:
    """:func:`page` in priority order over a set that may hold closed referrals: the open
    ones (sorted: a set bounded by open work), then the closed ones walked in
    referrals_status_priority order, so showing all referrals never sorts all of them
    (but for a search, ``walk`` False: its few matches are looked up, then sorted)."""
    keys, ckeys = ", ".join(sort.keys), ", ".join(_CLOSED_KEYS)
    opened = and_where(where, "status != 'closed'")
    # ``+status`` keeps the planner off the index walk (it has no statistics to tell)
    shut = and_where(where, "status = 'closed'" if walk else "+status = 'closed'")
    anchor = f"(SELECT {keys} FROM referrals WHERE id = ?)"
    canchor = f"(SELECT {ckeys} FROM referrals WHERE id = ?)"
    order = ", ".join(f"{k} ASC" for k in sort.keys)
    corder = ", ".join(f"{k} ASC" for k in _CLOSED_KEYS)
    rorder = ", ".join(f"{k} DESC" for k in sort.keys)
    rcorder = ", ".join(f"{k} DESC" for k in _CLOSED_KEYS)

    def ids(sql: str, extra: Sequence[Any]) -> list[int]:
        return [int(r[0]) for r in conn.execute(sql, (*args, *extra))]

    total = int(conn.execute(f"SELECT count(*) FROM referrals{where}", args).fetchone()[0])
    back = _status_of(conn, before)
    if back is not None:
        if back == "closed":
            found = ids(
                f"SELECT id FROM referrals{and_where(shut, f'({ckeys}) < {canchor}')} "
                f"ORDER BY {rcorder} LIMIT ?",
                (before, limit),
            )
            if len(found) < limit:
                found += ids(
                    f"SELECT id FROM referrals{opened} ORDER BY {rorder} LIMIT ?",
                    (limit - len(found),),
                )
        else:
            found = ids(
                f"SELECT id FROM referrals{and_where(opened, f'({keys}) < {anchor}')} "
                f"ORDER BY {rorder} LIMIT ?",
                (before, limit),
            )
        found.reverse()
    else:
        forth = _status_of(conn, after)
        found = []
        if forth != "closed":
            cond = and_where(opened, f"({keys}) > {anchor}") if forth else opened
            extra = (after,) if forth else ()
            found = ids(f"SELECT id FROM referrals{cond} ORDER BY {order} LIMIT ?", (*extra, limit))
        if len(found) < limit:
            cond = and_where(shut, f"({ckeys}) > {canchor}") if forth == "closed" else shut
            extra = (after,) if forth == "closed" else ()
            found += ids(
                f"SELECT id FROM referrals{cond} ORDER BY {corder} LIMIT ?",
                (*extra, limit - len(found)),
            )
    if not found:
        return Page([], total, 0)
    if _status_of(conn, found[0]) == "closed":
        n_open = conn.execute(f"SELECT count(*) FROM referrals{opened}", args).fetchone()[0]
        sql = f"SELECT count(*) FROM referrals{and_where(shut, f'({ckeys}) < {canchor}')}"
        earlier = int(n_open) + int(conn.execute(sql, (*args, found[0])).fetchone()[0])
    else:
        sql = f"SELECT count(*) FROM referrals{and_where(opened, f'({keys}) < {anchor}')}"
        earlier = int(conn.execute(sql, (*args, found[0])).fetchone()[0])
    return Page(found, total, earlier + 1)
