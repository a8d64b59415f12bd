"""The metrics docs/alerts.yml needs beyond the existing ones: certificate expiry, disk
space, FHIR poll failures (and the newest source problem), read from a real engine."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import yaml
from aiohttp import web
from cryptography import x509
from helpers import HOST, Pki, run, running_engine, tls_source
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from engine.app import Engine
from engine.config import loads
from engine.ingest.status import PROBLEMS, live_from_samples, metrics_samples, source_status


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_tls_certificate_expiry_and_disk_space(tmp_path: Path, pki: Pki) -> None:
    async def body() -> None:
        async with running_engine(tmp_path / "state", tls=tls_source(pki)) as engine:
            got = samples(engine.metrics.registry)
            usage = shutil.disk_usage(tmp_path / "state")
        cert = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
        key = ("refloop_certificate_expiry_timestamp_seconds", (("certificate", "mllp:ehr"),))
        assert got[key] == cert.not_valid_after_utc.timestamp()
        assert got[("refloop_state_disk_size_bytes", ())] == usage.total
        free = got[("refloop_state_disk_free_bytes", ())]
        assert abs(free - usage.free) < 64 * 1024 * 1024  # other writers on the disk

    run(body())


def test_a_failing_fhir_server_counts_poll_failures(tmp_path: Path) -> None:
    async def body() -> None:
        async def broken(request: web.Request) -> web.Response:
            # a search answered with no Bundle: the poll fails at once (a 5xx would be
            # retried with backoff first)
            return web.json_response({"resourceType": "OperationOutcome"})

        app = web.Application()
        app.router.add_get("/{tail:.*}", broken)
        runner = web.AppRunner(app)
        await runner.setup()
        try:
            site = web.TCPSite(runner, HOST, 0)
            await site.start()
            port = runner.addresses[0][1]
            doc = {
                "version": 1,
                "store": {"file": "refloop.db"},
                "http": {"enabled": False},
                "sources": {
                    "chart": {"type": "fhir", "base_url": f"http://{HOST}:{port}/fhir",
                              "resources": ["ServiceRequest"], "poll_interval": 3600},
                },
            }  # fmt: skip
            cfg = loads(yaml.safe_dump(doc), file="t.yaml", env={})
            engine = Engine(cfg, tmp_path / "state", registry=CollectorRegistry(),
                            drain_seconds=2.0)  # fmt: skip
            await engine.start()
            try:
                key = ("refloop_fhir_poll_failures_total", (("source", "chart"),))
                assert samples(engine.metrics.registry)[key] in (0.0, 1.0)  # exists from start

                async def failed() -> None:
                    while samples(engine.metrics.registry)[key] < 1:
                        await asyncio.sleep(0.02)

                await asyncio.wait_for(failed(), 10)
                live = live_from_samples(metrics_samples(engine.metrics))
                assert live["chart"]["error_kind"] == "poll"
                assert engine.db is not None
                (row,) = source_status(engine.db.conn, cfg, engine.clock.now(), live)
                assert (row["name"], row["kind"], row["connections_open"]) == (
                    "chart",
                    "fhir",
                    None,
                )
                assert row["last_error"] == PROBLEMS["poll"] and row["last_error_at"].endswith("Z")
            finally:
                await engine.stop()
        finally:
            await runner.cleanup()

    run(body())
