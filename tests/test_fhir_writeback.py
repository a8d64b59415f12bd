"""Write-back when a loop closes: the referral's Task updated (or created) to completed
with the report as output, validated by the server with fhir.resources."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fhir_server import FhirServer, make_service_request
from helpers import WAIT, Daemon, query, routed, run, shipped_routes

from engine.app import Engine
from engine.config import FhirSource, FhirWriteBack, loads
from engine.errors import ChannelError
from engine.ingest.fhir import completed_task, validate_resource, write_back_task
from engine.ingest.smart_auth import NoAuth
from engine.model import LoopClosure

CLOSED_AT = 1_767_312_000.0  # 2026-01-02T00:00:00Z


def closure(**kw: Any) -> LoopClosure:
    values: dict[str, Any] = {
        "referral_id": "42",
        "service_request": "ServiceRequest/sr1",
        "report": "DiagnosticReport/dr1",
        "closed_at": CLOSED_AT,
        "patient": "Patient/p1",
        "requester": "Practitioner/doc1",
        **kw,
    }
    return LoopClosure(**values)


def source(server: FhirServer, **wb: bool) -> FhirSource:
    return FhirSource(
        name="epic",
        base_url=server.base,
        write_back=FhirWriteBack(**{"task": True, **wb}),
        max_retries=1,
    )


async def sleep(_: float) -> None:
    return None


def existing_task(server: FhirServer) -> dict[str, Any]:
    return server.put(
        {
            "resourceType": "Task",
            "id": "t1",
            "status": "in-progress",
            "intent": "order",
            "focus": {"reference": "ServiceRequest/sr1"},
            "for": {"reference": "Patient/p1"},
            "executionPeriod": {"start": "2025-12-01T00:00:00Z"},
        }
    )


def test_closing_a_loop_updates_the_existing_task() -> None:
    async def body() -> None:
        async with FhirServer() as server, httpx.AsyncClient() as client:
            existing_task(server)
            result = await write_back_task(
                source(server), closure(), client=client, auth=NoAuth(), sleep=sleep
            )
            assert (result.task, result.created, result.communication) == ("Task/t1", False, "")
            ((method, path, sent),) = server.bodies
            assert (method, path) == ("PUT", "/fhir/Task/t1")
            assert validate_resource(sent) == ""
            assert sent["status"] == "completed"
            assert sent["output"][0]["valueReference"] == {"reference": "DiagnosticReport/dr1"}
            assert sent["executionPeriod"] == {
                "start": "2025-12-01T00:00:00Z",
                "end": "2026-01-02T00:00:00.000000Z",
            }
            stored = server.resources["Task"]["t1"]
            assert [v["status"] for v in stored] == ["in-progress", "completed"]
            # the update was conditional on the version read
            assert ("PUT", "/fhir/Task/t1") in server.requests

    run(body())


def test_no_task_yet_creates_one_once_and_notifies_the_referrer() -> None:
    async def body() -> None:
        async with FhirServer() as server, httpx.AsyncClient() as client:
            src = source(server, communication=True)
            first = await write_back_task(src, closure(), client=client, auth=NoAuth(), sleep=sleep)
            assert first.created and first.task.startswith("Task/")
            assert first.communication.startswith("Communication/")
            methods = [(m, p) for m, p, _ in server.bodies]
            assert methods == [("POST", "/fhir/Task"), ("POST", "/fhir/Communication")]
            task = server.bodies[0][2]
            assert task["focus"] == {"reference": "ServiceRequest/sr1"}
            assert task["for"] == {"reference": "Patient/p1"}
            comm = server.bodies[1][2]
            assert comm["recipient"] == [{"reference": "Practitioner/doc1"}]
            assert validate_resource(comm) == ""
            # a retry of the same closure finds the Task (by focus) and does not add one
            again = await write_back_task(src, closure(), client=client, auth=NoAuth(), sleep=sleep)
            assert again.task == first.task and not again.created
            assert len(server.resources["Task"]) == 1
            assert len(server.resources["Communication"]) == 1  # If-None-Exist

    run(body())


def test_a_version_conflict_rereads_and_applies_again() -> None:
    async def body() -> None:
        async with FhirServer() as server, httpx.AsyncClient() as client:
            existing_task(server)

            def racing_update(read: dict[str, Any]) -> None:
                if len(server.resources["Task"]["t1"]) == 1:  # someone updates meanwhile
                    server.put({**read, "status": "accepted"})

            server.after_read = racing_update
            result = await write_back_task(
                source(server),
                closure(task="Task/t1"),
                client=client,
                auth=NoAuth(),
                sleep=sleep,
            )
            assert result.task == "Task/t1"
            versions = server.resources["Task"]["t1"]
            assert [v["status"] for v in versions] == ["in-progress", "accepted", "completed"]

    run(body())


def test_server_errors_become_retryable_channel_errors() -> None:
    async def body() -> None:
        async with FhirServer() as server, httpx.AsyncClient() as client:
            server.fail_next(503, retry_after="30")
            server.fail_next(503, retry_after="30")
            with pytest.raises(ChannelError) as exc:
                await write_back_task(
                    source(server), closure(), client=client, auth=NoAuth(), sleep=sleep
                )
            assert exc.value.retryable and exc.value.retry_after == 30.0

    run(body())


def test_write_back_off_sends_nothing() -> None:
    async def body() -> None:
        async with FhirServer() as server, httpx.AsyncClient() as client:
            src = FhirSource(name="epic", base_url=server.base)
            result = await write_back_task(src, closure(), client=client, auth=NoAuth())
            assert result.skipped and server.requests == []

    run(body())


def test_completed_task_is_pure_and_valid() -> None:
    existing = {"resourceType": "Task", "id": "t", "status": "accepted", "intent": "order"}
    task = completed_task(existing, closure())
    assert existing["status"] == "accepted"  # unchanged
    assert validate_resource(task) == ""
    twice = completed_task(task, closure())
    assert len(twice["output"]) == 1  # the report is not added twice


# -- through the running engine: report in → loop closed → outbox → Task completed ------

ENGINE_CONFIG = """
version: 1
http: {{enabled: false}}
sources:
  ehr:
    type: fhir
    base_url: {base}
    resources: [ServiceRequest, DiagnosticReport]
    poll_interval: 3600
    write_back: {{task: true}}
routes:
  - name: fhir-referral-new
    when: {{resource: ServiceRequest}}
    extract:
      sending_facility: "{{{{ source }}}}"
      placer_number: ServiceRequest.identifier.value
      filler_numbers: "{{{{ [resource_ref] }}}}"
      patient_ids: "{{{{ refs('ServiceRequest.subject', 'Patient') }}}}"
    then:
      - track: referral-created
  - name: fhir-diagnostic-report
    when:
      resource: DiagnosticReport
      DiagnosticReport.status: final
    extract:
      sending_facility: "{{{{ source }}}}"
      filler_numbers: "{{{{ refs('DiagnosticReport.basedOn', 'ServiceRequest') }}}}"
      report_id: "{{{{ resource_ref }}}}"
    then:
      - track: report-received
"""


@pytest.mark.store
def test_closing_a_loop_from_fhir_completes_the_task_through_the_outbox(tmp_path: Path) -> None:
    async def body() -> None:
        async with FhirServer() as server:
            cfg = loads(ENGINE_CONFIG.format(base=server.base))
            eng = Engine(cfg, state_dir=tmp_path / "state", drain_seconds=2.0)
            await eng.start()
            try:
                poller = eng.pollers["ehr"]
                server.put(make_service_request(1))
                server.tick()
                poller.request_poll()
                await until(lambda: referral_status(eng) == "open")
                server.put(
                    {
                        "resourceType": "DiagnosticReport",
                        "id": "dr1",
                        "status": "final",
                        "code": {"text": "Consult note"},
                        "basedOn": [{"reference": "ServiceRequest/sr1"}],
                        "subject": {"reference": "Patient/p1"},
                    }
                )
                server.tick()
                poller.request_poll()
                await until(lambda: bool(server.resources.get("Task")))
                (versions,) = server.resources["Task"].values()
                task = versions[-1]
                assert referral_status(eng) == "closed"
                assert validate_resource(task) == ""
                assert task["status"] == "completed"
                assert task["focus"] == {"reference": "ServiceRequest/sr1"}
                assert task["for"] == {"reference": "Patient/p1"}
                assert task["output"][0]["valueReference"] == {"reference": "DiagnosticReport/dr1"}
                assert eng.db is not None
                await until(lambda: outbox_rows(eng) == [("fhir:ehr", "sent")])
                # the same report again (a re-read) closes nothing twice and sends nothing
                # (waits for that poll to finish and what it stored to be processed: the
                # outbox row a second close would write commits with the processing)
                server.tick()
                await asyncio.wait_for(poller.request_poll(), WAIT)
                processor, stored = eng.processor, eng.inbox
                assert processor is not None and stored is not None
                await until(lambda: processor.cursor >= stored.rows)
                assert outbox_rows(eng) == [("fhir:ehr", "sent")]
            finally:
                await eng.stop()

    run(body())


def referral_status(eng: Engine) -> str:
    assert eng.db is not None
    row = eng.db.conn.execute("SELECT status FROM referrals").fetchone()
    return str(row[0]) if row else ""


def outbox_rows(eng: Engine) -> list[tuple[str, str]]:
    assert eng.db is not None
    rows = eng.db.conn.execute(
        "SELECT channel, status FROM outbox WHERE template = 'fhir-task-completed'"
    ).fetchall()
    return [(str(a), str(b)) for a, b in rows]


async def until(condition: Callable[[], bool], bound: float = WAIT) -> None:
    async with asyncio.timeout(bound):
        while not condition():
            await asyncio.sleep(0.01)


# -- the daemon with the shipped routes: write_back.communication reaches the requester ---


def test_daemon_sends_the_communication_to_the_service_requests_requester(
    daemon: Daemon, tmp_path: Path
) -> None:
    """Issue 13.7: ``write_back: {task: true, communication: true}`` on a FHIR source; the
    shipped routes open a referral from a ServiceRequest (requester Practitioner/doc1)
    and close it with a final DiagnosticReport; the Communication arrives at the loopback
    FHIR server addressed to that requester."""

    def referral_status() -> str:
        if not daemon.db.exists() and not routed(daemon.db):
            return ""
        rows = query(daemon.db, "SELECT status FROM referrals")
        return str(rows[0][0]) if rows else ""

    async def body() -> list[dict[str, Any]]:
        async with FhirServer() as server:
            daemon.routes = shipped_routes(
                tmp_path / "routes.yaml",
                sources={
                    "epic": {
                        "type": "fhir",
                        "base_url": server.base,
                        "resources": ["ServiceRequest", "DiagnosticReport"],
                        "poll_interval": 0.2,
                        "write_back": {"task": True, "communication": True},
                    }
                },
            )
            server.put(
                make_service_request(
                    1,
                    requester={"reference": "Practitioner/doc1", "display": "Harriet Home"},
                    code={"coding": [{"code": "REFCARD"}]},
                )
            )
            server.tick()
            await asyncio.to_thread(daemon.start)
            await until(lambda: referral_status() == "open", 4 * WAIT)
            server.put(
                {
                    "resourceType": "DiagnosticReport",
                    "id": "dr1",
                    "status": "final",
                    "code": {"text": "Consult note"},
                    "basedOn": [{"reference": "ServiceRequest/sr1"}],
                    "subject": {"reference": "Patient/p1"},
                }
            )
            server.tick()
            await until(lambda: bool(server.resources.get("Communication")), 4 * WAIT)
            return [v[-1] for v in server.resources["Communication"].values()]

    (communication,) = run(body())
    assert communication["recipient"] == [{"reference": "Practitioner/doc1"}]
    assert communication["basedOn"] == [{"reference": "ServiceRequest/sr1"}]
    assert {"contentReference": {"reference": "DiagnosticReport/dr1"}} in communication["payload"]
    assert validate_resource(communication) == ""
    assert referral_status() == "closed"
