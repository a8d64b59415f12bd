"""Finding a referral in real headless Chromium (Debian's ``chromium`` driven by
Playwright, as tests/test_browser.py): log in, search by placer number, by MRN and by
the start of the patient's name (accents ignored), page forward and back through more
referrals than a page holds, sort by a column, open a referral from the results.

Skipped without /usr/bin/chromium unless ``REFLOOP_REQUIRE_BROWSER=1``.
"""

from __future__ import annotations

import re
from pathlib import Path

from helpers import run
from playwright import async_api
from test_browser import CHROMIUM, FLAGS
from ui_rig import PASSWORD, ref_i12, ui_engine

from engine.store import audit as audit_store

COUNT = 57  # more than the worklist's page of 50
FAMILIES = ("Ng", "Núñez", "Okafor")


def patient(n: int) -> str:
    """PID-3 .. PID-8 of referral n: MRN M<n>, a family name from FAMILIES."""
    family = FAMILIES[n % len(FAMILIES)]
    return f"M{n:03d}^^^CLINIC^MR||{family}^Given{n:03d}||19{50 + n % 40:02d}0102|F"


def test_coordinator_finds_and_pages_referrals(tmp_path: Path) -> None:
    async def body() -> None:
        async with ui_engine(tmp_path) as rig, async_api.async_playwright() as pw:
            await rig.send(
                *(ref_i12(f"FIND-{n:03d}", f"fd-{n}", pid=patient(n)) for n in range(COUNT))
            )
            await rig.wait_referral(f"FIND-{COUNT - 1:03d}")
            browser = await pw.chromium.launch(
                executable_path=str(CHROMIUM), args=FLAGS, headless=True
            )
            try:
                context = await browser.new_context(viewport={"width": 1400, "height": 900})
                page = await context.new_page()
                page.set_default_timeout(10_000)
                await page.goto(f"{rig.base}/ui/worklist")
                await page.fill("input[name=name]", "casey")
                await page.fill("input[name=password]", PASSWORD)
                await page.click("button[type=submit]")
                await page.wait_for_url("**/ui/worklist")
                worklist = page.locator("[data-testid=worklist] tbody tr")
                showing = page.locator("[data-testid=showing]").first

                # every referral counted, 50 shown
                assert await showing.inner_text() == f"Showing 1–50 of {COUNT} referrals"
                assert await worklist.count() == 50

                async def search(text: str) -> list[str]:
                    await page.fill("[data-testid=search]", text)
                    await page.click("form.search button[type=submit]")
                    await page.wait_for_load_state()
                    return [
                        (await worklist.nth(i).locator("td").nth(1).inner_text()).strip()
                        for i in range(await worklist.count())
                    ]

                assert await search("FIND-043") == ["FIND-043"]  # placer number
                assert "Núñez, Given043" in await worklist.first.inner_text()
                assert await search("M013") == ["FIND-013"]  # MRN
                # name prefix, accents and case ignored: Núñez is n % 3 == 1
                found = await search("nun")
                assert found == sorted(f"FIND-{n:03d}" for n in range(COUNT) if n % 3 == 1)
                assert await showing.inner_text() == f"Showing 1–{len(found)} of 19 referrals"
                assert await search("nun given01") == [
                    f"FIND-{n:03d}" for n in range(10, 20) if n % 3 == 1
                ]

                # clear the search, sort by placer (descending on the second click)
                await page.click("text=clear")
                await page.click("th a[data-sort=placer]")
                await page.wait_for_url(re.compile(r"sort=placer"))
                await page.click("th a[data-sort=placer]")
                await page.wait_for_url(re.compile(r"sort=-placer"))
                first = await worklist.first.locator("td").nth(1).inner_text()
                assert first.strip() == f"FIND-{COUNT - 1:03d}"

                # page forward, then back
                await page.locator("[data-testid=next]").first.click()
                await page.wait_for_url(re.compile(r"after=\d+"))
                assert await showing.inner_text() == f"Showing 51–{COUNT} of {COUNT} referrals"
                assert await worklist.count() == COUNT - 50
                last = await worklist.last.locator("td").nth(1).inner_text()
                assert last.strip() == "FIND-000"
                assert await page.locator("[data-testid=next]").count() == 0
                await page.locator("[data-testid=prev]").first.click()
                await page.wait_for_url(re.compile(r"before=\d+"))
                assert await showing.inner_text() == f"Showing 1–50 of {COUNT} referrals"
                first = await worklist.first.locator("td").nth(1).inner_text()
                assert first.strip() == f"FIND-{COUNT - 1:03d}"
                await page.screenshot(path=str(tmp_path / "search.png"), full_page=True)

                # open a referral from a search
                await search("Okafor")
                rid = await rig.wait_referral("FIND-002")
                await (
                    page.locator("[data-testid=worklist]")
                    .get_by_role("link", name="FIND-002")
                    .click()
                )
                await page.wait_for_url(f"**/ui/referrals/{rid}")
                shown = await page.text_content("[data-testid=patient]")
                assert shown is not None
                assert "Okafor, Given002" in shown and "1952-01-02" in shown
                assert "MRN M002" in shown
                await context.close()
            finally:
                await browser.close()

            rows = list(audit_store.rows(rig.db.conn))
            listed = [r for r in rows if r.action == "listed-referrals"]
            assert listed and all(r.actor == "user:casey" for r in listed)
            assert all("nun" not in str(r.detail).lower() for r in rows)  # no search text
            assert any(r.action == "viewed-referral" and r.referral_id == rid for r in rows)

    run(body(), timeout=120)
