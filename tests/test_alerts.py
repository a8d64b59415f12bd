"""docs/alerts.yml stays loadable and true: it is a Prometheus rule file, it covers what
an operator must hear about, and every metric its expressions name is one that a live
daemon's ``GET /metrics`` exports (a renamed or misspelt metric would make an alert
silently never fire). The name checker proves itself on planted wrong names."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from helpers import run
from prometheus_client.parser import text_string_to_metric_families
from ui_rig import ui_engine

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "docs" / "alerts.yml"
# The series names a family of each type exposes (prometheus_client's text format).
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
    "unknown": ("",),
}
# PromQL words that are not metric names (https://prometheus.io/docs/prometheus/latest/querying/operators/)
KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
     "group_left", "group_right", "inf", "nan"}
)  # fmt: skip
WANTED = {
    "refloop_outbox_oldest_seconds",
    "refloop_outbox_dead",
    "refloop_processing_lag_messages",
    "refloop_parked_messages",
    "refloop_fhir_poll_failures_total",
    "refloop_certificate_expiry_timestamp_seconds",
    "refloop_state_disk_free_bytes",
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers outside strings, label
    matchers, ranges and grouping clauses that are not functions, keywords or numbers."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', " ", expr)  # strings
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(
        r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text
    )  # label lists
    names = set()
    for m in re.finditer(r"(?<![\w.:])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()", text):
        word = m.group(1)
        if word.lower() not in KEYWORDS and not re.fullmatch(r"[eE]\d+", word):
            names.add(word)
    return names


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule for group in doc["groups"] for rule in group["rules"]]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Every series name the live daemon's /metrics exposes (the shipped routes.yaml)."""
    tmp = tmp_path_factory.mktemp("alerts")

    async def scrape() -> str:
        async with ui_engine(tmp) as rig, httpx.AsyncClient() as http:
            r = await http.get(f"{rig.base}/metrics")
            assert r.status_code == 200
            return r.text

    text = run(scrape(), timeout=60)
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + s for s in SUFFIXES[family.type])
        names.update(s.name for s in family.samples)
    return names


def test_the_rule_file_is_well_formed() -> None:
    found = rules()
    assert len(found) >= 7
    names = [r["alert"] for r in found]
    assert len(names) == len(set(names))
    for rule in found:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert rule["alert"].startswith("Refloop") and rule["expr"].strip()
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        if "for" in rule:
            assert re.fullmatch(r"\d+[smhd]", rule["for"]), rule["for"]


def test_the_issue_s_alerts_are_all_there() -> None:
    used = set().union(*(metric_names(r["expr"]) for r in rules()))
    assert used >= WANTED, WANTED - used
    (cert,) = [r for r in rules() if "certificate_expiry" in r["expr"]]
    assert "30 * 86400" in cert["expr"]  # within 30 days


def test_every_metric_an_alert_names_is_exported(exported: set[str]) -> None:
    missing = {
        r["alert"]: sorted(metric_names(r["expr"]) - exported)
        for r in rules()
        if metric_names(r["expr"]) - exported
    }
    assert not missing, f"alerts name metrics the daemon does not export: {missing}"


@pytest.mark.parametrize(
    ("expr", "wrong"),
    [
        pytest.param("sum by (channel) (refloop_outbox_deads) > 0", "refloop_outbox_deads",
                     id="misspelt"),
        pytest.param("increase(refloop_fhir_poll_failures[30m]) > 2",
                     "refloop_fhir_poll_failures", id="counter-without-_total"),
        pytest.param('refloop_outbox_dead{channel="fax"} > 0 and on (instance) up == 1', "up",
                     id="not-refloop"),
    ],
)  # fmt: skip
def test_the_check_itself_catches_a_planted_wrong_name(
    exported: set[str], expr: str, wrong: str
) -> None:
    assert metric_names(expr) - exported == {wrong}


def test_metric_names_reads_promql() -> None:
    expr = (
        'max by (instance, channel) (rate(refloop_outbox_sends_total{result="retry"}[15m]))'
        " / on (channel) group_left sum without (kind) (refloop_outbox_depth) > 2e9"
        " or histogram_quantile(0.99, rate(refloop_timer_lateness_seconds_bucket[1h])) > 300"
        " unless time() - refloop_x offset 5m < inf"
    )
    assert metric_names(expr) == {
        "refloop_outbox_sends_total",
        "refloop_outbox_depth",
        "refloop_timer_lateness_seconds_bucket",
        "refloop_x",
    }
