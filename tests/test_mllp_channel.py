"""channels/mllp.py over a real MLLP peer on 127.0.0.1: the factory's exchange
(engine.hl7v2.client) under the channel, as the dispatcher uses it. AA/CA is a receipt;
AE/AR is the receiver's refusal (not retried); no answer or no connection is retried
(HL7 v2.5.1 §2.9.2, Table 0008)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from channels.mllp import MllpChannel
from engine.delivery.factory import mllp_exchange
from engine.errors import ChannelError
from engine.hl7v2.mllp import Framer, frame
from engine.model import OutboundMessage

MESSAGE = "MSH|^~\\&|REFLOOP|CLINIC|EHR|CLINIC|20250303101500||MDM^T02|OUT-7|P|2.5.1\nEVN|T02\n"


def _item(body: str = MESSAGE) -> OutboundMessage:
    return OutboundMessage(
        outbox_id=7, idempotency_key="k7", channel="ehr", recipient="", body=body
    )


@asynccontextmanager
async def peer(code: str | None) -> AsyncIterator[tuple[int, list[bytes]]]:
    """An MLLP receiver answering each message with MSA-1 ``code`` (None: it closes the
    connection without answering); yields its port and what it received."""
    received: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        framer = Framer()
        while data := await reader.read(65536):
            for message in framer.feed(data):
                received.append(message)
                if code is None:
                    writer.close()
                    return
                ack = "MSH|^~\\&|EHR|CLINIC|REFLOOP|CLINIC|20250303101501||ACK|A1|P|2.5.1\r"
                writer.write(frame(f"{ack}MSA|{code}|OUT-7\r".encode()))
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], received
    finally:
        server.close()
        await server.wait_closed()


def _channel(port: int) -> MllpChannel:
    return MllpChannel("ehr", mllp_exchange("127.0.0.1", port, timeout=5.0, ssl_context=None))


@pytest.mark.parametrize("code", ["AA", "CA"])
def test_an_accept_is_a_receipt_and_the_wire_has_cr_line_ends(code: str) -> None:
    async def go() -> None:
        async with peer(code) as (port, received):
            receipt = await _channel(port).send(_item())
        assert (receipt.provider_message_id, receipt.provider_status) == ("OUT-7", code)
        assert received == [MESSAGE.replace("\n", "\r").encode()]  # §2.5.1: CR terminators

    asyncio.run(go())


@pytest.mark.parametrize("code", ["AE", "AR", "CE", "CR"])
def test_a_refusal_is_not_retried(code: str) -> None:
    async def go() -> None:
        async with peer(code) as (port, _):
            with pytest.raises(ChannelError, match=f"receiver answered {code}") as info:
                await _channel(port).send(_item())
        assert info.value.retryable is False

    asyncio.run(go())


def test_no_answer_is_retried() -> None:
    async def go() -> None:
        async with peer(None) as (port, received):
            with pytest.raises(ChannelError, match="no ACK") as info:
                await _channel(port).send(_item())
        assert info.value.retryable is True and len(received) == 1

    asyncio.run(go())


def test_no_connection_is_retried() -> None:
    with socket.socket() as s:  # a port nobody listens on once this socket closes
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ChannelError, match="cannot connect") as info:
        asyncio.run(_channel(port).send(_item()))
    assert info.value.retryable is True


def test_a_body_that_is_not_hl7_is_not_sent() -> None:
    with pytest.raises(ChannelError, match="not an HL7 message") as info:
        asyncio.run(_channel(1).send(_item("hello")))
    assert info.value.retryable is False
