"""A small FHIR R4 server for the tests, on 127.0.0.1 port 0 (aiohttp).

Real search semantics where refloop depends on them: ``_lastUpdated`` (gt/ge/lt/le on
instants), ``_count`` with ``link[next]`` paging over a snapshot taken at the first page,
``_sort=_lastUpdated``, and a few token parameters (``category``, ``status``, ``focus``,
``based-on``, ``identifier``). Versioned reads and writes: every create/update makes a
new ``meta.versionId`` and ``meta.lastUpdated`` from the server's own clock (whole seconds,
so same-timestamp updates happen); ``PUT`` honours ``If-Match``, ``POST`` honours
``If-None-Exist``; writes are validated with ``fhir.resources`` (400 + OperationOutcome).

Failure injection: :meth:`FhirServer.fail_next` queues answers (429 with Retry-After,
503, 500) for the next FHIR requests; :meth:`FhirServer.expire_tokens` makes every issued
token answer 401.

SMART token endpoint ``POST /token``: verifies the client assertion (signature with the
registered public key, ``aud`` = the token URL, ``iss`` = ``sub`` = client id, ``exp``
present and at most five minutes ahead, ``jti`` never seen before) with PyJWT, then issues
a bearer token valid ``token_lifetime`` seconds.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from fhir.resources.R4B import get_fhir_model_class

from engine.ingest.fhir import validate_resource

CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "corpus" / "fhir"
FHIR_JSON = "application/fhir+json"

# search parameter → element path (dotted, flattening lists) for the token searches
TOKEN_PARAMS: dict[str, str] = {
    "category": "category.coding.code",
    "status": "status",
    "focus": "focus.reference",
    "based-on": "basedOn.reference",
    "identifier": "identifier.value",
    "code": "code.coding.code",
}


def corpus_resources() -> list[dict[str, Any]]:
    """Every resource in shared/corpus/fhir (bundle entries flattened), except the
    HL7-to-FHIR converter outputs (whole message bundles)."""
    out: list[dict[str, Any]] = []
    for path in sorted(CORPUS.glob("*.json")):
        if path.name.startswith(("converter-", "v2-to-fhir")):
            continue
        data = json.loads(path.read_text(encoding="utf-8-sig"))
        if data.get("resourceType") == "Bundle":
            out.extend(
                e["resource"] for e in data.get("entry", []) if isinstance(e.get("resource"), dict)
            )
        else:
            out.append(data)
    return out


def _walk(node: Any, path: str) -> list[Any]:
    nodes = [node]
    for step in path.split("."):
        nxt: list[Any] = []
        for n in nodes:
            v = n.get(step) if isinstance(n, dict) else None
            if isinstance(v, list):
                nxt.extend(v)
            elif v is not None:
                nxt.append(v)
        nodes = nxt
    return nodes


def instant(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def outcome(code: str, text: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": text}],
    }


@dataclass
class Client:
    """A registered backend client: its public key (PEM) and algorithm."""

    client_id: str
    public_key: str
    alg: str


@dataclass
class FhirServer:
    """Start with ``await server.start()``; ``server.base`` is the FHIR base URL."""

    require_auth: bool = False
    static_token: str = ""
    token_lifetime: int = 300
    now: float = 1_767_225_600.0  # the server clock (2026-01-01T00:00:00Z); tests move it
    page_snapshots: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    resources: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)
    clients: dict[str, Client] = field(default_factory=dict)
    tokens: dict[str, float] = field(default_factory=dict)  # token → expiry (wall time)
    seen_jti: set[str] = field(default_factory=set)
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path_qs)
    bodies: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    token_requests: int = 0
    token_rejections: list[str] = field(default_factory=list)
    unsorted: bool = False  # ignore _sort (answer newest first), as some servers do
    after_read: Callable[[dict[str, Any]], None] | None = None  # e.g. a racing update
    _failures: list[tuple[int, dict[str, str], Any]] = field(default_factory=list)
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    port: int = 0

    def __post_init__(self) -> None:
        self.app = web.Application()
        self.app.router.add_post("/token", self._token)
        self.app.router.add_get("/fhir/{type}", self._search)
        self.app.router.add_get("/fhir/{type}/{id}", self._read)
        self.app.router.add_put("/fhir/{type}/{id}", self._update)
        self.app.router.add_post("/fhir/{type}", self._create)
        self._runner: web.AppRunner | None = None

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> FhirServer:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> FhirServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    @property
    def token_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    # -- test controls -------------------------------------------------------------------

    def tick(self, seconds: float = 1.0) -> None:
        self.now += seconds

    def put(self, resource: dict[str, Any], *, last_updated: float | None = None) -> dict[str, Any]:
        """Store a new version of ``resource`` (an id is assigned if it has none)."""
        res = json.loads(json.dumps(resource))
        rtype = res["resourceType"]
        res.setdefault("id", f"gen{next(self._ids)}")
        versions = self.resources.setdefault(rtype, {}).setdefault(res["id"], [])
        meta = dict(res.get("meta") or {})
        meta["versionId"] = str(len(versions) + 1)
        meta["lastUpdated"] = iso(self.now if last_updated is None else last_updated)
        res["meta"] = meta
        versions.append(res)
        return res

    def current(self) -> Iterator[dict[str, Any]]:
        for by_id in self.resources.values():
            for versions in by_id.values():
                yield versions[-1]

    def fail_next(self, status: int, *, retry_after: str = "", body: Any = None) -> None:
        headers = {"Retry-After": retry_after} if retry_after else {}
        self._failures.append((status, headers, body))

    def register_client(self, client_id: str, public_key: str, alg: str) -> None:
        self.clients[client_id] = Client(client_id, public_key, alg)

    def expire_tokens(self) -> None:
        for t in self.tokens:
            self.tokens[t] = 0.0

    # -- the token endpoint ----------------------------------------------------------------

    async def _token(self, request: web.Request) -> web.Response:
        self.token_requests += 1
        form = await request.post()

        def refuse(why: str) -> web.Response:
            self.token_rejections.append(why)
            return web.json_response({"error": "invalid_client", "why": why}, status=401)

        if form.get("grant_type") != "client_credentials":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        if form.get("client_assertion_type") != (
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
        ):
            return refuse("assertion type")
        assertion = str(form.get("client_assertion", ""))
        try:
            unverified = jwt.decode(assertion, options={"verify_signature": False})
            client = self.clients[str(unverified.get("iss"))]
            claims = jwt.decode(
                assertion,
                client.public_key,
                algorithms=[client.alg],
                audience=self.token_url,
                issuer=client.client_id,
                options={"require": ["exp", "jti", "iss", "sub", "aud"]},
            )
        except KeyError:
            return refuse("unknown client")
        except jwt.PyJWTError as exc:
            return refuse(type(exc).__name__)
        if claims["sub"] != client.client_id:
            return refuse("sub")
        if claims["exp"] > time.time() + 300 + 5:
            return refuse("exp too far")
        if claims["jti"] in self.seen_jti:
            return refuse("jti replay")
        self.seen_jti.add(claims["jti"])
        token = uuid.uuid4().hex
        self.tokens[token] = time.time() + self.token_lifetime
        return web.json_response(
            {
                "access_token": token,
                "token_type": "bearer",
                "expires_in": self.token_lifetime,
                "scope": str(form.get("scope", "")),
            }
        )

    # -- FHIR --------------------------------------------------------------------------

    def _gate(self, request: web.Request) -> web.Response | None:
        self.requests.append((request.method, request.path_qs))
        if self.require_auth:
            header = request.headers.get("Authorization", "")
            token = header.removeprefix("Bearer ")
            ok = (self.static_token and token == self.static_token) or (
                self.tokens.get(token, 0.0) > time.time()
            )
            if not header.startswith("Bearer ") or not ok:
                return web.json_response(outcome("login", "expired or unknown token"), status=401)
        if self._failures:
            status, headers, body = self._failures.pop(0)
            return web.json_response(
                body if body is not None else outcome("transient", "try later"),
                status=status,
                headers=headers,
                content_type=FHIR_JSON,
            )
        return None

    def _json(self, body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Any:
        return web.json_response(body, status=status, headers=headers, content_type=FHIR_JSON)

    async def _search(self, request: web.Request) -> web.Response:
        refused = self._gate(request)
        if refused is not None:
            return refused
        rtype = request.match_info["type"]
        q = request.query
        if "_page" in q:
            snapshot = self.page_snapshots.get(q["_page"])
            if snapshot is None:
                return self._json(outcome("not-found", "page expired"), 410)
            offset, count = int(q["_offset"]), int(q["_count"])
            return self._json(self._bundle(rtype, snapshot, q["_page"], offset, count))
        matches = list(self._matching(rtype, q))
        if q.get("_sort") == "_lastUpdated" and not self.unsorted:
            matches.sort(key=lambda r: (instant(r["meta"]["lastUpdated"]), r["id"]))
        else:
            matches.sort(key=lambda r: (instant(r["meta"]["lastUpdated"]), r["id"]), reverse=True)
        page = uuid.uuid4().hex
        self.page_snapshots[page] = matches
        return self._json(self._bundle(rtype, matches, page, 0, int(q.get("_count", "50"))))

    def _matching(self, rtype: str, q: Any) -> Iterator[dict[str, Any]]:
        for versions in self.resources.get(rtype, {}).values():
            res = versions[-1]
            ok = True
            for value in q.getall("_lastUpdated", []):
                prefix, when = value[:2], instant(value[2:])
                lu = instant(res["meta"]["lastUpdated"])
                ok = ok and {
                    "gt": lu > when,
                    "ge": lu >= when,
                    "lt": lu < when,
                    "le": lu <= when,
                }.get(prefix, False)
            for name, path in TOKEN_PARAMS.items():
                if name in q:
                    wanted = {v.split("|")[-1] for v in q[name].split(",")}
                    ok = ok and any(str(v) in wanted for v in _walk(res, path))
            if ok:
                yield res

    def _bundle(
        self, rtype: str, items: list[dict[str, Any]], page: str, offset: int, count: int
    ) -> dict[str, Any]:
        chunk = items[offset : offset + count]
        links = [{"relation": "self", "url": f"{self.base}/{rtype}?_page={page}&_offset={offset}"}]
        if offset + count < len(items):
            links.append(
                {
                    "relation": "next",
                    "url": f"{self.base}/{rtype}?_page={page}&_offset={offset + count}"
                    f"&_count={count}",
                }
            )
        return {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(items),
            "link": links,
            "entry": [
                {
                    "fullUrl": f"{self.base}/{r['resourceType']}/{r['id']}",
                    "resource": r,
                    "search": {"mode": "match"},
                }
                for r in chunk
            ],
        }

    async def _read(self, request: web.Request) -> web.Response:
        refused = self._gate(request)
        if refused is not None:
            return refused
        versions = self.resources.get(request.match_info["type"], {}).get(request.match_info["id"])
        if not versions:
            return self._json(outcome("not-found", "no such resource"), 404)
        res = versions[-1]
        if self.after_read is not None:
            self.after_read(res)
        return self._json(res, headers={"ETag": f'W/"{res["meta"]["versionId"]}"'})

    async def _write_body(self, request: web.Request) -> dict[str, Any] | web.Response:
        try:
            body = json.loads(await request.read())
        except ValueError:
            return self._json(outcome("structure", "not JSON"), 400)
        if body.get("resourceType") != request.match_info["type"]:
            return self._json(outcome("invalid", "resourceType does not match the URL"), 400)
        reason = validate_resource(body)
        try:  # and the model library itself, independently of refloop's helper
            get_fhir_model_class(body["resourceType"]).model_validate(body)
        except Exception as exc:
            reason = reason or f"model: {type(exc).__name__}"
        if reason:
            return self._json(outcome("invalid", reason), 400)
        self.bodies.append((request.method, request.path, body))
        return body

    async def _update(self, request: web.Request) -> web.Response:
        refused = self._gate(request)
        if refused is not None:
            return refused
        body = await self._write_body(request)
        if isinstance(body, web.Response):
            return body
        rtype, rid = request.match_info["type"], request.match_info["id"]
        versions = self.resources.get(rtype, {}).get(rid)
        match = request.headers.get("If-Match")
        if versions and match and match != f'W/"{versions[-1]["meta"]["versionId"]}"':
            return self._json(outcome("conflict", "version conflict"), 412)
        body["id"] = rid
        stored = self.put(body)
        return self._json(stored, 200 if versions and len(versions) > 1 else 201)

    async def _create(self, request: web.Request) -> web.Response:
        refused = self._gate(request)
        if refused is not None:
            return refused
        body = await self._write_body(request)
        if isinstance(body, web.Response):
            return body
        rtype = request.match_info["type"]
        cond = request.headers.get("If-None-Exist", "")
        if cond.startswith("identifier="):
            system, _, value = cond.removeprefix("identifier=").rpartition("|")
            for res in self.resources.get(rtype, {}).values():
                for ident in res[-1].get("identifier") or []:
                    if ident.get("value") == value and ident.get("system", "") == system:
                        return self._json(res[-1], 200)
        body.pop("id", None)
        stored = self.put(body)
        return self._json(stored, 201, {"Location": f"{self.base}/{rtype}/{stored['id']}"})


def make_service_request(n: int, **extra: Any) -> dict[str, Any]:
    """A referral ServiceRequest with placer number REF-<n>."""
    return {
        "resourceType": "ServiceRequest",
        "id": f"sr{n}",
        "status": "active",
        "intent": "order",
        "category": [{"coding": [{"system": "http://snomed.info/sct", "code": "3457005"}]}],
        "identifier": [
            {
                "type": {
                    "coding": [
                        {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "PLAC"}
                    ]
                },
                "system": "urn:oid:2.16.840.1.113883.19.5",
                "value": f"REF-{n}",
            }
        ],
        "subject": {"reference": f"Patient/p{n}"},
        **extra,
    }


Factory = Callable[[int], dict[str, Any]]
