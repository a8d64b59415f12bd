"""Driving the dashboard in real headless Chromium (Debian's ``chromium`` through
Playwright with its executable path set): the launch flags, logging in, the horizontal
overflow check, and screenshots of every page at a desktop and a phone width. Used by
test_browser.py and by ``make screenshots`` (tests/screenshots.py)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from playwright import async_api
from ui_rig import PASSWORD, UiRig, ref_i12

CHROMIUM = Path(os.environ.get("REFLOOP_CHROMIUM", "/usr/bin/chromium"))
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
WIDTHS = (1280, 390)  # a desktop, a phone (iPhone 12-15 CSS width)
HEIGHT = 844


async def launch(pw: async_api.Playwright) -> async_api.Browser:
    return await pw.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS, headless=True)


async def logged_in(
    browser: async_api.Browser, base: str, who: str, width: int
) -> tuple[async_api.BrowserContext, async_api.Page]:
    """A new context ``width`` CSS pixels wide, logged in as ``who``."""
    context = await browser.new_context(viewport={"width": width, "height": HEIGHT})
    page = await context.new_page()
    page.set_default_timeout(10_000)
    page.on("dialog", lambda dialog: dialog.accept())
    await page.goto(f"{base}/ui/login")
    await page.fill("input[name=name]", who)
    await page.fill("input[name=password]", PASSWORD)
    await page.click("button[type=submit]")
    await page.wait_for_url("**/ui/**")
    return context, page


async def overflow(page: async_api.Page) -> tuple[int, int]:
    """(scrollWidth, clientWidth) of the document: the page overflows horizontally when
    the first is larger (the user would have to scroll sideways)."""
    sizes: Any = await page.evaluate(
        "[document.documentElement.scrollWidth, document.documentElement.clientWidth]"
    )
    return int(sizes[0]), int(sizes[1])


SAMPLE = ref_i12("REF-TRY-1", "try-1").decode().replace("\r", "\n")


async def try_a_message(page: async_api.Page, base: str, text: str = SAMPLE) -> None:
    """Fill the Try page's text box and submit it; waits for the results."""
    await page.goto(f"{base}/ui/try")
    await page.fill("textarea[name=message]", text)
    await page.click("[data-testid=try-form] button[type=submit]")
    await page.locator("[data-testid=try-results]").wait_for()


async def seed(rig: UiRig) -> dict[str, int]:
    """Sample traffic for the pages: three referrals (one stat) and a message no route
    wants. Returns a referral id and a message id."""
    from helpers import hl7

    await rig.send(
        ref_i12("REF-DEMO-1", "demo-1"),
        ref_i12("REF-DEMO-2", "demo-2", priority="S"),
        ref_i12("REF-DEMO-3", "demo-3", specialty="REFDERM"),
        hl7("demo-adt", msg_type="ADT^A01"),
    )
    rid = await rig.wait_referral("REF-DEMO-1")
    await rig.wait_referral("REF-DEMO-3")
    return {"referral": rid, "message": 1}


@dataclass(frozen=True)
class Shot:
    page: str
    width: int
    scroll_width: int
    client_width: int
    path: Path

    @property
    def overflows(self) -> bool:
        return self.scroll_width > self.client_width


def pages(ids: dict[str, int]) -> list[tuple[str, str]]:
    """Every dashboard page: (name, path)."""
    return [
        ("worklist", "/ui/worklist"),
        ("referral", f"/ui/referrals/{ids['referral']}"),
        ("tasks", "/ui/tasks"),
        ("parked", "/ui/parked"),
        ("outbox", "/ui/outbox?status="),
        ("messages", "/ui/messages"),
        ("message", f"/ui/messages/{ids['message']}?raw=1"),
        ("sources", "/ui/sources"),
        ("try", "/ui/try"),
        ("chart", "/ui/chart"),
        ("users", "/ui/users"),
    ]


async def screenshot_all(
    browser: async_api.Browser, rig: UiRig, ids: dict[str, int], out: Path
) -> list[Shot]:
    """Every page (and the login form) at each of :data:`WIDTHS`, as the admin, to
    ``out/<page>-<width>.png``; the Try page with a message tried."""
    out.mkdir(parents=True, exist_ok=True)
    shots: list[Shot] = []
    for width in WIDTHS:
        anon = await browser.new_context(viewport={"width": width, "height": HEIGHT})
        page = await anon.new_page()
        await page.goto(f"{rig.base}/ui/login")
        shots.append(await _shot(page, "login", width, out))
        await anon.close()
        context, page = await logged_in(browser, rig.base, "ada", width)
        for name, path in pages(ids):
            if name == "try":
                await try_a_message(page, rig.base)
            else:
                await page.goto(f"{rig.base}{path}")
            shots.append(await _shot(page, name, width, out))
        await context.close()
    return shots


async def _shot(page: async_api.Page, name: str, width: int, out: Path) -> Shot:
    path = out / f"{name}-{width}.png"
    await page.screenshot(path=str(path), full_page=True)
    scroll, client = await overflow(page)
    return Shot(name, width, scroll, client, path)
