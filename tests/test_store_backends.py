"""The store on either backend (SQLite by default, PostgreSQL with REFLOOP_TEST_STORE):
the inbox's group commit and dedupe, raw bytes, the message-type filter, the audit chain
(append-only; on PostgreSQL also with concurrent writers), the schema version, and the
translation of SQLite-spelled SQL for PostgreSQL (engine/store/pg.py)."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest
from helpers import drop_pg_schema, make_pg_schema

from engine.errors import StoreError
from engine.hl7v2.message import read_msh
from engine.model import Inbound
from engine.store import audit, migrations
from engine.store.db import Database, DatabaseError, is_postgres_url, open_database
from engine.store.pg import redact, translate
from engine.store.sql import POSTGRESQL

TEST_STORE = os.environ.get("REFLOOP_TEST_STORE", "")
needs_pg = pytest.mark.skipif(not TEST_STORE, reason="PostgreSQL only (REFLOOP_TEST_STORE)")

# every byte value, as a message's bytes may hold (8-bit charsets, a stray NUL)
ALL_BYTES = bytes(range(256))


def _hl7(control_id: str, body: str = "PID|1||MRN1") -> bytes:
    return (
        f"MSH|^~\\&|EHR|CLINIC|REFLOOP|HUB|20260101120000||ADT^A04|{control_id}|P|2.5.1\r{body}\r"
    ).encode()


def _inbound(raw: bytes) -> Inbound:
    msh, codec = read_msh(raw)
    return Inbound("ehr", "127.0.0.1:1", raw, 1_767_268_800.0, msh, codec)


def _add_all(db: Database, raws: list[bytes | Inbound]) -> list[tuple[int, bool]]:
    """Store ``raws`` through the inbox's group-commit writer (its own connection)."""
    from engine.store import Inbox

    async def main() -> list[tuple[int, bool]]:
        inbox = Inbox(db)
        writer = asyncio.create_task(inbox.run_writer())
        results = [
            await inbox.add(raw if isinstance(raw, Inbound) else _inbound(raw), "AA")
            for raw in raws
        ]
        inbox.close()
        await writer
        return [(r.id, r.duplicate) for r in results]

    return asyncio.run(main())


def test_inbox_group_commit_dedupe_and_bytes(store: Database) -> None:
    from engine.store import Inbox

    first = _hl7("C1", "PID|1||" + ALL_BYTES[32:127].decode())
    resend = first
    reused = _hl7("C1", "PID|1||OTHER")
    results = _add_all(store, [first, resend, reused])
    # ids: the resend is the first row again; on PostgreSQL the resend's attempted insert
    # uses up an identity value (ids may have gaps), so the next row is only "higher"
    (a, new_a), (b, again), (c, new_c) = results
    assert (new_a, again, new_c) == (False, True, False) and a == b and c > a
    inbox = Inbox(store)
    one, two = inbox.get(a), inbox.get(c)
    assert one is not None and two is not None
    assert one.raw == first and one.duplicates == 1 and one.flags == ""
    assert two.flags == "control-id-reused"
    loaded = asyncio.run(inbox.load(c))  # another connection, in a worker thread
    assert loaded is not None and loaded.raw == reused


def test_raw_bytes_round_trip_every_byte_value(store: Database) -> None:
    from engine.store.inbox import raw_bytes

    raw = _hl7("C2") + ALL_BYTES
    with store.transaction() as conn:
        store_id = conn.execute(
            "INSERT INTO messages (received_at, source, status) VALUES (?, ?, ?) RETURNING id",
            (1.0, "ehr", "received"),
        ).fetchone()[0]
        conn.execute("INSERT INTO message_raw (message_id, raw) VALUES (?, ?)", (store_id, raw))
    assert raw_bytes(store.conn, store_id) == raw
    assert raw_bytes(store.conn, store_id + 1) is None


def test_message_type_patterns(store: Database) -> None:
    """``*`` inside a type (GLOB on SQLite, refloop_glob on PostgreSQL); ``?`` and ``[``
    in a type are literal."""
    from engine.store import Inbox

    def typed(control_id: str, kind: str) -> bytes:
        return _hl7(control_id).replace(b"ADT^A04", kind.encode())

    odd = Inbound(  # no MSH (a FHIR source's row): its type is whatever it says
        "fhir", "", b"{}", 1.0, None, "utf-8", sender="f", control_id="T3", message_type="AD?^A04"
    )
    _add_all(store, [typed("T1", "ADT^A04"), typed("T2", "ORU^R01"), odd])
    inbox = Inbox(store)

    def ids(pattern: str) -> list[int]:
        return [m.id for m in inbox.list(message_type=pattern, newest_first=False)]

    assert ids("ADT^A04") == [1]
    assert ids("*^A04") == [1, 3]
    assert ids("AD?^*4") == [3]  # '?' is a literal question mark, not any character
    assert ids("*R0*") == [2]


def test_audit_chain_appends_and_refuses_changes(store: Database) -> None:
    for n in range(3):
        with store.transaction() as conn:
            audit.append(
                conn,
                at=f"2026-01-01T00:00:0{n}.000000Z",
                actor="system",
                action="test",
                referral_id=None,
                message_id=n,
                detail={"n": n},
            )
    result = audit.verify(store.conn)
    assert result.ok and result.rows == 3
    for sql in ("UPDATE audit SET action = 'x' WHERE id = 2", "DELETE FROM audit WHERE id = 3"):
        with pytest.raises(DatabaseError, match="append-only"), store.transaction() as conn:
            conn.execute(sql)
    assert audit.verify(store.conn).ok


def test_schema_has_every_migration(store: Database) -> None:
    if store.dialect == POSTGRESQL:
        version = store.conn.execute("SELECT version FROM schema_version").fetchone()[0]
    else:
        version = store.conn.execute("PRAGMA user_version").fetchone()[0]
    assert version == len(migrations.MIGRATIONS)


def test_reopening_migrates_nothing_twice(store_url: str) -> None:
    open_database(store_url).close()
    db = open_database(store_url)  # the store fixture's open was the first
    try:
        assert audit.verify(db.conn).ok
    finally:
        db.close()


@needs_pg
def test_concurrent_audit_writers_keep_one_chain() -> None:
    """Four connections append at once (each its own transactions): the head row lock
    serialises them, so ids are contiguous and every link holds."""
    url, schema = make_pg_schema(TEST_STORE)
    try:
        dbs = [open_database(url) for _ in range(4)]
        errors: list[BaseException] = []

        def writer(db: Database, who: int) -> None:
            try:
                for n in range(25):
                    with db.transaction() as conn:
                        audit.append(
                            conn,
                            at="2026-01-01T00:00:00.000000Z",
                            actor=f"operator:w{who}",
                            action="test",
                            referral_id=None,
                            message_id=n,
                            detail={"who": who, "n": n},
                        )
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(db, i)) for i, db in enumerate(dbs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        result = audit.verify(dbs[0].conn)
        assert result.ok and result.rows == 100, result
        for db in dbs:
            db.close()
    finally:
        drop_pg_schema(TEST_STORE, schema)


@needs_pg
def test_migrating_nodes_start_together() -> None:
    """Three processes' worth of opens at once on an empty schema: the advisory lock lets
    one migrate; the others find the steps done."""
    url, schema = make_pg_schema(TEST_STORE)
    try:
        opened: list[Database] = []
        errors: list[BaseException] = []

        def opener() -> None:
            try:
                opened.append(open_database(url))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=opener) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors and len(opened) == 3
        version = opened[0].conn.execute("SELECT count(*), max(version) FROM schema_version")
        assert tuple(version.fetchone()) == (1, len(migrations.MIGRATIONS))
        for db in opened:
            db.close()
    finally:
        drop_pg_schema(TEST_STORE, schema)


@needs_pg
def test_migrations_of_two_schemas_do_not_wait_for_each_other() -> None:
    """The migration lock is per schema: a schema migrating (its lock held) does not hold
    back the migration of another schema in the same database (each test's schema, or
    two installations sharing a server)."""
    from engine.store.pg import _locked

    (url_a, schema_a), (url_b, schema_b) = make_pg_schema(TEST_STORE), make_pg_schema(TEST_STORE)
    holder = open_database(url_a)
    try:
        opened: list[Database | BaseException] = []

        def open_b() -> None:
            try:
                opened.append(open_database(url_b))
            except BaseException as exc:  # reported below
                opened.append(exc)

        with _locked(holder.conn):  # as a node in the middle of migrating schema A
            other = threading.Thread(target=open_b)
            other.start()
            other.join(30)
            waited = other.is_alive()
        other.join(30)
        for db in opened:
            if isinstance(db, Database):
                db.close()
        assert not waited, "schema B waited for schema A's migration lock"
        assert len(opened) == 1 and isinstance(opened[0], Database), opened
    finally:
        holder.close()
        drop_pg_schema(TEST_STORE, schema_a)
        drop_pg_schema(TEST_STORE, schema_b)


def test_open_errors_are_one_line_without_the_password(tmp_path: Path) -> None:
    url = "postgresql://refloop:s3cret@127.0.0.1:1/nowhere?connect_timeout=2"
    with pytest.raises(StoreError) as caught:
        open_database(url)
    text = str(caught.value)
    assert "s3cret" not in text and "\n" not in text and "127.0.0.1" in text
    assert redact(url) == "postgresql://refloop:***@127.0.0.1:1/nowhere?connect_timeout=2"
    assert is_postgres_url("postgres://x/y") and not is_postgres_url(tmp_path / "a.db")
    db = open_database(f"sqlite:///{tmp_path / 'via-url.db'}")
    db.close()
    assert (tmp_path / "via-url.db").exists()


# ---------------------------------------------------------------------------
# The translation (no server needed)


@pytest.mark.parametrize(
    ("sqlite", "postgresql"),
    [
        ("SELECT a FROM t WHERE b = ? AND c = ?", "SELECT a FROM t WHERE b = %s AND c = %s"),
        ("SELECT '50%' || ?", "SELECT '50%%' || %s"),
        ("SELECT x'' , x'00ff'", "SELECT '\\x'::bytea , '\\x00ff'::bytea"),
        ("SELECT 1 WHERE a IS ? OR b IS NOT ?",
         "SELECT 1 WHERE a IS NOT DISTINCT FROM %s OR b IS DISTINCT FROM %s"),
        ("SELECT 1 WHERE a IS NULL AND b IS NOT NULL",
         "SELECT 1 WHERE a IS NULL AND b IS NOT NULL"),
        ("SELECT 1 WHERE t GLOB ? AND +status = ?",
         "SELECT 1 WHERE refloop_glob(t, %s) AND status = %s"),
        ("SELECT 'it''s ? :x' -- a comment's ?\n, ?", "SELECT 'it''s ? :x' \n, %s"),
        ("SELECT json_extract(e.detail, '$.status')", "SELECT (e.detail::json ->> 'status')"),
        ("SELECT lower(hex(sha256)), 'hex(x)'",
         "SELECT lower(upper(encode(sha256, 'hex'))), 'hex(x)'"),
        ("SELECT id FROM messages m INDEXED BY messages_unpruned WHERE 1",
         "SELECT id FROM messages m WHERE 1"),
        ("CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT, v REAL, b BLOB) WITHOUT ROWID",
         "CREATE TABLE t (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, "
         "v DOUBLE PRECISION, b BYTEA)"),
    ],
)  # fmt: skip
def test_translate(sqlite: str, postgresql: str) -> None:
    assert translate(sqlite) == (postgresql,)


def test_translate_named_and_triggers() -> None:
    assert translate("SELECT :a, x::text, :b_2", True) == ("SELECT %(a)s, x::text, %(b_2)s",)
    fn, trigger = translate(
        "CREATE TRIGGER no_update BEFORE UPDATE ON audit\n"
        "BEGIN SELECT RAISE(ABORT, 'append-only'); END"
    )
    assert "RAISE EXCEPTION 'append-only';" in fn and fn.startswith("CREATE OR REPLACE FUNCTION")
    assert trigger == (
        "CREATE TRIGGER no_update BEFORE UPDATE ON audit FOR EACH ROW "
        "EXECUTE FUNCTION no_update_fn()"
    )
    _, when = translate(
        "CREATE TRIGGER t AFTER UPDATE OF a ON r WHEN old.a IS NOT new.a BEGIN "
        "UPDATE s SET b = 1; END"
    )
    assert "WHEN (old.a IS DISTINCT FROM new.a)" in when


# ---------------------------------------------------------------------------
# routes.yaml's store section


@pytest.mark.sqlite_file("the default: a file in the state directory")
def test_store_section_reads_url_pool_node_and_lease() -> None:
    from engine.config import loads

    cfg = loads(
        "version: 1\nstore:\n  url: ${env:DB_URL}\n  pool: {min: 3, max: 9}\n"
        "  node_id: node-a\n  lease_seconds: 20\n",
        env={"DB_URL": "postgresql://refloop@db1/refloop"},
    ).store
    assert (cfg.url, cfg.pool_min, cfg.pool_max) == ("postgresql://refloop@db1/refloop", 3, 9)
    assert (cfg.node_id, cfg.lease_seconds) == ("node-a", 20.0)
    assert cfg.location("state", "postgresql://other/x") == "postgresql://other/x"
    assert cfg.location("state") == "postgresql://refloop@db1/refloop"
    assert loads("version: 1\n").store.location("state") == str(Path("state") / "refloop.db")


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ("url: mysql://db/x", "r.yaml:3 store.url: must be postgresql://"),
        ("pool: {min: 5, max: 2}", "store.pool.max: must be at least min (5), not 2"),
        ("pool: {min: 1, size: 2}", "store.pool.size: unknown key"),
        ("lease_seconds: 0", "store.lease_seconds: must be at least 1.0"),
    ],
)
def test_store_section_errors(section: str, expected: str) -> None:
    from engine.config import loads
    from engine.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        loads(f"version: 1\nstore:\n  {section}\n", file="r.yaml")
    assert any(expected in p for p in caught.value.problems), caught.value.problems


def test_dialect_helpers(store: Database) -> None:
    from engine.store.sql import dialect, for_update, group_concat, month_of

    pg = dialect(store.conn) == POSTGRESQL
    assert for_update(store.conn, skip_locked=True) == (" FOR UPDATE SKIP LOCKED" if pg else "")
    row = store.conn.execute(
        f"SELECT {month_of(store.conn, '?')}, "
        f"(SELECT {group_concat(store.conn, 'n')} FROM (SELECT 1 AS n UNION ALL SELECT 2) AS t)",
        (1_767_225_599.0,),  # 2025-12-31T23:59:59Z
    ).fetchone()
    assert row[0] == "2025-12" and sorted(row[1].split(",")) == ["1", "2"]


def test_verify_finds_an_edited_row_through_the_cli(
    store: Database, store_url: str, tmp_path: Path
) -> None:
    """The planted fault: someone with the owner's rights drops the append-only triggers
    and edits row 2; ``refloop audit verify`` (reading ``store.url`` from routes.yaml)
    names row 2 and exits 1, on either backend."""
    from helpers import refloop

    for n in range(1, 5):
        with store.transaction() as conn:
            audit.append(
                conn,
                at=f"2026-01-01T00:00:0{n}.000000Z",
                actor="system",
                action="test",
                referral_id=None,
                message_id=n,
                detail={"n": n},
            )
    routes = tmp_path / "routes.yaml"
    routes.write_text(f"version: 1\nstore:\n  url: '{store_url}'\n", encoding="utf-8")
    ok = refloop("audit", "verify", "--routes", str(routes), "--state", str(tmp_path / "x"))
    assert ok.returncode == 0 and "4 rows" in ok.stdout.decode(), ok.stderr.decode()
    on = " ON audit" if store.dialect == POSTGRESQL else ""
    with store.transaction() as conn:
        conn.execute(f"DROP TRIGGER audit_no_update{on}")
        conn.execute("UPDATE audit SET actor = 'operator:mallory' WHERE id = 2")
    bad = refloop("audit", "verify", "--routes", str(routes), "--state", str(tmp_path / "x"))
    assert bad.returncode == 1
    assert "audit row 2:" in bad.stdout.decode() + bad.stderr.decode()
