"""The dashboard's security (acceptance 2) and its pages and actions over real HTTP:
every /api/ and /ui/ route refuses an unauthenticated request, roles are enforced,
POSTs without the CSRF token are refused, wrong passwords are rate-limited (on a
virtual clock), session cookies carry HttpOnly, SameSite=Strict and Secure behind TLS;
a coordinator's close / book / decline / link / retry land in the audit log with the
user's name; raw messages and referral pages are audited views."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
from helpers import refloop, run
from ui_rig import PASSWORD, UiRig, csrf_of, login, ref_i12, ui_engine

from engine.clock import VirtualClock
from engine.config import RetentionConfig
from engine.hl7v2.client import MllpClient
from engine.store import audit as audit_store
from engine.store import retention
from engine.web.dashboard import bar_chart

Body = Callable[[UiRig, httpx.AsyncClient], Awaitable[None]]


def go(tmp_path: Path, body: Body, **kwargs: object) -> None:
    async def main() -> None:
        async with (
            ui_engine(tmp_path, **kwargs) as rig,  # type: ignore[arg-type]
            httpx.AsyncClient(timeout=10, follow_redirects=False) as http,
        ):
            await body(rig, http)

    run(main(), timeout=60)


def _routes(rig: UiRig) -> list[tuple[str, str]]:
    out = []
    assert rig.engine.http is not None
    for r in rig.engine.http.app.router.routes():
        path = r.resource.canonical if r.resource is not None else ""
        if r.method == "HEAD" or not path.startswith(("/api/", "/ui/")):
            continue
        if path.startswith(("/ui/login", "/ui/static")):
            continue  # the login form and the stylesheet / script are public
        out.append((r.method, re.sub(r"\{[^}]+\}", "1", path)))
    return out


def test_every_api_and_dashboard_route_refuses_the_unauthenticated(tmp_path: Path) -> None:
    async def body(rig: UiRig, http: httpx.AsyncClient) -> None:
        routes = _routes(rig)
        assert len(routes) > 30
        for method, path in routes:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Cookie": "refloop_session=x"}):
                r = await http.request(method, f"{rig.base}{path}", headers=headers)
                if path.startswith("/api/") or method != "GET":
                    assert r.status_code == 401, (method, path, r.status_code)
                else:
                    assert r.status_code == 303, (method, path, r.status_code)
                    assert r.headers["Location"].startswith("/ui/login?next=")

    go(tmp_path, body)


@pytest.mark.parametrize(
    ("who", "method", "path", "status"),
    [
        ("casey", "GET", "/ui/users", 403),
        ("casey", "POST", "/ui/users", 403),
        ("casey", "POST", "/ui/users/ana/disable", 403),
        ("casey", "GET", "/ui/messages", 403),
        ("casey", "GET", "/ui/worklist", 200),
        ("ana", "GET", "/ui/worklist", 403),
        ("ana", "POST", "/ui/referrals/1/close", 403),
        ("ana", "GET", "/ui/messages", 200),
        ("ada", "GET", "/ui/users", 200),
    ],
)
def test_roles_on_the_dashboard(
    tmp_path: Path, who: str, method: str, path: str, status: int
) -> None:
    async def body(rig: UiRig, http: httpx.AsyncClient) -> None:
        assert (await login(http, rig.base, who)).status_code == 303
        home = await http.get(f"{rig.base}/ui/chart")
        data = {"csrf": csrf_of(home.text), "name": "x", "role": "admin", "reason": "other"}
        r = await http.request(method, f"{rig.base}{path}", data=data if method == "POST" else None)
        assert r.status_code == status, r.text[:300]

    go(tmp_path, body)


def test_posts_without_the_csrf_token_are_refused(tmp_path: Path) -> None:
    async def body(rig: UiRig, http: httpx.AsyncClient) -> None:
        await rig.send(ref_i12("REF-X", "x1"))
        rid = await rig.wait_referral("REF-X")
        # the login form itself: no login-CSRF cookie and token, no login
        bare = await http.post(f"{rig.base}/ui/login", data={"name": "casey", "password": PASSWORD})
        assert bare.status_code == 403 and "refloop_session" not in bare.headers.get(
            "set-cookie", ""
        )
        await login(http, rig.base, "casey")
        for data in ({"reason": "other"}, {"reason": "other", "csrf": "0" * 64}):
            r = await http.post(f"{rig.base}/ui/referrals/{rid}/close", data=data)
            assert r.status_code == 403
        logout = await http.post(f"{rig.base}/ui/logout", data={})
        assert logout.status_code == 403
        page = await http.get(f"{rig.base}/ui/referrals/{rid}")
        assert 'data-testid="status">open' in page.text  # nothing was closed

    go(tmp_path, body)


def test_wrong_passwords_are_rate_limited(tmp_path: Path) -> None:
    clock = VirtualClock(1_767_225_600.0)

    async def body(rig: UiRig, http: httpx.AsyncClient) -> None:
        page = await http.get(f"{rig.base}/ui/login")
        token = csrf_of(page.text)

        async def attempt(password: str) -> httpx.Response:
            return await http.post(
                f"{rig.base}/ui/login",
                data={"name": "casey", "password": password, "csrf": token},
            )

        for _ in range(5):
            assert (await attempt("wrong password")).status_code == 401
        locked = await attempt(PASSWORD)  # even the right one, while locked out
        assert locked.status_code == 429 and int(locked.headers["Retry-After"]) > 0
        # another user from the same address is not locked out
        other = await http.post(
            f"{rig.base}/ui/login", data={"name": "ana", "password": PASSWORD, "csrf": token}
        )
        assert other.status_code == 303
        clock.advance(15 * 60 + 1)
        http.cookies.clear()  # a fresh login form (its CSRF cookie went with the login)
        token = csrf_of((await http.get(f"{rig.base}/ui/login")).text)
        assert (await attempt(PASSWORD)).status_code == 303

    go(tmp_path, body, clock=clock)


def test_concurrent_wrong_passwords_are_checked_at_most_five_times(tmp_path: Path) -> None:
    """40 parallel guesses: each attempt is counted before its password is hashed, so
    at most 5 reach the KDF (401) and the rest get the throttle answer (429)."""

    async def body(rig: UiRig, http: httpx.AsyncClient) -> None:
        token = csrf_of((await http.get(f"{rig.base}/ui/login")).text)

        async def attempt(password: str) -> int:
            data = {"name": "casey", "password": password, "csrf": token}
            return (await http.post(f"{rig.base}/ui/login", data=data)).status_code

        statuses = await asyncio.gather(*(attempt(f"wrong {i:02}") for i in range(40)))
        checked = statuses.count(401)  # a password hashed and found wrong
        assert checked <= 5 and statuses.count(429) == 40 - checked, statuses
        assert await attempt(PASSWORD) == 429  # the right one, while throttled

    go(tmp_path, body)


def _set_cookie(r: httpx.Response, name: str) -> str:
    return next(c for c in r.headers.get_list("set-cookie") if c.startswith(f"{name}="))


@pytest.mark.parametrize(("public_url", "secure"), [("", False), ("https://refloop.test", True)])
def test_session_cookie_flags(tmp_path: Path, public_url: str, secure: bool) -> None:
    async def body(rig: UiRig, http: httpx.AsyncClient) -> None:
        # cookies by hand: a client keeps Secure cookies away from this http:// test server
        form = await http.get(f"{rig.base}/ui/login")
        login_cookie = _set_cookie(form, "refloop_login_csrf").split(";")[0]
        r = await http.post(
            f"{rig.base}/ui/login",
            data={"name": "casey", "password": PASSWORD, "csrf": csrf_of(form.text)},
            headers={"Cookie": login_cookie},
        )
        assert r.status_code == 303
        for cookie in (_set_cookie(form, "refloop_login_csrf"), _set_cookie(r, "refloop_session")):
            flags = {part.strip().split("=")[0].lower() for part in cookie.split(";")[1:]}
            assert {"httponly", "samesite", "path", "max-age"} <= flags
            assert "SameSite=Strict" in cookie
            assert ("secure" in flags) is secure
        session = {"Cookie": _set_cookie(r, "refloop_session").split(";")[0]}
        page = await http.get(f"{rig.base}/ui/worklist", headers=session)
        assert page.status_code == 200
        csp = page.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert page.headers["Cache-Control"] == "no-store"
        # logging out ends the session on the server, not only in the browser
        await http.post(f"{rig.base}/ui/logout", data={"csrf": csrf_of(page.text)}, headers=session)
        again = await http.get(f"{rig.base}/ui/worklist", headers=session)
        assert again.status_code == 303

    go(tmp_path, body, public_url=public_url)


def test_coordinator_actions_and_audited_views(tmp_path: Path) -> None:
    async def body(rig: UiRig, http: httpx.AsyncClient) -> None:
        await rig.send(ref_i12("REF-1", "m1"), ref_i12("REF-2", "m2"), ref_i12("REF-3", "m3"))
        r1 = await rig.wait_referral("REF-1")
        r2 = await rig.wait_referral("REF-2")
        r3 = await rig.wait_referral("REF-3")
        await login(http, rig.base, "casey")
        work = await http.get(f"{rig.base}/ui/worklist")
        assert all(p in work.text for p in ("REF-1", "REF-2", "REF-3"))
        token = csrf_of(work.text)
        page = await http.get(f"{rig.base}/ui/referrals/{r1}")
        assert "referral-created" in page.text and "Close referral" in page.text
        done = await http.post(
            f"{rig.base}/ui/referrals/{r1}/close",
            data={"csrf": token, "reason": "no-response", "note": "three calls"},
        )
        assert done.status_code == 303
        page = await http.get(done.headers["Location"].replace("/ui", f"{rig.base}/ui", 1))
        assert 'data-testid="status">closed (no-response)' in page.text
        assert "closed-by-operator" in page.text and "user:casey" in page.text
        await http.post(
            f"{rig.base}/ui/referrals/{r2}/book", data={"csrf": token, "start": "2026-04-02T10:00"}
        )
        await http.post(f"{rig.base}/ui/referrals/{r3}/decline", data={"csrf": token})
        filtered = await http.get(f"{rig.base}/ui/worklist?show=open&status=patient-booked")
        assert "REF-2" in filtered.text and "REF-3" not in filtered.text
        rows = list(audit_store.rows(rig.db.conn))
        acts = {(r.action, r.referral_id): r.actor for r in rows}
        assert acts[("closed-by-operator", r1)] == "user:casey"
        assert acts[("appointment-booked", r2)] == "user:casey"
        assert acts[("specialist-declined", r3)] == "user:casey"
        assert acts[("viewed-referral", r1)] == "user:casey"
        assert all("three calls" not in str(r.detail) for r in rows)

        # an analyst reads the raw message; the view is audited
        http.cookies.clear()
        await login(http, rig.base, "ana")
        listing = await http.get(f"{rig.base}/ui/messages?control_id=m1")
        assert "REF^I12" in listing.text and "m2" not in listing.text
        mid = int(re.search(r'href="/ui/messages/(\d+)"', listing.text).group(1))  # type: ignore[union-attr]
        meta = await http.get(f"{rig.base}/ui/messages/{mid}")
        assert "Doe^Jane" not in meta.text  # metadata only until asked
        raw = await http.get(f"{rig.base}/ui/messages/{mid}?raw=1")
        assert "Doe^Jane" in raw.text
        viewed = [r for r in audit_store.rows(rig.db.conn) if r.action == "viewed-message"]
        assert [(r.actor, r.message_id) for r in viewed] == [("user:ana", mid)]
        # 401 days after the referral closed, retention pruned its message's bytes: the page
        # says so, with the hash, and asking for the bytes shows no PHI (issue 20)
        closed_at = rig.db.conn.execute("SELECT max(closed_at) FROM referrals").fetchone()[0]
        later = float(closed_at) + 401 * 86400
        retention.prune_now(rig.db, RetentionConfig(), later, actor="system", pause=0)
        pruned = await http.get(f"{rig.base}/ui/messages/{mid}")
        assert 'data-testid="pruned"' in pruned.text and "retention policy" in pruned.text
        sha = rig.db.conn.execute("SELECT hex(sha256) FROM messages WHERE id = ?", (mid,))
        assert sha.fetchone()[0].lower() in pruned.text
        asked = await http.get(f"{rig.base}/ui/messages/{mid}?raw=1")
        assert asked.status_code == 200 and "Doe^Jane" not in asked.text
        assert 'data-testid="pruned"' in asked.text
        chart = await http.get(f"{rig.base}/ui/chart")
        assert chart.status_code == 200 and "<svg" in chart.text

    go(tmp_path, body)


def test_admin_adds_and_disables_users(tmp_path: Path) -> None:
    async def body(rig: UiRig, http: httpx.AsyncClient) -> None:
        await login(http, rig.base, "ada")
        page = await http.get(f"{rig.base}/ui/users")
        token = csrf_of(page.text)
        short = await http.post(
            f"{rig.base}/ui/users",
            data={"csrf": token, "name": "dan", "role": "analyst", "password": "short"},
        )
        assert short.status_code == 400 and "at least 10" in short.text
        added = await http.post(
            f"{rig.base}/ui/users",
            data={"csrf": token, "name": "dan", "role": "analyst", "password": PASSWORD},
        )
        assert added.status_code == 303
        await http.post(f"{rig.base}/ui/users/casey/disable", data={"csrf": token})
        api = await http.get(f"{rig.base}/api/referrals", headers=rig.bearer("casey"))
        assert api.status_code == 401  # a disabled user's token stops working

    go(tmp_path, body)


def test_bar_chart_geometry() -> None:
    c = bar_chart([("a", 50.0, "50%"), ("b", 100.0, "100%")], top=100.0, height=100.0)
    assert [b.height for b in c["bars"]] == [50.0, 100.0]
    assert c["bars"][1].y == 20.0 and c["base"] == 120.0


def test_tasks_page_done_with_a_note(tmp_path: Path) -> None:
    """/ui/tasks: the referral's packet task (no way to reach the specialist) is listed;
    Done with a note completes it, on the referral's timeline as the user."""

    async def body(rig: UiRig, http: httpx.AsyncClient) -> None:
        await rig.send(ref_i12("REF-TASK", "t1"))
        rid = await rig.wait_referral("REF-TASK")
        await login(http, rig.base, "casey")
        for _ in range(200):  # the dispatcher delivers the task row: wait on the row
            page = await http.get(f"{rig.base}/ui/tasks")
            if "no-way-to-reach-specialist" in page.text:
                break
            await asyncio.sleep(0.05)
        (tid,) = re.findall(r'action="/ui/tasks/(\d+)/done"', page.text)
        done = await http.post(
            f"{rig.base}/ui/tasks/{tid}/done", data={"csrf": csrf_of(page.text), "note": "faxed"}
        )
        assert (
            done.status_code == 303 and done.headers["Location"] == "/ui/tasks?status=due&done=done"
        )
        history = await http.get(f"{rig.base}/ui/tasks?status=done")
        assert "faxed" in history.text and "user:casey" in history.text
        events = [r for r in audit_store.rows(rig.db.conn) if r.action == "task-done"]
        assert [(e.actor, e.referral_id) for e in events] == [("user:casey", rid)]

    go(tmp_path, body)


def test_a_message_rejected_before_its_control_id_was_read_says_so(tmp_path: Path) -> None:
    """An empty MSH-9 is rejected (AR) before MSH-10 is read: the row has no control id.
    The messages list (dashboard and ``refloop messages list``) shows a dash and why,
    never an empty cell (failed before: a blank control id column) and never an
    invented id; the JSON keeps "" as stored."""
    bad = b"MSH|^~\\&|LAB|HOSP|REFLOOP|CLINIC|20260101120000||EMPTY-9|P|2.5.1\rPID|1\r"
    bad = bad.replace(b"||EMPTY-9|", b"|||EMPTY-9|")  # MSH-9 empty, MSH-10 EMPTY-9

    async def body(rig: UiRig, http: httpx.AsyncClient) -> None:
        client = await MllpClient.connect("127.0.0.1", rig.mllp_port, timeout=5)
        try:
            assert (await client.send(bad)).code == "AR"
        finally:
            await client.close()
        await login(http, rig.base, "ana")
        listing = await http.get(f"{rig.base}/ui/messages")
        row = re.search(r"<tr[^>]*>(?:(?!</tr>).)*MSH-9(?:(?!</tr>).)*</tr>", listing.text, re.S)
        assert row is not None, listing.text
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row.group(0), re.S)
        control = cells[5]
        assert "—" in control and "not read" in control and "MSH-9" in control, control
        assert "EMPTY-9" not in listing.text

        state = str(rig.engine.state_dir)
        listed = refloop("messages", "list", "--state", state)
        assert listed.returncode == 0, listed.stderr.decode()
        (line,) = [x for x in listed.stdout.decode().splitlines() if "rejected" in x]
        # ID, received, source, type, control id, status: each column says something
        assert line.split()[2:6] == ["ehr", "-", "-", "rejected"], line
        shown = refloop("messages", "show", line.split()[0], "--state", state).stdout.decode()
        assert "control id" in shown and "not read: MSH-9 message type is empty" in shown
        as_json = json.loads(refloop("messages", "list", "--json", "--state", state).stdout)
        assert [(m["control_id"], m["type"]) for m in as_json] == [("", "")]

    go(tmp_path, body)
