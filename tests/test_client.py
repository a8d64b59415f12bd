"""engine.hl7v2.client.MllpClient against a real listener, and reading ACKs with ack_code."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import hl7, mllp_port, run, running_engine

from engine.errors import EngineError
from engine.hl7v2.client import AckResult, MllpClient, ack_code, normalise


@pytest.mark.store
def test_client_reads_aa_ar_and_batch_replies(tmp_path: Path) -> None:
    custom = [hl7("C-1", fs="#", enc="!@%*"), hl7("", fs="#", enc="!@%*")]
    batch = b"BHS#!@%*#A#B\r" + b"".join(custom) + b"BTS#2\r"

    async def go() -> list[AckResult]:
        async with running_engine(tmp_path) as engine:
            client = await MllpClient.connect("127.0.0.1", mllp_port(engine), timeout=5)
            try:
                return [
                    await client.send(hl7("OK-1")),
                    await client.send(hl7("NO9-1", msg_type="")),
                    await client.send(batch),
                ]
            finally:
                await client.close()

    ok, rejected, batched = run(go())
    assert ok == AckResult("OK-1", "AA", "")
    assert (rejected.control_id, rejected.code) == ("NO9-1", "AR")
    assert rejected.text == "Required field missing"
    # a reply batch in the sender's own delimiters: the worst of its ACKs
    assert (batched.code, batched.text) == ("AR", "batch of 2 ACKs")


@pytest.mark.store
def test_client_reports_a_closed_connection(tmp_path: Path) -> None:
    async def go() -> AckResult:
        async with running_engine(tmp_path, allow_peers=["10.0.0.0/8"]) as engine:
            client = await MllpClient.connect("127.0.0.1", mllp_port(engine), timeout=5)
            try:
                return await client.send(hl7("REFUSED-1"))
            finally:
                await client.close()

    result = run(go())
    assert result.code == ""
    assert result.control_id == "REFUSED-1"


@pytest.mark.store
def test_client_connect_failure_is_an_engine_error(tmp_path: Path) -> None:
    async def go() -> int:
        async with running_engine(tmp_path) as engine:
            return mllp_port(engine)

    port = run(go())  # a port that was just closed

    with pytest.raises(EngineError, match="cannot connect"):
        run(MllpClient.connect("127.0.0.1", port, timeout=5))


ACKS = {
    "aa": (b"MSH|^~\\&|||||||ACK|1|P|2.5.1\rMSA|AA|X\r", ("AA", "")),
    "ae-with-text": (b"MSH|^~\\&|||||||ACK|1|P|2.5.1\rMSA|AE|X|bad thing\r", ("AE", "bad thing")),
    "empty-batch": (b"BHS|^~\\&\rBTS|0\r", ("", "reply batch holds no ACKs")),
    "not-hl7": (b"HTTP/1.1 400 Bad Request\r\n", ("", "unreadable reply")),
}


@pytest.mark.parametrize("case", ACKS.values(), ids=ACKS.keys())
def test_ack_code(case: tuple[bytes, tuple[str, str]]) -> None:
    reply, expected = case
    assert ack_code(reply) == expected


@pytest.mark.parametrize(
    "raw",
    [b"MSH|a\r\nPID|b\n", b"MSH|a\nPID|b\n\n\n", b"MSH|a\rPID|b"],
    ids=["crlf", "lf-blank-lines", "no-final-cr"],
)
def test_normalise(raw: bytes) -> None:
    assert normalise(raw) == b"MSH|a\rPID|b\r"
