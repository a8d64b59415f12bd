"""Metric labels against a hostile sender (issue 14, item 6), through a live engine on
loopback: MSH-9 codes a sender invents make no series (the ``type`` label is one of the
types the routes name, else ``other``), and ``GET /metrics`` formats the exposition off
the event loop's thread while store reads stay on it.
"""

from __future__ import annotations

import re
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
from helpers import run
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from ui_rig import ref_i12, ui_engine

from engine.hl7v2.client import MllpClient
from engine.metrics import StoreCollector

N_CODES = 300


def _code(rng: secrets.SystemRandom) -> str:
    """A well-formed MSH-9 code no route names: Z-segment message types are site-defined
    (HL7 v2.5.1 §2.7.1), so a sender may invent any of them."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    return (
        "Z"
        + "".join(rng.choice(alphabet) for _ in range(2))
        + "^"
        + "".join(rng.choice(alphabet) for _ in range(3))
    )


def _message(code: str, control: str) -> bytes:
    return (
        f"MSH|^~\\&|EHR|CLINIC|REFLOOP|CLINIC|20260101090000||{code}|{control}|P|2.5.1\r"
        "EVN||20260101090000\r"
    ).encode()


def _samples(text: str, name: str) -> dict[str, float]:
    """``{label set as written: value}`` of one metric in a text exposition."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


class _ThreadProbe(Collector):
    """Records the thread that collects it (a plain collector: the formatting thread)."""

    def __init__(self) -> None:
        self.threads: list[int] = []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        self.threads.append(threading.get_ident())
        yield GaugeMetricFamily("probe_plain", "test probe", value=1)


class _StoreProbe(StoreCollector):
    """Records the thread its store read runs on (must be the event loop's)."""

    def __init__(self) -> None:
        self.threads: list[int] = []

    def read(self) -> Iterator[GaugeMetricFamily]:
        self.threads.append(threading.get_ident())
        yield GaugeMetricFamily("probe_store", "test probe", value=1)


def test_sender_chosen_message_types_make_no_series(tmp_path: Path) -> None:
    rng = secrets.SystemRandom()
    codes = {_code(rng) for _ in range(N_CODES)}

    async def main() -> None:
        async with ui_engine(tmp_path) as rig, httpx.AsyncClient(timeout=10) as http:
            plain, store = _ThreadProbe(), _StoreProbe()
            rig.engine.metrics.registry.register(plain)
            rig.engine.metrics.registry.register(store)
            client = await MllpClient.connect("127.0.0.1", rig.mllp_port, timeout=5)
            try:
                for i, code in enumerate(sorted(codes)):
                    assert (await client.send(_message(code, f"Z{i}"))).code == "AA"
                assert (await client.send(ref_i12("P-1", "R1"))).code == "AA"
            finally:
                await client.close()
            r = await http.get(f"{rig.base}/metrics")
            assert r.status_code == 200
            received = _samples(r.text, "refloop_messages_received_total")
            # one series for every invented code together, one for the type a route names
            assert received == {
                'source="ehr",type="other"': float(len(codes)),
                'source="ehr",type="REF^I12"': 1.0,
            }, received
            assert not any(code in r.text for code in codes)
            loop_thread = threading.get_ident()
            assert plain.threads and loop_thread not in plain.threads  # formatted off the loop
            assert store.threads == [loop_thread]  # the store read hopped back to the loop

    run(main(), timeout=90)


def test_wildcard_route_types_label_by_their_pattern(tmp_path: Path) -> None:
    """routes.yaml's ``RRI^I1[2-5]`` admits RRI^I13, which the routes never spell out:
    its label is the pattern as written, so the label set stays the routes' own."""

    async def main() -> None:
        async with ui_engine(tmp_path) as rig, httpx.AsyncClient(timeout=10) as http:
            client = await MllpClient.connect("127.0.0.1", rig.mllp_port, timeout=5)
            try:
                assert (await client.send(_message("RRI^I13", "W1"))).code == "AA"
            finally:
                await client.close()
            text = (await http.get(f"{rig.base}/metrics")).text
            received = _samples(text, "refloop_messages_received_total")
            assert received == {'source="ehr",type="RRI^I1[2-5]"': 1.0}, received

    run(main(), timeout=60)
