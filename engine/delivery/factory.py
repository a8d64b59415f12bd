"""routes.yaml ``channels:`` → the channel adapters the dispatcher calls.

``engine.routing.channels`` keeps each channel's settings raw (``${env:}``/``${file:}`` not yet
substituted: secrets stay out of the compiled table); they are resolved here, once, at
start. Each adapter's own ``problems()`` validates what it needs; every problem is a
:class:`~engine.errors.ConfigError` line naming ``channels.<name>.<key>``, so ``refloop
run`` refuses to start with a channel it could not use.

Types and adapters:

* ``sms``: channels.sms.TwilioSms (account_sid, auth_token, messaging_service_sid or
  from_number, status_callback_url, max_chars, timeout);
* ``voice``: channels.voice.TwilioVoice, automated patient calls (account_sid,
  auth_token, from_number, status_callback_url, language, voice, max_chars, timeout);
* ``webhook``: channels.webhook.WebhookChannel (url, secret, timeout);
* ``portal``, ``task``: WebhookChannel with ``api_url`` and ``api_key`` as the secret; a
  ``task`` without ``api_url`` has no adapter (the built-in task queue, engine.delivery.task_queue,
  serves it);
* ``fhir``: channels.fhir_out.FhirOut (base_url, bearer_token, sender_ref,
  identifier_system, resource: Communication | Task);
* ``fax``: channels.fax.FaxChannel over PhaxioProvider (api_key, api_secret, api_url);
* ``mllp``: channels.mllp.MllpChannel over engine.hl7v2.client (host, port, timeout, tls);
* ``direct``: channels.direct.DirectChannel (address, hisp_host, hisp_port, hisp_ca,
  username, password, cert, key; the recipient's certificate from the specialist
  directory via ``certificate_for``); :func:`build_direct_listener` builds its
  ``inbound:`` SMTP listener (host, port, hostname, tls_cert, tls_key, require_tls) and
  :func:`build_direct_imap_poller` its ``imap:`` mailbox poller (host, port, username,
  password, mailbox, interval, tls, ca_file); both decrypt with our cert/key and verify
  with ``trust_anchors``.

Callback URLs (``/hooks/twilio/status``, ``/hooks/fax/phaxio``) are built from
``http.public_url`` unless a channel sets its own.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, cast

import httpx
from cryptography import x509

from channels.base import Channel
from channels.direct import smime
from channels.direct.inbound import (
    IMAPS_PORT,
    DirectHandler,
    DirectListener,
    ImapPoller,
    ImapSettings,
    ListenerSettings,
    OnResult,
)
from channels.direct.send import DirectChannel, HispSettings
from channels.fax.phaxio import PHAXIO_BASE_URL, FaxChannel, PhaxioProvider
from channels.fhir_out import FhirOut, FhirOutConfig, ResourceType
from channels.mllp import Exchange, MllpChannel
from channels.sms.twilio import SmsConfig, TwilioSms
from channels.voice.twilio import DEFAULT_MAX_CHARS as VOICE_MAX_CHARS
from channels.voice.twilio import TwilioVoice, VoiceConfig
from channels.webhook import WebhookChannel, WebhookConfig
from engine.clock import Clock
from engine.config import file_ref, substitute
from engine.errors import ConfigError
from engine.hl7v2.client import MllpClient, normalise
from engine.routing.table import ChannelSpec

log = logging.getLogger(__name__)

TWILIO_STATUS_PATH: Final = "/hooks/twilio/status"
PHAXIO_CALLBACK_PATH: Final = "/hooks/fax/phaxio"


class _Settings:
    """One channel's settings (or one ``block:`` of them, e.g. ``imap``) with
    substitution; problems collected, never values."""

    def __init__(
        self,
        spec: ChannelSpec,
        env: Mapping[str, str] | None,
        problems: list[str],
        block: str = "",
    ) -> None:
        self.spec = spec
        self.env = env
        self.problems = problems
        self.prefix = f"{block}." if block else ""
        values = spec.settings.get(block) if block else spec.settings
        self.values: Mapping[str, Any] = values if isinstance(values, Mapping) else {}

    def fail(self, key: str, message: str) -> None:
        self.problems.append(f"channels.{self.spec.name}.{self.prefix}{key}: {message}")

    def text(self, key: str, default: str = "") -> str:
        value = self.values.get(key)
        if value is None:
            return default
        text = str(value)
        if "${" in text:
            try:
                text = substitute(text, env=self.env)
            except ValueError as exc:
                self.fail(key, str(exc))
                return default
        return text

    def number(self, key: str, default: float) -> float:
        text = self.text(key, "")
        if not text:
            return default
        try:
            return float(text)
        except ValueError:
            self.fail(key, "must be a number")
            return default

    def flag(self, key: str, default: bool) -> bool:
        text = self.text(key, "").strip().lower()
        if not text:
            return default
        if text in ("true", "yes", "1"):
            return True
        if text in ("false", "no", "0"):
            return False
        self.fail(key, "must be true or false")
        return default

    def check(self, found: list[tuple[str, str]]) -> None:
        for key, message in found:
            self.fail(key, message)


@dataclass(frozen=True)
class _Shared:
    """What every channel builder may use besides its own settings."""

    name: str
    http: httpx.AsyncClient
    now: Callable[[], float]
    base: str  # http.public_url without its trailing slash ("" when unset)
    timeout: float  # the channel's ``timeout`` (default 10 s)
    certificate_for: Callable[[str], x509.Certificate | None] | None


Builder = Callable[[_Settings, _Shared], Channel | None]
"""Builds one channel from its settings; records problems on ``_Settings`` (the channel is
then dropped); None: nothing to build (the channel is served another way)."""


def _sms(s: _Settings, c: _Shared) -> Channel:
    cfg = SmsConfig(
        account_sid=s.text("account_sid"),
        auth_token=s.text("auth_token"),
        messaging_service_sid=s.text("messaging_service_sid"),
        from_number=s.text("from_number"),
        status_callback_url=s.text(
            "status_callback_url", f"{c.base}{TWILIO_STATUS_PATH}" if c.base else ""
        ),
        api_base=s.text("api_base"),
        max_chars=int(s.number("max_chars", 160)),
        timeout=c.timeout,
    )
    s.check(cfg.problems())
    return TwilioSms(cfg, http=c.http, clock=c.now)


def _voice(s: _Settings, c: _Shared) -> Channel:
    """An automated-call channel (Twilio Programmable Voice, docs/voice.md)."""
    if s.text("provider", "twilio") != "twilio":
        s.fail("provider", "only twilio is supported")
    cfg = VoiceConfig(
        account_sid=s.text("account_sid"),
        auth_token=s.text("auth_token"),
        from_number=s.text("from_number"),
        status_callback_url=s.text("status_callback_url"),
        api_base=s.text("api_base"),
        language=s.text("language", "en-US"),
        voice=s.text("voice"),
        max_chars=int(s.number("max_chars", VOICE_MAX_CHARS)),
        timeout=c.timeout,
    )
    s.check(cfg.problems())
    return TwilioVoice(cfg, http=c.http, clock=c.now)


def _webhook(s: _Settings, c: _Shared) -> Channel | None:
    """``webhook``, ``portal`` and ``task`` (a task without ``api_url``: the built-in
    task queue serves it, so nothing is built)."""
    url = s.text("url") or s.text("api_url")
    if not url and s.spec.type == "task":
        log.info(
            "outbox %s: task channel without api_url; the built-in task queue serves it",
            c.name,
        )
        return None
    cfg = WebhookConfig(url=url, secret=s.text("secret") or s.text("api_key"), timeout=c.timeout)
    s.check(cfg.problems())
    return WebhookChannel(c.name, cfg, http=c.http, clock=c.now)


def _fhir(s: _Settings, c: _Shared) -> Channel:
    cfg = FhirOutConfig(
        base_url=s.text("base_url"),
        bearer_token=s.text("bearer_token"),
        sender_ref=s.text("sender_ref"),
        identifier_system=s.text("identifier_system", "urn:refloop:outbox"),
        timeout=c.timeout,
    )
    s.check(cfg.problems())
    resource = s.text("resource", "Communication")
    if resource not in ("Communication", "Task"):
        s.fail("resource", "must be Communication or Task")
    return FhirOut(c.name, cfg, resource=cast(ResourceType, resource), http=c.http, clock=c.now)


def _fax(s: _Settings, c: _Shared) -> Channel:
    if s.text("provider", "phaxio") != "phaxio":
        s.fail("provider", "only phaxio is supported")
    if not c.base:
        s.fail("type", "a fax channel needs http.public_url for its status callbacks")
    provider = PhaxioProvider(
        api_key=s.text("api_key"),
        api_secret=s.text("api_secret"),
        client=c.http,
        base_url=s.text("api_url", PHAXIO_BASE_URL),
        clock=c.now,
    )
    return FaxChannel(provider, callback_url=f"{c.base}{PHAXIO_CALLBACK_PATH}")


def _direct(s: _Settings, c: _Shared) -> Channel | None:
    return _direct_channel(s, c.certificate_for, c.now)


def _mllp(s: _Settings, c: _Shared) -> Channel:
    tls = str(s.spec.settings.get("tls", "")).lower() in ("true", "1", "yes")
    return MllpChannel(
        c.name,
        mllp_exchange(
            s.text("host"),
            int(s.number("port", 0)),
            timeout=s.number("timeout", 30.0),
            ssl_context=ssl.create_default_context() if tls else None,
        ),
    )


def mllp_exchange(
    host: str, port: int, *, timeout: float, ssl_context: ssl.SSLContext | None
) -> Exchange:
    """channels.mllp's :data:`~channels.mllp.Exchange` over engine.hl7v2.client: a new
    connection per message, CR line ends (HL7 v2.5.1 §2.5.1), the ACK's MSA-1."""

    async def exchange(message: bytes) -> tuple[str, str]:
        client = await MllpClient.connect(host, port, timeout=timeout, ssl_context=ssl_context)
        try:
            result = await client.send(normalise(message))
        finally:
            await client.close()
        return result.code, result.control_id

    return exchange


# One builder per routes.yaml channel ``type`` (docs/routes.md, "Channels").
BUILDERS: Final[Mapping[str, Builder]] = {
    "sms": _sms,
    "voice": _voice,
    "webhook": _webhook,
    "portal": _webhook,
    "task": _webhook,
    "fhir": _fhir,
    "fax": _fax,
    "direct": _direct,
    "mllp": _mllp,
}


def build_channels(
    specs: Mapping[str, ChannelSpec],
    *,
    http: httpx.AsyncClient,
    clock: Clock,
    public_url: str = "",
    env: Mapping[str, str] | None = None,
    certificate_for: Callable[[str], x509.Certificate | None] | None = None,
) -> dict[str, Channel]:
    """An adapter per usable channel, built by the :data:`BUILDERS` entry of its type.
    Raises ConfigError listing every problem; channels with no adapter (a ``task``
    without ``api_url``) are left out and logged: the built-in task queue
    (engine.delivery.task_queue) serves them. ``certificate_for`` finds a Direct
    recipient's certificate (the specialist directory); without it every Direct send
    fails over to fax."""
    problems: list[str] = []
    out: dict[str, Channel] = {}
    base = public_url.rstrip("/")
    for name, spec in specs.items():
        builder = BUILDERS.get(spec.type)
        if builder is None:
            log.warning(
                "outbox %s: %s channels are not wired to the dispatcher yet", name, spec.type
            )
            continue
        s = _Settings(spec, env, problems)
        before = len(problems)
        shared = _Shared(name, http, clock.now, base, s.number("timeout", 10.0), certificate_for)
        channel = builder(s, shared)
        if channel is not None and len(problems) == before:
            out[name] = channel
    if problems:
        raise ConfigError(problems)
    return out


def _identity(s: _Settings) -> smime.Identity | None:
    cert, key = s.text("cert"), s.text("key")
    if not cert or not key:
        return None
    try:
        return smime.Identity.from_pem(cert.encode(), key.encode())
    except (ValueError, TypeError):
        s.fail("cert", "cert and key must be a PEM certificate and its RSA private key")
        return None


def _direct_channel(
    s: _Settings,
    certificate_for: Callable[[str], x509.Certificate | None] | None,
    now: Callable[[], float],
) -> DirectChannel | None:
    address = s.text("address").strip().lower()
    if "@" not in address:
        s.fail("address", "must be our Direct address (local@domain)")
    identity = _identity(s)
    if identity is not None and address and not smime.bound_to(identity.certificate, address):
        s.fail("cert", "does not name the Direct address (subjectAltName)")
    tls_context = None
    ca = s.text("hisp_ca")
    if ca:
        try:
            tls_context = ssl.create_default_context(cadata=ca)
        except (ssl.SSLError, ValueError):
            s.fail("hisp_ca", "must be PEM CA certificates")
    hisp = HispSettings(
        host=s.text("hisp_host"),
        port=int(s.number("hisp_port", 587)),
        username=s.text("username"),
        password=s.text("password"),
        tls_context=tls_context,
        timeout=s.number("timeout", 60.0),
    )
    if identity is None:
        if not s.text("cert") or not s.text("key"):
            s.fail("cert", "cert and key are required for a direct channel")
        return None
    return DirectChannel(
        hisp=hisp,
        identity=identity,
        address=address,
        certificate_for=certificate_for or (lambda _address: None),
        clock=now,
    )


def _direct_handler(s: _Settings, on_result: OnResult, clock: Clock) -> DirectHandler | None:
    """What both inbound paths (listener, IMAP poller) hand mail to: our address, our
    identity (decrypts) and the trust anchors (verify signers). None, with the problem
    recorded, when the identity does not load."""
    before = len(s.problems)
    identity = _identity(s)
    if identity is None and len(s.problems) == before:
        s.fail("cert", "cert and key are required to read inbound Direct mail")
    anchors: list[x509.Certificate] = []
    try:
        anchors = x509.load_pem_x509_certificates(s.text("trust_anchors").encode())
    except ValueError:
        s.fail("trust_anchors", "must be PEM CA certificates")
    if identity is None:
        return None
    return DirectHandler(
        addresses=[s.text("address").strip().lower()],
        identities=[identity],
        trust_anchors=anchors,
        on_result=on_result,
        clock=clock.now,
    )


def build_direct_listener(
    spec: ChannelSpec,
    *,
    on_result: OnResult,
    clock: Clock,
    env: Mapping[str, str] | None = None,
) -> DirectListener | None:
    """The SMTP listener of a ``direct`` channel with an ``inbound:`` block (None
    without one). Raises ConfigError naming ``channels.<name>.<key>``."""
    if not isinstance(spec.settings.get("inbound"), Mapping):
        return None
    problems: list[str] = []
    s = _Settings(spec, env, problems)
    inbound = _Settings(spec, env, problems, block="inbound")
    handler = _direct_handler(s, on_result, clock)
    tls_context = None
    cert_ref, key_ref = (
        file_ref(str(inbound.values.get(k) or "")) for k in ("tls_cert", "tls_key")
    )
    if cert_ref and key_ref:
        try:
            tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls_context.load_cert_chain(cert_ref, key_ref)
        except (OSError, ssl.SSLError) as exc:
            inbound.fail("tls_cert", f"cannot load the TLS certificate ({type(exc).__name__})")
    address = s.text("address").strip().lower()
    settings = ListenerSettings(
        host=inbound.text("host", "127.0.0.1"),
        port=int(inbound.number("port", 2525)),
        hostname=inbound.text("hostname", address.rpartition("@")[2] or "refloop"),
        tls_context=tls_context,
        require_tls=inbound.flag("require_tls", True),
    )
    if problems or handler is None:
        raise ConfigError(problems)
    return DirectListener(settings, handler)


def build_direct_imap_poller(
    spec: ChannelSpec,
    *,
    on_result: OnResult,
    clock: Clock,
    env: Mapping[str, str] | None = None,
) -> ImapPoller | None:
    """The IMAP poller of a ``direct`` channel with an ``imap:`` block (None without
    one): the alternative to the listener for HISPs that only offer a mailbox. TLS
    verifies the server with Python's default context (system CAs and hostname), or
    with the CAs of ``ca_file`` instead. Raises ConfigError naming
    ``channels.<name>.imap.<key>``."""
    if not isinstance(spec.settings.get("imap"), Mapping):
        return None
    problems: list[str] = []
    s = _Settings(spec, env, problems)
    imap = _Settings(spec, env, problems, block="imap")
    handler = _direct_handler(s, on_result, clock)
    use_tls = imap.flag("tls", True)
    ssl_context = None
    if use_tls:
        ca_raw = imap.values.get("ca_file")
        ca_file = file_ref(str(ca_raw)) if ca_raw is not None else None
        if ca_raw is not None and ca_file is None:
            imap.fail("ca_file", "must be a ${file:/path} reference")
        try:
            ssl_context = ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            imap.fail("ca_file", f"cannot load the CA certificates ({type(exc).__name__})")
    settings = ImapSettings(
        host=imap.text("host").strip(),
        username=imap.text("username"),
        password=imap.text("password"),
        port=int(imap.number("port", IMAPS_PORT)),
        mailbox=imap.text("mailbox", "INBOX"),
        interval=imap.number("interval", 60.0),
        ssl_context=ssl_context,
        use_tls=use_tls,
    )
    imap.check(settings.problems())
    if problems or handler is None:
        raise ConfigError(problems)
    return ImapPoller(settings, handler)


def webhook_secret(spec: ChannelSpec, key: str, env: Mapping[str, str] | None) -> str:
    """A channel's secret setting, substituted (the webhooks verify with it)."""
    problems: list[str] = []
    value = _Settings(spec, env, problems).text(key)
    if problems:
        raise ConfigError(problems)
    return value
