"""FHIR R4 out to the EHR: a ``Communication`` (portal message, referring-provider
notification) or a ``Task`` (voice task, care-coordinator "call to book" task).

Each resource is the minimal valid R4 document for its purpose (required elements:
``Communication.status``; ``Task.status`` and ``Task.intent``), POSTed to
``<base>/<Type>`` with ``Authorization: Bearer <token>`` and
``Content-Type: application/fhir+json``.

**Idempotency**: every resource carries ``identifier = <identifier_system>|<key>`` and
is created with FHIR conditional create (``If-None-Exist: identifier=...``, R4
§3.1.0.8.1), so a retry after an ambiguous failure finds the first resource (200)
instead of creating a second. Servers that ignore ``If-None-Exist`` degrade to
at-least-once. Statuses map to ChannelError as in :mod:`channels.base`.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import httpx

from channels.base import error_for_status, error_for_transport
from engine.model import OutboundMessage, SendReceipt

log = logging.getLogger(__name__)

FHIR_JSON: Final = "application/fhir+json"
# FHIR R4 request-priority value set.
PRIORITIES: Final = frozenset({"routine", "urgent", "asap", "stat"})
PRIORITY_SCORE_URL: Final = "urn:refloop:fhir:StructureDefinition:priority-score"
DEFAULT_IDENTIFIER_SYSTEM: Final = "urn:refloop:outbox"
_REFERENCE = re.compile(r"[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}")

ResourceType = Literal["Communication", "Task"]


@dataclass(frozen=True, slots=True)
class FhirOutConfig:
    """One ``channels.<name>`` of ``type: fhir``; ``bearer_token`` already resolved.

    ``sender_ref`` names refloop (or the practice) as ``Communication.sender`` /
    ``Task.requester``, e.g. ``Organization/42`` or ``Device/refloop``.
    """

    base_url: str
    bearer_token: str = field(default="", repr=False)
    sender_ref: str = ""
    identifier_system: str = DEFAULT_IDENTIFIER_SYSTEM
    timeout: float = 10.0

    def problems(self) -> list[tuple[str, str]]:
        """Every problem as ``(key, message)``, for ``engine.config`` to locate."""
        out: list[tuple[str, str]] = []
        if urlsplit(self.base_url).scheme not in ("http", "https"):
            out.append(("base_url", "must be an http(s) URL"))
        if self.sender_ref and not _REFERENCE.fullmatch(self.sender_ref):
            out.append(("sender_ref", "must be a FHIR reference like Organization/42"))
        if ":" not in self.identifier_system:
            out.append(("identifier_system", "must be a URI"))
        if self.timeout <= 0:
            out.append(("timeout", "must be positive"))
        return out


def _ref(value: str) -> dict[str, str] | None:
    return {"reference": value} if value else None


def _instant(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat(timespec="seconds")


def _priority(item: OutboundMessage) -> str:
    return item.priority if item.priority in PRIORITIES else "routine"


def _common(item: OutboundMessage, cfg: FhirOutConfig) -> dict[str, Any]:
    out: dict[str, Any] = {
        "identifier": [{"system": cfg.identifier_system, "value": item.idempotency_key}],
    }
    if item.based_on:
        out["basedOn"] = [{"reference": item.based_on}]
    return out


def communication_resource(
    item: OutboundMessage, cfg: FhirOutConfig, *, now: float
) -> dict[str, Any]:
    """A minimal R4 ``Communication`` carrying ``item``'s rendered text and attachments."""
    payload: list[dict[str, Any]] = []
    if item.body:
        payload.append({"contentString": item.body})
    for a in item.attachments:
        payload.append(
            {
                "contentAttachment": {
                    "contentType": a.content_type,
                    "data": base64.b64encode(a.data).decode("ascii"),
                    "title": a.filename,
                }
            }
        )
    resource: dict[str, Any] = {
        "resourceType": "Communication",
        **_common(item, cfg),
        "status": "completed",
        "priority": _priority(item),
        "sent": _instant(now),
    }
    if item.patient_ref:
        resource["subject"] = {"reference": item.patient_ref}
    if item.subject:
        resource["topic"] = {"text": item.subject}
    if item.recipient:
        resource["recipient"] = [{"reference": item.recipient}]
    if cfg.sender_ref:
        resource["sender"] = {"reference": cfg.sender_ref}
    if payload:
        resource["payload"] = payload
    return resource


def task_resource(item: OutboundMessage, cfg: FhirOutConfig, *, now: float) -> dict[str, Any]:
    """A minimal R4 ``Task`` (status requested, intent order) for a voice or coordinator
    task; ``priority_score`` travels in an extension, ``recipient`` is the owner."""
    resource: dict[str, Any] = {
        "resourceType": "Task",
        **_common(item, cfg),
        "status": "requested",
        "intent": "order",
        "priority": _priority(item),
        "code": {"text": item.subject or item.kind or "refloop task"},
        "authoredOn": _instant(now),
    }
    if item.priority_score is not None:
        resource["extension"] = [
            {"url": PRIORITY_SCORE_URL, "valueDecimal": round(item.priority_score, 4)}
        ]
    if item.body:
        resource["description"] = item.body
    if item.patient_ref:
        resource["for"] = {"reference": item.patient_ref}
    if item.recipient:
        resource["owner"] = {"reference": item.recipient}
    if cfg.sender_ref:
        resource["requester"] = {"reference": cfg.sender_ref}
    return resource


class FhirOut:
    """The FHIR :class:`~channels.base.Channel`: POSTs one ``resource`` type.

    ``http`` is a shared ``httpx.AsyncClient`` (closed by its owner); one is made when
    omitted and :meth:`aclose` closes it.
    """

    def __init__(
        self,
        name: str,
        cfg: FhirOutConfig,
        *,
        resource: ResourceType,
        http: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.cfg = cfg
        self.resource_type: ResourceType = resource
        self._own_http = http is None
        self._http = http if http is not None else httpx.AsyncClient()
        self._clock = clock

    async def aclose(self) -> None:
        if self._own_http:
            await self._http.aclose()

    def build(self, item: OutboundMessage) -> dict[str, Any]:
        """The resource that :meth:`send` would POST for ``item``."""
        now = self._clock()
        if self.resource_type == "Task":
            return task_resource(item, self.cfg, now=now)
        return communication_resource(item, self.cfg, now=now)

    async def send(self, item: OutboundMessage) -> SendReceipt:
        """Conditional-create the resource; 200 (already there) and 201 both succeed.
        ``provider_message_id`` is ``<Type>/<id>`` from the reply body or Location."""
        resource = self.build(item)
        headers = {
            "Content-Type": FHIR_JSON,
            "Accept": FHIR_JSON,
            "If-None-Exist": f"identifier={self.cfg.identifier_system}|{item.idempotency_key}",
        }
        if self.cfg.bearer_token:
            headers["Authorization"] = f"Bearer {self.cfg.bearer_token}"
        url = f"{self.cfg.base_url.rstrip('/')}/{self.resource_type}"
        try:
            response = await self._http.post(
                url, json=resource, headers=headers, timeout=self.cfg.timeout
            )
        except httpx.HTTPError as exc:
            raise error_for_transport(self.name, exc) from exc
        if not response.is_success:
            raise error_for_status(
                self.name,
                response.status_code,
                retry_after=response.headers.get("Retry-After"),
                now=self._clock(),
            )
        resource_id = _resource_id(response, self.resource_type)
        log.info(
            "outbox %d: %s %s accepted HTTP %d id=%s",
            item.outbox_id,
            self.name,
            self.resource_type,
            response.status_code,
            resource_id,
        )
        return SendReceipt(
            outbox_id=item.outbox_id,
            idempotency_key=item.idempotency_key,
            channel=item.channel,
            provider_message_id=resource_id,
            provider_status=str(response.status_code),
        )


def _resource_id(response: httpx.Response, resource_type: str) -> str:
    try:
        data = response.json()
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("id"), str):
        return f"{resource_type}/{data['id']}"
    location = response.headers.get("Location") or response.headers.get("Content-Location", "")
    match = re.search(rf"{resource_type}/([A-Za-z0-9\-.]{{1,64}})", location)
    return f"{resource_type}/{match.group(1)}" if match else ""
