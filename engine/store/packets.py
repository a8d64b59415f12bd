"""What the specialist packet is rendered from: the message that opened the referral.

The tracker links every event to the inbox row it came from (``referral_events``); the
packet shows the ``referral-created`` message as received (HL7 v2 bytes, or a FHIR
resource's JSON). Nothing here commits. Only this package runs SQL.
"""

from __future__ import annotations

from engine.store.inbox import raw_bytes
from engine.store.referrals import Conn


def source_message(conn: Conn, referral_id: int) -> bytes | None:
    """The raw bytes of the message whose ``referral-created`` opened the referral (the
    first one recorded), or None (an operator-made referral, or the row is gone)."""
    r = conn.execute(
        "SELECT e.message_id FROM referral_events e JOIN messages m ON m.id = e.message_id "
        "WHERE e.referral_id = ? AND e.kind = 'referral-created' ORDER BY e.id LIMIT 1",
        (referral_id,),
    ).fetchone()
    return raw_bytes(conn, int(r[0])) if r else None
