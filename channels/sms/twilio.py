"""SMS through Twilio, with the official ``twilio`` SDK, plus the pure helpers the
``/hooks/twilio/*`` webhooks need (signature, reply keywords, status ordering).

Texts are non-PHI by construction: bodies come from :mod:`channels.sms.templates`, which
renders with an allow-listed context only. :meth:`TwilioSms.send` re-checks every body
(GSM-7, length, opt-out wording) as a last line of defence.

**Consent and suppression are the caller's job.** The dispatcher sends SMS only to a
number with recorded consent that is not on refloop's suppression list; this module
cannot see the store. If Twilio itself refuses because the number opted out (error
21610) :class:`RecipientOptedOut` is raised so the caller can add it to the list.

**Idempotency.** Twilio's Messages API has no idempotency key. Each send puts the outbox
id in the StatusCallback URL (``...?outbox=<id>``) so every delivery callback maps back
to its row, but a retry after an *ambiguous* failure (read timeout, dropped connection
after the request left) can send the text twice: the guarantee is at-least-once, with
duplicates confined to that window. Connect failures, 4xx and 5xx (Twilio created
nothing) never duplicate. Reference: referral-standards.md §7.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import httpx
from twilio.base import values  # type: ignore[import-untyped]
from twilio.base.exceptions import (  # type: ignore[import-untyped]
    TwilioRestException,
    TwilioServiceException,
)
from twilio.http import AsyncHttpClient  # type: ignore[import-untyped]
from twilio.http.response import Response as TwilioResponse  # type: ignore[import-untyped]
from twilio.request_validator import (  # type: ignore[import-untyped]
    HMAC_SHA1,
    RequestValidator,
    get_signature_algorithm,
)
from twilio.rest import Client  # type: ignore[import-untyped]
from twilio.twiml.messaging_response import MessagingResponse  # type: ignore[import-untyped]

from channels.base import error_for_status, error_for_transport
from engine.errors import ChannelError
from engine.model import DeliveryUpdate, OutboundMessage, SendReceipt, SmsReply

log = logging.getLogger(__name__)

CHANNEL: Final = "sms"
TWILIO_API_BASE: Final = "https://api.twilio.com"
SIGNATURE_HEADER: Final = "X-Twilio-Signature"
SIGNATURE_SETTINGS_HEADER: Final = "X-Twilio-Webhooks-Signature-Settings"
# Twilio error 21610: "Attempt to send to unsubscribed recipient" (the number replied STOP).
TWILIO_UNSUBSCRIBED: Final = 21610
# The query parameter of the StatusCallback URL that carries the outbox id.
OUTBOX_PARAM: Final = "outbox"
# The kind (and template name) of the one text that confirms an opt-out: it carries the
# opt-in instruction ("START") instead of the opt-out one (FCC 24-18 allows one
# confirmation text).
OPT_OUT_CONFIRMATION: Final = "stop_confirm"

_ACCOUNT_SID = re.compile(r"AC[0-9a-fA-F]{32}")
_SERVICE_SID = re.compile(r"MG[0-9a-fA-F]{32}")
_E164 = re.compile(r"\+[1-9][0-9]{1,14}")
_ALPHANUMERIC_SENDER = re.compile(r"(?=.*[A-Za-z])[A-Za-z0-9 ]{1,11}")
# Shared with the voice channel (channels.voice.twilio), which uses the same account.
ACCOUNT_SID_PATTERN: Final = _ACCOUNT_SID
E164_PATTERN: Final = _E164


class RecipientOptedOut(ChannelError):
    """Twilio refused the send because the recipient opted out (error 21610).

    Never retryable; the caller should put the number on refloop's suppression list.
    """

    def __init__(self) -> None:
        super().__init__(
            f"{CHANNEL}: recipient has opted out (Twilio error {TWILIO_UNSUBSCRIBED})",
            retryable=False,
        )


# ---------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True, slots=True)
class SmsConfig:
    """``channels.sms`` in routes.yaml, secrets already resolved by ``engine.config``.

    Either ``messaging_service_sid`` (recommended: Advanced Opt-Out, sender pool) or
    ``from_number`` is required; with both, Twilio uses that sender from the service's
    pool. ``status_callback_url`` is the public URL of ``/hooks/twilio/status`` exactly
    as Twilio will call it (it is part of the signature). ``api_base`` replaces
    ``https://api.twilio.com`` and exists for tests only.
    """

    account_sid: str
    auth_token: str = field(repr=False)
    messaging_service_sid: str = ""
    from_number: str = ""
    status_callback_url: str = ""
    api_base: str = ""
    max_chars: int = 160
    timeout: float = 10.0

    def problems(self) -> list[tuple[str, str]]:
        """Every problem as ``(key, message)``, for ``engine.config`` to locate."""
        out: list[tuple[str, str]] = []
        if not _ACCOUNT_SID.fullmatch(self.account_sid):
            out.append(("account_sid", "must be a Twilio Account SID (AC + 32 hex digits)"))
        if not self.auth_token:
            out.append(("auth_token", "is required (use ${env:NAME})"))
        if not self.messaging_service_sid and not self.from_number:
            out.append(("messaging_service_sid", "messaging_service_sid or from is required"))
        if self.messaging_service_sid and not _SERVICE_SID.fullmatch(self.messaging_service_sid):
            out.append(("messaging_service_sid", "must be a Messaging Service SID (MG...)"))
        if self.from_number and not (
            _E164.fullmatch(self.from_number) or _ALPHANUMERIC_SENDER.fullmatch(self.from_number)
        ):
            out.append(("from", "must be an E.164 number or an alphanumeric sender id"))
        if self.status_callback_url and urlsplit(self.status_callback_url).scheme != "https":
            out.append(("status_callback_url", "must be an https:// URL Twilio can reach"))
        if self.api_base and urlsplit(self.api_base).scheme not in ("http", "https"):
            out.append(("api_base", "must be an http(s) URL"))
        if not 1 <= self.max_chars <= 1600:
            out.append(("max_chars", "must be between 1 and 1600"))
        if self.timeout <= 0:
            out.append(("timeout", "must be positive"))
        return out


# ---------------------------------------------------------------------------
# The channel


class HttpxTwilioTransport(AsyncHttpClient):
    """The twilio SDK's async HTTP client interface, implemented over ``httpx``.

    Why not ``asyncio.to_thread`` around the sync client, or the SDK's own
    ``AsyncTwilioHttpClient``? Both work, but this way (1) no thread pool and
    cancellation works, (2) one HTTP stack, injected like every other dependency, so
    tests and the daemon share a client and its timeouts, (3) the SDK's own client
    retries on its own (aiohttp-retry) and logs request headers at INFO, while retries
    belong to the outbox and logs must stay free of PHI, and (4) the test-only API base
    override is a plain host rewrite here. The SDK still builds every request (paths,
    parameter names and serialisation, auth, User-Agent) and parses every reply.

    429 and 5xx become a retryable :class:`ChannelError` here, where the Retry-After
    header is still at hand; other statuses go back to the SDK, which raises
    ``TwilioRestException`` with Twilio's error code.
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        api_base: str = "",
        timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
        channel: str = CHANNEL,
    ) -> None:
        super().__init__(logger=log, is_async=True, timeout=timeout)
        self.channel = channel  # names the channel in error reasons (sms, voice)
        self._http = http
        self._base = urlsplit(api_base) if api_base else None
        self._clock = clock

    def rebase(self, url: str) -> str:
        """``url`` with its scheme and host replaced by the API base override, if any."""
        if self._base is None:
            return url
        parts = urlsplit(url)
        path = self._base.path.rstrip("/") + parts.path
        return urlunsplit((self._base.scheme, self._base.netloc, path, parts.query, ""))

    async def request(
        self,
        method: str,
        uri: str,
        params: dict[str, object] | None = None,
        data: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        timeout: float | None = None,
        allow_redirects: bool = False,
    ) -> Any:
        try:
            response = await self._http.request(
                method.upper(),
                self.rebase(uri),
                params=params,  # type: ignore[arg-type]
                data=data,
                headers=headers,
                auth=auth,
                timeout=timeout or self.timeout,
                follow_redirects=allow_redirects,
            )
        except httpx.HTTPError as exc:
            raise error_for_transport(self.channel, exc) from exc
        if response.status_code == 429 or response.status_code >= 500:
            raise error_for_status(
                self.channel,
                response.status_code,
                retry_after=response.headers.get("Retry-After"),
                now=self._clock(),
                code=_twilio_code(response.text),
            )
        return TwilioResponse(response.status_code, response.text, response.headers)


class TwilioAccount(Protocol):
    """What a Twilio REST channel's settings must carry (SmsConfig, VoiceConfig)."""

    @property
    def account_sid(self) -> str: ...
    @property
    def auth_token(self) -> str: ...
    @property
    def api_base(self) -> str: ...
    @property
    def timeout(self) -> float: ...
    @property
    def status_callback_url(self) -> str: ...


class TwilioRestChannel:
    """What every Twilio REST channel shares (SMS here, automated calls in
    channels.voice.twilio): the SDK client over :class:`HttpxTwilioTransport`, closing,
    and the status callback URL that carries the outbox id.

    ``http`` is the shared ``httpx.AsyncClient`` (the daemon's; a test's with hooks);
    the caller owns and closes it. When omitted one is made and :meth:`aclose` closes it.
    """

    name: str = CHANNEL  # names the channel in error reasons

    def __init__(
        self,
        cfg: TwilioAccount,
        *,
        http: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._own_http = http is None
        self._http = http if http is not None else httpx.AsyncClient()
        self.transport = HttpxTwilioTransport(
            self._http, api_base=cfg.api_base, timeout=cfg.timeout, clock=clock, channel=self.name
        )
        self._client = twilio_client(cfg.account_sid, cfg.auth_token, self.transport)
        self._callback_base = cfg.status_callback_url

    async def aclose(self) -> None:
        if self._own_http:
            await self._http.aclose()

    def status_callback(self, item: OutboundMessage) -> Any:
        """The status callback URL for ``item`` (its outbox id in the query), or unset."""
        if not self._callback_base:
            return values.unset
        return status_callback_url(self._callback_base, item.outbox_id)


class TwilioSms(TwilioRestChannel):
    """The SMS :class:`~channels.base.Channel` (see :class:`TwilioRestChannel`)."""

    def __init__(
        self,
        cfg: SmsConfig,
        *,
        http: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(cfg, http=http, clock=clock)
        self.cfg = cfg

    def request_params(self, item: OutboundMessage) -> dict[str, Any]:
        """The keyword arguments for ``messages.create`` (exposed for tests and docs)."""
        return {
            "to": item.recipient,
            "body": item.body,
            "from_": self.cfg.from_number or values.unset,
            "messaging_service_sid": self.cfg.messaging_service_sid or values.unset,
            "status_callback": self.status_callback(item),
        }

    async def send(self, item: OutboundMessage) -> SendReceipt:
        """Send ``item.body`` to ``item.recipient`` (E.164). See the module docstring for
        the idempotency guarantee; raises :class:`ChannelError` (never retryable for a
        body that breaks the SMS rules or a 4xx, :class:`RecipientOptedOut` for 21610)."""
        problems = sms_body_problems(
            item.body,
            max_chars=self.cfg.max_chars,
            opt_out_confirmation=item.kind == OPT_OUT_CONFIRMATION,
        )
        if problems:
            raise ChannelError(f"{CHANNEL}: body refused: {'; '.join(problems)}", retryable=False)
        if not _E164.fullmatch(item.recipient):
            raise ChannelError(f"{CHANNEL}: recipient is not an E.164 number", retryable=False)
        try:
            message = await self._client.messages.create_async(**self.request_params(item))
        except TwilioRestException as exc:
            # ``from None``: Twilio's message text can echo the recipient's number.
            raise _rest_error(exc.status, exc.code) from None
        except TwilioServiceException as exc:
            raise _rest_error(exc.status, exc.code) from None
        sid = str(message.sid or "")
        status = str(message.status or "")
        log.info(
            "outbox %d: sms accepted sid=%s status=%s segments=%d",
            item.outbox_id,
            sid,
            status,
            segments(item.body),
        )
        return SendReceipt(
            outbox_id=item.outbox_id,
            idempotency_key=item.idempotency_key,
            channel=item.channel,
            provider_message_id=sid,
            provider_status=status,
        )


def _rest_error(status: int, code: object) -> ChannelError:
    if code == TWILIO_UNSUBSCRIBED or str(code) == str(TWILIO_UNSUBSCRIBED):
        return RecipientOptedOut()
    return error_for_status(CHANNEL, int(status), code=str(code) if code else "")


def twilio_client(cfg_sid: str, token: str, transport: HttpxTwilioTransport) -> Client:
    """The SDK client over ``transport``. A non-empty ``environment`` keeps the SDK from
    reading TWILIO_EDGE/REGION from os.environ: only engine.config reads the environment."""
    return Client(
        cfg_sid,
        token,
        http_client=transport,
        environment={"TWILIO_EDGE": "", "TWILIO_REGION": ""},
    )


def _twilio_code(text: str) -> str:
    match = re.search(r'"code"\s*:\s*(\d+)', text)
    return match.group(1) if match else ""


def status_callback_url(base: str, outbox_id: int) -> str:
    """``base`` with ``outbox=<id>`` added to its query, so a delivery callback names its
    outbox row. The query is covered by Twilio's signature, so it cannot be forged."""
    parts = urlsplit(base)
    query = [(k, v) for k, v in parse_qs(parts.query, keep_blank_values=True).items()]
    pairs = [(k, v) for k, vs in query for v in vs if k != OUTBOX_PARAM]
    pairs.append((OUTBOX_PARAM, str(outbox_id)))
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(pairs), ""))


def outbox_id_from_url(url: str) -> int:
    """The outbox id a StatusCallback URL carries; 0 when absent or malformed."""
    values_ = parse_qs(urlsplit(url).query).get(OUTBOX_PARAM, [])
    return int(values_[0]) if values_ and values_[0].isdigit() else 0


# ---------------------------------------------------------------------------
# GSM-7 and segments (3GPP TS 23.038 §6.2.1 default alphabet and extension table)

GSM7_BASIC: Final = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
# Each costs two septets (ESC + char).
GSM7_EXTENSION: Final = frozenset("^{}\\[~]|€\f")
# Single-part and per-part (after the 6-octet UDH) capacities, 3GPP TS 23.040 §9.2.3.24.
GSM7_SINGLE: Final = 160
GSM7_PART: Final = 153
UCS2_SINGLE: Final = 70
UCS2_PART: Final = 67


def e164(number: str, *, country_code: str = "1") -> str:
    """A phone number as Twilio writes it (E.164: ``+15555550100``). EHRs send numbers
    in every format (``(555) 555-0100``, ``555^5550100`` components joined, with or
    without the country code); a number without ``+`` and with as many digits as a
    national number (10 for NANP) gets ``country_code``. Returns "" when there are no
    digits. Used for both what we send to and what replies come from, so they match."""
    text = number.strip()
    digits = re.sub(r"\D", "", text)
    if not digits:
        return ""
    if text.startswith("+"):
        return f"+{digits}"
    if text.startswith("00"):
        return f"+{digits[2:]}"
    if len(digits) == 10 and country_code == "1":
        return f"+1{digits}"
    if digits.startswith(country_code) and len(digits) > 10:
        return f"+{digits}"
    return f"+{country_code}{digits}"


def is_gsm7(text: str) -> bool:
    """True when every character is in the GSM 03.38 default alphabet or its extension."""
    return all(c in GSM7_BASIC or c in GSM7_EXTENSION for c in text)


def gsm7_length(text: str) -> int:
    """Length in septets (extension characters count two). Only meaningful if is_gsm7."""
    return sum(2 if c in GSM7_EXTENSION else 1 for c in text)


def segments(text: str) -> int:
    """How many SMS parts ``text`` needs: GSM-7 when it fits the alphabet, else UCS-2.

    Multi-part splitting never breaks an escape pair or a UTF-16 surrogate pair.
    """
    if not text:
        return 1
    if is_gsm7(text):
        units = [2 if c in GSM7_EXTENSION else 1 for c in text]
        single, part = GSM7_SINGLE, GSM7_PART
    else:
        units = [2 if ord(c) > 0xFFFF else 1 for c in text]
        single, part = UCS2_SINGLE, UCS2_PART
    if sum(units) <= single:
        return 1
    count, used = 1, 0
    for u in units:
        if used + u > part:
            count, used = count + 1, 0
        used += u
    return count


_OPT_OUT_WORDING = re.compile(r"\bSTOP\b")
_OPT_IN_WORDING = re.compile(r"\bSTART\b")


def sms_body_problems(
    body: str, *, max_chars: int = GSM7_SINGLE, opt_out_confirmation: bool = False
) -> list[str]:
    """What is wrong with an SMS body under refloop's rules (empty list: fine).

    Rules: GSM-7 only; at most ``max_chars`` septets; carries the opt-out instruction
    ("STOP"), except the opt-out confirmation itself, which carries "START" instead.
    Messages name rules, never the body.
    """
    out: list[str] = []
    if not body.strip():
        out.append("body is empty")
    if not is_gsm7(body):
        out.append("body has characters outside the GSM-7 alphabet")
    elif gsm7_length(body) > max_chars:
        out.append(f"body is {gsm7_length(body)} GSM-7 characters, over the limit of {max_chars}")
    if opt_out_confirmation:
        if not _OPT_IN_WORDING.search(body):
            out.append('opt-out confirmation must say how to opt back in ("START")')
    elif not _OPT_OUT_WORDING.search(body):
        out.append('body must carry opt-out wording ("Reply STOP to opt out")')
    return out


# ---------------------------------------------------------------------------
# Inbound replies (FCC 24-18, 47 CFR 64.1200(a)(10); Twilio default keywords)

Keyword = Literal["stop", "start", "help", "yes", "other"]

# Whole-message keywords (after trimming and case-folding). Twilio's defaults for long
# codes plus the FCC's per-se revocation words.
STOP_KEYWORDS: Final = frozenset(
    {"stop", "stopall", "unsubscribe", "cancel", "end", "quit", "revoke", "optout", "opt out"}
)
START_KEYWORDS: Final = frozenset({"start", "unstop"})
HELP_KEYWORDS: Final = frozenset({"help", "info"})
YES_KEYWORDS: Final = frozenset({"yes", "y"})
# A reply whose first word is one of these is an opt-out whatever follows ("STOP please").
_STOP_FIRST_WORDS: Final = frozenset({"stop", "stopall", "unsubscribe", "revoke", "optout"})
# Plain-language revocations ("any reasonable means", FCC 24-18).
_PLAIN_STOP = re.compile(
    r"\b(?:"
    r"opt(?:\s|-)?(?:me\s+)?out"
    r"|unsubscribe"
    r"|(?:stop|quit|cease)\s+(?:texting|messaging|sending|contacting|txting|texts?|messages?)"
    r"|(?:don'?t|do\s+not|dont|never)\s+(?:text|message|contact|txt|sms)"
    r"|no\s+more\s+(?:texts?|messages?|txts?|sms)"
    r"|(?:remove|take)\s+me\s+(?:off|from)"
    r"|leave\s+me\s+alone"
    r")\b"
)
_WORD = re.compile(r"[a-z0-9']+")


def _normalise(body: str) -> str:
    text = body.casefold().replace("\u2019", "'")
    return " ".join(_WORD.findall(text))


def classify_reply(body: str) -> Keyword:
    """Classify a patient's SMS reply. Opt-out wins over everything else (revocation
    must be honoured; a false positive only suppresses texts), then opt-in, HELP, YES.

    ``"STOP"``, ``"stop please"``, ``"please stop texting me"`` → ``"stop"``;
    ``"START"``/``"UNSTOP"`` → ``"start"``; ``"HELP"``/``"INFO"`` → ``"help"``;
    ``"YES"``, ``"y"``, ``"Yes please!"`` → ``"yes"``; anything else → ``"other"``.
    CANCEL, END and QUIT count only as the whole message ("I need to cancel my
    appointment" is not an opt-out).
    """
    text = _normalise(body)
    if not text:
        return "other"
    words = text.split()
    if text in STOP_KEYWORDS or words[0] in _STOP_FIRST_WORDS or _PLAIN_STOP.search(text):
        return "stop"
    if text in START_KEYWORDS:
        return "start"
    if text in HELP_KEYWORDS or (words[0] == "help" and len(words) <= 2):
        return "help"
    if text in YES_KEYWORDS or (words[0] in YES_KEYWORDS and len(words) <= 3):
        return "yes"
    return "other"


# Twilio's Advanced Opt-Out adds OptOutType to the inbound webhook.
_OPT_OUT_TYPES: Final[dict[str, Keyword]] = {"STOP": "stop", "START": "start", "HELP": "help"}


def parse_inbound_sms(params: Mapping[str, str]) -> SmsReply:
    """The patient's reply from a (verified) ``/hooks/twilio/sms`` POST. Twilio's own
    ``OptOutType`` (Advanced Opt-Out) wins over our classification when present."""
    body = params.get("Body", "")
    keyword = _OPT_OUT_TYPES.get(params.get("OptOutType", "").upper()) or classify_reply(body)
    return SmsReply(
        provider_message_id=params.get("MessageSid", "") or params.get("SmsSid", ""),
        from_number=params.get("From", ""),
        to_number=params.get("To", ""),
        keyword=keyword,
        body=body,
    )


def twiml_message(text: str) -> str:
    """A TwiML ``<Response><Message>`` answering an inbound SMS with ``text``
    (the HELP reply, rendered from ``templates/sms/help.txt``)."""
    response = MessagingResponse()
    response.message(text)
    return str(response)


def twiml_empty() -> str:
    """A TwiML document that sends no reply."""
    return str(MessagingResponse())


# ---------------------------------------------------------------------------
# Delivery status (Twilio Message status values; callbacks arrive out of order)

MessageStatus = Literal[
    "scheduled",
    "accepted",
    "queued",
    "sending",
    "sent",
    "partially_delivered",
    "delivered",
    "undelivered",
    "failed",
    "canceled",
    "read",
]
# Twilio's lifecycle: a scheduled message becomes accepted, a Messaging Service send
# starts at accepted, then queued → sending → sent → a final state; read (WhatsApp/RCS)
# follows delivered. Final states share a rank, so none replaces another.
_STATUS_RANK: Final[dict[str, int]] = {
    "scheduled": 0,
    "accepted": 1,
    "queued": 2,
    "sending": 3,
    "sent": 4,
    "partially_delivered": 5,
    "delivered": 6,
    "undelivered": 6,
    "failed": 6,
    "canceled": 6,
    "read": 7,
}
FAILED_STATUSES: Final = frozenset({"failed", "undelivered"})


def status_rank(status: str) -> int:
    """Position of a Twilio message status in its lifecycle; -1 when unknown."""
    return _STATUS_RANK.get(status.strip().lower(), -1)


def newer_status(old: str, new: str) -> bool:
    """True when ``new`` should replace the recorded ``old`` status: it is known and
    strictly later in the lifecycle. ``sent`` after ``delivered`` is ignored, as is
    ``failed`` after ``delivered`` (final states never replace each other)."""
    new_rank = status_rank(new)
    return new_rank >= 0 and new_rank > status_rank(old)


def is_delivery_failure(status: str) -> bool:
    """``failed``/``undelivered``: the referral's rotation moves to the next channel."""
    return status.strip().lower() in FAILED_STATUSES


def parse_status_callback(params: Mapping[str, str], *, url: str) -> DeliveryUpdate:
    """A delivery update from a (verified) ``/hooks/twilio/status`` POST; ``url`` is the
    public URL Twilio called, whose ``outbox`` query parameter names the row."""
    return DeliveryUpdate(
        channel=CHANNEL,
        outbox_id=outbox_id_from_url(url),
        provider_message_id=params.get("MessageSid", "") or params.get("SmsSid", ""),
        status=(params.get("MessageStatus", "") or params.get("SmsStatus", "")).lower(),
        error_code=params.get("ErrorCode", ""),
    )


# ---------------------------------------------------------------------------
# Webhook signature (X-Twilio-Signature)

Params = Mapping[str, str] | Iterable[tuple[str, str]]


class _MultiParams:
    """Repeated form fields (MediaUrl0..., or a param sent twice) for RequestValidator,
    which reads values through ``getall`` when a mapping has it."""

    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        self._values: dict[str, list[str]] = {}
        for key, value in pairs:
            self._values.setdefault(key, []).append(value)

    def __iter__(self) -> Any:
        return iter(self._values)

    def getall(self, key: str) -> list[str]:
        return self._values[key]


def _pairs(params: Params) -> list[tuple[str, str]]:
    if isinstance(params, Mapping):
        getall = getattr(params, "getall", None)
        if getall is not None:  # aiohttp MultiDictProxy keeps repeated fields
            return [(k, v) for k in dict.fromkeys(params) for v in getall(k)]
        return list(params.items())
    return list(params)


def signature_algorithm(settings_header: str | None) -> str:
    """The HMAC algorithm named by ``X-Twilio-Webhooks-Signature-Settings`` (HMAC_SHA1
    when the header is absent: the Auth Token signature)."""
    return str(get_signature_algorithm(settings_header or ""))


def verify_twilio_signature(
    url: str,
    params: Params | str | None,
    signature: str | None,
    auth_token: str,
    *,
    algorithm: str = HMAC_SHA1,
) -> bool:
    """True when ``signature`` (the ``X-Twilio-Signature`` header) signs this request.

    ``url`` is the public URL Twilio was configured with, query included, not the URL
    the proxy handed us; ``params`` the form fields (a mapping, a multidict or pairs), or
    the raw body text for JSON webhooks (then the URL's ``bodySHA256`` must match).
    Twilio's RequestValidator computes the HMAC (with and without an explicit port, as
    Twilio signs either); the comparison is ``hmac.compare_digest`` (constant time).
    A missing header, empty token or unknown algorithm is a failure, never an error.
    """
    if not signature or not auth_token:
        return False
    validator = RequestValidator(auth_token)
    form: _MultiParams | dict[str, str]
    if isinstance(params, str):
        expected = parse_qs(urlsplit(url).query).get("bodySHA256", [""])[0]
        actual = hashlib.sha256(params.encode("utf-8")).hexdigest()
        if not expected or not hmac.compare_digest(expected, actual):
            return False
        form = {}
    else:
        form = _MultiParams(_pairs(params or {}))
    parts = urlsplit(url)
    default_port = 443 if parts.scheme == "https" else 80
    host = parts.netloc.rsplit(":", 1)[0] if parts.port else parts.netloc
    with_port = urlunsplit(
        (parts.scheme, f"{host}:{parts.port or default_port}", parts.path, parts.query, "")
    )
    without_port = urlunsplit((parts.scheme, host, parts.path, parts.query, ""))
    ok = False
    for candidate in (without_port, with_port):
        try:
            computed = validator.compute_signature(candidate, form, algorithm)
        except ValueError:  # unsupported algorithm
            return False
        ok |= hmac.compare_digest(str(computed).encode(), signature.encode())
    return ok


def compute_twilio_signature(
    url: str, params: Params, auth_token: str, *, algorithm: str = HMAC_SHA1
) -> str:
    """The signature Twilio would send for this request (for tests and tooling)."""
    validator = RequestValidator(auth_token)
    return str(validator.compute_signature(url, _MultiParams(_pairs(params)), algorithm))
