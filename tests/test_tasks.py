"""The built-in coordinator task queue (engine.delivery.task_queue; docs/escalation.md
"Where tasks go"): on a fresh daemon with the shipped routes.yaml, which configures no
worklist channel, an
escalation that reaches the coordinator step yields an open task a coordinator sees in
``refloop tasks list``, ``/api/tasks`` and ``/ui/tasks``, and closes with ``refloop tasks
done``."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import REPO, Daemon, move_time_back, query, refloop, wait_rows
from ui_rig import PASSWORD, csrf_of, ref_i12

from engine.clock import WallClock
from engine.delivery.task_queue import TaskQueue
from engine.store import open_database
from engine.store import referrals as referral_store
from engine.store import tasks as task_store
from engine.store.outbox import claim_due
from engine.store.outbox import get as get_outbox

DAY = 86400.0


def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[bytes]:
    """``refloop`` with text on stdin (``users add --password-stdin``)."""
    return refloop(*args, stdin=stdin.encode(), timeout=60)


def tasks_json(state: Path, *extra: str) -> list[dict[str, Any]]:
    out = refloop("tasks", "list", "--state", str(state), "--json", *extra)
    assert out.returncode == 0, out.stderr.decode()
    rows: list[dict[str, Any]] = json.loads(out.stdout)
    return rows


def test_a_fresh_daemon_exports_outbox_gauges_for_the_task_channels(daemon: Daemon) -> None:
    daemon.start()
    text = httpx.get(f"http://127.0.0.1:{daemon.http}/metrics").text
    for metric in ("refloop_outbox_depth", "refloop_outbox_oldest_seconds", "refloop_outbox_dead"):
        for channel in ("task", "coordinator"):
            assert f'{metric}{{channel="{channel}"}} 0.0' in text, (metric, channel)


def test_escalation_reaches_the_coordinator_as_a_task_and_done_closes_it(
    daemon: Daemon, tmp_path: Path
) -> None:
    state = daemon.state_dir
    daemon.start()
    added = cli("users", "add", "casey", "--role", "coordinator", "--password-stdin",
                "--state", str(state), stdin=PASSWORD + "\n")  # fmt: skip
    assert added.returncode == 0, added.stderr.decode()
    token = refloop("users", "token", "casey", "--state", str(state)).stdout.decode().strip()
    msg = tmp_path / "ref.hl7"
    msg.write_bytes(ref_i12("P-TASK-1", "ctl-task-1"))
    sent = refloop("send", "--port", str(daemon.mllp), str(msg))
    assert sent.returncode == 0 and sent.stdout.decode().strip().endswith("AA"), sent.stdout
    ((rid,),) = wait_rows(daemon.db, "SELECT id FROM referrals WHERE placer_number = 'P-TASK-1'")
    wait_rows(daemon.db, "SELECT 1 FROM timers WHERE kind = 'coordinator-task'")

    # The daemon is down for 15 days: every timer is that much nearer (the shipped
    # cadence puts the coordinator task at 14 days), and it fires them when it restarts.
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0, daemon.log_tail()
    move_time_back(daemon.db, 15 * DAY)  # the daemon was down for 15 days
    daemon.start()
    wait_rows(
        daemon.db,
        "SELECT id FROM tasks WHERE kind = 'coordinator-task' AND status = 'open' "
        "AND referral_id = ?",
        (rid,),
    )

    # refloop tasks list: one open task for the referral (the older ones superseded)
    (task,) = [t for t in tasks_json(state) if t["referral_id"] == rid]
    assert task["status"] == "open"
    assert task["template"] == "coordinator-followup"
    assert "not booked" in task["reason"]
    assert 0 <= task["priority"] <= 100
    older = [t for t in tasks_json(state, "--status", "all") if t["id"] != task["id"]]
    assert older and all(t["status"] == "superseded" for t in older)
    assert all(t["referral_id"] == rid for t in older)
    assert {t["superseded_by"] for t in older} <= {t["id"] for t in older} | {task["id"]}
    (outbox_row,) = query(daemon.db, "SELECT status FROM outbox WHERE id = ?", (task["outbox_id"],))
    assert outbox_row == ("sent",)

    # /api/tasks
    base = f"http://127.0.0.1:{daemon.http}"
    bearer = {"Authorization": f"Bearer {token}"}
    api = httpx.get(f"{base}/api/tasks", headers=bearer)
    assert api.status_code == 200, api.text
    assert [t["id"] for t in api.json()["items"] if t["referral_id"] == rid] == [task["id"]]

    # /ui/tasks: log in, see it, assign it to me
    with httpx.Client(base_url=base) as ui:
        login = ui.get("/ui/login")
        ui.post("/ui/login", data={"name": "casey", "password": PASSWORD,
                                   "csrf": csrf_of(login.text), "next": "/ui/tasks"})  # fmt: skip
        page = ui.get("/ui/tasks")
        assert page.status_code == 200
        assert f'action="/ui/tasks/{task["id"]}/done"' in page.text
        assert "coordinator-followup" in page.text
        no_csrf = ui.post(f"/ui/tasks/{task['id']}/assign", data={})
        assert no_csrf.status_code == 403
        mine = ui.post(f"/ui/tasks/{task['id']}/assign", data={"csrf": csrf_of(page.text)})
        assert mine.status_code == 303
    (assigned,) = [t for t in tasks_json(state) if t["id"] == task["id"]]
    assert assigned["assignee"] == "casey"

    # refloop tasks done closes it: timeline entry and audit row for the referral
    done = refloop("tasks", "done", str(task["id"]), "--note", "called the office",
                   "--by", "alice", "--state", str(state))  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    assert not [t for t in tasks_json(state) if t["referral_id"] == rid]
    (closed,) = [t for t in tasks_json(state, "--status", "done") if t["id"] == task["id"]]
    assert (closed["note"], closed["done_by"]) == ("called the office", "operator:alice")
    events = query(
        daemon.db,
        "SELECT actor FROM referral_events WHERE referral_id = ? AND kind = 'task-done'",
        (rid,),
    )
    assert events == [("operator:alice",)]
    audit = query(daemon.db, "SELECT actor, detail FROM audit WHERE action = 'task-done'")
    assert [(a, json.loads(d)["task_id"]) for a, d in audit] == [("operator:alice", task["id"])]
    assert "called the office" not in audit[0][1]  # free text never goes to the audit log
    again = refloop("tasks", "done", str(task["id"]), "--note", "x", "--state", str(state))
    assert again.returncode == 1
    assert again.stderr.decode().count("\n") == 1 and "not open" in again.stderr.decode()


def test_delivering_an_outbox_row_twice_opens_one_task(store_url: str) -> None:
    db = open_database(store_url)
    clock = WallClock()
    now = clock.now()
    with db.transaction() as conn:
        tried = [{"at": "2026-12-01T09:00:00Z", "what": "sms"}]
        payload = json.dumps({"kind": "coordinator-task", "task": "coordinator-followup",
                              "priority_score": 42.5, "reason": "no booking after two texts",
                              "attempts": tried})  # fmt: skip
        referral_store.enqueue_outbox(
            conn, None, "task", "coordinator-followup", payload, "k1", now
        )
    item = get_outbox(db.conn, 1)
    assert item is not None
    queue = TaskQueue()
    with db.transaction() as conn:
        first = queue.deliver(conn, item, now)
        second = queue.deliver(conn, item, now)
    assert first == second
    (row,) = task_store.listing(db.conn, status="")
    assert (row.priority, row.reason, row.kind) == (42.5, "no booking after two texts",
                                                     "coordinator-task")  # fmt: skip
    assert row.attempts == ({"at": "2026-12-01T09:00:00Z", "what": "sms"},)
    db.close()


def test_routes_check_reports_a_rotation_step_nothing_serves(tmp_path: Path) -> None:
    shipped = (REPO / "routes.yaml").read_text(encoding="utf-8")
    assert "\nescalation:" not in shipped  # the shipped file keeps the default rotation
    path = tmp_path / "routes.yaml"
    lines = shipped.rstrip("\n").count("\n") + 1
    path.write_text(
        shipped.rstrip("\n") + "\nescalation:\n  rotation:\n    - sms\n    - portal\n"
        "channels:\n  portal: {type: webhook, url: 'https://portal.example.org/x'}\n",
        encoding="utf-8",
    )
    out = refloop("routes", "check", str(path))
    assert out.returncode == 2, out.stdout.decode()
    (line,) = out.stderr.decode().splitlines()
    assert line.startswith(f"{path}:{lines + 3} escalation.rotation[0]: no channel serves 'sms'")
    # the staff channels need none: the built-in task queue serves task / coordinator (and
    # the voice step, as a "call the patient" task: tests/test_served.py)
    assert refloop("routes", "check", str(REPO / "routes.yaml")).returncode == 0


@pytest.mark.store
def test_assign_snooze_and_errors_through_the_executable(tmp_path: Path) -> None:
    """``refloop tasks assign`` / ``snooze`` on a real database file; an unknown task or
    a bad time is refused (click's usage error)."""
    state = tmp_path / "state"
    db = open_database(state / "refloop.db")
    now = WallClock().now()
    with db.transaction() as conn:
        referral_store.enqueue_outbox(conn, None, "task", "call-to-book", "{}", "k1", now)
        (item,) = claim_due(conn, "task", now + 1, 1)
        task_id = TaskQueue().deliver(conn, item, now)
    db.close()
    where = ("--state", str(state))
    assert refloop("tasks", "assign", str(task_id), "casey", *where).returncode == 0
    snoozed = refloop("tasks", "snooze", str(task_id), "2099-01-02T09:00:00Z", *where)
    assert snoozed.returncode == 0, snoozed.stderr.decode()
    (t,) = tasks_json(state)
    assert (t["assignee"], t["snoozed_until"], t["snoozed"]) == (
        "casey",
        "2099-01-02T09:00:00.000000Z",
        True,
    )
    audit = query(state / "refloop.db", "SELECT action FROM audit ORDER BY id")
    assert audit == [("task-assigned",), ("task-snoozed",)]
    missing = refloop("tasks", "done", "999", "--note", "x", *where)
    assert missing.returncode == 1
    assert missing.stderr.decode().splitlines() == ["Error: no task 999"]
    bad = refloop("tasks", "snooze", str(task_id), "soon", *where)
    assert bad.returncode != 0 and "not an ISO date or time: 'soon'" in bad.stderr.decode()


@pytest.mark.store
def test_the_due_list_orders_by_snooze_then_due_then_opened(tmp_path: Path) -> None:
    """``refloop tasks list --status due`` (the dashboard's work list): open tasks not
    asleep, by when each is due (its snooze's end, else its payload's due_at, else when
    it opened); ``--status snoozed`` has the sleeping ones. Times by hand, in days."""
    from engine.clock import isoformat

    state = tmp_path / "state"
    db = open_database(state / "refloop.db")
    now = WallClock().now()
    plan = [  # key, opened (days from now), payload due_at, snoozed until
        ("opened-3", -3, None, None),  # due -3
        ("due-5", -1, -5, None),  # due -5: its due_at
        ("woke-2", -4, None, -2),  # due -2: its snooze ended then
        ("asleep", -10, None, 2),  # snoozed two more days
    ]
    ids: dict[str, int] = {}
    with db.transaction() as conn:
        for key, opened, due, until in plan:
            payload = {} if due is None else {"due_at": isoformat(now + due * DAY)}
            referral_store.enqueue_outbox(
                conn, None, "task", "call-to-book", json.dumps(payload), key, now
            )
            (item,) = claim_due(conn, "task", now + 1, 1)
            ids[key] = TaskQueue().deliver(conn, item, now + opened * DAY)
            if until is not None:
                task_store.snooze(conn, ids[key], now + until * DAY)
    db.close()
    due = tasks_json(state, "--status", "due")
    assert [t["id"] for t in due] == [ids["due-5"], ids["opened-3"], ids["woke-2"]]
    assert due[0]["due"] == isoformat(now - 5 * DAY)
    assert [t["id"] for t in tasks_json(state, "--status", "snoozed")] == [ids["asleep"]]
    assert len(tasks_json(state, "--status", "open")) == 4
