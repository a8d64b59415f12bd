"""Issue 19, the coordinator's workbench and the analyst's tools, over real HTTP against
the real daemon (the shipped routes.yaml in an Engine on loopback, a real SQLite file):

- the Tasks page: open tasks by due date, assign to a user, snooze (and wake), done with
  a note, a referral's tasks on its page; the API's snooze;
- bulk close of selected referrals (the worklist's checkboxes and POST /api/referrals/close):
  one Tracker.close and one audit row per referral, role-checked, CSRF-protected;
- the message view: the ACK (rebuilt), the route decision, the events and outbox rows a
  message produced, the parsed tree (audited), Reprocess and Retry (role-checked, CSRF,
  audited with the user).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import free_port, run
from ui_rig import UiRig, csrf_of, login, ref_i12, ui_engine

from engine.delivery import task_queue
from engine.store import audit as audit_store
from engine.store import outbox as outbox_store
from engine.store import referrals as referral_store
from engine.store import tasks as task_store
from engine.web import api

Body = Callable[[UiRig, httpx.AsyncClient], Awaitable[None]]
DAY = 86400.0


def go(tmp_path: Path, body: Body, **kwargs: Any) -> None:
    async def main() -> None:
        async with (
            ui_engine(tmp_path, **kwargs) as rig,
            httpx.AsyncClient(timeout=10, follow_redirects=False) as http,
        ):
            await body(rig, http)

    run(main(), timeout=90)


def audit(rig: UiRig, action: str) -> list[audit_store.AuditRow]:
    return [r for r in audit_store.rows(rig.db.conn) if r.action == action]


async def open_tasks(rig: UiRig, n: int) -> list[task_store.TaskRow]:
    """The open tasks once the dispatcher has delivered ``n`` of them (the built-in queue
    delivers each referral's packet task: no channel reaches the specialist)."""
    for _ in range(200):
        rows = task_store.listing(rig.db.conn, status="open", limit=0)
        if len(rows) >= n:
            return sorted(rows, key=lambda t: t.id)
        await asyncio.sleep(0.05)
    raise AssertionError("the tasks were not delivered")


def task_ids(html: str) -> list[int]:
    return [int(i) for i in re.findall(r'data-task="(\d+)"', html)]


def test_the_lists_agree() -> None:
    assert api.TASK_LISTS == task_queue.LISTS


@pytest.mark.store
def test_tasks_page_assign_snooze_wake_and_done(tmp_path: Path) -> None:
    async def body(rig: UiRig, http: httpx.AsyncClient) -> None:
        await rig.send(ref_i12("REF-TQ-1", "tq-1"), ref_i12("REF-TQ-2", "tq-2"))
        r1 = await rig.wait_referral("REF-TQ-1")
        await rig.wait_referral("REF-TQ-2")
        a, b = await open_tasks(rig, 2)
        assert (a.referral_id, a.due_at, a.snoozed_until) == (r1, None, None)
        await login(http, rig.base, "casey")

        # the work list: open tasks by due date (no due date: due since opened), so the
        # older one first
        page = await http.get(f"{rig.base}/ui/tasks")
        assert page.status_code == 200 and task_ids(page.text) == [a.id, b.id]
        csrf = csrf_of(page.text)

        # assign to another user who may work tasks; an analyst may not be given one
        given = await http.post(
            f"{rig.base}/ui/tasks/{a.id}/assign", data={"csrf": csrf, "user": "ada"}
        )
        assert given.headers["Location"] == "/ui/tasks?status=due&done=assigned"
        assert task_store.get(rig.db.conn, a.id).assignee == "ada"  # type: ignore[union-attr]
        refused = await http.post(
            f"{rig.base}/ui/tasks/{a.id}/assign", data={"csrf": csrf, "user": "ana"}
        )
        assert refused.status_code == 400
        no_csrf = await http.post(f"{rig.base}/ui/tasks/{a.id}/assign", data={"user": "ada"})
        assert no_csrf.status_code == 403
        assert [(r.actor, r.detail["task_id"]) for r in audit(rig, "task-assigned")] == [
            ("user:casey", a.id)
        ]

        # snooze for 3 days: off the work list, on the snoozed list, due at its wake time
        before = time.time()
        slept = await http.post(
            f"{rig.base}/ui/tasks/{a.id}/snooze", data={"csrf": csrf, "days": "3"}
        )
        after = time.time()
        assert slept.headers["Location"] == "/ui/tasks?status=due&done=snoozed"
        until = task_store.get(rig.db.conn, a.id).snoozed_until  # type: ignore[union-attr]
        assert until is not None and before + 3 * DAY <= until <= after + 3 * DAY
        assert task_ids((await http.get(f"{rig.base}/ui/tasks")).text) == [b.id]
        snoozed = await http.get(f"{rig.base}/ui/tasks?status=snoozed")
        assert task_ids(snoozed.text) == [a.id] and "Wake" in snoozed.text
        # until a date instead (it wins over days), then wake it (days=0)
        dated = await http.post(
            f"{rig.base}/ui/tasks/{a.id}/snooze",
            data={"csrf": csrf, "days": "1", "until": "2099-01-02", "status": "snoozed"},
        )
        assert dated.headers["Location"] == "/ui/tasks?status=snoozed&done=snoozed"
        row = task_store.get(rig.db.conn, a.id)
        # 2099-01-02T00:00Z: (129 * 365 + 32 leap days + 1) * 86400
        assert row is not None and row.snoozed_until == 4070995200.0
        woken = await http.post(
            f"{rig.base}/ui/tasks/{a.id}/snooze", data={"csrf": csrf, "days": "0"}
        )
        assert woken.headers["Location"] == "/ui/tasks?status=due&done=woken"
        assert task_ids((await http.get(f"{rig.base}/ui/tasks")).text) == [a.id, b.id]
        assert len(audit(rig, "task-snoozed")) == 3

        # the referral's page lists its task with the same actions; done with a note
        # there comes back to the referral, whose timeline has the task and its completion
        ref = await http.get(f"{rig.base}/ui/referrals/{r1}")
        assert 'data-testid="referral-tasks"' in ref.text
        assert f'action="/ui/tasks/{a.id}/done"' in ref.text
        assert "task no-way-to-reach-specialist" in ref.text  # the timeline row
        done = await http.post(
            f"{rig.base}/ui/tasks/{a.id}/done",
            data={"csrf": csrf, "note": "faxed the packet", "referral": str(r1)},
        )
        assert done.headers["Location"] == f"/ui/referrals/{r1}?done=task-done"
        ref = await http.get(f"{rig.base}/ui/referrals/{r1}")
        assert "faxed the packet" in ref.text and "task-done" in ref.text
        assert task_ids((await http.get(f"{rig.base}/ui/tasks")).text) == [b.id]
        (row_done,) = audit(rig, "task-done")
        assert (row_done.actor, row_done.referral_id) == ("user:casey", r1)
        assert "faxed" not in str(row_done.detail)  # the note stays with the task

    go(tmp_path, body)


@pytest.mark.store
def test_api_snooze_and_task_lists(tmp_path: Path) -> None:
    async def body(rig: UiRig, http: httpx.AsyncClient) -> None:
        await rig.send(ref_i12("REF-TS-1", "ts-1"))
        await rig.wait_referral("REF-TS-1")
        (t,) = await open_tasks(rig, 1)
        casey = rig.bearer("casey")
        url = f"{rig.base}/api/tasks/{t.id}/snooze"
        past = await http.post(url, headers=casey, json={"until": "2000-01-01"})
        assert past.status_code == 400 and "future" in past.json()["error"]
        bad = await http.post(url, headers=casey, json={"until": "next week"})
        assert bad.status_code == 400
        analyst = await http.post(url, headers=rig.bearer("ana"), json={"until": "2099-01-01"})
        assert analyst.status_code == 403
        ok = await http.post(url, headers=casey, json={"until": "2099-01-01T08:00:00Z"})
        got = ok.json()
        assert ok.status_code == 200 and got["snoozed"] is True
        assert got["snoozed_until"] == got["due"] == "2099-01-01T08:00:00.000000Z"

        async def listed(status: str) -> list[int]:
            r = await http.get(f"{rig.base}/api/tasks?status={status}", headers=casey)
            return [i["id"] for i in r.json()["items"]]

        # assign as the dashboard does: to a user whose role may act, or to nobody
        assign = f"{rig.base}/api/tasks/{t.id}/assign"
        for who in ("ana", "nosuchuser"):  # an analyst cannot see tasks; a typo
            bad_user = await http.post(assign, headers=casey, json={"user": who})
            assert bad_user.status_code == 400, who
        given = await http.post(assign, headers=casey, json={"user": "casey"})
        assert given.status_code == 200 and given.json()["assignee"] == "casey"
        back = await http.post(assign, headers=casey, json={"user": ""})
        assert back.status_code == 200 and back.json()["assignee"] == ""
        assert await listed("due") == [] and await listed("snoozed") == [t.id]
        assert await listed("open") == [t.id]  # every open task, asleep or not
        woke = await http.post(url, headers=casey, json={"until": ""})
        assert woke.json()["snoozed"] is False and await listed("due") == [t.id]
        gone = await http.post(
            f"{rig.base}/api/tasks/999999/snooze", headers=casey, json={"until": ""}
        )
        assert gone.status_code == 404

    go(tmp_path, body)


@pytest.mark.store
def test_bulk_close_api_and_worklist(tmp_path: Path) -> None:
    async def body(rig: UiRig, http: httpx.AsyncClient) -> None:
        placers = [f"REF-BULK-{i}" for i in range(4)]
        await rig.send(*(ref_i12(p, f"bk-{i}") for i, p in enumerate(placers)))
        r0, r1, r2, r3 = [await rig.wait_referral(p) for p in placers]
        casey = rig.bearer("casey")
        url = f"{rig.base}/api/referrals/close"
        first = await http.post(
            f"{rig.base}/api/referrals/{r2}/close", headers=casey, json={"reason": "other"}
        )
        assert first.status_code == 200

        for bad in (
            {"referral_ids": [], "reason": "other"},
            {"referral_ids": [r0, r0], "reason": "other"},
            {"referral_ids": [r0], "reason": "because"},
            {"referral_ids": [True], "reason": "other"},
            {"referral_ids": list(range(1, 202)), "reason": "other"},
        ):
            r = await http.post(url, headers=casey, json=bad)
            assert r.status_code == 400, bad
        refused = await http.post(
            url, headers=rig.bearer("ana"), json={"referral_ids": [r0], "reason": "other"}
        )
        assert refused.status_code == 403

        body_ = {"referral_ids": [r0, r2, 999999], "reason": "patient-declined", "note": "moved"}
        result = (await http.post(url, headers=casey, json=body_)).json()
        assert (result["closed"], result["refused"]) == (1, 2)
        items = {i["referral_id"]: i for i in result["items"]}
        assert items[r0]["status"] == "closed" and items[r0]["error"] == ""
        assert items[r2]["outcome"] == "refused"
        assert items[r2]["error"] == f"referral {r2} is already closed"
        assert items[999999]["error"] == "no referral 999999"

        # the worklist: a checkbox per open referral, one form, CSRF, back with a count
        await login(http, rig.base, "casey")
        page = await http.get(f"{rig.base}/ui/worklist")
        boxes = {int(v) for v in re.findall(r'name="referral_id" value="(\d+)"', page.text)}
        assert {r1, r3} <= boxes and r0 not in boxes
        form = {"reason": "other", "note": "duplicate", "referral_id": [str(r1), str(r3)]}
        no_csrf = await http.post(f"{rig.base}/ui/worklist/close", data=form)
        assert no_csrf.status_code == 403
        done = await http.post(
            f"{rig.base}/ui/worklist/close", data={**form, "csrf": csrf_of(page.text)}
        )
        assert done.headers["Location"] == "/ui/worklist?closed=2"
        shown = await http.get(f"{rig.base}{done.headers['Location']}")
        assert "Closed 2 referral(s)." in shown.text
        for rid in (r0, r1, r3):
            row = referral_store.get_referral(rig.db.conn, rid)
            assert row is not None and row.status == "closed"
        closes = audit(rig, "closed-by-operator")
        # one row per referral, each with the user and its own reason
        assert sorted((r.referral_id, r.actor) for r in closes) == sorted(
            (rid, "user:casey") for rid in (r0, r1, r2, r3)
        )
        reasons = {r.referral_id: r.detail["close_reason"] for r in closes}
        assert (reasons[r0], reasons[r1]) == ("patient-declined", "other")

    go(tmp_path, body)


def _forward_to_nowhere(port: int) -> Callable[[dict[str, Any]], None]:
    """A route that forwards each referral to a downstream MLLP port nobody listens on:
    its outbox row waits (pending, with a last error) for the analyst to retry."""

    def edit(data: dict[str, Any]) -> None:
        data["channels"] = {
            "downstream": {"type": "mllp", "host": "127.0.0.1", "port": port, "timeout": 1}
        }
        data["routes"].insert(
            0,
            {
                "name": "copy-ref",
                "when": {"type": "REF^I12"},
                "then": [{"forward": "downstream"}],
                "continue": True,  # and the shipped ref-new route tracks it
            },
        )

    return edit


@pytest.mark.store
def test_message_view_tree_reprocess_and_retry(tmp_path: Path) -> None:
    async def body(rig: UiRig, http: httpx.AsyncClient) -> None:
        await rig.send(ref_i12("REF-MSG-1", "msg-ctl-1"))
        rid = await rig.wait_referral("REF-MSG-1")
        mid = int(rig.db.conn.execute("SELECT max(id) FROM messages").fetchone()[0])
        ana, casey = rig.bearer("ana"), rig.bearer("casey")

        # what became of the message: no content, so no audit row
        out = (await http.get(f"{rig.base}/api/messages/{mid}/outcome", headers=ana)).json()
        assert out["decision"]["status"] == "routed"
        assert out["decision"]["route"].split(",")[0] == "copy-ref"
        assert {"route": "copy-ref", "action": "forward", "what": "downstream"} in out["decision"][
            "actions"
        ]
        assert [(e["referral_id"], e["kind"]) for e in out["events"]] == [(rid, "referral-created")]
        (row,) = out["outbox"]
        assert (row["channel"], row["template"]) == ("downstream", "forward")
        # HL7 v2.5.1 §2.9: MSH-3/4 and MSH-5/6 swapped, MSH-9 ACK^<trigger>^ACK, MSA-2 the
        # message's control id
        msh, msa = out["ack"].split("\n")
        f = msh.split("|")
        assert f[2:6] == ["REFLOOP", "CLINIC", "EHR", "CLINIC"] and f[8] == "ACK^I12^ACK"
        assert msa == "MSA|AA|msg-ctl-1"
        assert not any(r.action == "viewed-message" for r in audit_store.rows(rig.db.conn))

        # the parsed tree: analysts only, audited like the raw text
        assert (
            await http.get(f"{rig.base}/api/messages/{mid}/tree", headers=casey)
        ).status_code == 403
        tree = (await http.get(f"{rig.base}/api/messages/{mid}/tree", headers=ana)).json()
        segs = {s["id"]: s for s in tree["segments"]}
        assert [s["id"] for s in tree["segments"]] == ["MSH", "RF1", "PRD", "PRD", "PID", "OBR"]
        pid5 = next(x for x in segs["PID"]["fields"] if x["path"] == "PID-5")
        assert (pid5["name"], pid5["type"], pid5["value"]) == ("Patient Name", "XPN", "Doe^Jane")
        assert [(c["path"], c["name"], c["value"]) for c in pid5["children"]] == [
            ("PID-5.1", "Family Name", "Doe"),
            ("PID-5.2", "Given Name", "Jane"),
        ]
        rf1 = {x["path"]: x["name"] for x in segs["RF1"]["fields"]}
        assert (
            rf1["RF1-1"] == "Referral Status" and rf1["RF1-6"] == "Originating Referral Identifier"
        )
        assert tree["text"].startswith("MSH|^~\\&|EHR|CLINIC|")
        (seen,) = [r for r in audit_store.rows(rig.db.conn) if r.action == "viewed-message"]
        assert (seen.actor, seen.message_id, seen.detail["via"]) == ("user:ana", mid, "api")

        # reprocess: the analyst's (a coordinator's role may not); an unchanged decision
        # applies nothing; with resend its forward is queued again; audited as the user
        url = f"{rig.base}/api/messages/{mid}/reprocess"
        assert (await http.post(url, headers=casey, json={})).status_code == 403
        same = (await http.post(url, headers=ana, json={})).json()
        assert (same["changed"], same["applied"], same["new"]["status"]) == (False, False, "routed")
        assert audit(rig, "replayed") == []
        again = (await http.post(url, headers=ana, json={"resend": True})).json()
        assert again["applied"] is True
        (replayed,) = audit(rig, "replayed")
        assert (replayed.actor, replayed.message_id) == ("user:ana", mid)
        assert len(outbox_store.for_message(rig.db.conn, mid)) == 2
        events = referral_store.message_events(rig.db.conn, mid)
        assert [e[2] for e in events] == ["referral-created"]  # never applied twice
        gone = await http.post(f"{rig.base}/api/messages/999999/reprocess", headers=ana, json={})
        assert gone.status_code == 404

        # the page: decision, events, outbox rows with Retry, Reprocess; CSRF on both
        await login(http, rig.base, "ana")
        page = await http.get(f"{rig.base}/ui/messages/{mid}")
        assert 'data-testid="decision"' in page.text and "referral-created" in page.text
        assert "MSA|AA|msg-ctl-1" in page.text and "Doe" not in page.text
        csrf = csrf_of(page.text)
        oid = row["id"]
        retry_url = f"{rig.base}/ui/messages/{mid}/outbox/{oid}/retry"
        assert (await http.post(retry_url, data={})).status_code == 403
        retried = await http.post(retry_url, data={"csrf": csrf})
        assert retried.headers["Location"] == f"/ui/messages/{mid}?done=retried"
        (retry_row,) = audit(rig, "outbox-retry")
        assert retry_row.actor == "user:ana"
        other = await http.post(
            f"{rig.base}/ui/messages/{mid}/outbox/999999/retry", data={"csrf": csrf}
        )
        assert other.status_code == 404
        repro = await http.post(f"{rig.base}/ui/messages/{mid}/reprocess", data={"csrf": csrf})
        assert repro.headers["Location"] == f"/ui/messages/{mid}?done=unchanged"
        raw = await http.get(f"{rig.base}/ui/messages/{mid}?raw=1")
        assert 'data-testid="tree"' in raw.text and "Patient Name" in raw.text
        assert "Doe^Jane" in raw.text

    go(tmp_path, body, edit=_forward_to_nowhere(free_port()))


def test_an_older_database_gets_the_workbench_indexes(tmp_path: Path) -> None:
    """A database from before the _m_workbench step: its tasks are listed by due date and
    the message view's look-ups use the new indexes once it is opened again."""
    from engine.store import open_database
    from engine.store.migrations import MIGRATIONS, _m_workbench

    path = tmp_path / "old.db"
    old = open_database(path, migrations=MIGRATIONS[: MIGRATIONS.index(_m_workbench)])
    with old.transaction() as conn:
        for oid, created in ((1, 200.0), (2, 100.0)):
            task_store.open_task(conn, task_store.NewTask(oid, None, "k", "t"), created)
    old.close()
    db = open_database(path)
    names = {r[0] for r in db.conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"tasks_status_due", "tasks_referral", "referral_events_message", "parked_message"} <= (
        names
    )
    assert [t.outbox_id for t in task_store.due_listing(db.conn, 1000.0)] == [2, 1]
    db.close()


def test_the_rebuilt_ack() -> None:
    """HL7 v2.5.1 §2.9 / §2.15.8: the receiver's and sender's MSH-3..6 swapped, MSA-1 the
    recorded code, MSA-2 the message's MSH-10, MSA-3 the recorded error text; no ERR (its
    code is not kept), nothing for a FHIR resource."""
    from engine.web.service import _ack_text

    raw = b"MSH|^~\\&|LAB|NORTH|REFLOOP|SOUTH|20260101||ORU^R01|C-77|P|2.4\rPID|1\r"
    meta = {
        "ack_code": "AE",
        "error": "no route matched ORU^R01",
        "received_at": "1970-01-01T00:00:00Z",
    }
    msh, msa = _ack_text(raw, meta).split("\n")
    f = msh.split("|")
    assert f[2:6] == ["REFLOOP", "SOUTH", "LAB", "NORTH"] and f[6] == "19700101000000+0000"
    assert (f[8], f[10], f[11]) == ("ACK^R01^ACK", "P", "2.4")
    assert msa == "MSA|AE|C-77|no route matched ORU R01"  # the delimiter kept out
    assert _ack_text(raw, {**meta, "ack_code": ""}) == ""
    fhir = b'{"resourceType": "ServiceRequest", "id": "sr-1"}'
    assert _ack_text(fhir, {**meta, "ack_code": "AA"}) == ""


@pytest.mark.store
def test_task_lists_say_when_rows_are_left(tmp_path: Path, monkeypatch: Any) -> None:
    """No silent cap: GET /api/tasks answers ``more`` past ``limit``, and the Tasks page
    says when it shows only the first page (3 tasks, a page of 2)."""
    from engine.web import dashboard

    monkeypatch.setattr(dashboard, "TASK_PAGE", 2, raising=False)

    async def body(rig: UiRig, http: httpx.AsyncClient) -> None:
        for n in (1, 2, 3):
            await rig.send(ref_i12(f"REF-CAP-{n}", f"cap-{n}"))
            await rig.wait_referral(f"REF-CAP-{n}")
        await open_tasks(rig, 3)
        casey = rig.bearer("casey")
        two = (await http.get(f"{rig.base}/api/tasks?limit=2", headers=casey)).json()
        assert len(two["items"]) == 2 and two["more"] is True
        three = (await http.get(f"{rig.base}/api/tasks?limit=3", headers=casey)).json()
        assert len(three["items"]) == 3 and three["more"] is False
        await login(http, rig.base, "casey")
        page = (await http.get(f"{rig.base}/ui/tasks")).text
        assert len(task_ids(page)) == 2 and 'data-testid="tasks-more"' in page
        assert "--limit 0" in page

    go(tmp_path, body)
