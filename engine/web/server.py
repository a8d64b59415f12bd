"""The HTTP server in the daemon's own event loop: health, readiness, metrics, and
``POST /admin/reload`` (loopback only) for routes.yaml.

Webhooks under ``/hooks/`` (engine.delivery.webhooks) and the JSON API under ``/api/``
register their routes on :attr:`HttpServer.app` before :meth:`start`. Authentication by prefix:
``/hooks/`` handlers verify the provider's signature themselves (403 otherwise);
everything under ``/api/`` needs ``Authorization: Bearer <token>``: ``http.admin_token``
(an admin) or a user's API token (``authenticate``, engine.web.auth); a middleware here puts
the caller in ``request["principal"]``. The dashboard (``/ui/``, engine.web.dashboard) checks
its own session cookies. The server binds to
``http.host`` (loopback by default); put it behind a TLS reverse proxy to expose the
webhooks (docs/delivery.md, "Webhooks").

Against DNS rebinding and cross-site requests (docs/operations.md, "HTTP: allowed hosts
and same-origin"), every request but ``/healthz`` and ``/readyz`` must name an allowed
host in its ``Host`` header (:func:`allowed_hosts`; 421 otherwise, 400 without one), and a
state-changing request (not GET/HEAD/OPTIONS) outside ``/hooks/`` that a browser marks
as cross-origin is refused with 403 before its handler runs: ``Sec-Fetch-Site`` other
than same-origin/none or, from a browser that sends no fetch metadata, an ``Origin`` that
is neither the request's own nor ``public_url``'s. Browsers send these on every
cross-site POST; a script or ``curl`` sends neither. Every response carries
``X-Content-Type-Options: nosniff``; those under ``/api/``, ``/metrics`` and
``/confirm/`` also ``Cache-Control: no-store``.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Final
from urllib.parse import urlsplit

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from engine.config import HttpConfig
from engine.metrics import Metrics
from engine.web.auth import Principal

log = logging.getLogger(__name__)

LOOPBACK: Final = frozenset({"127.0.0.1", "::1", "::ffff:127.0.0.1"})
# Who an authenticated /api/ request is from (set by the middleware below).
PRINCIPAL: Final = web.RequestKey("principal", Principal)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Probes (a load balancer, kubelet) call these by address; they reveal nothing.
ANY_HOST_PATHS: Final = frozenset({"/healthz", "/readyz"})
SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
# Sec-Fetch-Site values of a request the user made on our own pages (or typed):
# https://www.w3.org/TR/fetch-metadata/#sec-fetch-site-header
SAME_ORIGIN_FETCH: Final = frozenset({"same-origin", "none"})
NO_STORE_PREFIXES: Final = ("/api/", "/metrics", "/confirm/")
LOOPBACK_NAMES: Final = frozenset({"localhost", "127.0.0.1", "::1"})


def allowed_hosts(cfg: HttpConfig) -> frozenset[str]:
    """The host names a request's ``Host`` header may carry: ``localhost``,
    ``127.0.0.1``, ``::1`` and the host of ``http.public_url`` always (no rebound DNS name
    is spelled like these), plus ``http.allowed_hosts`` when set, else the bind address.
    (A wildcard bind address such as ``0.0.0.0`` is no name a client uses: set
    ``allowed_hosts`` to the names and addresses clients reach the daemon by.)"""
    hosts = set(LOOPBACK_NAMES)
    hosts.update(h.strip("[]") for h in cfg.allowed_hosts or (cfg.host.lower(),))
    public = urlsplit(cfg.public_url).hostname if cfg.public_url else None
    if public:
        hosts.add(public)
    return frozenset(hosts)


def _hostname(netloc: str) -> str | None:
    """``example.org:8575`` → ``example.org``; ``[::1]:80`` → ``::1``; None if unreadable."""
    try:
        return urlsplit(f"//{netloc}").hostname
    except ValueError:
        return None


def _origin(url: str) -> str:
    """scheme://host[:port] of a URL, lower case (an ``Origin`` header's form)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


class HttpServer:
    def __init__(
        self,
        cfg: HttpConfig,
        metrics: Metrics,
        ready: Callable[[], bool],
        *,
        reload: Callable[[], list[str]] | None = None,
        authenticate: Callable[[str], Principal | None] | None = None,
        not_ready: Callable[[], str] | None = None,
        ready_details: Callable[[], dict[str, str]] | None = None,
    ):
        self.cfg = cfg
        self.metrics = metrics
        self.ready = ready
        self.not_ready = not_ready  # why /readyz says 503 ("starting" when not given)
        self.ready_details = ready_details  # more of /readyz's answer (the worker's state)
        self.reload = reload
        self.authenticate = authenticate
        self.hosts = allowed_hosts(cfg)
        self.app = web.Application(
            client_max_size=1024 * 1024,
            middlewares=[self._host_check, self._same_origin, self._api_auth],
        )
        self.app.on_response_prepare.append(_security_headers)
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
    async def _host_check(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """A ``Host`` that is not ours is a rebound DNS name (or a misrouted request):
        421 Misdirected Request (RFC 9110 §15.5.20); no ``Host`` at all is 400."""
        if request.path in ANY_HOST_PATHS:
            return await handler(request)
        header = request.headers.get("Host", "")
        if not header:
            return web.json_response({"status": "bad-request", "error": "no Host"}, status=400)
        if _hostname(header) not in self.hosts:
            log.warning("%s: %s %s refused (Host not allowed)", request.remote,
                        request.method, request.path)  # fmt: skip
            return web.json_response(
                {"status": "misdirected", "error": "host not allowed"}, status=421
            )
        return await handler(request)

    @web.middleware
    async def _same_origin(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """State-changing requests from another site's page are refused (CSRF); provider
        webhooks under ``/hooks/`` are server-to-server and prove themselves by signature."""
        if (
            request.method in SAFE_METHODS
            or request.path.startswith("/hooks/")
            or self._same_origin_ok(request)
        ):
            return await handler(request)
        log.warning("%s: %s %s refused (cross-origin)", request.remote, request.method,
                    request.path)  # fmt: skip
        return web.json_response({"status": "forbidden", "error": "cross-origin"}, status=403)

    def _same_origin_ok(self, request: web.Request) -> bool:
        site = request.headers.get("Sec-Fetch-Site")
        if site is not None:  # the browser's own verdict; under the dashboard's
            # Referrer-Policy: no-referrer its Origin is "null" even on our own forms
            return site.lower() in SAME_ORIGIN_FETCH
        origin = request.headers.get("Origin")
        if origin is None:
            return True  # not a browser's cross-site request (browsers send Origin on POST)
        # our own origin: the Host the browser addressed (its scheme may differ behind a
        # TLS proxy, which is no other site), or public_url's
        netloc = urlsplit(origin.lower()).netloc
        if netloc and netloc == request.headers.get("Host", "").lower():
            return True
        return bool(self.cfg.public_url) and origin.lower() == _origin(self.cfg.public_url)

    @web.middleware
    async def _api_auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
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
        details = self.ready_details() if self.ready_details is not None else {}
        if self.ready():
            return web.json_response({"status": "ready", **details})
        reason = self.not_ready() if self.not_ready is not None else ""
        return web.json_response({"status": reason or "starting", **details}, status=503)

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


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``nosniff`` everywhere (a raw HL7 message served as text must never be sniffed
    into HTML); ``no-store`` where a response carries PHI, metrics or a one-time link."""
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    if request.path.startswith(NO_STORE_PREFIXES):
        response.headers["Cache-Control"] = "no-store"
