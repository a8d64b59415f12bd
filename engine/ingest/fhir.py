"""FHIR as a source: search polling, Subscription notifications, and write-back.

Every resource version fetched becomes one inbox row like an HL7 message: ``source``, the
resource's JSON (compact, keys in the server's order), ``sending_app`` = the source name,
``message_type`` = the resource type and ``control_id`` =
``<type>/<id>/_history/<versionId or lastUpdated>``. A version is immutable, so the inbox
stores each control id once; the processor then routes it through the FHIR routes of
routes.yaml (engine.routing.decide.decide_fhir) into the same normalised events as HL7 v2.

**Polling** (:class:`FhirPoller`): per configured resource type,
``GET [base]/<type>?<params>&_lastUpdated=gt<cursor - overlap>&_count=<n>&_sort=_lastUpdated``,
following ``link[next]``. Each page's rows are committed in one transaction; the cursor
(the highest ``meta.lastUpdated`` seen) is committed with the *last* page's rows, so a
crash or an error mid-search repeats the search (dedupe absorbs it) and never skips a page,
whether or not the server honours ``_sort``. The overlap window re-reads the recent past
so that updates sharing the cursor's timestamp, or committed late by the server, are seen.
429 / 503 / 5xx / transport errors are retried with ``Retry-After`` or exponential backoff
(the sleep is injected); other errors raise :class:`FhirSourceError` quoting the
OperationOutcome.

**Subscriptions** (:class:`SubscriptionHooks`): ``POST /hooks/fhir/<source>`` takes R4
Subscriptions-backport rest-hook notifications (a ``history`` Bundle whose first entry is
a ``Parameters`` status). The configured secret must arrive in the configured header.
``events-since-subscription-start`` and the event numbers detect missed notifications; a
gap (or an id-only payload) asks the poller for a catch-up search.

**Validation**: each resource is parsed with ``fhir.resources`` (R4B models, which accept
R4 content for the resources used here) plus the top-level required elements and code
value sets the models describe but do not enforce. A malformed resource is stored as a
``rejected`` row with the reason, never routed, and never stops the poller.

**Write-back** (:func:`write_back_task`): when a loop closes, update (or create) the
referral's ``Task`` to ``completed`` with an output referencing the report, and optionally
post a ``Communication`` to the referring provider.

Nothing here logs a resource's content, a token or a search parameter value.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import httpx
import pydantic
from aiohttp import web
from fhir.resources.R4B import get_fhir_model_class

from engine.clock import Clock, WallClock
from engine.config import FhirQuery, FhirSource
from engine.errors import ChannelError, EngineError
from engine.ingest.smart_auth import Auth, AuthError, send
from engine.metrics import Metrics
from engine.model import Inbound, LoopClosure, OutboundMessage, SendReceipt
from engine.routing.fhirpath import instant, reference_key
from engine.store import Database, Inbox
from engine.store.inbox import AddResult

log = logging.getLogger(__name__)

FHIR_JSON: Final = "application/fhir+json"
BACKOFF_BASE: Final = 1.0  # seconds; doubled per attempt
BACKOFF_MAX: Final = 60.0
RETRY_AFTER_MAX: Final = 600.0  # a longer Retry-After is capped (and logged)
RETRYABLE: Final = frozenset({408, 425, 429, 500, 502, 503, 504})
# R4 Subscriptions Backport IG: notification types on Parameters.parameter "type".
NOTIFICATION_TYPES: Final = (
    "handshake",
    "heartbeat",
    "event-notification",
    "query-status",
    "query-event",
)
# LOINC 11488-4 "Consult note": the Task output type for the specialist's report.
CONSULT_NOTE: Final = {"system": "http://loinc.org", "code": "11488-4", "display": "Consult note"}
REFERRAL_ID_SYSTEM: Final = "urn:refloop:referral"

Sleep = Callable[[float], Awaitable[None]]


class FhirSourceError(EngineError):
    """A FHIR request failed for good (after retries, or a 4xx). Safe to log.
    ``status`` is the HTTP status (0: no answer)."""

    def __init__(self, reason: str, *, status: int = 0, retry_after: float | None = None):
        super().__init__(reason)
        self.status = status
        self.retry_after = retry_after


# ---------------------------------------------------------------------------
# Resources → inbox rows


def validate_resource(data: Mapping[str, Any]) -> str:
    """Why ``data`` is not a valid R4 resource, or ``""``. The reason names elements and
    error kinds, never values."""
    rtype = data.get("resourceType")
    if not isinstance(rtype, str) or not rtype:
        return "not a FHIR resource (no resourceType)"
    try:
        model = get_fhir_model_class(rtype)
    except (ValueError, KeyError):
        return f"unknown resource type {rtype[:64]!r}"
    problems: list[str] = []
    try:
        model.model_validate(data)
    except pydantic.ValidationError as exc:
        for err in exc.errors(include_input=False, include_url=False)[:5]:
            loc = ".".join(str(p) for p in err["loc"]) or "(resource)"
            problems.append(f"{loc}: {err['type']}")
    except (ValueError, TypeError) as exc:
        problems.append(type(exc).__name__)
    # The models carry R4's required flags and code value sets without enforcing them.
    for name, field in model.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        key = field.alias or name
        value = data.get(key)
        if extra.get("element_required") and value in (None, "", []):
            problems.append(f"{key}: missing")
        enum = extra.get("enum_values")
        # an enum ending in "+" is an abbreviated list (the title's "a | b | +"): skip it
        if (
            isinstance(value, str)
            and isinstance(enum, list)
            and enum
            and "+" not in enum
            and value not in enum
        ):
            problems.append(f"{key}: not in the value set")
    if problems:
        return f"invalid {rtype}: " + "; ".join(problems[:5])
    return ""


def control_id_of(data: Mapping[str, Any], raw: bytes) -> str:
    """``<type>/<id>/_history/<versionId or lastUpdated>``; a resource without an id or
    version uses a digest of its bytes instead."""
    digest = hashlib.sha256(raw).hexdigest()[:16]
    rtype = data.get("resourceType") if isinstance(data.get("resourceType"), str) else ""
    meta = _obj(data.get("meta"))
    rid = str(data.get("id") or "") or f"sha256-{digest}"
    version = str(meta.get("versionId") or meta.get("lastUpdated") or "") or f"sha256-{digest}"
    return f"{rtype or 'Unknown'}/{rid}/_history/{version}"


def resource_inbound(
    source: str, data: Mapping[str, Any], *, received_at: float, peer: str
) -> Inbound:
    """The inbox row for one resource, validated (a malformed one carries its reason and
    is stored as ``rejected``)."""
    raw = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    rtype = data.get("resourceType")
    reason = validate_resource(data)
    return Inbound(
        source=source,
        peer=peer,
        raw=raw,
        received_at=received_at,
        msh=None,
        text_encoding="utf-8",
        reject=("AR", "", "", reason) if reason else None,
        sender=source,
        control_id=control_id_of(data, raw),
        message_type=rtype if isinstance(rtype, str) else "",
    )


def outcome_summary(body: Any) -> str:
    """An OperationOutcome as one line: ``severity code: diagnostics`` per issue."""
    if not isinstance(body, dict) or body.get("resourceType") != "OperationOutcome":
        return ""
    parts = []
    for issue in body.get("issue") or []:
        if not isinstance(issue, dict):
            continue
        details = _obj(issue.get("details"))
        text = str(issue.get("diagnostics") or details.get("text") or "")[:200]
        parts.append(f"{issue.get('severity', '?')} {issue.get('code', '?')}: {text}".strip())
    return "; ".join(parts[:3]) or "OperationOutcome without issues"


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def retry_after(response: httpx.Response, now: float) -> float | None:
    """Seconds to wait per ``Retry-After`` (RFC 9110 §10.2.3: delay-seconds or an
    HTTP-date), or None."""
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


# ---------------------------------------------------------------------------
# The poller


def cursor_key(source: str, resource_type: str) -> str:
    return f"fhir:{source}:{resource_type}:cursor"


class FhirPoller:
    """Searches one FHIR source's resources into the inbox. One task per source."""

    def __init__(
        self,
        source: FhirSource,
        db: Database,
        inbox: Inbox,
        *,
        client: httpx.AsyncClient,
        auth: Auth,
        clock: Clock | None = None,
        notify: Callable[[], None] = lambda: None,
        sleep: Sleep = asyncio.sleep,
        metrics: Metrics | None = None,
    ):
        self.source = source
        self.db = db
        self.inbox = inbox
        self.client = client
        self.auth = auth
        self.clock = clock or WallClock()
        self.notify = notify
        self.sleep = sleep
        self.metrics = metrics
        if metrics is not None:  # a sample (0) from the first scrape: alerts can use increase()
            metrics.fhir_poll_failures.labels(source.name)
        self.polls = 0  # completed poll cycles
        self._wake = asyncio.Event()
        self._stopping = False
        self._requested: list[asyncio.Future[None]] = []

    # -- the cursor ---------------------------------------------------------------

    def cursor(self, resource_type: str) -> str:
        """The highest ``meta.lastUpdated`` stored for the type (``""`` before the first)."""
        return self.db.get_meta(cursor_key(self.source.name, resource_type), "")

    # -- running --------------------------------------------------------------------

    def request_poll(self) -> asyncio.Future[None]:
        """Ask for a poll soon (a subscription gap); the future resolves when a poll that
        started after this call has finished (successfully or not)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._requested.append(fut)
        self._wake.set()
        return fut

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        """Poll every ``poll_interval`` seconds (or only on request when it is 0) until
        :meth:`stop`. A failed cycle is logged and retried with backoff."""
        failures = 0
        while not self._stopping:
            self._wake.clear()
            waiting, self._requested = self._requested, []
            try:
                await self.poll_once()
                failures = 0
            except (FhirSourceError, AuthError) as exc:
                failures += 1
                self._failed()
                log.warning("%s: poll failed: %s", self.source.name, exc)
            except Exception:  # a bug must not end polling for good
                failures += 1
                self._failed()
                log.exception("%s: poll failed", self.source.name)
            self.polls += 1
            for fut in waiting:
                if not fut.done():
                    fut.set_result(None)
            interval = self.source.poll_interval
            if failures:
                backoff = min(BACKOFF_BASE * 2**failures, BACKOFF_MAX)
                interval = min(interval, backoff) if interval > 0 else backoff
            if self._stopping or self._requested:
                continue
            try:
                if interval > 0:
                    await asyncio.wait_for(self._wake.wait(), timeout=interval)
                else:
                    await self._wake.wait()
            except TimeoutError:
                pass
        for fut in self._requested:
            if not fut.done():
                fut.cancel()

    def _failed(self) -> None:
        """Count a failed poll cycle (``refloop_fhir_poll_failures_total``) and note when."""
        if self.metrics is not None:
            self.metrics.fhir_poll_failures.labels(self.source.name).inc()
            self.metrics.source_error_at.labels(self.source.name, "poll").set(self.clock.now())

    async def poll_once(self) -> int:
        """Search every configured resource type once; returns the new rows stored."""
        total = 0
        for query in self.source.resources:
            total += await self.poll_query(query)
        return total

    async def poll_query(self, query: FhirQuery) -> int:
        """One search through all its pages. Raises FhirSourceError / AuthError; rows of
        the pages before the failure stay stored, the cursor does not move."""
        key = cursor_key(self.source.name, query.type)
        old = self.cursor(query.type)
        newest = instant(old) if old else None
        first: list[tuple[str, str]] = [
            *query.params,
            ("_count", str(self.source.page_size)),
            ("_sort", "_lastUpdated"),
        ]
        if newest is not None:
            first.append(("_lastUpdated", f"gt{_iso(newest - self.source.overlap)}"))
        params: list[tuple[str, str]] | None = first
        url: str | None = f"{self.source.base_url}/{query.type}"
        new = 0
        pages = 0
        while url is not None:
            bundle = await self._get_bundle(url, params)
            pages += 1
            received_at = self.clock.now()
            inbounds: list[Inbound] = []
            for entry in bundle.get("entry") or []:
                resource = entry.get("resource") if isinstance(entry, dict) else None
                if not isinstance(resource, dict):
                    continue
                search = _obj(entry.get("search"))
                if search.get("mode") == "outcome" or resource.get("resourceType") in (
                    "OperationOutcome",
                    "Bundle",
                ):
                    summary = outcome_summary(resource)
                    if summary:
                        log.warning("%s: %s search: %s", self.source.name, query.type, summary)
                    continue
                meta = _obj(resource.get("meta"))
                updated = instant(str(meta.get("lastUpdated") or ""))
                if updated is not None and (newest is None or updated > newest):
                    newest = updated
                inbounds.append(
                    resource_inbound(
                        self.source.name, resource, received_at=received_at, peer=self.peer
                    )
                )
            url = _next_link(bundle)
            params = None  # a next link carries the whole search
            last = url is None
            cursor = _iso(newest) if last and newest is not None else None
            results = self._commit(inbounds, key if cursor else "", cursor or "")
            new += sum(1 for r in results if not r.duplicate)
            self._count(inbounds, results)
        if new:
            log.info("%s: %s: %d new in %d page(s)", self.source.name, query.type, new, pages)
        return new

    @property
    def peer(self) -> str:
        return self.source.base_url

    def store(self, inbounds: list[Inbound], meta: Mapping[str, str]) -> list[AddResult]:
        """Store resources and meta values in one transaction (subscriptions use it)."""
        with self.db.transaction() as conn:
            results = self.inbox.add_in(conn, inbounds, "AA")
            for k, v in meta.items():
                self.db.set_meta(k, v)
        if inbounds:
            self.notify()
        self._count(inbounds, results)
        return results

    def _commit(self, inbounds: list[Inbound], key: str, cursor: str) -> list[AddResult]:
        with self.db.transaction() as conn:
            results = self.inbox.add_in(conn, inbounds, "AA")
            if key:
                self.db.set_meta(key, cursor)
        if inbounds:
            self.notify()
        return results

    def _count(self, inbounds: list[Inbound], results: list[AddResult]) -> None:
        if self.metrics is None:
            return
        # the type label is one of the source's configured resource types, else "other":
        # a server's (or a notification's) own string never becomes a label value
        known = {q.type for q in self.source.resources}
        for m, r in zip(inbounds, results, strict=True):
            if r.duplicate:
                self.metrics.duplicates.labels(self.source.name).inc()
            else:
                kind = m.message_type if m.message_type in known else "other"
                self.metrics.messages_received.labels(self.source.name, kind).inc()
        self.metrics.inbox_rows.set(self.inbox.rows)

    async def _get_bundle(
        self, url: str, params: list[tuple[str, str]] | None
    ) -> Mapping[str, Any]:
        body = await request_json(
            self.client,
            self.auth,
            "GET",
            url,
            params=params,
            retries=self.source.max_retries,
            sleep=self.sleep,
            clock=self.clock,
            what=f"{self.source.name}: GET {url.split('?', 1)[0]}",
        )
        if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
            raise FhirSourceError(
                f"{self.source.name}: search answered with "
                f"{body.get('resourceType') if isinstance(body, dict) else 'no resource'}, "
                "not a Bundle"
            )
        return body


def _next_link(bundle: Mapping[str, Any]) -> str | None:
    for link in bundle.get("link") or []:
        if isinstance(link, dict) and link.get("relation") == "next" and link.get("url"):
            return str(link["url"])
    return None


async def request_json(
    client: httpx.AsyncClient,
    auth: Auth,
    method: str,
    url: str,
    *,
    retries: int,
    sleep: Sleep,
    clock: Clock,
    what: str,
    params: list[tuple[str, str]] | None = None,
    json_body: Any = None,
    headers: Mapping[str, str] | None = None,
    ok: tuple[int, ...] = (200, 201),
) -> Any:
    """A FHIR request with retries on 429 / 5xx / transport errors (``Retry-After`` or
    exponential backoff, via ``sleep``); returns the parsed JSON body (None when empty).
    A final failure raises FhirSourceError with the OperationOutcome's summary and
    ``.status`` / ``.retry_after`` attributes."""
    hdrs = {"Accept": FHIR_JSON, **(headers or {})}
    content = None
    if json_body is not None:
        content = json.dumps(json_body, ensure_ascii=False).encode("utf-8")
        hdrs["Content-Type"] = FHIR_JSON
    attempt = 0
    while True:
        delay: float | None = None
        try:
            response = await send(
                client, auth, method, url, params=params, content=content, headers=hdrs
            )
        except httpx.TransportError as exc:
            error = FhirSourceError(f"{what}: {type(exc).__name__}")
        else:
            if response.status_code in ok:
                if not response.content:
                    return None
                try:
                    return response.json()
                except ValueError:
                    raise FhirSourceError(f"{what}: answered invalid JSON") from None
            summary = ""
            try:
                summary = outcome_summary(response.json())
            except ValueError:
                pass
            delay = retry_after(response, clock.now())
            error = FhirSourceError(
                f"{what}: HTTP {response.status_code}" + (f" ({summary})" if summary else ""),
                status=response.status_code,
                retry_after=delay,
            )
            if response.status_code not in RETRYABLE:
                raise error
        if attempt >= retries:
            raise error
        if delay is None:
            delay = min(BACKOFF_BASE * 2**attempt, BACKOFF_MAX)
        elif delay > RETRY_AFTER_MAX:
            log.warning("%s: Retry-After %.0fs capped at %.0fs", what, delay, RETRY_AFTER_MAX)
            delay = RETRY_AFTER_MAX
        attempt += 1
        log.info("%s: %s; retry %d in %.1fs", what, error, attempt, delay)
        await sleep(delay)


# ---------------------------------------------------------------------------
# Subscription notifications (R4 Subscriptions Backport IG, rest-hook)


@dataclass(frozen=True, slots=True)
class NotificationStatus:
    """What the Parameters entry of a notification bundle says."""

    type: str
    subscription: str
    events_since_start: int | None
    event_numbers: tuple[int, ...]


def parse_notification(body: Any) -> tuple[NotificationStatus, list[Any]]:
    """The status and the remaining entries of a notification Bundle; ValueError with a
    reason (no content) when it is not one."""
    if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
        raise ValueError("not a Bundle")
    if body.get("type") not in ("history", "subscription-notification"):
        raise ValueError("not a history (notification) Bundle")
    entries = body.get("entry") or []
    if not isinstance(entries, list) or not entries:
        raise ValueError("no status entry")
    first = entries[0].get("resource") if isinstance(entries[0], dict) else None
    if not isinstance(first, dict) or first.get("resourceType") not in (
        "Parameters",
        "SubscriptionStatus",
    ):
        raise ValueError("the first entry is not a Parameters status")
    kind, subscription, counter = "", "", None
    numbers: list[int] = []
    for p in first.get("parameter") or []:
        if not isinstance(p, dict):
            continue
        name = p.get("name")
        if name == "type":
            kind = str(_value(p) or "")
        elif name == "subscription":
            ref = _value(p)
            subscription = str(ref.get("reference", "") if isinstance(ref, dict) else ref or "")
        elif name == "events-since-subscription-start":
            counter = _int(_value(p))
        elif name == "notification-event":
            for part in p.get("part") or []:
                if isinstance(part, dict) and part.get("name") == "event-number":
                    n = _int(_value(part))
                    if n is not None:
                        numbers.append(n)
    if kind not in NOTIFICATION_TYPES:
        raise ValueError("unknown notification type")
    status = NotificationStatus(kind, subscription, counter, tuple(sorted(numbers)))
    return status, entries[1:]


def _value(p: Mapping[str, Any]) -> Any:
    for k, v in p.items():
        if k.startswith("value"):
            return v
    return None


def _int(v: Any) -> int | None:
    try:
        return int(str(v))
    except (TypeError, ValueError):
        return None


def events_key(source: str, subscription: str) -> str:
    return f"fhir:{source}:subscription:{subscription or '-'}:events"


class SubscriptionHooks:
    """``POST /hooks/fhir/<source>`` for every FHIR source with a subscription secret."""

    def __init__(self, pollers: Mapping[str, FhirPoller]):
        self.pollers = {name: p for name, p in pollers.items() if p.source.subscription_secret}

    def register(self, app: web.Application) -> None:
        app.router.add_post("/hooks/fhir/{source}", self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        name = request.match_info.get("source", "")
        poller = self.pollers.get(name)
        if poller is None:
            return web.json_response({"status": "unknown source"}, status=404)
        source = poller.source
        got = request.headers.get(source.subscription_header, "")
        if not got:
            log.warning("%s: notification without %s", name, source.subscription_header)
            return web.json_response({"status": "unauthenticated"}, status=401)
        secret = source.subscription_secret
        if not (
            hmac.compare_digest(got.encode(), secret.encode())
            or hmac.compare_digest(got.encode(), f"Bearer {secret}".encode())
        ):
            log.warning("%s: notification with a wrong secret refused", name)
            return web.json_response({"status": "forbidden"}, status=403)
        try:
            body = json.loads(await request.read())
            status, entries = parse_notification(body)
        except ValueError as exc:
            reason = str(exc) if not isinstance(exc, json.JSONDecodeError) else "not JSON"
            log.warning("%s: bad notification: %s", name, reason)
            return web.json_response({"status": "invalid", "reason": reason}, status=400)
        return web.json_response(await self.accept(poller, status, entries))

    async def accept(
        self, poller: FhirPoller, status: NotificationStatus, entries: list[Any]
    ) -> dict[str, Any]:
        """Store a notification's resources and its counter; ask for a catch-up poll on a
        gap or an id-only payload. Returns the JSON answer."""
        name = poller.source.name
        key = events_key(name, status.subscription)
        last = _int(poller.db.get_meta(key, "")) or 0
        counter = status.events_since_start
        numbers = status.event_numbers
        gap = False
        if counter is not None:
            first = numbers[0] if numbers else counter - len(entries) + 1
            if status.type == "event-notification" and first > last + 1:
                gap = True  # notifications last+1 .. first-1 never arrived
            elif status.type == "heartbeat" and counter > last:
                gap = True  # events happened that we were not sent
            elif counter < last:
                gap = True  # the subscription restarted: its events may be lost
        received_at = poller.clock.now()
        inbounds: list[Inbound] = []
        id_only = False
        for entry in entries:
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if isinstance(resource, dict):
                inbounds.append(
                    resource_inbound(name, resource, received_at=received_at, peer="subscription")
                )
            elif isinstance(entry, dict) and entry.get("fullUrl"):
                id_only = True
        meta: dict[str, str] = {}
        if counter is not None and (counter > last or counter < last):
            meta[key] = str(counter)
        results = poller.store(inbounds, meta)
        new = sum(1 for r in results if not r.duplicate)
        if gap or id_only:
            log.info(
                "%s: notification %s: %s; polling",
                name,
                status.type,
                "gap in the event count" if gap else "id-only payload",
            )
            poller.request_poll()
        return {"status": "ok", "type": status.type, "stored": new, "gap": gap}


# ---------------------------------------------------------------------------
# Write-back when a loop closes


@dataclass(frozen=True, slots=True)
class WriteBackResult:
    task: str = ""  # "Task/77"
    created: bool = False  # no Task existed: one was created
    communication: str = ""  # "Communication/5"
    skipped: str = ""  # why nothing was sent (write_back.task is off)


def _validated(resource: dict[str, Any]) -> dict[str, Any]:
    reason = validate_resource(resource)
    if reason:
        raise ChannelError(f"write-back would send an {reason}", retryable=False)
    return resource


def completed_task(existing: Mapping[str, Any] | None, closure: LoopClosure) -> dict[str, Any]:
    """The Task to PUT (``existing`` updated) or POST: ``status`` completed, the report in
    ``output``, ``executionPeriod.end`` = when the loop closed. Pure."""
    when = _iso(closure.closed_at)
    output = {
        "type": {"coding": [CONSULT_NOTE], "text": "Consultant report"},
        "valueReference": {"reference": closure.report},
    }
    if existing is not None:
        task = json.loads(json.dumps(existing))  # a deep copy; the input is not changed
    else:
        task = {
            "resourceType": "Task",
            "identifier": [{"system": REFERRAL_ID_SYSTEM, "value": closure.referral_id}],
            "intent": "order",
            "code": {"text": "Referral fulfilment"},
            "focus": {"reference": closure.service_request},
            "basedOn": [{"reference": closure.service_request}],
            "authoredOn": when,
        }
        if closure.patient:
            task["for"] = {"reference": closure.patient}
        if closure.requester:
            task["requester"] = {"reference": closure.requester}
        if closure.owner:
            task["owner"] = {"reference": closure.owner}
    task["status"] = "completed"
    task["lastModified"] = when
    period = _obj(task.get("executionPeriod"))
    task["executionPeriod"] = {**period, "end": when}
    outputs = [o for o in task.get("output") or [] if isinstance(o, dict)]
    known = any((o.get("valueReference") or {}).get("reference") == closure.report for o in outputs)
    if closure.report and not known:
        outputs.append(output)
    if outputs:
        task["output"] = outputs
    task.pop("meta", None)  # the server owns meta
    return task


async def write_back_task(
    source: FhirSource,
    closure: LoopClosure,
    *,
    client: httpx.AsyncClient,
    auth: Auth,
    clock: Clock | None = None,
    sleep: Sleep = asyncio.sleep,
) -> WriteBackResult:
    """Tell the EHR the loop is closed: update the referral's Task (``closure.task``, else
    the Task whose ``focus`` is the ServiceRequest, else a new one) to ``completed`` with
    the report as output; then, when ``write_back.communication`` is on and a requester is
    known, post a Communication to the referring provider.

    Updates use ``If-Match`` on the Task's version (a 412 re-reads and retries once);
    creates use ``If-None-Exist`` on the referral identifier, so a retry never makes a
    second Task. Every resource is validated before it is sent. Raises ChannelError
    (``retryable`` for 429 / 5xx / transport errors) for the outbox to retry.
    """
    if not source.write_back.task:
        return WriteBackResult(skipped="write_back.task is off")
    clk = clock or WallClock()

    async def call(method: str, url: str, **kw: Any) -> Any:
        return await request_json(
            client,
            auth,
            method,
            url,
            retries=source.max_retries,
            sleep=sleep,
            clock=clk,
            what=f"{source.name}: {method} {url.split('?', 1)[0]}",
            **kw,
        )

    try:
        return await _write_back(source, closure, call)
    except FhirSourceError as exc:
        raise ChannelError(
            str(exc),
            retryable=exc.status in RETRYABLE or exc.status == 0,
            retry_after=exc.retry_after,
        ) from None
    except AuthError as exc:
        raise ChannelError(str(exc), retryable=True) from None


async def _write_back(
    source: FhirSource, closure: LoopClosure, call: Callable[..., Awaitable[Any]]
) -> WriteBackResult:
    base = source.base_url
    task_ref, created = "", False
    for attempt in (1, 2):
        existing = await _find_task(call, base, closure)
        body = _validated(completed_task(existing, closure))
        if existing is not None:
            tid = str(existing.get("id", ""))
            headers = {}
            version = (existing.get("meta") or {}).get("versionId")
            if version:
                headers["If-Match"] = f'W/"{version}"'
            body["id"] = tid
            try:
                await call("PUT", f"{base}/Task/{tid}", json_body=body, headers=headers)
            except FhirSourceError as exc:
                if exc.status == 412 and attempt == 1:
                    continue  # updated by someone else meanwhile: re-read, apply again
                raise
            task_ref = f"Task/{tid}"
        else:
            ident = f"{REFERRAL_ID_SYSTEM}|{closure.referral_id}"
            answer = await call(
                "POST",
                f"{base}/Task",
                json_body=body,
                headers={"If-None-Exist": f"identifier={ident}"},
            )
            tid = str(answer.get("id", "")) if isinstance(answer, dict) else ""
            task_ref, created = (f"Task/{tid}" if tid else "Task"), True
        break
    log.info("%s: referral %s: %s completed", source.name, closure.referral_id, task_ref)
    comm_ref = ""
    if source.write_back.communication and closure.requester:
        comm = _validated(
            {
                "resourceType": "Communication",
                "identifier": [{"system": REFERRAL_ID_SYSTEM, "value": closure.referral_id}],
                "status": "completed",
                "basedOn": [{"reference": closure.service_request}],
                "recipient": [{"reference": closure.requester}],
                "sent": _iso(closure.closed_at),
                "payload": [
                    {"contentString": "The specialist's report for your referral is available."},
                    *(
                        [{"contentReference": {"reference": closure.report}}]
                        if closure.report
                        else []
                    ),
                ],
                **({"subject": {"reference": closure.patient}} if closure.patient else {}),
            }
        )
        answer = await call(
            "POST",
            f"{base}/Communication",
            json_body=comm,
            headers={"If-None-Exist": f"identifier={REFERRAL_ID_SYSTEM}|{closure.referral_id}"},
        )
        cid = str(answer.get("id", "")) if isinstance(answer, dict) else ""
        comm_ref = f"Communication/{cid}" if cid else "Communication"
    return WriteBackResult(task=task_ref, created=created, communication=comm_ref)


class WriteBackChannel:
    """The outbox channel ``fhir:<source>``: the tracker enqueues a
    :data:`engine.model.WRITE_BACK_TEMPLATE` row in the transaction that closes the loop, so an EHR
    outage or a restart delays the Task update but never loses it; the dispatcher retries
    it like any send (:func:`write_back_task` says which failures are worth retrying).
    Shares the source's poller HTTP client and token cache."""

    def __init__(
        self, source: FhirSource, *, client: httpx.AsyncClient, auth: Auth, clock: Clock
    ) -> None:
        self.source = source
        self.client = client
        self.auth = auth
        self.clock = clock

    async def send(self, item: OutboundMessage) -> SendReceipt:
        try:
            data = json.loads(item.payload or "{}")
            closure = LoopClosure(
                referral_id=item.referral_id or str(data["referral_id"]),
                service_request=str(data["service_request"]),
                report=str(data.get("report") or ""),
                closed_at=float(data["closed_at"]),
                patient=str(data.get("patient") or ""),
                requester=str(data.get("requester") or ""),
            )
        except (ValueError, KeyError, TypeError):
            raise ChannelError(
                f"{item.channel}: outbox row is not a write-back", retryable=False
            ) from None
        result = await write_back_task(
            self.source, closure, client=self.client, auth=self.auth, clock=self.clock
        )
        return SendReceipt(
            outbox_id=item.outbox_id,
            idempotency_key=item.idempotency_key,
            channel=item.channel,
            provider_message_id=result.task,
            provider_status=result.skipped or ("created" if result.created else "updated"),
        )


async def _find_task(
    call: Callable[..., Awaitable[Any]], base: str, closure: LoopClosure
) -> dict[str, Any] | None:
    if closure.task:
        key = reference_key(closure.task)
        found = await call("GET", f"{base}/{key}")
        return found if isinstance(found, dict) else None
    for param in ("focus", "based-on"):
        bundle = await call("GET", f"{base}/Task", params=[(param, closure.service_request)])
        for entry in (bundle or {}).get("entry") or []:
            res = entry.get("resource") if isinstance(entry, dict) else None
            if isinstance(res, dict) and res.get("resourceType") == "Task":
                return res
    return None
