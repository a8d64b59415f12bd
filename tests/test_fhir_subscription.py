"""Subscription notifications through the running engine: POST /hooks/fhir/<source>
(R4 Subscriptions backport rest-hook), secret checks, and gap detection → catch-up poll."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fhir_server import FhirServer, make_service_request
from helpers import WAIT, run

from engine.app import Engine
from engine.config import loads
from engine.ingest.fhir import parse_notification

pytestmark = pytest.mark.store  # every test here uses the store

SECRET = "hook-secret-123"

CONFIG = """
version: 1
http: {{host: 127.0.0.1, port: 0}}
sources:
  ehr:
    type: fhir
    base_url: {base}
    resources: [ServiceRequest]
    poll_interval: 3600
    subscription: {{secret: "${{env:SUB_SECRET}}"}}
routes:
  - name: fhir-new
    when:
      resource: ServiceRequest
      ServiceRequest.status: active
    extract:
      sending_facility: "{{{{ source }}}}"
      placer_number: ServiceRequest.identifier.value
    then:
      - track: referral-created
  - name: fhir-other
    when: {{resource: "*"}}
    then:
      - drop: not tracked
"""


def notification(
    kind: str, counter: int, resources: list[dict[str, Any]] = (), *, first_event: int = 0
) -> dict[str, Any]:
    """An R4 backport notification Bundle (history; Parameters first)."""
    params: list[dict[str, Any]] = [
        {"name": "subscription", "valueReference": {"reference": "Subscription/sub1"}},
        {"name": "topic", "valueCanonical": "http://example.org/topic/referrals"},
        {"name": "status", "valueCode": "active"},
        {"name": "type", "valueCode": kind},
        {"name": "events-since-subscription-start", "valueString": str(counter)},
    ]
    for i, res in enumerate(resources):
        params.append(
            {
                "name": "notification-event",
                "part": [
                    {"name": "event-number", "valueString": str((first_event or counter) + i)},
                    {
                        "name": "focus",
                        "valueReference": {"reference": f"ServiceRequest/{res['id']}"},
                    },
                ],
            }
        )
    return {
        "resourceType": "Bundle",
        "type": "history",
        "entry": [
            {
                "fullUrl": "urn:uuid:status",
                "resource": {"resourceType": "Parameters", "parameter": params},
            },
            *({"fullUrl": f"x/ServiceRequest/{r['id']}", "resource": r} for r in resources),
        ],
    }


@contextlib.asynccontextmanager
async def engine(tmp_path: Path) -> AsyncIterator[tuple[Engine, FhirServer, httpx.AsyncClient]]:
    async with FhirServer() as server:
        cfg = loads(CONFIG.format(base=server.base), env={"SUB_SECRET": SECRET})
        eng = Engine(cfg, state_dir=tmp_path / "state", drain_seconds=2.0)
        await eng.start()
        try:
            assert eng.http is not None
            base = f"http://127.0.0.1:{eng.http.port}"
            async with httpx.AsyncClient(base_url=base, timeout=WAIT) as client:
                await until(lambda: eng.pollers["ehr"].polls >= 1)  # the start-up poll
                yield eng, server, client
        finally:
            await eng.stop()


async def until(condition: Callable[[], bool]) -> None:
    """Wait (bounded) for a condition another task makes true."""
    async with asyncio.timeout(WAIT):
        while not condition():
            await asyncio.sleep(0.01)


def inbox(eng: Engine) -> list[tuple[str, str, str]]:
    assert eng.db is not None
    conn: sqlite3.Connection = eng.db.conn
    return [
        (str(a), str(b), str(c))
        for a, b, c in conn.execute("SELECT control_id, status, route FROM messages ORDER BY id")
    ]


def stored(resource: dict[str, Any], server: FhirServer) -> dict[str, Any]:
    return server.put(resource)


def test_valid_notification_is_stored_and_routed(tmp_path: Path) -> None:
    async def body() -> None:
        async with engine(tmp_path) as (eng, server, client):
            sr = stored(make_service_request(1), server)
            r = await client.post(
                "/hooks/fhir/ehr",
                json=notification("event-notification", 1, [sr]),
                headers={"Authorization": f"Bearer {SECRET}"},
            )
            assert r.status_code == 200
            assert r.json() == {
                "status": "ok",
                "type": "event-notification",
                "stored": 1,
                "gap": False,
            }
            await until(lambda: inbox(eng)[-1][1] != "received")
            assert inbox(eng) == [("ServiceRequest/sr1/_history/1", "routed", "fhir-new")]
            # the same notification again (a retry) stores nothing new
            r = await client.post(
                "/hooks/fhir/ehr",
                json=notification("event-notification", 1, [sr]),
                headers={"Authorization": SECRET},
            )
            assert r.json()["stored"] == 0 and len(inbox(eng)) == 1

    run(body())


def test_wrong_or_missing_secret_is_refused(tmp_path: Path) -> None:
    async def body() -> None:
        async with engine(tmp_path) as (eng, server, client):
            sr = stored(make_service_request(1), server)
            payload = notification("event-notification", 1, [sr])
            r = await client.post("/hooks/fhir/ehr", json=payload)
            assert r.status_code == 401
            r = await client.post(
                "/hooks/fhir/ehr", json=payload, headers={"Authorization": "Bearer wrong"}
            )
            assert r.status_code == 403
            r = await client.post(
                "/hooks/fhir/nosuch", json=payload, headers={"Authorization": SECRET}
            )
            assert r.status_code == 404
            r = await client.post(
                "/hooks/fhir/ehr", content=b"{not json", headers={"Authorization": SECRET}
            )
            assert r.status_code == 400
            assert inbox(eng) == []

    run(body())


def test_gap_in_event_count_triggers_a_catch_up_poll(tmp_path: Path) -> None:
    async def body() -> None:
        async with engine(tmp_path) as (eng, server, client):
            poller = eng.pollers["ehr"]
            headers = {"Authorization": SECRET}
            r = await client.post(
                "/hooks/fhir/ehr", json=notification("handshake", 0), headers=headers
            )
            assert r.status_code == 200 and r.json()["gap"] is False
            first = stored(make_service_request(1), server)
            r = await client.post(
                "/hooks/fhir/ehr",
                json=notification("event-notification", 1, [first]),
                headers=headers,
            )
            assert r.json()["gap"] is False
            # events 2 and 3 happen, their notifications are lost; event 4 arrives
            server.tick()
            stored(make_service_request(2), server)
            stored(make_service_request(3), server)
            server.tick()
            fourth = stored(make_service_request(4), server)
            polls = poller.polls
            r = await client.post(
                "/hooks/fhir/ehr",
                json=notification("event-notification", 4, [fourth]),
                headers=headers,
            )
            assert r.json()["gap"] is True
            await until(lambda: poller.polls > polls)
            ids = sorted(row[0] for row in inbox(eng))
            assert ids == [f"ServiceRequest/sr{n}/_history/1" for n in (1, 2, 3, 4)]
            # a heartbeat whose counter is ahead of what we saw means missed events too
            server.tick()
            stored(make_service_request(5), server)
            polls = poller.polls
            r = await client.post(
                "/hooks/fhir/ehr", json=notification("heartbeat", 5), headers=headers
            )
            assert r.json() == {"status": "ok", "type": "heartbeat", "stored": 0, "gap": True}
            await until(lambda: poller.polls > polls)
            assert len(inbox(eng)) == 5
            # an up-to-date heartbeat is just a heartbeat
            r = await client.post(
                "/hooks/fhir/ehr", json=notification("heartbeat", 5), headers=headers
            )
            assert r.json()["gap"] is False

    run(body())


def test_parse_notification_reads_the_backport_parameters() -> None:
    sr = make_service_request(7)
    status, rest = parse_notification(notification("event-notification", 9, [sr], first_event=9))
    assert (status.type, status.subscription, status.events_since_start) == (
        "event-notification",
        "Subscription/sub1",
        9,
    )
    assert status.event_numbers == (9,) and rest[0]["resource"]["id"] == "sr7"
