"""``make screenshots``: every dashboard page at 1280 and 390 px wide, written to
docs/screenshots/<page>-<width>.png from a daemon on loopback (the shipped routes.yaml,
sample referrals sent over MLLP, the admin user), driven by Playwright in Debian's
chromium. Prints a table of each page's document width against the window's; exits 1
when a page is wider than the window (it would scroll sideways on a phone).

    .venv/bin/python tests/screenshots.py [OUT_DIR]
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

from browser_rig import CHROMIUM, launch, screenshot_all, seed
from playwright import async_api
from ui_rig import ui_engine

ROOT = Path(__file__).resolve().parent.parent


async def main(out: Path) -> int:
    if not CHROMIUM.exists():
        print(f"{CHROMIUM} is missing (apt-get install chromium)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        async with ui_engine(Path(tmp)) as rig, async_api.async_playwright() as pw:
            ids = await seed(rig)
            browser = await launch(pw)
            try:
                shots = await screenshot_all(browser, rig, ids, out)
            finally:
                await browser.close()
    print(f"{'PAGE':<10} {'WIDTH':>5} {'DOCUMENT':>8}  FILE")
    for s in shots:
        mark = "  OVERFLOWS" if s.overflows else ""
        shown = s.path.relative_to(ROOT) if s.path.is_relative_to(ROOT) else s.path
        print(f"{s.page:<10} {s.width:>5} {s.scroll_width:>8}  {shown}{mark}")
    return 1 if any(s.overflows for s in shots) else 0


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "screenshots"
    sys.exit(asyncio.run(main(target.resolve())))
