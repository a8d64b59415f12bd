"""HL7 v2 over MLLP to an EHR worklist or interface: coordinator tasks, referrer notices,
and the messages a route's ``forward`` queued.

The channel does not speak MLLP itself (channels import only ``engine.model`` and
``engine.errors``): it is handed an :data:`Exchange`, one message out and its ACK back
on a fresh connection, which engine.delivery.factory builds over engine.hl7v2.client.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Awaitable, Callable
from typing import Final

from engine.errors import ChannelError, EngineError
from engine.model import OutboundMessage, SendReceipt

# HL7 v2.5.1 §2.9.2, Table 0008: AA/CA accept; AE/AR/CE/CR error or reject.
ACCEPT: Final = frozenset({"AA", "CA"})

Exchange = Callable[[bytes], Awaitable[tuple[str, str]]]
"""Send one HL7 message (CR or LF line ends) on a new connection and wait for its ACK:
(MSA-1, or "" when no answer came; MSH-10 of the message sent). Raises EngineError when
it cannot connect."""


class MllpChannel:
    """``item.body`` is the rendered HL7 message; templates should put the outbox id in
    MSH-10 (``{{ outbox_id }}``) so the receiver's own duplicate check (same MSH-10) makes
    a resend harmless. AA/CA is a receipt; AE/AR/CE/CR are not retryable (the receiver
    refused this message); no answer (timeout, refused, closed) is."""

    def __init__(self, name: str, exchange: Exchange) -> None:
        self.name = name
        self.exchange = exchange

    async def send(self, item: OutboundMessage) -> SendReceipt:
        raw = forwarded(item)
        raw = item.body.encode("utf-8") if raw is None else raw.removeprefix(b"\xef\xbb\xbf")
        if not raw.startswith(b"MSH"):
            raise ChannelError(f"{self.name}: body is not an HL7 message", retryable=False)
        try:
            code, control_id = await self.exchange(raw)
        except EngineError:
            raise ChannelError(f"{self.name}: cannot connect", retryable=True) from None
        if code in ACCEPT:
            return SendReceipt(
                outbox_id=item.outbox_id,
                idempotency_key=item.idempotency_key,
                channel=item.channel,
                provider_message_id=control_id,
                provider_status=code,
            )
        if not code:
            raise ChannelError(f"{self.name}: no ACK; outcome unknown", retryable=True)
        raise ChannelError(f"{self.name}: receiver answered {code}", retryable=False)


def forwarded(item: OutboundMessage) -> bytes | None:
    """The message a route's ``forward`` queued (payload ``hl7_b64``): the bytes as
    received, so the receiver sees the sender's own encoding and MSH-10."""
    if '"hl7_b64"' not in item.payload:
        return None
    try:
        return base64.b64decode(json.loads(item.payload)["hl7_b64"], validate=True)
    except (ValueError, KeyError, TypeError):
        raise ChannelError("forward: the queued message is unreadable", retryable=False) from None
