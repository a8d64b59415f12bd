"""The daemon end to end as an operator runs it: ``refloop run``, ``send``, ``messages``,
``routes check``; SIGTERM drains and exits 0."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from helpers import CORPUS, REPO, Daemon, hl7, mllp_port, peer, query, refloop, run, running_engine

SAMPLE = CORPUS / "fhir-converter" / "REF-I12-01.hl7"


def sample_file(tmp_path: Path) -> Path:
    """A corpus referral when the corpus is present, else a generated one."""
    if SAMPLE.is_file():
        return SAMPLE
    path = tmp_path / "ref-i12.hl7"
    path.write_bytes(hl7("MSG00112", msg_type="REF^I12^REF_I12"))
    return path


def test_run_send_list_and_sigterm(daemon: Daemon, tmp_path: Path) -> None:
    daemon.start()
    path = sample_file(tmp_path)

    sent = refloop("send", "--port", str(daemon.mllp), "--timeout", "10", str(path))
    assert sent.returncode == 0, sent.stderr.decode()
    fields = sent.stdout.decode().strip().split("\t")
    assert fields[0] == str(path)
    assert fields[-1] == "AA"
    control_id = fields[1]

    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0, daemon.log_tail()

    listed = refloop("messages", "list", "--state", str(daemon.state_dir), "--json")
    assert listed.returncode == 0, listed.stderr.decode()
    rows = json.loads(listed.stdout)
    assert len(rows) == 1
    row = rows[0]
    for key in ("id", "control_id", "type", "status", "ack_code", "received_at", "source"):
        assert key in row, key
    assert row["control_id"] == control_id
    assert row["type"] == "REF^I12"
    assert row["ack_code"] == "AA"
    assert row["source"] == "ehr"
    assert row["status"] in ("received", "routed", "filtered")
    assert row["received_at"].endswith("Z")


def test_send_exits_1_when_a_message_is_rejected(daemon: Daemon, tmp_path: Path) -> None:
    daemon.start()
    bad = tmp_path / "no-msh9.hl7"
    bad.write_bytes(hl7("NO-TYPE-1", msg_type=""))
    sent = refloop("send", "--port", str(daemon.mllp), "--timeout", "10", str(bad))
    assert sent.returncode == 1
    assert "\tAR" in sent.stdout.decode()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0, daemon.log_tail()


BROKEN = {
    # (file text, line the error must name)
    "yaml-syntax": ("version: 1\nsources:\n  ehr:\n    type: mllp\n   port: [1\n", 5),
    "unknown-key": (
        "version: 1\nstore:\n  file: x.db\nsources:\n  ehr:\n    type: mllp\n    prot: 2575\n",
        7,
    ),
    "bad-value": ("version: 1\nsources:\n  ehr:\n    ack_mode: sometimes\n", 4),
}


@pytest.mark.parametrize("case", list(BROKEN), ids=list(BROKEN))
def test_routes_check_broken_yaml_exits_2_with_file_and_line(tmp_path: Path, case: str) -> None:
    text, line = BROKEN[case]
    path = tmp_path / "routes.yaml"
    path.write_text(text)
    result = refloop("routes", "check", str(path))
    assert result.returncode == 2
    err = result.stderr.decode()
    assert f"{path}:{line}" in err, err
    assert "Traceback" not in err


def test_routes_check_shipped_file_ok() -> None:
    result = refloop("routes", "check", str(REPO / "routes.yaml"))
    assert result.returncode == 0, result.stderr.decode()


@pytest.mark.store
def test_messages_show_raw_writes_exact_bytes(tmp_path: Path) -> None:
    # latin-1, CRLF and LF segment ends, a trailing blank line: nothing may be normalised
    message = hl7("RAW-1", msh18="8859/1", body=("PID|1||1^^^MRN||MÜLLER^JOSÉ",), codec="latin-1")
    message = message.replace(b"\r", b"\r\n", 1) + b"NTE|1||caf\xe9\n\n"

    async def store() -> None:
        async with running_engine(tmp_path) as engine, peer(mllp_port(engine)) as p:
            assert (await p.ask(message)).code == "AA"

    run(store())
    (row_id,) = query(tmp_path / "refloop.db", "SELECT id FROM messages")[0]
    shown = refloop("messages", "show", str(row_id), "--raw", "--state", str(tmp_path))
    assert shown.returncode == 0, shown.stderr.decode()
    assert shown.stdout == message

    plain = refloop("messages", "show", str(row_id), "--state", str(tmp_path))
    assert plain.returncode == 0
    assert "charset: latin-1" in plain.stdout.decode()
