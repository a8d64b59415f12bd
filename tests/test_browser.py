"""Acceptance 1 in real headless Chromium (Debian's ``chromium``, driven by Playwright with
its executable path set; ``make test`` installs both): log in; a referral sent over MLLP
appears in the worklist; the coordinator closes it with a reason; the referral page
shows the timeline and the audit log has the user's action; a screenshot of the
worklist is written under the test's output folder (and ``test-output/``).

Without /usr/bin/chromium the test is skipped, unless ``REFLOOP_REQUIRE_BROWSER=1``
(set by ``make test``) makes that a failure.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from helpers import run
from playwright import async_api
from ui_rig import PASSWORD, ref_i12, ui_engine

from engine.store import audit as audit_store

CHROMIUM = Path(os.environ.get("REFLOOP_CHROMIUM", "/usr/bin/chromium"))
ROOT = Path(__file__).resolve().parent.parent
# As root, in a closed network: no sandbox, and nothing that calls Google's hosts.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]

if not CHROMIUM.exists():
    if os.environ.get("REFLOOP_REQUIRE_BROWSER") == "1":
        raise RuntimeError(f"{CHROMIUM} is missing: make test installs Debian's chromium")
    pytest.skip(f"{CHROMIUM} is not installed (make test installs it)", allow_module_level=True)


def test_coordinator_closes_a_referral_in_the_browser(tmp_path: Path) -> None:
    async def body() -> None:
        async with ui_engine(tmp_path) as rig, async_api.async_playwright() as pw:
            await rig.send(ref_i12("REF-BROWSER-1", "br-1"), ref_i12("REF-BROWSER-2", "br-2"))
            rid = await rig.wait_referral("REF-BROWSER-1")
            await rig.wait_referral("REF-BROWSER-2")
            browser = await pw.chromium.launch(
                executable_path=str(CHROMIUM), args=FLAGS, headless=True
            )
            try:
                context = await browser.new_context(viewport={"width": 1400, "height": 800})
                page = await context.new_page()
                page.set_default_timeout(10_000)
                page.on("dialog", lambda dialog: dialog.accept())  # "Close this referral?"

                # not logged in: the worklist sends us to the login form
                await page.goto(f"{rig.base}/ui/worklist")
                assert "/ui/login" in page.url
                await page.fill("input[name=name]", "casey")
                await page.fill("input[name=password]", PASSWORD)
                await page.click("button[type=submit]")
                await page.wait_for_url("**/ui/worklist")
                assert await page.text_content("[data-testid=user]") == "casey (coordinator)"

                worklist = page.locator("[data-testid=worklist]")
                await worklist.get_by_text("REF-BROWSER-1").wait_for()
                shot = tmp_path / "worklist.png"
                await page.screenshot(path=str(shot), full_page=True)
                stable = ROOT / "test-output"
                stable.mkdir(exist_ok=True)
                shutil.copyfile(shot, stable / "worklist.png")
                assert shot.stat().st_size > 10_000

                await worklist.get_by_role("link", name="REF-BROWSER-1").click()
                await page.wait_for_url(f"**/ui/referrals/{rid}")
                timeline = page.locator("[data-testid=timeline]")
                assert "referral-created" in (await timeline.inner_text())

                await page.select_option("select[name=reason]", "patient-declined")
                await page.fill("form[action$='/close'] input[name=note]", "called twice")
                await page.click("form[action$='/close'] button[type=submit]")
                await page.wait_for_url(f"**/ui/referrals/{rid}?done=closed")
                status = await page.text_content("[data-testid=status]")
                assert status is not None and "closed (patient-declined)" in status
                text = await timeline.inner_text()
                assert "closed-by-operator" in text and "user:casey" in text
                await page.screenshot(path=str(tmp_path / "referral.png"), full_page=True)
                shutil.copyfile(tmp_path / "referral.png", stable / "referral.png")
                await context.close()
            finally:
                await browser.close()

            rows = [r for r in audit_store.rows(rig.db.conn) if r.referral_id == rid]
            closes = [r for r in rows if r.action == "closed-by-operator"]
            assert len(closes) == 1 and closes[0].actor == "user:casey"
            assert closes[0].detail["close_reason"] == "patient-declined"
            assert any(r.action == "viewed-referral" and r.actor == "user:casey" for r in rows)

    run(body(), timeout=90)
