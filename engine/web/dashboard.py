"""The care-team dashboard under ``/ui/``: server-rendered Jinja2 pages (autoescaped),
one small script and one stylesheet from ``templates/dashboard/static/`` (no build
step, no CDN), and charts drawn as inline SVG on the server.

Access: a session cookie (``HttpOnly``, ``SameSite=Strict``, ``Secure`` when the request
came over TLS or ``http.public_url`` is https) from the login form. Every page needs a
session (GET redirects to the login page, anything else answers 401) and a role allowed
its permission (403, engine.web.auth.PERMISSIONS). Every POST carries the session's CSRF
token (403 without it); the login form uses a double-submit cookie instead. Failed logins
are rate-limited per user name + client address (429).

Coordinator actions call :class:`engine.web.service.Service`, the same path as the JSON API:
the tracker or the outbox functions with ``actor = user:<name>``, so each lands in the
referral's timeline and the audit log.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hmac
import logging
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote, urlencode, urlsplit

import jinja2
from aiohttp import web

from engine.clock import isoformat, parse_iso
from engine.store import outbox as outbox_store
from engine.store.referral_search import SORTS
from engine.tracking import states
from engine.web.auth import (
    PERMISSIONS,
    SESSION_COOKIE,
    SESSION_SECONDS,
    Auth,
    AuthError,
    Permission,
    Principal,
    RateLimited,
    csrf_ok,
    stored_hash,
    verify_password,
)
from engine.web.pages import FORM
from engine.web.pages import secure as _secure
from engine.web.service import ApiError, Service
from engine.web.workbench import WorkbenchPages

log = logging.getLogger(__name__)

TEMPLATE_DIR: Final = Path(__file__).resolve().parents[2] / "templates" / "dashboard"
LOGIN_CSRF_COOKIE: Final = "refloop_login_csrf"
PREFIX: Final = "/ui"
MESSAGE_STATUSES: Final = ("received", "routed", "filtered", "error", "rejected")
TASK_PAGE: Final = 200  # tasks on the Tasks page; the page says when more are left
TASK_FILTERS: Final = ("due", "snoozed", "open", "done", "superseded", "all")
SNOOZE_DAYS: Final = (("1", "1 day"), ("3", "3 days"), ("7", "1 week"), ("14", "2 weeks"))
WORKLIST_SHOW: Final = ("open", "overdue", "all")
WORKLIST_PAGE: Final = 50
LIST_PAGE: Final = 100  # the message browser's and the outbox's page
# The worklist's sortable columns: (heading, sort key or "" for none)
WORKLIST_COLUMNS: Final = (
    ("#", "id"), ("Placer", "placer"), ("Patient", "patient"), ("Born", "birth_date"),
    ("MRN", ""), ("Priority", "priority"), ("Specialty", "specialty"), ("Specialist", ""),
    ("Referring", ""), ("Status", "status"), ("Patient side", ""), ("Specialist side", ""),
    ("Days", "days"), ("Needed by", "needed_by"),
)  # fmt: skip

Page = Callable[[web.Request, Principal], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    label: str
    value: str


def bar_chart(
    values: list[tuple[str, float, str]],
    *,
    height: float = 160.0,
    bar: float = 36.0,
    gap: float = 12.0,
    top: float | None = None,
) -> dict[str, Any]:
    """Geometry for an SVG bar chart of (label, value, value text) — drawn by the
    ``chart`` macro in templates/dashboard/_macros.html."""
    peak = top if top is not None else max([v for _, v, _ in values] + [1.0])
    bars = []
    for i, (label, value, text) in enumerate(values):
        h = 0.0 if peak <= 0 else height * max(0.0, value) / peak
        bars.append(Bar(gap + i * (bar + gap), 20 + height - h, bar, h, label, text))
    return {
        "bars": bars,
        "width": gap + len(values) * (bar + gap),
        "height": height + 60,
        "base": 20 + height,
    }


class Dashboard(WorkbenchPages):
    def __init__(self, service: Service, auth: Auth, *, secure: bool = False):
        self.service = service
        self.auth = auth
        self.secure = secure
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        self.env.filters["when"] = _when

    # -- wiring --

    def register(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/", self._root)
        r.add_get(f"{PREFIX}/login", self._login_form)
        r.add_post(f"{PREFIX}/login", self._login)
        r.add_static(f"{PREFIX}/static/", TEMPLATE_DIR / "static", append_version=False)
        for method, path, permission, page in self.pages():
            r.add_route(method, f"{PREFIX}{path}", self._guard(permission, page))

    def pages(self) -> list[tuple[str, str, Permission | None, Page]]:
        """Every authenticated page: (method, path under /ui, permission, handler)."""
        return [
            ("GET", "/", None, self._home),
            ("POST", "/logout", None, self._logout),
            ("GET", "/worklist", "referrals", self._worklist),
            ("POST", "/worklist/close", "act", self._close_many),
            ("GET", "/referrals", "referrals", self._worklist),
            ("GET", "/referrals/{referral_id}", "referrals", self._referral),
            ("POST", "/referrals/{referral_id}/close", "act", self._close),
            ("POST", "/referrals/{referral_id}/book", "act", self._book),
            ("POST", "/referrals/{referral_id}/decline", "act", self._decline),
            ("GET", "/parked", "referrals", self._parked),
            ("POST", "/parked/{parked_id}/link", "act", self._link),
            ("GET", "/tasks", "referrals", self._tasks),
            ("POST", "/tasks/{task_id}/assign", "act", self._task_assign),
            ("POST", "/tasks/{task_id}/done", "act", self._task_done),
            ("POST", "/tasks/{task_id}/snooze", "act", self._task_snooze),
            ("GET", "/outbox", "outbox", self._outbox),
            ("POST", "/outbox/{outbox_id}/retry", "act", self._retry),
            ("GET", "/messages", "messages", self._messages),
            ("GET", "/messages/{message_id}", "messages", self._message),
            ("POST", "/messages/{message_id}/reprocess", "reprocess", self._reprocess),
            (
                "POST",
                "/messages/{message_id}/outbox/{outbox_id}/retry",
                "reprocess",
                self._message_retry,
            ),
            ("GET", "/chart", "report", self._chart),
            ("GET", "/users", "users", self._users),
            ("POST", "/users", "users", self._add_user),
            ("POST", "/users/{name}/disable", "users", self._disable_user),
            *self.workbench_pages(),  # Sources, Try a message (engine.web.workbench)
        ]

    def _guard(self, permission: Permission | None, page: Page) -> Callable[..., Any]:
        async def handle(request: web.Request) -> web.StreamResponse:
            principal = self.auth.from_session(request.cookies.get(SESSION_COOKIE, ""))
            if principal is None:
                if request.method == "GET":
                    target = f"{PREFIX}/login?next={quote(request.path_qs, safe='')}"
                    return _redirect(target)
                return self._render(request, None, "error.html", status=401, message="Log in.")
            if request.method == "POST":
                form = await request.post()
                if not csrf_ok(principal, str(form.get("csrf", ""))):
                    log.warning("%s: %s %s refused (CSRF)", request.remote, request.method,
                                request.path)  # fmt: skip
                    return self._render(
                        request, principal, "error.html", status=403, message="Bad CSRF token."
                    )
                request[FORM] = form
            if permission is not None and not principal.may(permission):
                return self._render(
                    request, principal, "error.html", status=403,
                    message=f"The {principal.role} role may not open this page.",
                )  # fmt: skip
            try:
                return await page(request, principal)
            except ApiError as exc:
                return self._render(
                    request, principal, "error.html", status=exc.status, message=exc.reason
                )

        return handle

    def _is_secure(self, request: web.Request) -> bool:
        return self.secure or request.secure

    # -- logging in and out --

    async def _root(self, request: web.Request) -> web.StreamResponse:
        return _redirect(f"{PREFIX}/", 302)

    async def _login_form(self, request: web.Request) -> web.StreamResponse:
        token = secrets.token_urlsafe(24)
        response = self._render(
            request, None, "login.html", login_csrf=token, next=_safe_next(request), error=""
        )
        response.set_cookie(
            LOGIN_CSRF_COOKIE, token, httponly=True, samesite="Strict",
            secure=self._is_secure(request), path=f"{PREFIX}/login", max_age=3600,
        )  # fmt: skip
        return response

    async def _login(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        cookie = request.cookies.get(LOGIN_CSRF_COOKIE, "")
        given = str(form.get("csrf", ""))
        if not cookie or not hmac.compare_digest(cookie, given):
            return self._render(request, None, "error.html", status=403, message="Bad CSRF token.")
        name, password = str(form.get("name", "")), str(form.get("password", ""))
        address = request.remote or ""
        next_ = _safe_next(request, str(form.get("next", "")))
        try:
            key, user = self.auth.begin_login(name, address)
        except RateLimited as exc:
            response = self._render(
                request, None, "login.html", status=429, login_csrf=cookie, next=next_,
                error="Too many failed logins. Try again later.",
            )  # fmt: skip
            response.headers["Retry-After"] = str(max(1, int(exc.retry_after)))
            return response
        # the KDF takes tens of milliseconds and 16 MiB: off the event loop's thread
        ok = await asyncio.get_running_loop().run_in_executor(
            None, verify_password, password, stored_hash(user)
        )
        result = self.auth.finish_login(key, address, user, ok)
        if result is None:
            return self._render(
                request, None, "login.html", status=401, login_csrf=cookie, next=next_,
                error="Wrong user name or password.",
            )  # fmt: skip
        principal, session = result
        log.info("%s: %s logged in", address, principal.name)
        response = _redirect(next_)
        response.set_cookie(
            SESSION_COOKIE, session, httponly=True, samesite="Strict",
            secure=self._is_secure(request), path="/", max_age=int(SESSION_SECONDS),
        )  # fmt: skip
        response.del_cookie(LOGIN_CSRF_COOKIE, path=f"{PREFIX}/login")
        return _secure(response)

    async def _logout(self, request: web.Request, me: Principal) -> web.StreamResponse:
        self.auth.logout(me.session)
        response = _redirect(f"{PREFIX}/login")
        response.del_cookie(SESSION_COOKIE, path="/")
        return _secure(response)

    async def _home(self, request: web.Request, me: Principal) -> web.StreamResponse:
        if me.may("referrals"):
            return _redirect(f"{PREFIX}/worklist")
        if me.may("messages"):
            return _redirect(f"{PREFIX}/messages")
        return _redirect(f"{PREFIX}/chart")

    # -- referrals --

    async def _worklist(self, request: web.Request, me: Principal) -> web.StreamResponse:
        q = request.query
        status = q.get("status") or None
        if status not in (None, *states.OVERALL_STATUSES):
            raise ApiError(400, "unknown status")
        show = q.get("show", "open")
        if show not in WORKLIST_SHOW:
            raise ApiError(400, "show must be open, overdue or all")
        days = _int(q.get("days_open_min"), 0, 36500)
        sort = q.get("sort", "priority")
        if sort.lstrip("-") not in SORTS:
            raise ApiError(400, "unknown sort")
        filters = {
            "q": q.get("q", "")[:200],
            "status": status or "",
            "show": show,
            "specialty": q.get("specialty", "")[:100],
            "specialist": q.get("specialist", "")[:100],
            "referring": q.get("referring", "")[:100],
            "days_open_min": "" if days is None else str(days),
            "sort": sort,
        }
        page = self.service.worklist_page(
            me,
            via="dashboard",
            q=filters["q"],
            status=status,
            open_only=show != "all" and status is None,
            specialty=filters["specialty"] or None,
            specialist=filters["specialist"] or None,
            referring=filters["referring"] or None,
            days_open_min=days,
            overdue=True if show == "overdue" else None,
            sort=sort,
            after=_int(q.get("after"), 1, 2**53),
            before=_int(q.get("before"), 1, 2**53),
            limit=WORKLIST_PAGE,
        )
        closed = _int(q.get("closed"), 0, 10_000)
        return self._render(
            request, me, "worklist.html", page=page, items=page["items"], filters=filters,
            statuses=states.OVERALL_STATUSES, close_reasons=states.CLOSE_PRECEDENCE,
            closed=closed, refused=q.get("refused", "")[:200],
            heading=_worklist_heading(filters),
            link=_query_link(request.path, filters), columns=WORKLIST_COLUMNS,
        )  # fmt: skip

    async def _referral(self, request: web.Request, me: Principal) -> web.StreamResponse:
        rid = _path_id(request, "referral_id")
        item = self.service.referral(me, rid, via="dashboard")
        return self._render(
            request, me, "referral.html", r=item, timeline=_timeline(item),
            close_reasons=states.CLOSE_PRECEDENCE, notice=request.query.get("done", ""),
            workers=self._workers(), snooze_days=SNOOZE_DAYS,
        )  # fmt: skip

    async def _close(self, request: web.Request, me: Principal) -> web.StreamResponse:
        rid = _path_id(request, "referral_id")
        form = self._form(request)
        self.service.close(me, rid, str(form.get("reason", "")), str(form.get("note", ""))[:2000])
        return _redirect(f"{PREFIX}/referrals/{rid}?done=closed")

    async def _book(self, request: web.Request, me: Principal) -> web.StreamResponse:
        rid = _path_id(request, "referral_id")
        self.service.book(me, rid, str(self._form(request).get("start", ""))[:40])
        return _redirect(f"{PREFIX}/referrals/{rid}?done=booked")

    async def _decline(self, request: web.Request, me: Principal) -> web.StreamResponse:
        rid = _path_id(request, "referral_id")
        self.service.decline(me, rid, str(self._form(request).get("reason", ""))[:2000])
        return _redirect(f"{PREFIX}/referrals/{rid}?done=declined")

    async def _close_many(self, request: web.Request, me: Principal) -> web.StreamResponse:
        """The worklist's *Close selected*: the ticked referrals, one reason and note."""
        form = await request.post()  # read (and CSRF-checked) by the guard; cached
        ids = [_int(str(v), 1, 2**53) for v in form.getall("referral_id", [])]
        result = self.service.close_many(
            me, [i for i in ids if i is not None], str(form.get("reason", "")),
            str(form.get("note", ""))[:2000],
        )  # fmt: skip
        refused = [str(i["referral_id"]) for i in result["items"] if i["error"]]
        target = f"{PREFIX}/worklist?closed={result['closed']}"
        if refused:
            target += f"&refused={','.join(refused[:20])}"
        return _redirect(target)

    async def _parked(self, request: web.Request, me: Principal) -> web.StreamResponse:
        items = self.service.parked(include_linked=request.query.get("all") == "1")
        return self._render(request, me, "parked.html", items=items)

    async def _link(self, request: web.Request, me: Principal) -> web.StreamResponse:
        pid = _path_id(request, "parked_id")
        rid = _int(str(self._form(request).get("referral_id", "")), 1, 2**53)
        if rid is None:
            raise ApiError(400, "referral id must be a number")
        self.service.link(me, pid, rid)
        return _redirect(f"{PREFIX}/referrals/{rid}?done=linked")

    # -- coordinator tasks --

    async def _tasks(self, request: web.Request, me: Principal) -> web.StreamResponse:
        status = request.query.get("status", "due")
        if status not in TASK_FILTERS:
            raise ApiError(400, "unknown status")
        items = self.service.tasks(status=status, limit=TASK_PAGE + 1)
        return self._render(
            request, me, "tasks.html", items=items[:TASK_PAGE], more=len(items) > TASK_PAGE,
            page_size=TASK_PAGE, current=status, statuses=TASK_FILTERS,
            notice=request.query.get("done", ""), workers=self._workers(),
            snooze_days=SNOOZE_DAYS,
        )  # fmt: skip

    def _workers(self) -> list[str]:
        """Who a task can be given to: enabled users whose role may act on it."""
        return [
            u.name for u in self.auth.users() if not u.disabled and u.role in PERMISSIONS["act"]
        ]

    def _back(self, request: web.Request, done: str) -> web.Response:
        """Back to the page the form was on: a referral (its ``referral``) or the task
        list (its ``status``), with a notice."""
        form = self._form(request)
        referral = _int(str(form.get("referral", "")), 1, 2**53)
        if referral is not None:
            return _redirect(f"{PREFIX}/referrals/{referral}?done=task-{done}")
        status = str(form.get("status", "due"))
        status = status if status in TASK_FILTERS else "due"
        return _redirect(f"{PREFIX}/tasks?status={status}&done={done}")

    async def _task_assign(self, request: web.Request, me: Principal) -> web.StreamResponse:
        """Assign to me, or to the user the form names ("" takes the task back)."""
        user = str(self._form(request).get("user", me.name))[:64]
        if user and user not in self._workers():
            raise ApiError(400, "no such user may work tasks")
        self.service.task_action(me, _path_id(request, "task_id"), "assign", user)
        return self._back(request, "assigned" if user else "unassigned")

    async def _task_done(self, request: web.Request, me: Principal) -> web.StreamResponse:
        tid = _path_id(request, "task_id")
        note = str(self._form(request).get("note", ""))[:2000]
        self.service.task_action(me, tid, "done", note)
        return self._back(request, "done")

    async def _task_snooze(self, request: web.Request, me: Principal) -> web.StreamResponse:
        """Snooze for a number of days (``days``), or until a date (``until``, which wins);
        ``days=0`` wakes the task."""
        form = self._form(request)
        until = str(form.get("until", "")).strip()[:40]
        if not until:
            days = _int(str(form.get("days", "")), 0, 365)
            if days is None:
                raise ApiError(400, "snooze for how many days?")
            until = "" if days == 0 else isoformat(self.service.clock.now() + days * 86400.0)
        self.service.task_action(me, _path_id(request, "task_id"), "snooze", until)
        return self._back(request, "snoozed" if until else "woken")

    # -- outbox --

    async def _outbox(self, request: web.Request, me: Principal) -> web.StreamResponse:
        status = request.query.get("status", "dead")
        if status not in ("", *outbox_store.OUTBOX_STATUSES):
            raise ApiError(400, "unknown status")
        page = self.service.outbox_page(
            status=status,
            before=_int(request.query.get("before"), 1, 2**53),
            after=_int(request.query.get("after"), 1, 2**53),
            limit=LIST_PAGE,
        )
        return self._render(
            request, me, "outbox.html", items=page["items"], page=page, current=status,
            statuses=outbox_store.OUTBOX_STATUSES,
            link=_query_link(request.path, {"status": status}, keep_empty=("status",)),
        )  # fmt: skip

    async def _retry(self, request: web.Request, me: Principal) -> web.StreamResponse:
        oid = _path_id(request, "outbox_id")
        self.service.retry(me, oid)
        return _redirect(f"{PREFIX}/outbox?status=pending")

    # -- messages --

    async def _messages(self, request: web.Request, me: Principal) -> web.StreamResponse:
        q = request.query
        status = q.get("status") or None
        if status not in (None, *MESSAGE_STATUSES):
            raise ApiError(400, "unknown status")
        since, until = _day(q.get("since")), _day(q.get("until"))
        filters = {
            "type": q.get("type", "")[:64],
            "control_id": q.get("control_id", "")[:200],
            "status": status or "",
            "since": q.get("since", "")[:10] if since is not None else "",
            "until": q.get("until", "")[:10] if until is not None else "",
        }
        page = self.service.message_page(
            message_type=filters["type"] or None,
            control_id=filters["control_id"] or None,
            status=status,
            since=since,
            until=None if until is None else until + 86400,
            before=_int(q.get("before"), 1, 2**53),
            after=_int(q.get("after"), 1, 2**53),
            limit=LIST_PAGE,
        )
        return self._render(
            request, me, "messages.html", items=page["items"], page=page, filters=filters,
            statuses=MESSAGE_STATUSES, link=_query_link(request.path, filters),
        )  # fmt: skip

    async def _message(self, request: web.Request, me: Principal) -> web.StreamResponse:
        """Metadata, the ACK, the decision and what it produced; with ``raw=1`` the text
        and its parsed tree side by side (audited as a raw view)."""
        mid = _path_id(request, "message_id")
        meta = self.service.message_detail(mid)
        tree = None
        if request.query.get("raw") == "1" and meta.get("pruned_at") is None:
            tree = self.service.message_tree(me, mid, via="dashboard")
            tree["text"] = tree["text"].replace("\r\n", "\n").replace("\r", "\n")
        return self._render(
            request, me, "message.html", m=meta, tree=tree, notice=request.query.get("done", "")
        )

    async def _reprocess(self, request: web.Request, me: Principal) -> web.StreamResponse:
        mid = _path_id(request, "message_id")
        resend = self._form(request).get("resend") == "1"
        item = self.service.reprocess(me, mid, resend=resend)
        done = "reprocessed" if item["applied"] else "unchanged"
        return _redirect(f"{PREFIX}/messages/{mid}?done={done}")

    async def _message_retry(self, request: web.Request, me: Principal) -> web.StreamResponse:
        mid = _path_id(request, "message_id")
        self.service.message_retry(me, mid, _path_id(request, "outbox_id"))
        return _redirect(f"{PREFIX}/messages/{mid}?done=retried")

    # -- chart --

    async def _chart(self, request: web.Request, me: Principal) -> web.StreamResponse:
        months, aging = self.chart_data()
        closure = bar_chart([(m, rate, f"{round(rate)}%") for m, rate, _n in months], top=100.0)
        ages = bar_chart([(label, float(n), str(n)) for label, n in aging])
        return self._render(
            request, me, "chart.html", closure=closure, ages=ages, months=months, aging=aging,
            open_total=sum(n for _label, n in aging),
        )  # fmt: skip

    def chart_data(self) -> tuple[list[tuple[str, float, int]], list[tuple[str, int]]]:
        """(closure rate % and denominator by month for the last 12 months, from the
        closure report (engine.tracking.report); every open referral by age bucket,
        whatever its opening date, as the worklist counts them)."""
        today = dt.datetime.fromtimestamp(self.service.clock.now(), dt.UTC).date()
        start = (today.replace(day=1) - dt.timedelta(days=335)).replace(day=1)
        data = self.service.report(start, today, "month")
        return _months(data), self.service.open_aging()

    # -- users --

    async def _users(self, request: web.Request, me: Principal) -> web.StreamResponse:
        return self._render(request, me, "users.html", users=self.auth.users(), error="")

    async def _add_user(self, request: web.Request, me: Principal) -> web.StreamResponse:
        form = self._form(request)
        try:
            self.auth.add_user(
                str(form.get("name", "")), str(form.get("role", "")),
                str(form.get("password", "")),
            )  # fmt: skip
        except AuthError as exc:
            return self._render(
                request, me, "users.html", status=400, users=self.auth.users(), error=str(exc)
            )
        return _redirect(f"{PREFIX}/users")

    async def _disable_user(self, request: web.Request, me: Principal) -> web.StreamResponse:
        try:
            self.auth.set_disabled(request.match_info["name"], True)
        except AuthError as exc:
            raise ApiError(404, str(exc)) from None
        return _redirect(f"{PREFIX}/users")


# ---------------------------------------------------------------------------
# Helpers


def _redirect(location: str, status: int = 303) -> web.Response:
    return _secure(web.Response(status=status, headers={"Location": location}))


def _safe_next(request: web.Request, given: str | None = None) -> str:
    """Only a local /ui/ path (no open redirects)."""
    target = given if given is not None else request.query.get("next", "")
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith(f"{PREFIX}/") or "\\" in target:
        return f"{PREFIX}/"
    return target


def _int(raw: str | None, lo: int, hi: int) -> int | None:
    if raw is None or raw.strip() == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, "not a whole number") from None
    if not lo <= value <= hi:
        raise ApiError(400, "number out of range")
    return value


def _path_id(request: web.Request, name: str) -> int:
    value = _int(request.match_info.get(name), 1, 2**53)
    if value is None:
        raise ApiError(404, "not found")
    return value


def _day(raw: str | None) -> float | None:
    if not raw:
        return None
    try:
        return parse_iso(raw[:10])
    except ValueError:
        raise ApiError(400, "dates are YYYY-MM-DD") from None


def _when(value: Any) -> str:
    """ISO or epoch to ``YYYY-MM-DD HH:MM`` (UTC)."""
    if value is None or value == "":
        return "-"
    if isinstance(value, int | float):
        value = isoformat(float(value))
    return str(value)[:16].replace("T", " ")


def _worklist_heading(filters: Mapping[str, str]) -> str:
    """The worklist's heading, from its filters ("Overdue referrals in cardiology")."""
    if filters["status"]:
        text = f"Referrals with status {filters['status']}"
    else:
        text = {"open": "Open referrals", "overdue": "Overdue referrals"}.get(
            filters["show"], "All referrals"
        )
    if filters["specialty"]:
        text += f" in {filters['specialty']}"
    if filters["specialist"]:
        text += f" to {filters['specialist']}"
    if filters["referring"]:
        text += f" from {filters['referring']}"
    if filters["days_open_min"]:
        text += f" open {filters['days_open_min']}+ days"
    if filters["q"]:
        text += " matching the search"
    return text


def _query_link(
    path: str, filters: Mapping[str, str], keep_empty: tuple[str, ...] = ()
) -> Callable[..., str]:
    """``link(**changes)``: this page's URL with its filters and ``changes`` (None drops
    a parameter); empty values are left out, but for ``keep_empty``."""

    def link(**changes: Any) -> str:
        params = {**filters, **changes}
        kept = {
            k: str(v) for k, v in params.items() if v is not None and (v != "" or k in keep_empty)
        }
        return f"{path}?{urlencode(kept)}" if kept else path

    return link


def _timeline(item: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Events (messages in, nudges, MDNs, escalations, operator actions) and outbound
    rows in one list, by time."""
    rows: list[dict[str, Any]] = []
    for e in item["timeline"]:
        if e["message_id"]:
            direction = "in"
        elif e["source"] in ("operator", "link") or str(e["actor"]).startswith(
            ("user:", "operator:")
        ):
            direction = "action"
        else:
            direction = "event"
        rows.append(
            {
                "at": e["recorded_at"],
                "direction": direction,
                "what": e["kind"],
                "who": e["actor"] if not e["message_id"] else f"message {e['message_id']}",
                "status": e["status"],
                "effects": ", ".join(e["effects"]),
                "detail": ", ".join(f"{k}={v}" for k, v in sorted(e["detail"].items())),
                "changed": e["changed"],
            }
        )
    for t in item.get("tasks", ()):
        rows.append(
            {
                "at": t["created_at"],
                "direction": "task",
                "what": f"task {t['template']}",
                "who": t["assignee"] or "-",
                "status": t["status"],
                "effects": "",
                "detail": f"task {t['id']}, due {_when(t['due'])}",
                "changed": True,
            }
        )
    rows.sort(key=lambda r: str(r["at"]))  # ISO-8601 UTC: text order is time order
    for o in item["outbox"]:
        rows.append(
            {
                "at": "",
                "direction": "out",
                "what": o["template"],
                "who": o["channel"],
                "status": o["status"],
                "effects": "",
                "detail": f"outbox {o['id']}",
                "changed": True,
            }
        )
    return rows


def _months(data: Mapping[str, Any]) -> list[tuple[str, float, int]]:
    """(month, closure rate %, denominator) from a ``by=month`` report dict
    (engine.tracking.report.report_to_dict): one per group; a month with no referrals has no
    group."""
    return [
        (str(g["key"]), (g["rate"] or 0.0) * 100.0, int(g["denominator"])) for g in data["groups"]
    ]
