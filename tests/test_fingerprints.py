"""Issue 13.11: one canonical JSON form for event fingerprints.

The decisions table (what a replay compares) and the referral timeline (what the tracker
deduplicates on) hold the same digest of the same event: sha256 of the event as JSON
with sorted keys and compact separators. Decisions recorded before that (``json.dumps``
with its default ``", "`` / ``": "`` separators) still count as the same decision, so an
existing database does not see every message as changed.
"""

from __future__ import annotations

import hashlib
import json
import signal
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from helpers import REPO, Daemon, peer, query, refloop, run, shipped_routes, store_conn

from engine.config import load
from engine.model import Event, StoredMessage, to_plain
from engine.routing.compile import compile_config
from engine.routing.decide import decide_stored
from engine.store import Inbox, open_database

pytestmark = pytest.mark.store  # every test here uses the store

REF = (
    b"MSH|^~\\&|EHR|NORTHSIDE|REFLOOP|HUB|20260105090000||REF^I12^REF_I12|FP-1|P|2.5.1\r"
    b"RF1|P^Pending^HL70283|R^Routine^HL70280|Med||O|F-100^NORTH_EHR|20260105\r"
    b"PID|1||MRN1^^^NORTHSIDE^MR||Doe^Jane||19700101|F\r"
    b"OBR|1|F-100^NORTH_EHR||REFCARD^Cardiology referral^L|||||||||||||||||||||||||||"
    b"^Exertional chest pain\r"
)


def digest(event: Event, **separators: Any) -> str:
    """The event digest computed here by hand: sha256 of its JSON, kind included; the
    fields added after fingerprints were first stored (the placer number's authority,
    a provider's FHIR reference) are left out while empty (engine/canonical.py)."""
    plain = to_plain(event)
    for group, name in (
        ("ids", "placer_authority"),
        ("referring", "reference"),
        ("specialist", "reference"),
    ):
        if plain.get(group, {}).get(name) == "":
            del plain[group][name]
    body = json.dumps(plain, sort_keys=True, default=str, **separators)
    return hashlib.sha256(body.encode()).hexdigest()[:32]


def stored_event(state: Path, routes: Path) -> tuple[int, Event]:
    db = open_database(state / "refloop.db")
    try:
        (row,) = Inbox(db).list(limit=0)
        assert isinstance(row, StoredMessage)
        (event,) = decide_stored(compile_config(load(routes)), row).events
        return row.id, event
    finally:
        db.close()


def replay_changed(state: Path, routes: Path) -> list[bool]:
    result = refloop(
        "replay", "--dry-run", "--json", "--state", str(state), "--routes", str(routes)
    )
    assert result.returncode == 0, result.stderr.decode()
    return [json.loads(line)["changed"] for line in result.stdout.decode().splitlines()]


def test_decisions_and_timeline_share_one_fingerprint(daemon: Daemon, tmp_path: Path) -> None:
    daemon.routes = shipped_routes(tmp_path / "routes.yaml")
    daemon.start()

    async def send() -> str:
        async with peer(daemon.mllp) as p:
            return (await p.ask(REF, timeout=20.0)).code

    assert run(send()) == "AA"
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0, daemon.log_tail()

    message_id, event = stored_event(daemon.state_dir, daemon.routes)
    canonical = digest(event, separators=(",", ":"))
    (actions,) = query(
        daemon.db, "SELECT actions FROM decisions WHERE message_id = ?", (message_id,)
    )[0]
    (recorded,) = [a["fingerprint"] for a in json.loads(actions) if a["action"] == "track"]
    timeline = query(
        daemon.db, "SELECT fingerprint FROM referral_events WHERE message_id = ?", (message_id,)
    )
    assert recorded == canonical
    assert timeline == [(canonical,)]
    assert replay_changed(daemon.state_dir, daemon.routes) == [False]

    # a database written before the canonical form: its decision holds the digest with
    # json.dumps's default separators; a replay still sees the same decision
    legacy = digest(event)
    assert legacy != canonical
    with closing(store_conn(daemon.db)) as conn:
        conn.execute(
            "UPDATE decisions SET actions = ? WHERE message_id = ?",
            (actions.replace(canonical, legacy), message_id),
        )
    assert replay_changed(daemon.state_dir, daemon.routes) == [False]


def test_remembered_fingerprints_are_each_events_own() -> None:
    """event_fingerprint remembers the last events' digests (routing, the replay check
    and the tracker ask for the same event's): each answer, first or remembered, and
    after more events than it keeps, is that event's digest computed by hand."""
    from dataclasses import replace

    from engine.canonical import MEMO_EVENTS, event_fingerprint

    table = compile_config(load(REPO / "routes.yaml"))
    events = []
    for n in range(MEMO_EVENTS + 8):
        raw = REF.replace(b"F-100^", f"F-{n}^".encode())
        row = StoredMessage(
            id=n + 1, received_at=0.0, source="ehr", peer="t", sending_app="EHR",
            sending_facility="NORTHSIDE", control_id="FP-1", message_type="REF^I12",
            version="2.5.1", raw=raw, charset="utf-8", status="received", ack_code="AA",
            error="",
        )  # fmt: skip
        (event,) = decide_stored(table, row).events
        events.append(event)
    compact = {"separators": (",", ":")}
    for event in events + events[:8]:  # the first eight again, forgotten meanwhile
        assert event_fingerprint(event) == digest(event, **compact)
        assert event_fingerprint(event) == digest(event, **compact)  # remembered
    twin = replace(events[0])  # equal, another object
    assert twin is not events[0]
    assert event_fingerprint(twin) == event_fingerprint(events[0])
    assert len({event_fingerprint(e) for e in events}) == len(events)
