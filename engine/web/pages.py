"""What every dashboard page class shares (engine.web.dashboard and its mix-in
engine.web.workbench): a template rendered with the session's context and the security
headers, and the POSTed form the guard checked the CSRF token of."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, TypeVar

import jinja2
from aiohttp import web

from engine.web.auth import ROLES, Principal
from engine.web.service import Service

HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
FORM: Final = web.RequestKey("form", Mapping[str, Any])  # the POSTed form, CSRF-checked

R = TypeVar("R", bound=web.StreamResponse)


def secure(response: R) -> R:
    """``response`` with the dashboard's security headers."""
    for key, value in HEADERS.items():
        response.headers.setdefault(key, value)
    return response


class Pages:
    """The base of the dashboard's page classes."""

    service: Service
    env: jinja2.Environment

    def _render(
        self,
        request: web.Request,
        principal: Principal | None,
        template: str,
        *,
        status: int = 200,
        **context: Any,
    ) -> web.Response:
        body = self.env.get_template(template).render(
            me=principal,
            csrf=principal.csrf if principal is not None and principal.session else "",
            path=request.path,
            roles=ROLES,
            **context,
        )
        return secure(web.Response(text=body, status=status, content_type="text/html"))

    def _form(self, request: web.Request) -> Mapping[str, Any]:
        return request[FORM]
