"""FHIR out: minimal valid R4 Communication and Task, bearer token, conditional create,
and status mapping, against a real aiohttp server on 127.0.0.1 port 0."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from aiohttp import web

from channels.base import Channel
from channels.fhir_out import (
    PRIORITY_SCORE_URL,
    FhirOut,
    FhirOutConfig,
    ResourceType,
    communication_resource,
    task_resource,
)
from engine.errors import ChannelError
from engine.model import Attachment, OutboundMessage

TOKEN = "fhir-bearer-token-for-tests"
NOW = 1_760_000_000.0
CFG = FhirOutConfig(base_url="https://ehr.example.org/fhir", sender_ref="Organization/refloop")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def fhir_server(handler: Handler) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/fhir/{type}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/fhir"
    finally:
        await runner.cleanup()


def item(**kw: Any) -> OutboundMessage:
    base: dict[str, Any] = {
        "outbox_id": 3,
        "idempotency_key": "ob-3",
        "channel": "portal",
        "recipient": "Patient/p1",
        "kind": "first-nudge",
        "subject": "Your referral",
        "body": "Your provider referred you to cardiology. Please book.",
        "patient_ref": "Patient/p1",
        "based_on": "ServiceRequest/sr1",
    }
    base.update(kw)
    return OutboundMessage(**base)


def test_is_a_channel() -> None:
    assert isinstance(FhirOut("portal", CFG, resource="Communication"), Channel)


def test_communication_is_minimal_valid_r4() -> None:
    attach = Attachment("letter.pdf", "application/pdf", b"%PDF-1.4")
    doc = communication_resource(item(attachments=(attach,)), CFG, now=NOW)
    assert doc["resourceType"] == "Communication"
    assert doc["status"] == "completed"  # the one required element (1..1)
    assert doc["identifier"] == [{"system": "urn:refloop:outbox", "value": "ob-3"}]
    assert doc["basedOn"] == [{"reference": "ServiceRequest/sr1"}]
    assert doc["subject"] == {"reference": "Patient/p1"}
    assert doc["recipient"] == [{"reference": "Patient/p1"}]
    assert doc["sender"] == {"reference": "Organization/refloop"}
    assert doc["sent"] == "2025-10-09T08:53:20+00:00"
    assert doc["payload"][0] == {"contentString": item().body}
    data = doc["payload"][1]["contentAttachment"]
    assert (
        base64.b64decode(data["data"]) == b"%PDF-1.4" and data["contentType"] == "application/pdf"
    )
    assert doc["priority"] == "routine"


def test_task_is_minimal_valid_r4_with_priority_score() -> None:
    msg = item(
        channel="coordinator",
        kind="coordinator-task",
        recipient="PractitionerRole/coord",
        subject="Call to book",
        body="Patient replied YES.",
        priority="urgent",
        priority_score=0.91234567,
    )
    doc = task_resource(msg, CFG, now=NOW)
    assert doc["resourceType"] == "Task"
    assert (doc["status"], doc["intent"]) == ("requested", "order")  # required elements
    assert doc["priority"] == "urgent"
    assert doc["code"] == {"text": "Call to book"}
    assert doc["description"] == "Patient replied YES."
    assert doc["for"] == {"reference": "Patient/p1"}
    assert doc["owner"] == {"reference": "PractitionerRole/coord"}
    assert doc["requester"] == {"reference": "Organization/refloop"}
    assert doc["extension"] == [{"url": PRIORITY_SCORE_URL, "valueDecimal": 0.9123}]
    assert doc["authoredOn"] == "2025-10-09T08:53:20+00:00"


def test_unknown_priority_falls_back_to_routine() -> None:
    assert task_resource(item(priority="whenever"), CFG, now=NOW)["priority"] == "routine"


@pytest.mark.parametrize("resource", ["Communication", "Task"])
def test_post_with_bearer_token_and_conditional_create(resource: ResourceType) -> None:
    seen: list[tuple[str, dict[str, str], dict[str, Any]]] = []

    async def handler(request: web.Request) -> web.Response:
        doc = json.loads(await request.read())
        seen.append((request.match_info["type"], dict(request.headers), doc))
        return web.json_response(
            {**doc, "id": "new-1"},
            status=201,
            headers={"Location": f"{request.url}/new-1/_history/1"},
            content_type="application/fhir+json",
        )

    async def main() -> None:
        async with fhir_server(handler) as base, httpx.AsyncClient() as http:
            cfg = FhirOutConfig(base_url=base, bearer_token=TOKEN, sender_ref="Device/refloop")
            out = FhirOut("portal", cfg, resource=resource, http=http, clock=lambda: NOW)
            receipt = await out.send(item())
        assert receipt.provider_message_id == f"{resource}/new-1"
        assert receipt.provider_status == "201" and receipt.outbox_id == 3
        kind, headers, doc = seen[0]
        assert kind == resource and doc["resourceType"] == resource
        assert headers["Authorization"] == f"Bearer {TOKEN}"
        assert headers["Content-Type"] == "application/fhir+json"
        assert headers["If-None-Exist"] == "identifier=urn:refloop:outbox|ob-3"

    asyncio.run(main())


def test_existing_resource_from_conditional_create_is_success() -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(
            status=200, headers={"Location": "https://ehr/fhir/Communication/old-7/_history/2"}
        )

    async def main() -> None:
        async with fhir_server(handler) as base, httpx.AsyncClient() as http:
            out = FhirOut(
                "portal", FhirOutConfig(base_url=base), resource="Communication", http=http
            )
            receipt = await out.send(item())
        assert receipt.provider_message_id == "Communication/old-7"
        assert receipt.provider_status == "200"

    asyncio.run(main())


@pytest.mark.parametrize(
    ("status", "retryable"),
    [(429, True), (500, True), (503, True), (400, False), (401, False), (412, False), (422, False)],
)
def test_status_mapping(status: int, retryable: bool) -> None:
    async def handler(request: web.Request) -> web.Response:
        outcome = {"resourceType": "OperationOutcome", "issue": [{"diagnostics": "Patient Doe"}]}
        return web.json_response(outcome, status=status, headers={"Retry-After": "9"})

    async def main() -> None:
        async with fhir_server(handler) as base, httpx.AsyncClient() as http:
            out = FhirOut("portal", FhirOutConfig(base_url=base), resource="Task", http=http)
            with pytest.raises(ChannelError) as info:
                await out.send(item())
        assert info.value.retryable is retryable
        assert info.value.retry_after == (9.0 if retryable else None)
        assert "Doe" not in str(info.value)

    asyncio.run(main())


def test_timeout_is_retryable() -> None:
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response()

    async def main() -> None:
        async with fhir_server(handler) as base, httpx.AsyncClient() as http:
            cfg = FhirOutConfig(base_url=base, timeout=0.2)
            with pytest.raises(ChannelError) as info:
                await FhirOut("portal", cfg, resource="Task", http=http).send(item())
            release.set()
        assert info.value.retryable is True

    asyncio.run(main())


@pytest.mark.parametrize(
    ("cfg", "keys"),
    [
        (CFG, []),
        (FhirOutConfig(base_url="ehr.example.org"), ["base_url"]),
        (FhirOutConfig(base_url="https://e/fhir", sender_ref="refloop"), ["sender_ref"]),
        (
            FhirOutConfig(base_url="https://e/fhir", identifier_system="outbox"),
            ["identifier_system"],
        ),
    ],
    ids=["ok", "base-url", "sender-ref", "identifier-system"],
)
def test_config_problems(cfg: FhirOutConfig, keys: list[str]) -> None:
    assert [k for k, _ in cfg.problems()] == keys
    assert TOKEN not in repr(FhirOutConfig(base_url="https://e", bearer_token=TOKEN))
