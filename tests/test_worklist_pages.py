"""The worklist and the Closure page agree (issue 19): with the clock two years after the
referrals were opened (RF1-7 / MSH-7 2026-01-01), the closure rate has no month to show,
yet the open-by-age chart counts every open referral the worklist lists; days are whole
numbers, and a closed referral says how many days it was open. Real engine, real HTTP."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import httpx
import pytest
from helpers import run
from ui_rig import UiRig, login, ref_i12, ui_engine

from engine.clock import VirtualClock

pytestmark = pytest.mark.store  # every test here uses the store

NOW = dt.datetime(2028, 1, 11, 12, tzinfo=dt.UTC).timestamp()
OPENED = dt.datetime(2026, 1, 1, 9, tzinfo=dt.UTC).timestamp()  # MSH-7 of ref_i12


def test_closure_page_counts_what_the_worklist_shows(tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            ui_engine(tmp_path, clock=VirtualClock(NOW)) as rig,
            httpx.AsyncClient(timeout=10, follow_redirects=True) as http,
        ):
            await body(rig, http)

    async def body(rig: UiRig, http: httpx.AsyncClient) -> None:
        await rig.send(*(ref_i12(f"AGE-{n}", f"age-{n}") for n in range(5)))
        for n in range(5):
            await rig.wait_referral(f"AGE-{n}")
        assert (await login(http, rig.base, "casey")).status_code == 200
        work = await http.get(f"{rig.base}/ui/worklist")
        assert "Showing 1–5 of 5 referrals" in work.text
        days = (NOW - OPENED) // 86400  # 740 whole days
        cells = re.findall(r'<td class="num">([^<]*)</td>', work.text)
        assert cells == [str(int(days))] * 5  # whole days, not "740.1"
        chart = await http.get(f"{rig.base}/ui/chart")
        assert chart.status_code == 200
        assert 'data-testid="open-total">5 open<' in chart.text
        assert 'data-testid="no-months"' in chart.text and "5 open referrals" in chart.text
        assert "Denominator" in chart.text or "denominator" in chart.text
        assert "91+: 5" in chart.text  # the bar's tooltip: every one is over 90 days

        # a closed referral: "closed after N days"
        rid = await rig.wait_referral("AGE-0")
        api = await http.post(
            f"{rig.base}/api/referrals/{rid}/close",
            json={"reason": "other"},
            headers=rig.bearer("casey"),
        )
        assert api.status_code == 200, api.text
        closed = await http.get(f"{rig.base}/ui/worklist?show=all&q=AGE-0")
        assert f"closed after {int(days)} days" in closed.text
        assert 'data-testid="heading">All referrals matching the search<' in closed.text
        chart = await http.get(f"{rig.base}/ui/chart")
        assert 'data-testid="open-total">4 open<' in chart.text

    run(main(), timeout=60)


def test_message_browser_and_outbox_page_without_a_cap(tmp_path: Path) -> None:
    """105 messages: the browser shows 100 with "of 105", the older page the last 5,
    and the newer link comes back; the outbox counts every row of the status shown."""

    async def main() -> None:
        async with (
            ui_engine(tmp_path) as rig,
            httpx.AsyncClient(timeout=10, follow_redirects=True) as http,
        ):
            await rig.send(*(ref_i12(f"MB-{n:03d}", f"mb-{n}") for n in range(105)))
            await rig.wait_referral("MB-104")
            assert (await login(http, rig.base, "ana")).status_code == 200
            first = await http.get(f"{rig.base}/ui/messages")
            assert "Showing 1–100 of 105 messages" in first.text
            older = re.search(r'href="([^"]*before=\d+[^"]*)" rel="next"', first.text)
            assert older, first.text[:2000]
            second = await http.get(rig.base + older.group(1).replace("&amp;", "&"))
            assert "Showing 101–105 of 105 messages" in second.text
            assert 'rel="next"' not in second.text
            assert second.text.count('<a href="/ui/messages/') == 5
            newer = re.search(r'href="([^"]*after=\d+[^"]*)" rel="prev"', second.text)
            assert newer
            back = await http.get(rig.base + newer.group(1).replace("&amp;", "&"))
            assert "Showing 1–100 of 105 messages" in back.text
            # the outbox: any status (an explicit empty status stays in the links)
            rows = int(rig.db.conn.execute("SELECT count(*) FROM outbox").fetchone()[0])
            out = await http.get(f"{rig.base}/ui/outbox?status=")
            if rows:
                assert f"of {rows} rows" in out.text
            else:
                assert "No rows match" in out.text

    run(main(), timeout=90)


def test_api_lists_say_when_rows_are_left(tmp_path: Path) -> None:
    """/api/messages and /api/audit stop at ``limit`` and say so: ``more`` and the cursor
    of the next page; following it reaches every row once."""

    async def main() -> None:
        async with ui_engine(tmp_path) as rig, httpx.AsyncClient(timeout=10) as http:
            await rig.send(*(ref_i12(f"API-{n}", f"api-{n}") for n in range(3)))
            await rig.wait_referral("API-2")
            seen: list[int] = []
            query: dict[str, object] = {"limit": 2}
            while True:
                r = await http.get(
                    f"{rig.base}/api/messages", params=query, headers=rig.bearer("ana")
                )
                body = r.json()
                seen += [m["id"] for m in body["items"]]
                if not body["more"]:
                    assert body["next"] is None
                    break
                assert body["next"] == {"before_id": body["items"][-1]["id"]}
                query = {"limit": 2, **body["next"]}
            assert len(seen) == 3 and seen == sorted(seen, reverse=True)
            audit = (
                await http.get(f"{rig.base}/api/audit?limit=1", headers=rig.bearer("ada"))
            ).json()
            assert audit["more"] is True and audit["next"] == {"after_id": audit["items"][0]["id"]}
            dead = await http.get(f"{rig.base}/api/dead-letters", headers=rig.bearer("ana"))
            assert dead.json()["more"] is False

    run(main(), timeout=60)
