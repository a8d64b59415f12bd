"""The schema's history: ``MIGRATIONS``, one step per schema version, applied in order by
``engine.store.db.open_database`` (``PRAGMA user_version`` counts the steps done).

Each table module owns its schema (its ``migrate``); this list imports them, and they
import only the leaf ``engine.store.sql``. Append new steps at the end, never reorder.
"""

from __future__ import annotations

from typing import Final

from engine.store import (
    audit,
    closure_report,
    decisions,
    inbox,
    leases,
    nodes,
    outbox,
    referral_search,
    referrals,
    retention,
    specialists,
    tasks,
    timers,
    users,
)
from engine.store.sql import Migration, Schema


def _m1_inbox(db: Schema) -> None:
    db.table("messages").create(
        {
            "id": int,
            "received_at": float,  # epoch seconds (UTC)
            "source": str,
            "peer": str,
            "sending_app": str,
            "sending_facility": str,
            "receiving_app": str,
            "receiving_facility": str,
            "control_id": str,
            "message_type": str,  # TYPE^TRIGGER
            "version": str,
            "charset": str,  # the codec the bytes decode with
            "raw": bytes,  # exactly the bytes received
            "sha256": bytes,
            "status": str,  # received | routed | filtered | error | rejected
            "ack_code": str,
            "error": str,  # reason; never PHI
            "duplicates": int,  # identical resends ACKed again, not stored again
            "flags": str,  # e.g. control-id-reused
            "route": str,
            "processed_at": float,
            "batch_ref": str,
        },
        pk="id",
        not_null={"received_at", "source", "raw", "status"},
        defaults={
            "peer": "",
            "sending_app": "",
            "sending_facility": "",
            "receiving_app": "",
            "receiving_facility": "",
            "control_id": "",
            "message_type": "",
            "version": "",
            "charset": "",
            "ack_code": "",
            "error": "",
            "duplicates": 0,
            "flags": "",
            "route": "",
            "batch_ref": "",
        },
    )
    # dedupe lookups on the ACK path, and the CLI's / API's metadata filters
    db.table("messages").create_index(["control_id"], index_name="messages_control_id")
    db.table("messages").create_index(["received_at"], index_name="messages_received_at")
    db.table("messages").create_index(["message_type", "id"], index_name="messages_type")
    # processing cursors and other small facts
    db.table("meta").create({"key": str, "value": str}, pk="key")


def _m2_decisions(db: Schema) -> None:
    decisions.migrate(db)


def _m3_referrals(db: Schema) -> None:
    referrals.migrate(db)


def _m4_audit(db: Schema) -> None:
    audit.migrate(db)


def _m5_outbox_dispatch(db: Schema) -> None:
    outbox.migrate(db)


def _m6_specialists(db: Schema) -> None:
    specialists.migrate(db)


def _m_users(db: Schema) -> None:
    users.migrate(db)


def _m_closure_report(db: Schema) -> None:
    closure_report.migrate(db)


def _m_patient_phone(db: Schema) -> None:
    # the nudge caps look up a patient's contacts across referrals by phone
    # (store.timers.patient_contacts): without it each nudge scanned every patient nudge
    db.execute("CREATE INDEX referrals_patient_phone ON referrals (patient_phone)")


def _m_browse_indexes(db: Schema) -> None:
    # the worklist (dashboard, /api/referrals: store.worklist.search_referrals) lists open
    # referrals, by specialty or not, or all referrals, oldest first: without these each
    # request read every referral and sorted it. The open ones are a partial index (the
    # query's ``status != 'closed'`` selects it), so they cost nothing once closed.
    db.execute("CREATE INDEX referrals_open ON referrals (opened_at) WHERE status != 'closed'")
    db.execute(
        "CREATE INDEX referrals_open_specialty ON referrals (lower(specialty), opened_at) "
        "WHERE status != 'closed'"
    )
    db.execute("CREATE INDEX referrals_opened ON referrals (opened_at)")
    # the message browser's status filter (newest first): without it a status with few or
    # no rows (received, rejected) read the whole inbox
    db.execute("CREATE INDEX messages_status ON messages (status, id)")


def _m_outbox_message_id(db: Schema) -> None:
    outbox.migrate_message_id(db)


def _m_tasks_queue(db: Schema) -> None:
    tasks.migrate(db)


def _m_referral_keys(db: Schema) -> None:
    # a placer number is unique only within its assigning authority (EI.2): two practices
    # may both send order 10482 (docs/referral-states.md, "Keys"); and the FHIR requester
    # of a referral, to address the write-back Communication (docs/fhir.md)
    # (a database created since has them from _m3_referrals)
    columns = db["referrals"].columns_dict
    for column in ("placer_authority", "referring_reference"):
        if column not in columns:
            db.execute(f"ALTER TABLE referrals ADD COLUMN {column} TEXT NOT NULL DEFAULT ''")


def _m_workbench(db: Schema) -> None:
    # the coordinator's work page (open tasks by due date, a referral's tasks) and the
    # analyst's message view (what one message did: its events, parked events) (issue 19)
    tasks.migrate_due(db)
    referrals.migrate_message_indexes(db)


def _m_message_raw(db: Schema) -> None:
    # raw bytes in their own table: a status update no longer rewrites them (issue 14.5)
    inbox.migrate_raw(db)


def _m_timers_loaded(db: Schema) -> None:
    # issue 17 stage 0: the timer wheel claims new rows by a flag, not "id > last seen"
    timers.migrate_loaded(db)


def _m_outbox_leases(db: Schema) -> None:
    # issue 17 stage 0: outbox claims are leases (claimed_by, lease_until), one row per
    # referral and channel in flight
    outbox.migrate_leases(db)


def _m_inbox_dedupe(db: Schema) -> None:
    # issue 17 stage 0: inbox dedupe by a unique index and INSERT ... ON CONFLICT
    inbox.migrate_dedupe(db)


def _m_referral_search(db: Schema) -> None:
    # the patient's MRN, name and birth date on the referral row, with search keys and
    # indexes for the search box (issue 19); existing referrals from their opening message
    from engine.hl7v2.message import Message
    from engine.hl7v2.patient import from_hl7

    referral_search.migrate(db, backfill=lambda raw: from_hl7(Message(raw)))


def _m_cluster(db: Schema) -> None:
    # issue 17 stage 2: the nodes sharing this store and the singleton leases
    nodes.migrate(db)
    leases.migrate(db)


def _m_referral_rekey(db: Schema) -> None:
    # issue 19 review: names with letters NFKD leaves whole (Ø, Ł, Đ, Æ) get search keys
    # spelled plain, as a person types them
    referral_search.migrate_rekey(db)


def _m_retention(db: Schema) -> None:
    # pruned messages keep their row (issue 20): pruned_at/pruned_size, and the indexes
    # the pruner scans (engine.store.retention)
    retention.migrate(db)


def _m_retention_replies(db: Schema) -> None:
    # SMS reply texts and outbox recipients (phone numbers) get a retention period too
    retention.migrate_replies(db)


def _m_specialty_category(db: Schema) -> None:
    # the specialty filter matches the derived specialty (REFCARD -> Cardiology) too
    referral_search.migrate_category_index(db)


MIGRATIONS: Final[list[Migration]] = [
    _m1_inbox,
    _m2_decisions,
    _m3_referrals,
    _m4_audit,
    _m5_outbox_dispatch,
    _m6_specialists,
    _m_users,
    _m_closure_report,
    _m_patient_phone,
    _m_browse_indexes,
    _m_outbox_message_id,
    _m_tasks_queue,
    _m_referral_keys,
    _m_message_raw,
    _m_timers_loaded,
    _m_outbox_leases,
    _m_inbox_dedupe,
    _m_workbench,
    _m_referral_search,
    _m_cluster,
    _m_retention,
    _m_referral_rekey,
    _m_retention_replies,
    _m_specialty_category,
]
