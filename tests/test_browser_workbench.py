"""Issue 19's acceptance in real headless Chromium (Debian's ``chromium``, driven by
Playwright, as in test_browser.py) against the real daemon: a coordinator logs in,
completes a task with a note, assigns one, snoozes it, bulk-closes two referrals from the
worklist; an analyst reprocesses a message and opens its parsed tree. Screenshots of the
Tasks page and the message view land in the test's folder and ``test-output/``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from helpers import free_port, run
from playwright import async_api
from test_browser import CHROMIUM, FLAGS, ROOT
from test_workbench_queue import _forward_to_nowhere, open_tasks
from ui_rig import PASSWORD, ref_i12, ui_engine

from engine.store import audit as audit_store
from engine.store import referrals as referral_store
from engine.store import tasks as task_store


async def _login(page: Any, base: str, name: str) -> None:
    await page.goto(f"{base}/ui/login")
    await page.fill("input[name=name]", name)
    await page.fill("input[name=password]", PASSWORD)
    await page.click("button[type=submit]")
    await page.wait_for_selector("[data-testid=user]")


def _keep(shot: Path) -> None:
    stable = ROOT / "test-output"
    stable.mkdir(exist_ok=True)
    shutil.copyfile(shot, stable / shot.name)


def test_coordinator_works_the_queue_and_analyst_reprocesses(tmp_path: Path) -> None:
    async def body() -> None:
        edit = _forward_to_nowhere(free_port())
        async with (
            ui_engine(tmp_path, edit=edit) as rig,
            async_api.async_playwright() as pw,
        ):
            placers = ("REF-WB-1", "REF-WB-2", "REF-WB-3")
            await rig.send(*(ref_i12(p, f"wb-{i}") for i, p in enumerate(placers)))
            r1, r2, r3 = [await rig.wait_referral(p) for p in placers]
            t1, t2, _t3 = await open_tasks(rig, 3)
            mid = int(rig.db.conn.execute("SELECT min(id) FROM messages").fetchone()[0])
            browser = await pw.chromium.launch(
                executable_path=str(CHROMIUM), args=FLAGS, headless=True
            )
            try:
                context = await browser.new_context(viewport={"width": 1500, "height": 900})
                page = await context.new_page()
                page.set_default_timeout(10_000)
                page.on("dialog", lambda dialog: dialog.accept())  # the confirm() prompts
                await _login(page, rig.base, "casey")

                # Tasks: done with a note
                await page.goto(f"{rig.base}/ui/tasks")
                row = page.locator(f"tr[data-task='{t1.id}']")
                await row.locator("input[name=note]").fill("called the office, booked")
                await row.get_by_role("button", name="Done").click()
                await page.wait_for_url("**/ui/tasks?status=due&done=done")
                assert await page.locator(f"tr[data-task='{t1.id}']").count() == 0

                # assign to another coordinator-capable user
                row = page.locator(f"tr[data-task='{t2.id}']")
                await row.locator("select[name=user]").select_option("ada")
                await row.get_by_role("button", name="Assign").click()
                await page.wait_for_url("**/ui/tasks?status=due&done=assigned")
                cell = page.locator(f"tr[data-task='{t2.id}'] [data-testid=assignee]")
                assert await cell.inner_text() == "ada"
                shot = tmp_path / "tasks.png"
                await page.screenshot(path=str(shot), full_page=True)
                _keep(shot)

                # snooze a week: off the work list, on the snoozed one
                row = page.locator(f"tr[data-task='{t2.id}']")
                await row.locator("select[name=days]").select_option("7")
                await row.get_by_role("button", name="Snooze").click()
                await page.wait_for_url("**/ui/tasks?status=due&done=snoozed")
                assert await page.locator(f"tr[data-task='{t2.id}']").count() == 0
                await page.select_option("select[name=status]", "snoozed")  # autosubmits
                await page.wait_for_url("**/ui/tasks?status=snoozed")
                await page.locator(f"tr[data-task='{t2.id}']").wait_for()

                # bulk close two referrals from the worklist
                await page.goto(f"{rig.base}/ui/worklist")
                for rid in (r2, r3):
                    await page.check(f"input[name=referral_id][value='{rid}']")
                await page.select_option("#bulk select[name=reason]", "patient-declined")
                await page.fill("#bulk input[name=note]", "moved away")
                await page.click("#bulk button[type=submit]")
                await page.wait_for_url("**/ui/worklist?closed=2")
                await page.get_by_text("Closed 2 referral(s).").wait_for()

                # the analyst: reprocess a message (queue its forward again), see its tree
                await page.click("form.logout button[type=submit]")
                await page.wait_for_url("**/ui/login")
                await _login(page, rig.base, "ana")
                await page.goto(f"{rig.base}/ui/messages/{mid}")
                await page.check("input[name=resend]")
                await page.get_by_role("button", name="Reprocess").click()
                await page.wait_for_url(f"**/ui/messages/{mid}?done=reprocessed")
                outbox = page.locator("[data-testid=message-outbox] tbody tr")
                assert await outbox.count() == 2  # the first forward and the resent one
                await page.get_by_role("link", name="Show the raw message").click()
                await page.wait_for_url(f"**/ui/messages/{mid}?raw=1")
                tree = page.locator("[data-testid=tree]")
                text = await tree.inner_text()
                assert "PID-5" in text and "Patient Name" in text and "Family Name" in text
                assert "Referral Status" in text  # RF1-1
                raw = await page.locator("[data-testid=raw]").inner_text()
                assert raw.startswith("MSH|^~\\&|EHR|CLINIC|")
                shot = tmp_path / "message.png"
                await page.screenshot(path=str(shot), full_page=True)
                _keep(shot)
                await context.close()
            finally:
                await browser.close()

            conn = rig.db.conn
            done = task_store.get(conn, t1.id)
            assert done is not None and (done.status, done.note, done.done_by) == (
                "done",
                "called the office, booked",
                "user:casey",
            )
            assert r1 not in (r2, r3)
            for rid in (r2, r3):
                row_ = referral_store.get_referral(conn, rid)
                assert row_ is not None and row_.close_reason == "patient-declined"
            rows = list(audit_store.rows(conn))
            acts = {(r.action, r.actor) for r in rows}
            assert {
                ("task-done", "user:casey"),
                ("task-assigned", "user:casey"),
                ("task-snoozed", "user:casey"),
                ("closed-by-operator", "user:casey"),
                ("replayed", "user:ana"),
                ("viewed-message", "user:ana"),
            } <= acts

    run(body(), timeout=120)
