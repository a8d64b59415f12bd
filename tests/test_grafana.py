"""docs/grafana/refloop.json stays importable and true: every metric a panel queries is
one refloop exports (the registry the daemon builds: engine.metrics, the tracker's and the
timers' metrics, the closure ratio)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from engine.metrics import Metrics
from engine.store.db import open_database
from engine.timers.service import TimerMetrics
from engine.tracking.tracker import TrackerMetrics

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "docs" / "grafana" / "refloop.json"
METRIC = re.compile(r"\brefloop_\w+")
# The sample names a family of each type exposes (prometheus_client's text format).
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Every series name refloop's registry can expose."""
    db = open_database(tmp_path_factory.mktemp("grafana") / "refloop.db")
    try:
        registry = CollectorRegistry()
        metrics = Metrics(registry)
        TrackerMetrics(registry, db)
        TimerMetrics(registry, db)
        metrics.watch_closure_ratio(lambda now: {"30d": 0.5}, lambda: 0.0)
        metrics.watch_inbox_commits(lambda: 0)
        return {
            family.name + suffix
            for family in registry.collect()
            for suffix in SUFFIXES[family.type]
        }
    finally:
        db.close()


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in items:
        yield p
        yield from panels(p.get("panels", []))


def test_the_dashboard_is_importable() -> None:
    d = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert d["uid"] == "refloop" and d["title"] and 36 <= d["schemaVersion"] <= 41
    assert [i["name"] for i in d["__inputs"]] == ["DS_PROMETHEUS"]
    assert d["__inputs"][0]["pluginId"] == "prometheus"
    ids = [p["id"] for p in panels(d["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels(d["panels"]):
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]


def test_every_queried_metric_is_exported(exported: set[str]) -> None:
    d = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    used: dict[str, str] = {}
    for p in panels(d["panels"]):
        for t in p.get("targets", []):
            for name in METRIC.findall(t["expr"]):
                used[name] = p["title"]
    unknown = {name: title for name, title in used.items() if name not in exported}
    assert not unknown, f"panels query metrics refloop does not export: {unknown}"
    assert "refloop_closure_ratio" in used and "refloop_ack_latency_seconds_bucket" in used


def test_the_check_itself_catches_a_wrong_name(exported: set[str]) -> None:
    assert "refloop_acks_total" in exported and "refloop_ack_latency_seconds_bucket" in exported
    assert "refloop_acks" not in exported  # a counter's series ends in _total
    assert "refloop_outbox_dead_total" not in exported  # a gauge has no _total
