"""Automated patient calls through Twilio Programmable Voice, with the official ``twilio``
SDK (``client.calls.create(to=..., from_=..., twiml=...)``).

The call speaks one short prompt (TwiML ``<Say>``, twice so a voicemail keeps it whole)
rendered from ``templates/voice/`` by :class:`channels.sms.templates.SmsTemplates`: the
same allow-list and the same static and render-time checks as SMS (practice name and
phone, booking link, a greeting; the specialty category only where
``practice.sms_may_name_specialty``), so a call can no more carry PHI than a text. The
body rules differ (:func:`voice_body_problems`): any printable text, at most
``max_chars`` characters, and it says how to stop the calls (the 2015 FCC healthcare
exemption asks for an easy opt-out in every automated message; referral-standards.md §7).

Why automated: an RCT found that adding live calls to a series of automated calls added
nothing (40 % vs 39 %, Nielson 2018, referral-outcomes.md §4 [25]).

**Consent, suppression and quiet hours are the caller's job**, as for SMS: the
dispatcher places an automated call only to a number with recorded consent
(``sms_consent``: the consent for automated calls and texts) that is not on the
suppression list, inside the practice's contact window (engine.delivery.dispatch).

**Idempotency.** Like Messages, the Calls API has no idempotency key. The outbox id
travels in the StatusCallback URL (``?outbox=<id>``) so call-status callbacks map back to
their row; a row whose result was recorded is never placed again, and a retry after an
*ambiguous* failure (read timeout after the request left) can ring twice: at-least-once,
duplicates confined to that window. Connect failures, 4xx and 5xx (Twilio created no
call) never duplicate. 429 and 5xx are retryable (Retry-After honoured), other 4xx not.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

import httpx
from twilio.base.exceptions import (  # type: ignore[import-untyped]
    TwilioRestException,
    TwilioServiceException,
)
from twilio.twiml.voice_response import VoiceResponse  # type: ignore[import-untyped]

from channels.base import error_for_status
from channels.sms.twilio import (
    ACCOUNT_SID_PATTERN,
    E164_PATTERN,
    TwilioRestChannel,
    outbox_id_from_url,
)
from engine.errors import ChannelError
from engine.model import DeliveryUpdate, OutboundMessage, SendReceipt

log = logging.getLogger(__name__)

CHANNEL: Final = "voice"
# A spoken prompt of ~400 characters takes about 30 s at Twilio's default voice rate.
DEFAULT_MAX_CHARS: Final = 400
# How many times the prompt is spoken (TwiML <Say loop>): a voicemail greeting can eat
# the start of the first one.
SAY_LOOP: Final = 2
# The opt-out instruction every automated call carries ("To stop these calls, ...").
_OPT_OUT_WORDING = re.compile(r"\bstop\b", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class VoiceConfig:
    """``channels.<name>`` of ``type: voice`` in routes.yaml, secrets resolved.

    ``from_number`` is a Twilio voice-capable number (E.164); ``status_callback_url``
    the public URL call-status callbacks go to (optional); ``language`` and ``voice``
    the TwiML ``<Say>`` attributes; ``api_base`` replaces ``https://api.twilio.com``
    and exists for tests only."""

    account_sid: str
    auth_token: str = field(repr=False)
    from_number: str = ""
    status_callback_url: str = ""
    api_base: str = ""
    language: str = "en-US"
    voice: str = ""
    max_chars: int = DEFAULT_MAX_CHARS
    timeout: float = 10.0

    def problems(self) -> list[tuple[str, str]]:
        """Every problem as ``(key, message)``, for ``engine.config`` to locate."""
        out: list[tuple[str, str]] = []
        if not ACCOUNT_SID_PATTERN.fullmatch(self.account_sid):
            out.append(("account_sid", "must be a Twilio Account SID (AC + 32 hex digits)"))
        if not self.auth_token:
            out.append(("auth_token", "is required (use ${env:NAME})"))
        if not E164_PATTERN.fullmatch(self.from_number):
            out.append(("from_number", "must be the E.164 number calls come from (+1555...)"))
        if self.status_callback_url and urlsplit(self.status_callback_url).scheme != "https":
            out.append(("status_callback_url", "must be an https:// URL Twilio can reach"))
        if self.api_base and urlsplit(self.api_base).scheme not in ("http", "https"):
            out.append(("api_base", "must be an http(s) URL"))
        if not 1 <= self.max_chars <= 4000:  # TwiML <Say> takes up to 4,096 characters
            out.append(("max_chars", "must be between 1 and 4000"))
        if self.timeout <= 0:
            out.append(("timeout", "must be positive"))
        return out


def voice_body_problems(body: str, name: str = "", max_chars: int = DEFAULT_MAX_CHARS) -> list[str]:
    """What is wrong with a spoken prompt (empty list: fine): empty, longer than
    ``max_chars``, control characters, or no opt-out instruction ("stop").
    ``name`` (the template) is unused: every call carries the opt-out. Messages name
    rules, never the text."""
    del name
    out: list[str] = []
    if not body.strip():
        out.append("body is empty")
    if len(body) > max_chars:
        out.append(f"body is {len(body)} characters, over the limit of {max_chars}")
    if any(not c.isprintable() for c in body):
        out.append("body has control characters")
    if not _OPT_OUT_WORDING.search(body):
        out.append('a call must say how to stop the calls ("To stop these calls, ...")')
    return out


def twiml_say(text: str, *, language: str = "en-US", voice: str = "") -> str:
    """The TwiML document a call runs: ``text`` spoken :data:`SAY_LOOP` times. The SDK
    escapes the text (XML)."""
    response = VoiceResponse()
    attrs: dict[str, Any] = {"language": language, "loop": SAY_LOOP}
    if voice:
        attrs["voice"] = voice
    response.say(text, **attrs)
    return str(response)


class TwilioVoice(TwilioRestChannel):
    """The automated-call :class:`~channels.base.Channel` (the SDK client, closing and
    the status callback as :class:`channels.sms.twilio.TwilioRestChannel`)."""

    name = CHANNEL

    def __init__(
        self,
        cfg: VoiceConfig,
        *,
        http: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(cfg, http=http, clock=clock)
        self.cfg = cfg

    def request_params(self, item: OutboundMessage) -> dict[str, Any]:
        """The keyword arguments for ``calls.create`` (exposed for tests and docs)."""
        return {
            "to": item.recipient,
            "from_": self.cfg.from_number,
            "twiml": twiml_say(item.body, language=self.cfg.language, voice=self.cfg.voice),
            "status_callback": self.status_callback(item),
        }

    async def send(self, item: OutboundMessage) -> SendReceipt:
        """Place the call speaking ``item.body`` to ``item.recipient`` (E.164). Raises
        :class:`ChannelError`: not retryable for a prompt that breaks the rules, a
        recipient that is not E.164, or a 4xx; retryable for 429/5xx/transport."""
        problems = voice_body_problems(item.body, item.kind, self.cfg.max_chars)
        if problems:
            raise ChannelError(f"{CHANNEL}: prompt refused: {'; '.join(problems)}", retryable=False)
        if not E164_PATTERN.fullmatch(item.recipient):
            raise ChannelError(f"{CHANNEL}: recipient is not an E.164 number", retryable=False)
        try:
            call = await self._client.calls.create_async(**self.request_params(item))
        except (TwilioRestException, TwilioServiceException) as exc:
            # ``from None``: Twilio's message text can echo the number called.
            code = str(exc.code) if exc.code else ""
            raise error_for_status(CHANNEL, int(exc.status), code=code) from None
        sid = str(call.sid or "")
        status = str(call.status or "")
        log.info("outbox %d: voice call placed sid=%s status=%s", item.outbox_id, sid, status)
        return SendReceipt(
            outbox_id=item.outbox_id,
            idempotency_key=item.idempotency_key,
            channel=item.channel,
            provider_message_id=sid,
            provider_status=status,
        )


# ---------------------------------------------------------------------------
# Call-status callbacks (POST to the StatusCallback URL, ``/hooks/twilio/voice-status``)

# Twilio's CallStatus lifecycle; the final states share the top rank, so a late or
# repeated callback never moves a row backwards and finals never replace each other.
_CALL_RANK: Final[dict[str, int]] = {
    "queued": 0,
    "initiated": 1,
    "ringing": 2,
    "in-progress": 3,
    "completed": 4,
    "busy": 4,
    "no-answer": 4,
    "canceled": 4,
    "failed": 4,
}
# The call could not be placed at all (an unreachable or invalid number): the rotation
# moves on, as for an undelivered text. ``busy`` and ``no-answer`` are recorded only: the
# next step's timer tries again (live calls added nothing to a series of automated
# ones, [25]; a person is asked only where the machine has nothing left to try).
CALL_FAILED: Final = frozenset({"failed"})


def newer_call_status(old: str, new: str) -> bool:
    """True when ``new`` should replace the recorded ``old`` call status."""
    new_rank = _CALL_RANK.get(new.strip().lower(), -1)
    return new_rank >= 0 and new_rank > _CALL_RANK.get(old.strip().lower(), -1)


def parse_call_status(params: dict[str, str], *, url: str) -> DeliveryUpdate:
    """A call-status update from a (verified) callback; ``url`` is the public URL Twilio
    called, whose ``outbox`` query parameter names the row."""
    return DeliveryUpdate(
        channel=CHANNEL,
        outbox_id=outbox_id_from_url(url),
        provider_message_id=params.get("CallSid", ""),
        status=params.get("CallStatus", "").strip().lower(),
        error_code=params.get("ErrorCode", "") or params.get("SipResponseCode", ""),
    )
