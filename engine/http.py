"""The HTTP server in the daemon's own event loop: health, readiness, metrics, and
``POST /admin/reload`` (loopback only) for routes.yaml.

Webhooks under ``/hooks/`` (engine.hooks) and the JSON API under ``/api/`` register their
routes on :attr:`HttpServer.app` before :meth:`start`. Authentication by prefix:
``/hooks/`` handlers verify the provider's signature themselves (403 otherwise);
everything under ``/api/`` needs ``Authorization: Bearer <token>``: ``http.admin_token``
(an admin) or a user's API token (``authenticate``, engine.auth); a middleware here puts
the caller in ``request["principal"]``. The dashboard (``/ui/``, engine.dashboard) checks
its own session cookies. The server binds to
``http.host`` (loopback by default); put it behind a TLS reverse proxy to expose the
webhooks (docs/delivery.md, "Webhooks").
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from engine.auth import Principal
from engine.config import HttpConfig
from engine.metrics import Metrics

log = logging.getLogger(__name__)

LOOPBACK: Final = frozenset({"127.0.0.1", "::1", "::ffff:127.0.0.1"})
# Who an authenticated /api/ request is from (set by the middleware below).
PRINCIPAL: Final = web.RequestKey("principal", Principal)


class HttpServer:
    def __init__(
        self,
        cfg: HttpConfig,
        metrics: Metrics,
        ready: Callable[[], bool],
        *,
        reload: Callable[[], list[str]] | None = None,
        authenticate: Callable[[str], Principal | None] | None = None,
    ):
        self.cfg = cfg
        self.metrics = metrics
        self.ready = ready
        self.reload = reload
        self.authenticate = authenticate
        self.app = web.Application(client_max_size=1024 * 1024, middlewares=[self._api_auth])
        self.app.router.add_get("/healthz", self._healthz)
        self.app.router.add_get("/readyz", self._readyz)
        self.app.router.add_get("/metrics", self._metrics)
        self.app.router.add_post("/admin/reload", self._admin_reload)
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.port = cfg.port

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self.cfg.host, self.cfg.port, reuse_address=True)
        await self._site.start()
        for address in self._runner.addresses:
            self.port = int(address[1])
        log.info("http: listening on %s:%d", self.cfg.host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _api_auth(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        """``/api/`` needs a bearer token: ``http.admin_token`` or a user's API token."""
        if request.path.startswith("/api/"):
            principal = self._bearer(request.headers.get("Authorization", ""))
            if principal is None:
                log.warning(
                    "%s: %s %s refused (bearer token)", request.remote, request.method, request.path
                )
                return web.json_response(
                    {"status": "unauthorized", "error": "unauthorized"},
                    status=401,
                    headers={"WWW-Authenticate": 'Bearer realm="refloop"'},
                )
            request[PRINCIPAL] = principal
        return await handler(request)

    def _bearer(self, header: str) -> Principal | None:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        admin = self.cfg.admin_token
        if admin and hmac.compare_digest(token.encode(), admin.encode()):
            return Principal("admin-token", "admin", "config")
        if self.authenticate is not None:
            return self.authenticate(token)
        return None

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        if self.ready():
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "starting"}, status=503)

    def _admin_allowed(self, request: web.Request) -> bool:
        """Admin endpoints answer loopback peers only, and when ``http.admin_token`` is
        set, only with that bearer token as well."""
        if (request.remote or "") not in LOOPBACK:
            return False
        if self.cfg.admin_token:
            expected = f"Bearer {self.cfg.admin_token}"
            return hmac.compare_digest(request.headers.get("Authorization", ""), expected)
        return True

    async def _admin_reload(self, request: web.Request) -> web.Response:
        if not self._admin_allowed(request):
            log.warning("%s: POST /admin/reload refused", request.remote)
            return web.json_response({"status": "forbidden"}, status=403)
        if self.reload is None:
            return web.json_response({"status": "unavailable"}, status=503)
        problems = self.reload()
        if problems:
            return web.json_response({"status": "invalid", "problems": problems}, status=422)
        return web.json_response({"status": "reloaded"})

    async def _metrics(self, request: web.Request) -> web.Response:
        body = await self.metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
