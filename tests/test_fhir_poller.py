"""The FHIR poller against a loopback FHIR server: every resource version exactly once
across pages, restarts and injected failures; the cursor commits with the last page."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from fhir_server import FhirServer, corpus_resources, make_service_request
from helpers import query, run

from engine.config import FhirQuery, FhirSource
from engine.ingest.fhir import FhirPoller, FhirSourceError, cursor_key, resource_inbound
from engine.ingest.smart_auth import NoAuth
from engine.store import Inbox, open_database

pytestmark = pytest.mark.store  # every test here uses the store

TYPES = ("ServiceRequest", "Appointment", "DiagnosticReport", "DocumentReference", "Task")


class Sleeper:
    """The injected sleep: records the delays, waits for nothing."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


@dataclass
class Rig:
    server: FhirServer
    poller: FhirPoller
    sleeper: Sleeper
    db_path: Path
    make: Callable[..., FhirPoller]

    def rows(self) -> list[tuple[str, str, str]]:
        return [
            (str(r[0]), str(r[1]), str(r[2]))
            for r in query(
                self.db_path, "SELECT control_id, status, error FROM messages ORDER BY id"
            )
        ]


def source(base: str, **kw: Any) -> FhirSource:
    settings: dict[str, Any] = {
        "resources": tuple(FhirQuery(t) for t in TYPES),
        "page_size": 3,
        "overlap": 60.0,
        "max_retries": 3,
        **kw,
    }
    return FhirSource(name="ehrfhir", base_url=base, **settings)


@contextlib.asynccontextmanager
async def rig(tmp_path: Path, server: FhirServer | None = None, **kw: Any) -> AsyncIterator[Rig]:
    srv = server or FhirServer()
    db_path = tmp_path / "refloop.db"
    async with srv, httpx.AsyncClient(timeout=5.0) as client:
        dbs = []
        sleeper = Sleeper()

        def make(**over: Any) -> FhirPoller:
            db = open_database(db_path)
            dbs.append(db)
            src = source(srv.base, **{**kw, **over})
            return FhirPoller(src, db, Inbox(db), client=client, auth=NoAuth(), sleep=sleeper)

        try:
            yield Rig(srv, make(), sleeper, db_path, make)
        finally:
            for db in dbs:
                db.close()


def expected(server: FhirServer) -> set[str]:
    return {
        f"{r['resourceType']}/{r['id']}/_history/{r['meta']['versionId']}"
        for r in server.current()
        if r["resourceType"] in TYPES
    }


def load_corpus(server: FhirServer, generated: int = 10) -> None:
    for res in corpus_resources():
        server.put(res)
        server.tick()
    for n in range(generated):
        server.put(make_service_request(n))
        if n % 3 == 0:  # several resources share one lastUpdated second
            server.tick()


@pytest.mark.store
def test_every_resource_once_across_pages_and_a_second_poll(tmp_path: Path) -> None:
    async def body() -> None:
        async with rig(tmp_path) as r:
            load_corpus(r.server)
            new = await r.poller.poll_once()
            want = expected(r.server)
            assert new == len(want) > 10
            ids = [row[0] for row in r.rows()]
            assert sorted(ids) == sorted(want)  # each exactly once
            # paging really happened: more than one page per busy type
            assert any("_page=" in path for _, path in r.server.requests)
            # the overlap window re-reads recent ones: all duplicates, nothing new
            assert await r.poller.poll_once() == 0
            assert len(r.rows()) == len(want)

    run(body())


@pytest.mark.store
def test_cursor_persists_across_restarts_and_catches_new_versions(tmp_path: Path) -> None:
    async def body() -> None:
        async with rig(tmp_path) as r:
            load_corpus(r.server, generated=4)
            await r.poller.poll_once()
            cursor = r.poller.cursor("ServiceRequest")
            assert cursor
            # an update in the same second as the cursor, and one later
            r.server.put(make_service_request(1, status="on-hold"), last_updated=r.server.now)
            r.server.tick(5)
            r.server.put(make_service_request(2, status="revoked"))
            again = r.make()  # a restart: a new poller on the same database
            assert again.cursor("ServiceRequest") == cursor
            assert await again.poll_once() == 2
            ids = [row[0] for row in r.rows()]
            assert "ServiceRequest/sr1/_history/2" in ids
            assert "ServiceRequest/sr2/_history/2" in ids
            assert sorted(ids) == sorted(
                {
                    *expected(r.server),
                    "ServiceRequest/sr1/_history/1",
                    "ServiceRequest/sr2/_history/1",
                }
            )
            # the restarted search asked for the cursor minus the overlap
            searches = [p for _, p in r.server.requests if p.startswith("/fhir/ServiceRequest?_")]
            assert any("_lastUpdated=gt" in p for p in searches)

    run(body())


@pytest.mark.store
def test_retry_after_and_backoff_are_honoured_without_losing_a_page(tmp_path: Path) -> None:
    async def body() -> None:
        async with rig(tmp_path) as r:
            for n in range(10):
                r.server.put(make_service_request(n))
                r.server.tick()
            r.server.fail_next(429, retry_after="7")
            r.server.fail_next(503)
            new = await r.poller.poll_query(FhirQuery("ServiceRequest"))
            assert new == 10
            assert r.sleeper.calls == [7.0, 2.0]  # Retry-After, then backoff (attempt 2)
            assert len(r.rows()) == 10

    run(body())


@pytest.mark.store
def test_failure_mid_search_keeps_the_cursor_and_loses_nothing(tmp_path: Path) -> None:
    async def body() -> None:
        async with rig(tmp_path, max_retries=1) as r:
            for n in range(9):
                r.server.put(make_service_request(n))
                r.server.tick()
            query = FhirQuery("ServiceRequest")
            poller = r.poller
            original = poller._get_bundle
            calls = 0

            async def failing_second_page(url: str, params: Any) -> Any:
                nonlocal calls
                calls += 1
                if calls == 2:
                    r.server.fail_next(503)
                    r.server.fail_next(503)
                return await original(url, params)

            poller._get_bundle = failing_second_page  # type: ignore[method-assign]
            with pytest.raises(FhirSourceError, match="HTTP 503"):
                await poller.poll_query(query)
            assert len(r.rows()) == 3  # page 1 is stored...
            assert poller.cursor("ServiceRequest") == ""  # ...but the cursor did not move
            poller._get_bundle = original  # type: ignore[method-assign]
            assert await poller.poll_query(query) == 6
            assert sorted(x[0] for x in r.rows()) == sorted(expected(r.server))
            assert poller.cursor("ServiceRequest")

    run(body())


@pytest.mark.store
def test_unsorted_server_still_misses_nothing_after_a_crash(tmp_path: Path) -> None:
    async def body() -> None:
        server = FhirServer(unsorted=True)  # newest first, ignoring _sort
        async with rig(tmp_path, server) as r:
            for n in range(7):
                r.server.put(make_service_request(n))
                r.server.tick(120)  # further apart than the overlap
            await r.poller.poll_query(FhirQuery("ServiceRequest"))
            assert len(r.rows()) == 7
            # the cursor is the newest of all pages, not of the first page read
            assert r.poller.cursor("ServiceRequest").startswith("2026-01-01T00:12:00")

    run(body())


@pytest.mark.store
def test_operation_outcome_errors_are_surfaced(tmp_path: Path) -> None:
    async def body() -> None:
        async with rig(tmp_path) as r:
            r.server.fail_next(
                400,
                body={
                    "resourceType": "OperationOutcome",
                    "issue": [{"severity": "error", "code": "invalid", "diagnostics": "bad _sort"}],
                },
            )
            with pytest.raises(FhirSourceError, match=r"HTTP 400 \(error invalid: bad _sort\)"):
                await r.poller.poll_query(FhirQuery("Appointment"))
            assert r.sleeper.calls == []  # a 400 is not retried

    run(body())


@pytest.mark.store
def test_malformed_resources_are_stored_rejected_and_polling_goes_on(tmp_path: Path) -> None:
    async def body() -> None:
        async with rig(tmp_path) as r:
            r.server.put(make_service_request(1))
            bad = make_service_request(2)
            bad["status"] = "not-a-status"
            r.server.put(bad)
            worse = make_service_request(3)
            worse["subject"] = "Patient/3"  # a Reference must be an object
            r.server.put(worse)
            assert await r.poller.poll_query(FhirQuery("ServiceRequest")) == 3
            rows = {cid: (status, error) for cid, status, error in r.rows()}
            assert rows["ServiceRequest/sr1/_history/1"] == ("received", "")
            status, error = rows["ServiceRequest/sr2/_history/1"]
            assert (status, error) == (
                "rejected",
                "invalid ServiceRequest: status: not in the value set",
            )
            status, error = rows["ServiceRequest/sr3/_history/1"]
            assert status == "rejected" and error.startswith("invalid ServiceRequest: subject")

    run(body())


@pytest.mark.parametrize(
    ("resource", "control_id"),
    [
        (
            {"resourceType": "Task", "id": "t1", "meta": {"versionId": "4"}},
            "Task/t1/_history/4",
        ),
        (
            {"resourceType": "Task", "id": "t1", "meta": {"lastUpdated": "2026-01-01T00:00:00Z"}},
            "Task/t1/_history/2026-01-01T00:00:00Z",
        ),
    ],
    ids=["version-id", "last-updated"],
)
def test_control_id(resource: dict[str, Any], control_id: str) -> None:
    inbound = resource_inbound("s", resource, received_at=1.0, peer="p")
    assert inbound.control_id == control_id
    assert inbound.msh is None and inbound.text_encoding == "utf-8"
    assert json.loads(inbound.raw) == resource


def test_cursor_is_written_in_the_pages_transaction(tmp_path: Path) -> None:
    async def body() -> None:
        async with rig(tmp_path) as r:
            r.server.put(make_service_request(1))
            await r.poller.poll_query(FhirQuery("ServiceRequest"))
            key = cursor_key("ehrfhir", "ServiceRequest")
            assert r.poller.db.get_meta(key) == "2026-01-01T00:00:00.000000Z"

    run(body())


def test_replace_keeps_source_frozen() -> None:
    s = source("http://127.0.0.1:1/fhir")
    assert replace(s, page_size=5).page_size == 5
