"""The specialist packet as the dispatcher sends it: the PDF rendered from the message
that opened the referral, the documents it carried, optionally the original HL7 message
and a signed confirmation link.

:class:`PacketBuilder` is what :class:`engine.delivery.dispatch.Renderer` calls for a
``specialist-packet`` row (on any channel: Direct, fax, a worklist). It reads the
referral's ``referral-created`` message from the store (``engine.store.packets``); an
HL7 v2 message is read by :func:`engine.delivery.packet_source.packet_data_from_hl7`, anything
else (a FHIR ServiceRequest, an operator-made referral) falls back to the referral's own
detail columns. The PDF comes from :mod:`channels.packet`.

The confirmation link (``/confirm/<token>``, :mod:`channels.confirm`) is added when
``http.confirm_key`` and ``http.public_url`` are set; it expires after ``confirm_ttl``
(default 30 days) and names only refloop's referral id.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import replace
from typing import Final

from channels import confirm
from channels.direct.send import HL7_V2_TYPE
from channels.packet import PacketRenderer
from engine.clock import Clock
from engine.delivery.packet_source import DEFAULT_CONFIRMATION, packet_data_from_hl7
from engine.errors import EngineError
from engine.model import Attachment, PacketData, Provider
from engine.store import packets as store
from engine.store.db import Database
from engine.store.outbox import Item
from engine.store.referrals import ReferralRow

log = logging.getLogger(__name__)

PACKET_TEMPLATES: Final = frozenset({"specialist-packet"})
DEFAULT_CONFIRM_TTL: Final = 30 * 86400.0
LINK_LINE: Final = (
    "Please confirm receipt of this referral with the link below, or by replying to this message."
)
BODY: Final = (
    "Referral packet attached (referral.pdf). Please confirm receipt by replying to this "
    "message{link}."
)


class PacketBuilder:
    """Builds a packet's attachments and cover text for one outbox row."""

    def __init__(
        self,
        db: Database,
        clock: Clock,
        *,
        renderer: PacketRenderer | None = None,
        confirm_key: bytes = b"",
        public_url: str = "",
        confirm_ttl: float = DEFAULT_CONFIRM_TTL,
        attach_original: Collection[str] = (),
    ) -> None:
        self.db = db
        self.clock = clock
        self.renderer = renderer or PacketRenderer()
        self.confirm_key = confirm_key
        self.public_url = public_url.rstrip("/")
        self.confirm_ttl = confirm_ttl
        self.attach_original = frozenset(attach_original)

    def confirmation_url(self, referral_id: int) -> str:
        if len(self.confirm_key) < confirm.MIN_KEY_BYTES or not self.public_url:
            return ""
        token = confirm.make_token(
            str(referral_id), self.clock.now() + self.confirm_ttl, self.confirm_key
        )
        return confirm.confirm_url(self.public_url, token)

    def data(self, referral: ReferralRow, raw: bytes | None, url: str) -> PacketData:
        """The packet's values: the message's own (documents, notes, insurance, ...), with
        what the route extracted into the referral row (reason, urgency, needed-by) in
        place of the message reader's guesses, so the packet says what the referral says."""
        line = LINK_LINE if url else DEFAULT_CONFIRMATION
        if raw is not None and raw.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"MSH"):
            try:
                data = packet_data_from_hl7(raw, confirmation_line=line, confirmation_url=url)
            except EngineError:
                log.warning("referral %d: packet source message unreadable", referral.id)
            else:
                return _as_recorded(data, referral)
        d = referral.details

        def party(prefix: str) -> Provider:
            return Provider(
                name=str(d.get(f"{prefix}_name") or ""),
                npi=str(d.get(f"{prefix}_npi") or ""),
                organisation=str(d.get(f"{prefix}_organisation") or ""),
                direct_address=str(d.get(f"{prefix}_direct_address") or ""),
                fax=str(d.get(f"{prefix}_fax") or ""),
                phone=str(d.get(f"{prefix}_phone") or ""),
            )

        return PacketData(
            referral_id=referral.placer_number,
            message_type="",
            specialty=str(d.get("specialty") or ""),
            reason=str(d.get("reason") or ""),
            urgency=str(d.get("priority") or "routine"),
            needed_by=str(d.get("needed_by") or ""),
            referring=party("referring"),
            specialist=party("specialist"),
            confirmation_line=line,
            confirmation_url=url,
        )

    def build(self, item: Item, referral: ReferralRow) -> tuple[str, tuple[Attachment, ...]]:
        """(cover text, attachments): ``referral.pdf`` first (what a fax sends), then the
        documents the referral carried, then ``original.hl7`` when the channel asks for
        it. Raises ChannelError (not retryable) when the template does not render."""
        raw = store.source_message(self.db.conn, referral.id)
        url = self.confirmation_url(referral.id)
        data = self.data(referral, raw, url)
        pdf = self.renderer.render_pdf(data)
        attachments = [Attachment("referral.pdf", "application/pdf", pdf), *data.attachments]
        is_hl7 = raw is not None and raw.lstrip().startswith(b"MSH")
        if item.channel in self.attach_original and raw is not None and is_hl7:
            attachments.append(Attachment("original.hl7", HL7_V2_TYPE, raw))
        body = BODY.format(link=f" or with this link: {url}" if url else "")
        return body, tuple(attachments)


def _as_recorded(data: PacketData, referral: ReferralRow) -> PacketData:
    """``data`` with the referral row's reason, priority and needed-by date where the
    route recorded one: one extraction (routes.yaml) feeds the row and the packet."""
    d = referral.details
    return replace(
        data,
        reason=str(d.get("reason") or data.reason),
        urgency=str(d.get("priority") or data.urgency),
        needed_by=str(d.get("needed_by") or data.needed_by),
    )
