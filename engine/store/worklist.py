"""Read queries for the dashboard and the JSON API: the referral worklist with its
filters, message metadata search (indexed columns only — never a scan of raw message
text), a message's raw bytes on request, and coordinator tasks.

Plain read-only functions over an open connection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from engine.clock import isoformat
from engine.store import message_filter, referral_search
from engine.store import outbox as outbox_store
from engine.store.inbox import RAW_SIZE, raw_bytes
from engine.store.paging import IdPage, newest_first
from engine.store.referral_filter import ReferralFilter
from engine.store.referral_filter import where as referral_where
from engine.store.referrals import Conn, ReferralRow, get_referral

TASK_CHANNELS: Final = ("task", "coordinator")


def search_referrals(
    conn: Conn,
    *,
    status: str | None = None,
    open_only: bool = False,
    specialty: str | None = None,
    specialist: str | None = None,
    referring: str | None = None,
    opened_before: float | None = None,
    limit: int = 200,
) -> list[ReferralRow]:
    """Referrals matching every filter given, oldest first. ``specialist`` and
    ``referring`` match the provider's name, NPI or organisation (case-insensitive
    substring). ``opened_before`` keeps referrals opened before that time."""
    flt = ReferralFilter(
        status=status,
        open_only=open_only,
        specialty=specialty,
        specialist=specialist,
        referring=referring,
        opened_before=opened_before,
    )
    clause, args = referral_where(flt)
    sql = f"SELECT id FROM referrals{clause}"
    sql += " ORDER BY opened_at, id LIMIT ?"
    args.append(limit)
    ids = [int(r[0]) for r in conn.execute(sql, args).fetchall()]
    out = []
    for rid in ids:
        row = get_referral(conn, rid)
        if row is not None:
            out.append(row)
    return out


def referral_page(
    conn: Conn,
    flt: ReferralFilter,
    sort: referral_search.Sort,
    *,
    limit: int,
    after: int | None = None,
    before: int | None = None,
) -> tuple[referral_search.Page, list[ReferralRow]]:
    """One page of the referrals ``flt`` selects, in ``sort`` order, keyset-paged
    (engine.store.referral_search.page), with their rows."""
    clause, args = referral_where(flt)
    closed = not flt.open_only and flt.status in (None, "closed") and flt.overdue is not True
    found = referral_search.page(
        conn, clause, args, sort, limit=limit, after=after, before=before, closed=closed,
        walk=not (flt.q.strip() or flt.prior_auth),
    )  # fmt: skip
    rows = [row for rid in found.ids if (row := get_referral(conn, rid)) is not None]
    return found, rows


def specialties(conn: Conn) -> list[str]:
    """Distinct specialties of open referrals (for the worklist's filter)."""
    rows = conn.execute(
        "SELECT DISTINCT specialty FROM referrals WHERE specialty != '' ORDER BY specialty"
    )
    return [str(r[0]) for r in rows]


@dataclass(frozen=True, slots=True)
class MessageMeta:
    """An inbox row without its bytes."""

    id: int
    received_at: float
    source: str
    sending_app: str
    sending_facility: str
    control_id: str
    message_type: str
    version: str
    status: str
    ack_code: str
    error: str
    duplicates: int
    flags: str
    route: str
    size: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "received_at": isoformat(self.received_at),
            "source": self.source,
            "sending_app": self.sending_app,
            "sending_facility": self.sending_facility,
            "control_id": self.control_id,
            "message_type": self.message_type,
            "version": self.version,
            "status": self.status,
            "ack_code": self.ack_code,
            "error": self.error,
            "duplicates": self.duplicates,
            "flags": self.flags,
            "route": self.route,
            "size": self.size,
        }


_META: Final = (
    "id, received_at, source, sending_app, sending_facility, control_id, message_type, "
    "version, status, ack_code, error, duplicates, flags, route, " + RAW_SIZE
)


def _meta(r: Any) -> MessageMeta:
    return MessageMeta(
        id=int(r[0]),
        received_at=float(r[1]),
        source=str(r[2] or ""),
        sending_app=str(r[3] or ""),
        sending_facility=str(r[4] or ""),
        control_id=str(r[5] or ""),
        message_type=str(r[6] or ""),
        version=str(r[7] or ""),
        status=str(r[8] or ""),
        ack_code=str(r[9] or ""),
        error=str(r[10] or ""),
        duplicates=int(r[11] or 0),
        flags=str(r[12] or ""),
        route=str(r[13] or ""),
        size=int(r[14] or 0),
    )


def search_messages(
    conn: Conn,
    *,
    message_type: str | None = None,
    control_id: str | None = None,
    status: str | None = None,
    source: str | None = None,
    since: float | None = None,
    until: float | None = None,
    before_id: int | None = None,
    limit: int = 50,
) -> list[MessageMeta]:
    """Inbox metadata, newest first, selected by engine.store.message_filter (the filter
    ``refloop messages list`` uses: ``*`` in ``message_type`` stands for any text)."""
    clause, args = message_filter.where(
        message_filter.MessageFilter(
            message_type=message_type,
            control_id=control_id,
            status=status,
            source=source,
            since=since,
            until=until,
            before_id=before_id,
        )
    )
    sql = f"SELECT {_META} FROM messages{clause} ORDER BY id DESC LIMIT ?"
    args.append(limit)
    return [_meta(r) for r in conn.execute(sql, args).fetchall()]


def message_page(
    conn: Conn,
    flt: message_filter.MessageFilter,
    *,
    limit: int,
    before: int | None = None,
    after: int | None = None,
) -> IdPage[MessageMeta]:
    """A page of the message browser, newest first, with the total the filter selects."""
    clause, args = message_filter.where(flt)
    return newest_first(
        conn, "messages", _META, clause, args, _meta, limit=limit, before=before, after=after
    )


def outbox_page(
    conn: Conn,
    *,
    status: str = "",
    limit: int,
    before: int | None = None,
    after: int | None = None,
) -> IdPage[outbox_store.Item]:
    """A page of the outbox, newest first, with the total of that status."""
    clause, args = (" WHERE status = ?", [status]) if status else ("", [])
    return newest_first(
        conn, "outbox", outbox_store.COLUMNS, clause, args, outbox_store.item_of,
        limit=limit, before=before, after=after,
    )  # fmt: skip


def get_message(conn: Conn, message_id: int) -> MessageMeta | None:
    r = conn.execute(f"SELECT {_META} FROM messages WHERE id = ?", (message_id,)).fetchone()
    return _meta(r) if r else None


def raw_message(conn: Conn, message_id: int) -> tuple[bytes, str] | None:
    """(the exact bytes received, the codec they decode with)."""
    r = conn.execute("SELECT charset FROM messages WHERE id = ?", (message_id,)).fetchone()
    raw = raw_bytes(conn, message_id) if r else None
    return (raw, str(r[0] or "utf-8")) if r and raw is not None else None


def referral_message_ids(conn: Conn, referral_id: int) -> list[int]:
    """Inbox rows that reached a referral's timeline."""
    rows = conn.execute(
        "SELECT DISTINCT message_id FROM referral_events WHERE referral_id = ? "
        "AND message_id IS NOT NULL ORDER BY message_id",
        (referral_id,),
    )
    return [int(r[0]) for r in rows]
