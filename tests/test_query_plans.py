"""No statement refloop runs on a hot path reads a big table whole.

Every SQL statement of a small practice-800 run (MLLP ingest, routing, tracker, timers,
outbox, webhooks) is traced, then, on the database it left, every read and action the
dashboard, the API, the metrics, the dispatcher and the CLI make, and every store function
the simulation does not reach (Direct, SMS replies, merges, users, operator actions). Each
distinct statement, and each statement of a trigger body, is explained. A plan may not
``SCAN`` a table that grows with the practice, nor ``SEARCH`` one through an index
constrained only by a column with a handful of values (``channel``, ``status``, ``kind``):
that is a scan in disguise (the nudge caps once read every patient nudge in the outbox that
way on each nudge). Nor may it sort (``USE TEMP B-TREE``) rows it found that way or through
a range alone: that reads and sorts a big part of the table before the first row comes
back. Deliberate passes (reports, exports, a list with no filter, a walk that stops at its
``LIMIT``, sets bounded by open work) are listed in :data:`ALLOWED` with their reason.

Small tables are not checked: ``meta``, ``users`` / ``user_sessions`` / ``api_tokens`` (a
practice's staff and their live sessions), ``prior_auth`` (looked up by referral only),
``patient_merges`` (by primary key only), ``suppressed_numbers`` (by primary key only) and
``sqlite_master`` / ``sqlite_sequence`` (a row per table). The specialist directory is
checked: referrals add to it, and each referral message looks a specialist up.
"""

from __future__ import annotations

import datetime as dt
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import engine.app
from engine.clock import VirtualClock
from engine.config import RetentionConfig
from engine.delivery import dispatch
from engine.sim.simulate import load_scenario, simulate
from engine.store import audit as audit_store
from engine.store import open_database, retention
from engine.store import outbox as outbox_store
from engine.store import packets as packets_store
from engine.store import referrals as referral_store
from engine.store import specialists as specialists_store
from engine.store import timers as timers_store
from engine.store import users as users_store
from engine.store.decisions import Decisions
from engine.store.inbox import Inbox
from engine.timers import service as timers
from engine.tracking import report, tracker, views
from engine.web.auth import Principal
from engine.web.service import Service

ROOT = Path(__file__).resolve().parent.parent
GROWING = (
    "messages", "message_raw", "decisions", "referrals", "referral_events", "referral_patients",
    "referral_fillers", "parked", "parked_fillers", "outbox", "timers", "audit",
    "report_referrals", "sms_replies", "specialists", "tasks",
)  # fmt: skip
LOW_CARDINALITY = ("channel", "status", "kind", "template")
# An allowance covers the statement's scans and low-cardinality searches; its sorts only
# when the reason says "sort"; "via <index>" pins the index the reason relies on.
ALLOWED = {
    # -- one row, or a walk in index order that stops at its LIMIT
    "SELECT (SELECT hash FROM audit ORDER BY id DESC LIMIT ?), (SELECT seq FROM "
    "sqlite_sequence WHERE name = ?)": "the chain's head (one row, backwards by rowid) and "
    "its sequence, in one statement",
    "SELECT … FROM tasks WHERE status = ? ORDER BY priority DESC, id LIMIT ?":
        "open tasks, most urgent first via tasks_status_priority: stops at the LIMIT",
    "SELECT … FROM tasks WHERE status = ? AND coalesce(snoozed_until, ?) <= ? "
    "ORDER BY coalesce(snoozed_until, due_at, created_at), id LIMIT ?":
        "the Tasks work list via tasks_status_due: open tasks in due order, stops at the LIMIT",
    "SELECT … FROM tasks WHERE status = ? AND coalesce(snoozed_until, ?) > ? "
    "ORDER BY coalesce(snoozed_until, due_at, created_at), id LIMIT ?":
        "snoozed tasks via tasks_status_due: walks open tasks only (bounded by open work)",
    "SELECT … FROM tasks WHERE status = ? ORDER BY id DESC LIMIT ?":
        "done / superseded tasks via tasks_status: newest first, stops at the LIMIT",
    "SELECT … FROM tasks ORDER BY id DESC LIMIT ?":
        "every task (`refloop tasks list --status all`): rowid order, stops at the LIMIT",
    "SELECT … FROM outbox ORDER BY id DESC LIMIT ?": "newest first, stops at the LIMIT",
    "SELECT … FROM messages ORDER BY id DESC LIMIT ?": "newest first, stops at the LIMIT",
    "SELECT … FROM messages WHERE received_at >= ? ORDER BY id DESC LIMIT ?":
        "newest first from now back to since: every row it passes matches",
    "SELECT … FROM messages WHERE source = ? ORDER BY id DESC LIMIT ?":
        "API-only filter on a few sources, all active: newest first, stops at the LIMIT",
    "SELECT … FROM messages WHERE status = ? ORDER BY id DESC LIMIT ?":
        "one status via messages_status (status, id): newest first, stops at the LIMIT",
    "SELECT … FROM messages WHERE status = ? AND source = ? ORDER BY id DESC LIMIT ?":
        "one status via messages_status (status, id): newest first, stops at the LIMIT",
    # -- sets bounded by open work (queues, pending timers, open referrals), not by history
    "SELECT count(*) FROM parked WHERE status = ?":
        "metrics via parked_status: the events still parked",
    "SELECT … FROM parked WHERE status = ? ORDER BY id":
        "parked list via parked_status: the events still parked",
    "SELECT kind, count(*) FROM timers GROUP BY kind":
        "metrics: sorts pending timers only (a timer row is deleted once fired or cancelled)",
    "SELECT … FROM timers t JOIN referrals r ON r.id = t.referral_id ORDER BY t.due, t.id":
        "`refloop timers list` via timers_due: pending timers only",
    "SELECT min(o.due) FROM outbox o WHERE o.channel = ? AND o.status = ? AND NOT EXISTS "
    "(SELECT ? FROM outbox p WHERE o.referral_id IS NOT NULL AND p.referral_id = o.referral_id "
    "AND p.channel = o.channel AND (p.status = ? OR (p.status = ? AND p.id < o.id)))":
        "dispatcher idle via outbox_channel_due: the channel's pending rows (its queue)",
    "UPDATE outbox SET status = ?, due = CASE WHEN due < ? THEN due ELSE ? END, "
    "updated_at = ?, lease_until = NULL, last_error = ? WHERE status = ? AND lease_until < ? "
    "RETURNING id, channel, claimed_by":
        "lease reaper via outbox_due: the rows in flight (concurrency per channel and node)",
    "UPDATE outbox SET status = ?, due = CASE WHEN due < ? THEN due ELSE ? END, "
    "updated_at = ?, lease_until = NULL, last_error = ? WHERE status = ? AND lease_until < ? "
    "AND id NOT IN (SELECT value FROM json_each(?)) RETURNING id, channel, claimed_by":
        "lease reaper via outbox_due: the rows in flight (concurrency per channel and node)",
    "SELECT min(lease_until) FROM outbox WHERE status = ?":
        "dispatcher idle via outbox_due: the rows in flight (concurrency per channel and node)",
    "SELECT id, (SELECT length(raw) FROM message_raw WHERE message_id = messages.id) FROM "
    "messages WHERE status = ? ORDER BY id LIMIT ?":
        "processing claim via messages_status (status, id): unprocessed rows, up to the LIMIT",
    "SELECT min(id) FROM messages WHERE status = ?":
        "processor start via messages_status (status, id): one row, the first unprocessed",
    "SELECT id, due FROM timers WHERE loaded = ? ORDER BY id":
        "timer refill via timers_unloaded (partial): rows written since the last look",
    "UPDATE timers SET loaded = ? WHERE loaded = ?":
        "wheel rebuild via timers_unloaded (partial): rows written since the last look",
    "UPDATE timers SET loaded = ? WHERE loaded = ? RETURNING id, due":
        "timer refill's claim via timers_unloaded (partial): rows written since the last look",
    "SELECT id FROM outbox WHERE status = ? ORDER BY id":
        "retry every dead row via outbox_due: sorts the dead rows",
    "SELECT id FROM outbox WHERE status = ? AND channel = ? ORDER BY id":
        "retry a channel's dead rows via outbox_channel_due: sorts them",
    "WITH RECURSIVE channels (name) AS (SELECT min(channel) FROM outbox UNION ALL SELECT "
    "(SELECT min(channel) FROM outbox WHERE channel > name) FROM channels WHERE name IS NOT "
    "NULL) SELECT name, (SELECT count(*) FROM outbox WHERE channel = name AND status IN (?, ?)"
    "), (SELECT min(created_at) FROM outbox WHERE channel = name AND status IN (?, ?)), "
    "(SELECT count(*) FROM outbox WHERE channel = name AND status = ?) FROM channels WHERE "
    "name IS NOT NULL ORDER BY name":
        "outbox gauges via outbox_channel_due: queued and dead rows; sorts the channel names",
    # -- deliberate passes: metrics of everything, reports, exports, lists, the CLI
    "SELECT status, count(*) FROM referrals GROUP BY status":
        "metrics scrape: one pass of referrals_status (~70 ms at 1M referrals)",
    "SELECT … FROM outbox WHERE status = ? ORDER BY id DESC LIMIT ?":
        "outbox page: sorts that status's rows (the queue; all history for sent / cancelled)",
    "SELECT … FROM outbox WHERE status = ? ORDER BY id DESC":
        "`refloop outbox list --status`: sorts that status's rows",
    "SELECT … FROM parked ORDER BY id": "parked list with linked ones: all of them",
    "SELECT … FROM specialists ORDER BY name, id":
        "`refloop specialists list`: sorts the directory",
    "SELECT … FROM audit ORDER BY id": "`refloop audit verify` / export; the API's first page",
    "SELECT … FROM audit WHERE at >= ? ORDER BY id": "audit export since a time",
    "SELECT … FROM messages WHERE source = ? ORDER BY id ASC": "replay selection: a pass",
    "SELECT … FROM messages WHERE received_at >= ? AND received_at < ? ORDER BY id DESC LIMIT ?":
        "message browser window: sorts the window's rows (ids need not follow received_at)",
    "SELECT … FROM messages WHERE +status = ? AND received_at >= ? AND received_at < ? "
    "ORDER BY id DESC LIMIT ?": "message browser window: sorts the window's rows",
    "SELECT … FROM messages WHERE +status = ? AND received_at >= ? ORDER BY id DESC LIMIT ?":
        "`refloop messages list --since --status`: newest first back to since",
    "SELECT … FROM messages WHERE message_type >= ? AND message_type < ? ORDER BY id DESC "
    "LIMIT ?": "message browser / `messages list --type TYPE*`: sorts the prefix's rows",
    "SELECT … FROM messages WHERE message_type GLOB ? ORDER BY id DESC LIMIT ?":
        "message browser / `messages list --type 'SIU^*12'`: sorts the prefix's rows",
    "SELECT … FROM report_referrals WHERE opened_at >= ? AND opened_at < ? AND "
    "(prev_opened_at IS NULL OR prev_opened_at < ?) GROUP BY ?":
        "closure report: sorts the period's referrals into groups",
    # the simulator's own end-of-run summary, not the daemon
    "SELECT … FROM referrals ORDER BY id": "simulator summary",
    "SELECT … FROM referral_events ORDER BY referral_id, id": "simulator summary",
    "SELECT … FROM outbox WHERE referral_id IS NOT NULL ORDER BY referral_id, id":
        "simulator summary (sorts)",
    "SELECT referral_id, min(occurred_at) FROM referral_events WHERE kind = ? "
    "GROUP BY referral_id": "simulator summary",
    "SELECT channel FROM outbox WHERE template IN (?, ?) AND status = ?": "simulator summary",
    "SELECT due FROM outbox WHERE channel IN (?,?)": "simulator summary",
}  # fmt: skip
# Families of worklist statements (engine.store.referral_search builds them from the
# filters, the sort and the cursor, too many shapes to list one by one): a pattern of the
# statement's key and why its reads are deliberate. bench/search.py times them at 1M.
ALLOWED_PATTERNS = (
    (  # engine.store.referrals.insert_referral: the columns it names and its NULLs vary
        re.compile(r"^INSERT INTO referrals \(sending_facility, placer_number, "),
        "SCAN parked: a foreign-key check SQLite runs only while a violation is pending",
    ),
    (
        re.compile(r"^SELECT id FROM referrals WHERE .*(?<!\+)status = \? ORDER BY \(CASE "),
        "the closed referrals of a worklist that shows all, in priority order via "
        "referrals_status_priority: a walk in index order, filtered, that stops at the LIMIT",
    ),
    (
        re.compile(r"^SELECT count\(\*\) FROM (messages|outbox)\b"),
        "the message browser's or the outbox page's total (and a page's position): counts "
        "the rows its filter selects, on an index",
    ),
    (
        re.compile(r"^SELECT … FROM outbox WHERE status = \? AND id [<>] \? ORDER BY id "),
        "outbox page before or after a row: sorts that status's rows (as the first page)",
    ),
    (
        re.compile(r"^SELECT count\(\*\) FROM referrals\b"),
        "worklist total and a page's position: counts the rows its filter selects (sort)",
    ),
    (
        re.compile(r"^SELECT id FROM referrals\b.* ORDER BY \(NOT \(status != \? AND "),
        "worklist in priority order (overdue is computed at now): sorts the rows its filter "
        "selects: open referrals, the search's matches, or (show all) every referral",
    ),
    (
        re.compile(
            r"^SELECT id FROM referrals\b.*id IN \(SELECT id FROM referrals WHERE "
            r"placer_number IN .* ORDER BY "
        ),
        "search results: sorts the referrals the words matched (each word by its indexes)",
    ),
    (
        re.compile(r"^SELECT id FROM referrals( WHERE .*)? ORDER BY (id|opened_at) (DESC|ASC)"),
        "a page newest (or oldest) first: walks rowid or referrals_opened order to the LIMIT; "
        "with a status filter it sorts that status's referrals",
    ),
)
_LITERAL = re.compile(r"'(?:[^']|'')*'|\b\d+(?:\.\d+)?(?:e[+-]?\d+)?\b|X'[0-9A-Fa-f]*'")
_ALIAS = re.compile(r"\b(?:FROM|JOIN) (\w+) (?:AS )?(\w+)")
_ACCESS = re.compile(r"(SCAN|SEARCH) (\w+)(?: USING .*?(?: \((.*)\))?)?$")
_TERM = re.compile(r"(<expr>|\w+)([=<>])")
_NOT_ALIAS = {"WHERE", "JOIN", "ON", "ORDER", "GROUP", "LIMIT", "LEFT", "INNER", "CROSS", "UNION"}


def shape(sql: str) -> str:
    """The statement with its literal values as ``?`` and spaces collapsed."""
    return " ".join(_LITERAL.sub("?", sql).split())


def key(sql: str) -> str:
    """:func:`shape`, with a select list of five columns or more as ``…``."""
    s = shape(sql)
    m = re.match(r"SELECT (?:DISTINCT )?", s)
    if m is None:
        return s
    depth = commas = 0
    for i in range(m.end(), len(s)):
        if s[i] in "()":
            depth += 1 if s[i] == "(" else -1
        elif depth == 0 and s[i] == ",":
            commas += 1
        elif depth == 0 and s.startswith(" FROM ", i):
            return s[: m.end()] + "…" + s[i:] if commas >= 4 else s
    return s


def _plan(conn: sqlite3.Connection, sql: str) -> list[str]:
    try:
        return [str(r[-1]) for r in conn.execute("EXPLAIN QUERY PLAN " + sql)]
    except sqlite3.Error:
        return []  # PRAGMA, BEGIN, COMMIT, DDL of migrations: nothing to plan


def plan_problems(conn: sqlite3.Connection, sql: str) -> list[str]:
    """What in ``sql``'s plan reads a growing table widely: a scan, a search by
    low-cardinality columns only, a sort of rows found by either or by a range alone."""
    aliases = {a: t for t, a in _ALIAS.findall(sql) if a.upper() not in _NOT_ALIAS}
    out, broad = [], []
    for detail in _plan(conn, sql):
        m = _ACCESS.match(detail)
        if m and aliases.get(m[2], m[2]) in GROWING:
            if m[1] == "SCAN":
                out.append(detail)
                broad.append(detail)
            elif m[3] is not None:
                terms = _TERM.findall(m[3])
                selective = {c for c, op in terms if op == "=" and c not in LOW_CARDINALITY}
                if not selective:
                    broad.append(detail)
                    if all(op == "=" for _, op in terms):
                        out.append(detail)  # low-cardinality columns only
        elif detail.startswith("USE TEMP B-TREE") and broad:
            out.append(f"{detail} of {broad[0]}")
    return out


def _operator_paths(db: Any, now: float) -> None:
    """What the dashboard, the API, the metrics, the dispatcher and the CLI run, and the
    store functions the simulation does not reach, on a populated database."""
    conn = db.conn
    clock = VirtualClock(now)
    svc = Service(db, clock)
    me = Principal("pat", "admin", "token")
    rid = int(conn.execute("SELECT max(id) FROM referrals").fetchone()[0])
    mid = int(conn.execute("SELECT max(id) FROM messages").fetchone()[0])
    phone = conn.execute("SELECT max(patient_phone) FROM referrals").fetchone()[0]
    kw: dict[str, Any]
    # the worklist, as the dashboard's filters and the API ask for it
    for kw in (
        {"open_only": True},
        {"open_only": True, "specialty": "REFCARD"},
        {"open_only": True, "specialist": "smith"},
        {"open_only": True, "referring": "1234", "days_open_min": 30},
        {"open_only": True, "days_open_min": 30},
        {"status": "open"},
        {},
        {"specialty": "REFCARD"},
        {"days_open_min": 7},
    ):
        svc.worklist_page(me, via="api", **kw)
    # the search box, the sorts and the pages after and before a referral
    for kw in (
        {"q": "REF-1"},
        {"q": "smith jane", "open_only": True},
        {"q": "1970-01-01"},
        {"q": "cardiology", "sort": "-opened"},
        {"open_only": True, "overdue": True},
        {"open_only": True, "sort": "priority", "after": rid},
        {"open_only": True, "sort": "priority", "before": rid},
        {"sort": "-id", "after": rid},
        {"sort": "opened", "before": rid},
    ):
        svc.worklist_page(me, via="api", **kw)
    svc.referral(me, rid, via="api")
    svc.parked()
    svc.parked(include_linked=True)
    for status in ("", "pending", "dead"):
        svc.outbox(status=status)
    svc.tasks()
    for status in ("open", "done", "all", "due", "snoozed"):
        svc.tasks(status=status)
    for kw in (
        {},
        {"status": "error"},
        {"status": "received", "before_id": mid},
        {"status": "error", "source": "mllp"},
        {"source": "mllp"},
        {"message_type": "ORM^O01"},
        {"message_type": "ORM^O01", "status": "routed"},
        {"message_type": "SIU*"},
        {"message_type": "SIU^*12"},
        {"control_id": "X1", "status": "error"},
        {"since": now - 86400},
        {"since": now - 86400, "until": now},
        {"since": now - 86400, "until": now, "status": "error"},
        {"before_id": mid},
    ):
        svc.messages(**kw)
    svc.message(mid)
    svc.message_detail(mid)  # the message view: decision, events, parked, outbox rows
    svc.message_tree(me, mid, via="api")
    # the dashboard's message browser and outbox pages (totals, older and newer pages)
    for kw in (
        {},
        {"before": mid},
        {"after": mid - 5},
        {"status": "error"},
        {"message_type": "ORM^O01", "before": mid},
        {"since": now - 86400, "after": mid - 5},
    ):
        svc.message_page(**kw)
    for status in ("", "dead", "pending"):
        svc.outbox_page(status=status)
        svc.outbox_page(status=status, before=mid)
        svc.outbox_page(status=status, after=1)
    svc.raw(me, mid, via="api")
    svc.audit(limit=10)
    svc.audit(after_id=5, limit=10)
    svc.audit(since="2000-01-01", after_id=5, limit=10)
    today = dt.datetime.fromtimestamp(now, dt.UTC).date()
    for by in (None, "specialty", "month"):
        svc.report(today.replace(month=1, day=1), today, by)
    # metrics (scrape time) and the dispatcher's gauges (after every round)
    report.closure_ratios(conn, now)
    list(tracker._StoreGauges(db).collect())
    list(timers._PendingGauge(db).collect())
    outbox_store.stats(conn, now)
    # the CLI
    for kw in (
        {},
        {"limit": 0},
        {"status": "open"},
        {"specialty": "REFCARD"},
        {"open_days_over": 30.0},
        {"prior_auth": "required"},
        {"q": "smith"},
        {"after": rid},
    ):
        views.find_referrals(db, now=now, **kw)
    timers_store.listing(conn)
    timers_store.listing(conn, due_before=now, limit=10)
    inbox = Inbox.__new__(Inbox)  # reads only: no writer task
    inbox.db = db
    for kw in (
        {},
        {"status": "error"},
        {"since": now - 86400, "status": "error"},
        {"message_type": "SIU^S1*"},
        {"source": "mllp", "limit": 0, "newest_first": False},
        {"ids": [1, 2], "limit": 0, "newest_first": False},
    ):
        list(inbox.list(**kw))
    list(audit_store.rows(conn))
    list(audit_store.rows(conn, since="2000-01-01"))
    audit_store.verify(conn)
    dispatch.list_outbox(db, status="dead")
    specialists_store.listing(conn)
    Decisions(db).get(mid)
    packets_store.source_message(conn, rid)
    # writes the simulation does not make, rolled back
    with db.transaction() as c:
        outbox_store.retry_dead(c, now)
        outbox_store.retry_dead(c, now, "sms")
        outbox_store.reap_expired(c, now, keep=[1, 2])
        outbox_store.next_expiry(c)
        outbox_store.renew(c, outbox_store.list_items(c, status="sent", limit=1), now)
        timers_store.unloaded(c)
        timers_store.claim_unloaded(c)
        outbox_store.next_due(c, "sms")
        oid = int(c.execute("SELECT max(id) FROM outbox").fetchone()[0])
        c.execute("UPDATE outbox SET status = 'dead' WHERE id = ?", (oid,))
        outbox_store.retry(c, oid, now)
        outbox_store.cancel(c, oid, now)
        outbox_store.find_by_provider_id(c, "sms", "SM1")
        outbox_store.last_referral_texted(c, "sms", "+15555550100")
        outbox_store.id_for_key(c, "k")
        outbox_store.suppress(c, "+15555550100", "stop", now)
        outbox_store.is_suppressed(c, "+15555550100")
        outbox_store.unsuppress(c, "+15555550100")
        outbox_store.record_reply(
            c, message_sid="SM1", from_number="+1", keyword="yes", body="", referral_id=rid, now=now
        )
        timers_store.patient_contacts(c, rid, phone or "+15555550100", now - 86400)
        timers_store.patient_contacts(c, rid, "", now - 86400)
        referral_store.find_by_patient(c, ["P1^^^MRN"], "REFCARD", now - 86400, now)
        referral_store.find_open_by_patient(c, ["P1^^^MRN", "P3^^^MRN"])
        referral_store.placer_candidates(c, "P-1")
        referral_store.learn_placer_authority(c, rid, "NORTH_EHR")
        referral_store.record_merge(c, "P1^^^MRN", "P2^^^MRN", None, now)
        referral_store.surviving_id(c, "P1^^^MRN")
        pid, _ = referral_store.park(
            c, message_id=None, kind="report-received", fingerprint="f", event={},
            why="no-match", sending_facility="F", placer_number="P-1",
            filler_numbers=["F-1"], now=now,
        )  # fmt: skip
        referral_store.parked_candidates(c, "P-1", ["F-1", "F-2"])
        referral_store.get_parked(c, pid)
        referral_store.mark_linked(c, pid, rid, "user:pat", now)
        referral_store.ensure_prior_auth(c, rid, hold_packet=True, now=now)
        referral_store.update_prior_auth(c, rid, now=now, status="approved")
        referral_store.get_prior_auth(c, rid)
        referral_store.find_by_fillers(c, ["F-1"])
        referral_store.count_outbox(c, rid, "nudge:")
        sid = specialists_store.upsert(
            c, {"npi": "1234567893", "name": "S"}, source="import", now=now
        )
        specialists_store.upsert(c, {"npi": "1234567893", "fax": "+1"}, source="referral", now=now)
        specialists_store.find_by_address(c, "s@direct.example")
        specialists_store.certificate_for(c, "s@direct.example")
        assert sid
        uid = users_store.add_user(c, "pat", "admin", "x", now)
        users_store.add_session(c, "s", uid, now, now + 60)
        users_store.session_user(c, "s", now)
        users_store.add_token(c, "t", uid, "", now)
        users_store.token_user(c, "t")
        users_store.count_tokens(c, uid)
        users_store.list_users(c)
        users_store.set_password(c, uid, "y", now)
        users_store.delete_session(c, "s")
        users_store.delete_expired_sessions(c, now)
        users_store.set_disabled(c, uid, True, now)
        c.execute("ROLLBACK")
        c.execute("BEGIN")  # the context manager commits: nothing
    # retention (engine.store.retention): what a dry run and a real run read, 600 days on
    later = now + 600 * 86400
    retention.plan(db, RetentionConfig(), later)
    retention.prune_now(db, RetentionConfig(), later, actor="system", pause=0)


def _trigger_statements(conn: sqlite3.Connection) -> Iterator[tuple[str, str]]:
    """(trigger, statement) for each statement of each trigger body, ``new.x`` / ``old.x``
    as a literal (tracing shows a trigger's name, not its statements)."""
    for name, sql in conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'"):
        body = sql[sql.upper().index("BEGIN") + 5 : sql.upper().rindex("END")]
        for statement in body.split(";"):
            if statement.strip() and "RAISE(" not in statement:
                yield name, re.sub(r"\b(?:new|old)\.\w+", "1", statement)


Plans = dict[str, tuple[list[str], list[str]]]  # key: (problems, plan)


@pytest.fixture(scope="module")
def plans(tmp_path_factory: pytest.TempPathFactory) -> Plans:
    """{:func:`key`: (its plan's problems, its plan)} for every statement of a small
    practice run and of the operator paths on what it left, and for every trigger
    statement."""
    seen: dict[str, str] = {}
    opened: list[Path] = []
    real = engine.app.open_database

    def traced(path: Any, **kw: Any) -> Any:
        db = real(path, **kw)
        db.conn.set_trace_callback(lambda sql: seen.setdefault(shape(sql), sql))
        opened.append(Path(path))
        return db

    mp = pytest.MonkeyPatch()
    mp.setattr(engine.app, "open_database", traced)  # observes; changes nothing
    try:
        state = tmp_path_factory.mktemp("plans")
        simulate(load_scenario(ROOT / "docs/scenarios/practice-800.yaml", scale=0.05), state)
    finally:
        mp.undo()
    assert opened and len(seen) > 50
    db = open_database(opened[0])
    try:
        now = float(db.conn.execute("SELECT max(updated_at) FROM referrals").fetchone()[0])
        db.conn.set_trace_callback(lambda sql: seen.setdefault(shape(sql), sql))
        _operator_paths(db, now)
        db.conn.set_trace_callback(None)
        out: Plans = {}
        for sql in seen.values():
            problems, plan = out.setdefault(key(sql), ([], []))
            problems.extend(plan_problems(db.conn, sql))
            plan.extend(_plan(db.conn, sql))
        for trigger, sql in _trigger_statements(db.conn):
            out[f"trigger {trigger}: {shape(sql)}"] = (
                plan_problems(db.conn, sql),
                _plan(db.conn, sql),
            )
    finally:
        db.close()
    assert len(out) > 150
    return out


def unexplained(k: str, problems: list[str], plan: list[str]) -> list[str]:
    """What :data:`ALLOWED` does not account for in statement ``k``'s plan."""
    reason = ALLOWED.get(k)
    if reason is None:
        reason = next((why for pattern, why in ALLOWED_PATTERNS if pattern.search(k)), None)
    if reason is None:
        return problems
    left = [p for p in problems if p.startswith("USE TEMP B-TREE") and "sort" not in reason]
    via = re.search(r"\bvia (\w+)", reason)
    if via and not any(f"INDEX {via[1]}" in line for line in plan):
        left.append(f"not via {via[1]}: {plan}")
    return left


@pytest.mark.sqlite_file("SQLite's query plans (EXPLAIN QUERY PLAN)")
def test_no_statement_reads_a_growing_table_whole(plans: Plans) -> None:
    found = {k: left for k, (p, plan) in plans.items() if (left := unexplained(k, p, plan))}
    assert not found, "\n".join(f"{k}\n    {v}" for k, v in found.items())


@pytest.mark.sqlite_file("SQLite's query plans (EXPLAIN QUERY PLAN)")
def test_every_allowance_is_still_needed(plans: Plans) -> None:
    """An allowance whose statement no longer runs, or no longer reads widely, goes."""
    unused = sorted(k for k in ALLOWED if not plans.get(k, ([], []))[0])
    assert not unused, "\n".join(unused)


@pytest.mark.sqlite_file("SQLite's query plans (EXPLAIN QUERY PLAN)")
def test_the_check_catches_a_scan_in_disguise(tmp_path: Path) -> None:
    db = open_database(tmp_path / "r.db")  # every migration: the real schema
    conn = db.conn
    try:
        # the shape of the nudge caps' old query: every patient nudge, by the channel index
        assert plan_problems(conn, "SELECT due FROM outbox WHERE channel IN ('sms', 'portal')")
        assert plan_problems(conn, "SELECT * FROM parked WHERE status = 'parked' AND why = ''")
        assert plan_problems(conn, "SELECT count(*) FROM messages")
        # through an alias, and a sort of what a range found
        assert plan_problems(conn, "SELECT o.id FROM outbox o WHERE o.template = 'x'")
        assert plan_problems(conn, "SELECT id FROM messages WHERE received_at > 0 ORDER BY id")
        # the outbox gauges' old GROUP BY; the open worklist in a form its index cannot serve
        assert plan_problems(conn, "SELECT channel, count(*) FROM outbox GROUP BY channel")
        assert plan_problems(
            conn, "SELECT id FROM referrals WHERE status NOT IN ('closed') ORDER BY opened_at"
        )
        assert not plan_problems(conn, "SELECT * FROM outbox WHERE referral_id = 1")
        assert not plan_problems(conn, "SELECT * FROM referrals r WHERE r.id = 1")
        # the open worklist reads the open referrals' partial index in order, no sort
        plan = conn.execute(
            "EXPLAIN QUERY PLAN SELECT id FROM referrals WHERE status != ? "
            "ORDER BY opened_at, id LIMIT 5",
            ("closed",),
        ).fetchall()
        assert [r[-1] for r in plan] == ["SCAN referrals USING INDEX referrals_open"]
    finally:
        db.close()


def test_outbox_gauges_count_as_a_group_by_would(tmp_path: Path) -> None:
    """``store.outbox.stats`` reads each channel's queued and dead rows by index instead
    of grouping the whole table: the same numbers as the GROUP BY it replaced."""
    db = open_database(tmp_path / "r.db")
    try:
        statuses = ("pending", "sending", "sent", "dead", "cancelled")
        with db.transaction() as conn:
            for i in range(200):
                channel = ("sms", "fax", "", "task", "portal")[i % 5] if i % 7 else "sms"
                referral_store.enqueue_outbox(
                    conn, None, channel, "t", "{}", f"k{i}", float(i), now=float(i % 13)
                )
                conn.execute(
                    "UPDATE outbox SET status = ? WHERE idempotency_key = ?",
                    (statuses[(i * 3) % 5] if channel != "portal" else "sent", f"k{i}"),
                )
        grouped = db.conn.execute(
            "SELECT channel, sum(CASE WHEN status IN ('pending', 'sending') THEN 1 ELSE 0 END), "
            "min(CASE WHEN status IN ('pending', 'sending') THEN created_at END), "
            "sum(CASE WHEN status = 'dead' THEN 1 ELSE 0 END) "
            "FROM outbox GROUP BY channel ORDER BY channel"
        ).fetchall()
        now = 20.0
        assert [
            (s.channel, s.depth, s.oldest_age, s.dead) for s in outbox_store.stats(db.conn, now)
        ] == [
            (c, int(n), now - float(t) if t is not None else 0.0, int(d)) for c, n, t, d in grouped
        ]
        assert ("portal", 0, 0.0, 0) in [
            (s.channel, s.depth, s.oldest_age, s.dead) for s in outbox_store.stats(db.conn, now)
        ]
    finally:
        db.close()
