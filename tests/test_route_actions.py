"""A route's ``send`` and ``forward`` actions: outbox rows written in the processing
transaction and delivered by the dispatcher; a forward carries the bytes as received; a
replay queues nothing again unless ``--resend``."""

from __future__ import annotations

import asyncio
import base64
import json
import textwrap
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from helpers import store_for
from prometheus_client import CollectorRegistry

from engine import config
from engine.app import Engine
from engine.hl7v2.client import MllpClient
from engine.routing.replay import ReplayFilter, replay
from engine.store import open_database

WAIT = 10.0
VT, FS, CR = b"\x0b", b"\x1c", b"\r"


class Receiver:
    """A downstream HL7 system on loopback: records each frame and answers AA."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.port = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(VT)
                frame = (await reader.readuntil(FS + CR))[:-2]
                self.frames.append(frame)
                msh = frame.split(b"\r", 1)[0].decode("latin-1")
                control_id = msh.split("|")[9]
                ack = f"MSH|^~\\&|DOWN|X|REFLOOP|CLINIC|20250303||ACK|A{control_id}|P|2.5.1\r"
                ack += f"MSA|AA|{control_id}\r"
                writer.write(VT + ack.encode() + FS + CR)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Receiver]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        try:
            yield self
        finally:
            server.close()
            await server.wait_closed()


CONFIG = """\
version: 1
store: {{file: refloop.db}}
http: {{host: 127.0.0.1, port: 0}}
sources:
  ehr: {{type: mllp, host: 127.0.0.1, port: 0}}
channels:
  downstream: {{type: mllp, host: 127.0.0.1, port: {port}, timeout: 5}}
  worklist:
    type: mllp
    host: 127.0.0.1
    port: {port}
    timeout: 5
    templates:
      notice: "MSH|^~\\\\&|REFLOOP|CLINIC|WL|CLINIC|20250303||ORU^R01|\\
        N{{{{ outbox_id }}}}|P|2.5.1\\r\\
        OBX|1|TX|DECLINED||{{{{ payload['values']['reason'] }}}} for {{{{ payload['to'] }}}}\\r"
routes:
  - name: copy-adt
    when: {{type: "ADT^A0*"}}
    then: [{{forward: downstream}}]
  - name: declined
    when: {{type: ORM^O01, ORC.1: CA}}
    extract:
      reason: ORC.16.2
    then:
      - send: {{channel: worklist, template: notice, to: ORC.12.1}}
"""

ADT = (
    "MSH|^~\\&|EHR|CLINIC|REFLOOP|CLINIC|20250303100001||ADT^A08|CTL1|P|2.5.1|||||||8859/1\n"
    "PID|1||MRN1^^^CLINIC||Mu\xf1oz^Jos\xe9\n"
).encode("latin-1")
CANCEL = (
    b"MSH|^~\\&|EHR|CLINIC|REFLOOP|CLINIC|20250303100002||ORM^O01|CTL2|P|2.5.1\r"
    b"PID|1||MRN2^^^CLINIC\r"
    b"ORC|CA|REF-2^CLINIC||||||||||DR7^Who^Doc||||^Patient moved away\r"
)


def make_engine(tmp_path: Path, port: int) -> Engine:
    path = tmp_path / "routes.yaml"
    path.write_text(textwrap.dedent(CONFIG.format(port=port)))
    cfg = config.load(path)
    return Engine(cfg, tmp_path / "state", registry=CollectorRegistry(), drain_seconds=2.0)


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT):
        while not condition():
            await asyncio.sleep(0.01)


def outbox(eng: Engine) -> list[tuple[str, str, str, str]]:
    assert eng.db is not None
    rows = eng.db.conn.execute(
        "SELECT channel, template, idempotency_key, status FROM outbox ORDER BY id"
    ).fetchall()
    return [(str(a), str(b), str(c), str(d)) for a, b, c, d in rows]


async def deliver(tmp_path: Path, *messages: bytes) -> tuple[list[bytes], list[tuple[str, ...]]]:
    """Send ``messages`` to a fresh engine whose channels point at a :class:`Receiver`;
    wait until each outbox row is sent. (frames received, outbox rows)"""
    async with Receiver().running() as rx:
        eng = make_engine(tmp_path, rx.port)
        await eng.start()
        try:
            client = await MllpClient.connect("127.0.0.1", eng.ports()["ehr"], timeout=5)
            try:
                for raw in messages:
                    assert (await client.send(raw)).code == "AA"
            finally:
                await client.close()
            await until(lambda: len(rx.frames) == len(messages))
            await until(lambda: {r[3] for r in outbox(eng)} == {"sent"})
            return rx.frames, outbox(eng)
        finally:
            await eng.stop()


@pytest.mark.store
def test_forward_and_send_go_out_through_the_outbox(tmp_path: Path) -> None:
    frames, rows = asyncio.run(deliver(tmp_path, ADT, CANCEL))
    by_type = {f.split(b"|", 9)[8]: f for f in frames}
    # the forward: the sender's own bytes (latin-1, MSH-10), segment ends made CR
    assert by_type[b"ADT^A08"] == ADT.replace(b"\n", b"\r")
    # the send: the channel's template with the route's extracted values
    notice = by_type[b"ORU^R01"].decode()
    assert "OBX|1|TX|DECLINED||Patient moved away for DR7" in notice
    assert [(c, t) for c, t, _, _ in rows] == [("downstream", "forward"), ("worklist", "notice")]
    assert [k for _, _, k, _ in rows] == ["route:1:0", "route:2:0"]


@pytest.mark.store
def test_replay_queues_nothing_again_unless_resend(tmp_path: Path) -> None:
    asyncio.run(deliver(tmp_path, ADT))
    cfg = config.load(tmp_path / "routes.yaml")
    path = tmp_path / "state" / "refloop.db"
    replay(store_for(path), cfg, ReplayFilter(), dry_run=False, user="ops")
    db = open_database(path)
    try:
        keys = [str(r[0]) for r in db.conn.execute("SELECT idempotency_key FROM outbox")]
        assert keys == ["route:1:0"]
    finally:
        db.close()
    replay(store_for(path), cfg, ReplayFilter(), dry_run=False, resend=True, user="ops")
    db = open_database(path)
    try:
        rows = db.conn.execute("SELECT idempotency_key, status, payload FROM outbox ORDER BY id")
        (_first, second) = rows.fetchall()
        assert second[0].startswith("route:1:0:resend:") and second[1] == "pending"
        assert base64.b64decode(json.loads(second[2])["hl7_b64"]) == ADT
    finally:
        db.close()
