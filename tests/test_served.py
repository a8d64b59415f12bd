"""No channel is left unserved (issue 13 item 9; docs/escalation.md "Where each step
goes with no channels"): on a fresh daemon with the shipped routes.yaml, which configures
no channel at all, every escalation step reaches something that serves it (the patient
call and the outreach are coordinator tasks of the built-in queue), and ``refloop routes
check`` reports each step or route that names a channel nothing serves."""

from __future__ import annotations

import json
import signal
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from helpers import REPO, Daemon, move_time_back, query, refloop, wait_rows

from engine.store import open_database
from engine.store import referrals as referral_store

DAY = 86400.0
SERVED = ("task", "coordinator")  # what serves anything with no channels: the task queue


def patient_zone() -> str:
    """An IANA zone where it is now about 14:00, inside the default contact window
    (09:00-20:00), so the nudges fire at once whenever the test runs. Etc/GMT-N is UTC+N."""
    offset = 14 - datetime.now(UTC).hour  # in -9 .. 14
    return f"Etc/GMT{-offset:+d}" if offset else "Etc/UTC"


def referral(placer: str) -> bytes:
    """A REF^I12 without SMS consent or portal, whose specialist office has a fax number
    (PRD(RT)-5 XTN equipment FX): with no fax channel the packet cannot go by fax."""
    segments = [
        f"MSH|^~\\&|EHR|CLINIC|REFLOOP|CLINIC|20260101090000||REF^I12^REF_I12|c-{placer}|P|2.5.1",
        f"RF1|A^Accepted^HL70283|R^Routine^HL70280|Med||O|{placer}^CLINIC|20260101|||^Chest pain",
        "PRD|RP^Referring^HL70286|Home^Harriet^^^^MD|||||1234567802^NPI",
        "PRD|RT^Referred to^HL70286|Smith^Ann^^^^MD|||^WPN^FX^^^555^0100199||1234567893^NPI",
        "PID|1||MRN1^^^CLINIC^MR||Doe^Jane||19700101|F",
        f"OBR|1|{placer}^CLINIC||REFCARD^Cardiology referral^L",
        "ZCN|SMS|N",
        "ZCN|PORTAL|N",
        f"ZCN|TZ|{patient_zone()}",
    ]
    return "\r".join(segments).encode() + b"\r"


def days_pass(daemon: Daemon, days: float) -> None:
    """The daemon is down for ``days``: every stored time moves back that much, so the
    timers due meanwhile fire when it restarts (as after real downtime)."""
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0, daemon.log_tail()
    move_time_back(daemon.db, days * DAY)
    daemon.start()


def open_tasks(daemon: Daemon) -> list[dict[str, Any]]:
    out = refloop("tasks", "list", "--state", str(daemon.state_dir), "--json")
    assert out.returncode == 0, out.stderr.decode()
    rows: list[dict[str, Any]] = json.loads(out.stdout)
    return rows


def step(daemon: Daemon, rid: int, kind: str) -> dict[str, Any]:
    """Wait until the timer ``kind`` has made the referral's open task, then check the
    outbox: every row is on a served channel and none stays pending there."""
    wait_rows(
        daemon.db,
        "SELECT id FROM tasks WHERE referral_id = ? AND kind = ? AND status = 'open'",
        (rid, kind),
    )
    wait_rows(
        daemon.db, "SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM outbox WHERE status = 'pending')"
    )
    rows = query(daemon.db, "SELECT channel, status FROM outbox")
    assert {c for c, _s in rows} <= set(SERVED), rows
    assert {s for _c, s in rows} == {"sent"}, rows
    (task,) = open_tasks(daemon)  # one open task per referral
    assert task["referral_id"] == rid and task["kind"] == kind
    return task


def test_a_fresh_daemon_serves_every_escalation_step(daemon: Daemon, tmp_path: Path) -> None:
    daemon.start()
    msg = tmp_path / "ref.hl7"
    msg.write_bytes(referral("P-SERVED-1"))
    sent = refloop("send", "--port", str(daemon.mllp), str(msg))
    assert sent.returncode == 0 and sent.stdout.decode().strip().endswith("AA"), sent.stdout
    ((rid, zone),) = wait_rows(
        daemon.db, "SELECT id, time_zone FROM referrals WHERE placer_number = 'P-SERVED-1'"
    )
    assert zone == patient_zone()  # the nudges are due inside the contact window

    # At once: the packet has a fax number but no fax channel, so it is the one task
    # "no way to reach the specialist", not a fax row that nothing would ever send.
    first = step(daemon, rid, "send-packet")
    assert first["template"] == "no-way-to-reach-specialist"
    assert "no direct or fax channel" in first["reason"]

    # Day 1, then day 7: no SMS consent, no portal channel, no voice channel: nothing
    # automated can reach the patient, and no person is asked yet (escalation
    # `nudge_call_task: false`, the default): a `nudge-not-sent` timeline entry each.
    days_pass(daemon, 1.5)
    wait_rows(
        daemon.db,
        "SELECT id FROM referral_events WHERE referral_id = ? AND kind = 'nudge-not-sent'",
        (rid,),
    )
    days_pass(daemon, 6.0)
    wait_rows(
        daemon.db,
        "SELECT count(*) FROM referral_events WHERE referral_id = ? "
        "AND kind = 'nudge-not-sent' HAVING count(*) = 2",
        (rid,),
    )
    assert [t["template"] for t in open_tasks(daemon)] == ["no-way-to-reach-specialist"]

    # Day 14: the coordinator follow-up (no automated call without a voice channel)
    # supersedes the packet task: the person's first call.
    days_pass(daemon, 7.0)
    follow = step(daemon, rid, "coordinator-task")
    assert follow["template"] == "coordinator-followup"

    # Day 30: the call and the letter are ONE task (two would supersede each other).
    days_pass(daemon, 16.0)
    outreach = step(daemon, rid, "outreach")
    assert outreach["template"] == "outreach"
    assert "call the patient" in outreach["reason"] and "letter" in outreach["reason"]
    history = query(
        daemon.db, "SELECT template, status FROM tasks WHERE referral_id = ? ORDER BY id", (rid,)
    )
    assert [t for t, _s in history] == [
        "no-way-to-reach-specialist",
        "coordinator-followup",
        "outreach",
    ]
    assert [s for _t, s in history] == ["superseded"] * 2 + ["open"]


# A routes.yaml whose every channel reference is unserved (no `channels:` at all).
UNSERVED = """\
version: 1
sources:
  ehr: {type: mllp, host: 127.0.0.1, port: 0}
escalation:
  notify: inbox
  appointment_reminder: true
  rotation:
    - sms
    - portal
    - voice
routes:
  - name: ref-new
    when: {type: REF^I12}
    then:
      - send: {channel: fax, template: packet, to: PRD(RT).5.1}
      - forward: ehr-out
"""


def test_routes_check_reports_every_step_and_route_nothing_serves(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(UNSERVED, encoding="utf-8")
    out = refloop("routes", "check", str(path))
    assert out.returncode == 2, out.stdout.decode()
    lines = out.stderr.decode().splitlines()
    expected = [
        (5, "escalation.notify", "'inbox'"),
        (6, "escalation.appointment_reminder", "'sms'"),
        (8, "escalation.rotation[0]", "'sms'"),
        (9, "escalation.rotation[1]", "'portal'"),
        (15, "routes[0].then[0].send.channel", "'fax'"),
        (16, "routes[0].then[1].forward", "'ehr-out'"),
    ]
    for line_no, key, name in expected:
        hits = [x for x in lines if x.startswith(f"{path}:{line_no} {key}:")]
        assert len(hits) == 1 and name in hits[0], (line_no, key, lines)
    # voice needs no channel (a coordinator task), nor do the staff channels
    assert not [x for x in lines if "rotation[2]" in x or "'voice'" in x], lines
    assert len(lines) == len(expected), lines


def test_the_shipped_routes_yaml_passes_routes_check() -> None:
    out = refloop("routes", "check", str(REPO / "routes.yaml"))
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().strip().endswith("ok (1 source(s))")


def test_a_daemon_warns_at_start_of_rows_waiting_on_a_channel_nothing_serves(
    daemon: Daemon,
) -> None:
    """A nudge an older version queued on ``portal`` (no portal channel): the daemon says
    so at start, and /metrics shows it beside the served channels' gauges."""
    db = open_database(daemon.db)
    with db.transaction() as conn:
        referral_store.enqueue_outbox(conn, None, "portal", "first_nudge", "{}", "old-1", 0.0)
    db.close()
    daemon.start()
    log = daemon.log_path.read_text(encoding="utf-8")
    assert "outbox: 1 row(s) wait on channel 'portal' that nothing serves" in log, log
    text = httpx.get(f"http://127.0.0.1:{daemon.http}/metrics").text
    assert 'refloop_outbox_depth{channel="portal"} 1.0' in text
    for channel in SERVED:
        assert f'refloop_outbox_depth{{channel="{channel}"}} 0.0' in text, channel


def test_a_reload_that_routes_to_a_channel_the_daemon_lacks_is_warned_about(
    daemon: Daemon, tmp_path: Path
) -> None:
    """Channels take effect on restart, routes on reload: a reloaded route that sends on a
    channel added to the file since the start has nothing serving it until the restart."""
    shipped = (REPO / "routes.yaml").read_text(encoding="utf-8")
    daemon.routes = tmp_path / "routes.yaml"
    daemon.routes.write_text(shipped, encoding="utf-8")
    daemon.start()
    route = (
        "routes:\n  - name: copy-out\n    when: {type: REF^I12}\n    continue: true\n"
        "    then:\n      - send: {channel: inbox, template: t, to: PID.3.1}\n"
    )
    channel = (
        "channels:\n  inbox:\n    type: webhook\n    url: https://inbox.example.org/x\n"
        "    secret: ${env:INBOX_SECRET:-s}\n    templates: {t: copy}\n"
    )
    changed = shipped.replace("\nroutes:\n", f"\n{channel}{route}", 1)
    daemon.routes.write_text(changed, encoding="utf-8")
    url = f"http://127.0.0.1:{daemon.http}/admin/reload"
    out = refloop("routes", "reload", "--url", url)
    assert out.returncode == 0, out.stderr.decode()
    log = daemon.log_path.read_text(encoding="utf-8")
    assert "channel 'inbox' is named by route copy-out" in log, log
