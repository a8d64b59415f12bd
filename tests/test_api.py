"""The JSON API through the engine's real HTTP server: a referral sent over MLLP is
listed, filtered, shown with its timeline (and the view audited), closed, booked and
declined through the tracker with the user as actor; parked links, outbox retries,
inbox metadata search and raw messages, audit export; the OpenAPI document is built
from the same route table the server runs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import run
from ui_rig import UiRig, ref_i12, ui_engine

from engine.clock import isoformat
from engine.model import AppointmentBooked, Identifiers
from engine.store import audit as audit_store
from engine.store import outbox as outbox_store
from engine.store import referrals as referral_store
from engine.web.api import ROUTES
from engine.web.openapi import build_openapi

pytestmark = pytest.mark.store  # every test here uses the store

Body = Callable[[UiRig, httpx.AsyncClient], Awaitable[None]]


def go(tmp_path: Path, body: Body) -> None:
    async def main() -> None:
        async with ui_engine(tmp_path) as rig, httpx.AsyncClient(timeout=10) as http:
            await body(rig, http)

    run(main(), timeout=60)


def audit_rows(rig: UiRig, action: str) -> list[dict[str, Any]]:
    return [r.as_dict() for r in audit_store.rows(rig.db.conn) if r.action == action]


def test_openapi_lists_every_route_of_the_table(tmp_path: Path) -> None:
    async def body(rig: UiRig, http: httpx.AsyncClient) -> None:
        doc = (await http.get(f"{rig.base}/api/openapi.json", headers=rig.bearer("ana"))).json()
        assert doc == build_openapi(ROUTES)
        served = {
            (r.method, r.resource.canonical)
            for r in rig.engine.http.app.router.routes()  # type: ignore[union-attr]
            if r.resource is not None and r.resource.canonical.startswith("/api/")
        }
        documented = {
            (method.upper(), path) for path, ops in doc["paths"].items() for method in ops
        }
        assert served == documented
        assert len(documented) == len(ROUTES)

    go(tmp_path, body)


def test_referral_list_filters_detail_and_close(tmp_path: Path) -> None:
    async def body(rig: UiRig, http: httpx.AsyncClient) -> None:
        await rig.send(ref_i12("REF-A", "a1"), ref_i12("REF-B", "b1", priority="S"))
        a = await rig.wait_referral("REF-A")
        b = await rig.wait_referral("REF-B")
        casey = rig.bearer("casey")
        listing = (await http.get(f"{rig.base}/api/referrals", headers=casey)).json()["items"]
        # both opened 2026-01-01, so both are overdue; stat sorts before routine
        assert [i["id"] for i in listing] == [b, a]
        assert listing[0]["priority"] == "stat" and listing[0]["overdue"] is True
        assert "patient_ids" not in listing[0]  # the worklist carries no patient ids
        q = {"specialist": "smith", "referring": "1234567802", "days_open_min": "1"}
        found = (await http.get(f"{rig.base}/api/referrals", headers=casey, params=q)).json()
        assert {i["id"] for i in found["items"]} == {a, b}
        none = await http.get(f"{rig.base}/api/referrals?specialist=nobody", headers=casey)
        assert none.json()["items"] == []
        assert (
            await http.get(f"{rig.base}/api/referrals?overdue=maybe", headers=casey)
        ).status_code == 400

        detail = await http.get(f"{rig.base}/api/referrals/{a}", headers=casey)
        assert detail.status_code == 200
        d = detail.json()
        assert d["placer_number"] == "REF-A" and d["patient_ids"] == ["MRN1^^^CLINIC"]
        assert d["timeline"][0]["kind"] == "referral-created"
        assert d["messages"][0]["control_id"] == "a1"
        views = audit_rows(rig, "viewed-referral")
        assert views[-1]["actor"] == "user:casey" and views[-1]["referral_id"] == a

        closed = await http.post(
            f"{rig.base}/api/referrals/{a}/close",
            headers=casey,
            json={"reason": "patient-declined", "note": "moved away"},
        )
        assert closed.status_code == 200, closed.text
        assert closed.json()["status"] == "closed"
        row = [r for r in audit_rows(rig, "closed-by-operator") if r["referral_id"] == a]
        assert row and row[0]["actor"] == "user:casey"
        assert "moved away" not in str(row)  # the note stays with the referral
        after = (await http.get(f"{rig.base}/api/referrals/{a}", headers=casey)).json()
        assert after["close_reason"] == "patient-declined" and after["close_note"] == "moved away"
        assert after["timeline"][-1]["actor"] == "user:casey"

        bad = await http.post(
            f"{rig.base}/api/referrals/{a}/close", headers=casey, json={"reason": "bored"}
        )
        assert bad.status_code == 400
        missing = await http.post(
            f"{rig.base}/api/referrals/999/close", headers=casey, json={"reason": "other"}
        )
        assert missing.status_code == 404

    go(tmp_path, body)


def test_book_and_decline_go_through_the_tracker(tmp_path: Path) -> None:
    async def body(rig: UiRig, http: httpx.AsyncClient) -> None:
        await rig.send(ref_i12("REF-C", "c1"), ref_i12("REF-D", "d1"))
        c = await rig.wait_referral("REF-C")
        d = await rig.wait_referral("REF-D")
        casey = rig.bearer("casey")
        booked = await http.post(
            f"{rig.base}/api/referrals/{c}/book",
            headers=casey,
            json={"start": "2026-03-01T09:30:00Z"},
        )
        assert booked.status_code == 200, booked.text
        assert booked.json()["status"] == "patient-booked"
        detail = (await http.get(f"{rig.base}/api/referrals/{c}", headers=casey)).json()
        assert detail["patient_status"] == "booked"
        assert detail["appointments"][0]["start"].startswith("2026-03-01T09:30:00")
        assert detail["timeline"][-1]["kind"] == "appointment-booked"
        assert detail["timeline"][-1]["actor"] == "user:casey"

        declined = await http.post(
            f"{rig.base}/api/referrals/{d}/decline", headers=casey, json={"reason": "not taking"}
        )
        assert declined.status_code == 200, declined.text
        detail = (await http.get(f"{rig.base}/api/referrals/{d}", headers=casey)).json()
        assert detail["specialist_status"] == "declined"
        assert detail["decline_reason"] == "not taking"
        assert [r["actor"] for r in audit_rows(rig, "specialist-declined")] == ["user:casey"]

    go(tmp_path, body)


def test_parked_link_outbox_retry_and_tasks(tmp_path: Path) -> None:
    async def body(rig: UiRig, http: httpx.AsyncClient) -> None:
        await rig.send(ref_i12("REF-E", "e1"))
        e = await rig.wait_referral("REF-E")
        tracker = rig.engine.tracker
        # a booking that names no known referral is parked
        with rig.db.transaction() as conn:
            parked = tracker.apply(
                AppointmentBooked(
                    ids=Identifiers(placer_number="NOPE"), occurred_at=0.0, appointment_id="X1"
                ),
                conn,
            )
        assert parked.outcome == "parked"
        casey = rig.bearer("casey")
        items = (await http.get(f"{rig.base}/api/parked", headers=casey)).json()["items"]
        assert [p["id"] for p in items] == [parked.parked_id]
        linked = await http.post(
            f"{rig.base}/api/parked/{parked.parked_id}/link",
            headers=casey,
            json={"referral_id": e},
        )
        assert linked.status_code == 200, linked.text
        again = await http.post(
            f"{rig.base}/api/parked/{parked.parked_id}/link",
            headers=casey,
            json={"referral_id": e},
        )
        assert again.status_code == 409
        assert [r["actor"] for r in audit_rows(rig, "appointment-booked")] == ["user:casey"]

        # the packet went to a coordinator task (no channels configured): the built-in
        # queue delivered it (engine.delivery.task_queue); a coordinator assigns and completes it
        tasks = (await http.get(f"{rig.base}/api/tasks", headers=casey)).json()["items"]
        (task,) = [t for t in tasks if t["referral_id"] == e]
        assert (task["status"], task["template"]) == ("open", "no-way-to-reach-specialist")
        assert outbox_store.get(rig.db.conn, task["outbox_id"]).status == "sent"  # type: ignore[union-attr]
        url = f"{rig.base}/api/tasks/{task['id']}"
        mine = await http.post(f"{url}/assign", headers=casey, json={"user": "casey"})
        assert mine.status_code == 200 and mine.json()["assignee"] == "casey", mine.text
        done = await http.post(f"{url}/done", headers=casey, json={"note": "faxed by hand"})
        assert done.status_code == 200 and done.json()["status"] == "done", done.text
        assert (
            await http.post(f"{url}/done", headers=casey, json={"note": "x"})
        ).status_code == 409
        gone = await http.post(
            f"{rig.base}/api/tasks/999999/done", headers=casey, json={"note": ""}
        )
        assert gone.status_code == 404
        assert [r["actor"] for r in audit_rows(rig, "task-done")] == ["user:casey"]

        # a row on a channel nothing here serves (no fax channel), made dead
        now = rig.engine.clock.now()
        with rig.db.transaction() as conn:
            referral_store.enqueue_outbox(conn, e, "fax", "specialist-packet", "{}", "dead-1", now)
            (item,) = outbox_store.claim_due(conn, "fax", now + 1, 10)
            assert outbox_store.mark_dead(conn, item.id, error="test", now=now)
        oid = item.id
        dead = (await http.get(f"{rig.base}/api/dead-letters", headers=casey)).json()["items"]
        assert [i["id"] for i in dead] == [oid]
        retried = await http.post(f"{rig.base}/api/outbox/{oid}/retry", headers=casey)
        assert retried.status_code == 200, retried.text
        assert retried.json()["status"] in ("pending", "sending", "sent")
        assert [r["actor"] for r in audit_rows(rig, "outbox-retry")] == ["user:casey"]
        listing = await http.get(f"{rig.base}/api/outbox?status=pending", headers=casey)
        assert listing.status_code == 200

    go(tmp_path, body)


def test_messages_metadata_search_raw_and_audit_export(tmp_path: Path) -> None:
    async def body(rig: UiRig, http: httpx.AsyncClient) -> None:
        await rig.send(ref_i12("REF-F", "ctl-f"), ref_i12("REF-G", "ctl-g"))
        await rig.wait_referral("REF-G")
        ana = rig.bearer("ana")
        found = await http.get(f"{rig.base}/api/messages?control_id=ctl-f", headers=ana)
        items = found.json()["items"]
        assert [m["control_id"] for m in items] == ["ctl-f"]
        assert "raw" not in items[0]
        by_type = await http.get(f"{rig.base}/api/messages?type=REF*", headers=ana)
        assert len(by_type.json()["items"]) == 2
        since = isoformat(rig.engine.clock.now() + 3600)
        later = await http.get(f"{rig.base}/api/messages", headers=ana, params={"since": since})
        assert later.json()["items"] == []
        mid = items[0]["id"]
        meta = await http.get(f"{rig.base}/api/messages/{mid}", headers=ana)
        assert meta.json()["message_type"] == "REF^I12"
        raw = await http.get(f"{rig.base}/api/messages/{mid}/raw", headers=ana)
        assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/plain")
        assert raw.text.startswith("MSH|^~\\&|EHR|CLINIC") and "Doe^Jane" in raw.text
        views = audit_rows(rig, "viewed-message")
        assert views[-1]["actor"] == "user:ana" and views[-1]["message_id"] == mid

        audit = (await http.get(f"{rig.base}/api/audit?limit=2", headers=ana)).json()["items"]
        assert [r["id"] for r in audit] == [1, 2]
        nxt = (await http.get(f"{rig.base}/api/audit?after_id=2&limit=1", headers=ana)).json()
        assert [r["id"] for r in nxt["items"]] == [3]
        assert (await http.get(f"{rig.base}/api/messages/abc", headers=ana)).status_code == 400
        assert (await http.get(f"{rig.base}/api/messages/99999", headers=ana)).status_code == 404

    go(tmp_path, body)


@pytest.mark.parametrize(
    ("who", "path", "status"),
    [
        ("casey", "/api/referrals", 200),
        ("casey", "/api/messages", 403),
        ("casey", "/api/audit", 403),
        ("ana", "/api/referrals", 403),
        ("ana", "/api/messages", 200),
        ("ana", "/api/audit", 200),
        ("ada", "/api/messages", 200),
        ("config", "/api/referrals", 200),
        ("casey", "/api/me", 200),
    ],
)
def test_roles_on_the_api(tmp_path: Path, who: str, path: str, status: int) -> None:
    async def body(rig: UiRig, http: httpx.AsyncClient) -> None:
        r = await http.get(f"{rig.base}{path}", headers=rig.bearer(who))
        assert r.status_code == status, r.text
        if status == 403:
            assert r.json()["error"]

    go(tmp_path, body)
