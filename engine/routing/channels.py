"""The ``channels:`` section of routes.yaml compiled into :class:`ChannelSpec` values.

Each channel type's allowed settings (:data:`CHANNEL_TYPES`), secrets only as
``${env:}``/``${file:}`` references, the typed settings of ``mllp`` and ``direct``, outbox
retry settings, and the templates (Jinja syntax checked; SMS templates against the no-PHI
allow-list of channels.sms.templates). Also which channel serves each patient rotation
slot (:func:`rotation_slots`). The senders themselves are built in engine.delivery.factory.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from channels.direct.inbound import is_loopback
from channels.sms.templates import check_sms_template
from engine.config import Doc, Reader, Section, file_ref
from engine.routing.expressions import make_environment
from engine.routing.table import NAME, ChannelSpec, PracticeSpec
from engine.tracking.escalation import CHANNELS as ROTATION_SLOTS

_DURATION: Final = re.compile(r"(\d+)\s*(m|h|d|w)")

CHANNEL_TYPES: Final[dict[str, tuple[str, ...]]] = {
    "mllp": ("host", "port", "tls", "timeout"),
    "direct": (
        "address",
        "hisp_host",
        "hisp_port",
        "hisp_ca",
        "username",
        "password",
        "cert",
        "key",
        "trust_anchors",
        "mdn_timeout",
        "attach_original",
        "inbound",
        "imap",
        "timeout",
    ),
    "fax": (
        "provider",
        "api_url",
        "api_key",
        "api_secret",
        "callback_token",
        "from_number",
        "timeout",
    ),
    "sms": (
        "provider",
        "account_sid",
        "auth_token",
        "from_number",
        "messaging_service_sid",
        "status_callback_url",
        "api_base",
        "max_chars",
        "timeout",
        "advanced_opt_out",
    ),
    # automated patient calls (channels.voice.twilio); templates under the SMS allow-list
    "voice": (
        "provider",
        "account_sid",
        "auth_token",
        "from_number",
        "status_callback_url",
        "api_base",
        "language",
        "voice",
        "max_chars",
        "timeout",
    ),
    "portal": ("api_url", "api_key", "timeout"),
    "task": ("api_url", "api_key", "queue", "timeout"),
    "webhook": ("url", "secret", "timeout"),
    "fhir": (
        "base_url",
        "client_id",
        "token_url",
        "key",
        "scope",
        "bearer_token",
        "sender_ref",
        "identifier_system",
        "resource",
        "timeout",
    ),
}
CHANNEL_COMMON: Final = ("type", "description", "enabled", "templates")
# Outbox dispatch settings every channel may carry (engine.delivery.dispatch.RetryPolicy).
CHANNEL_DISPATCH: Final = ("max_attempts", "retry_base", "retry_cap", "concurrency")
SECRET_KEYS: Final = (
    "password",
    "api_key",
    "api_secret",
    "auth_token",
    "bearer_token",
    "callback_token",
    "key",
    "secret",
)


def rotation_slots(channels: Mapping[str, ChannelSpec]) -> dict[str, str]:
    """Which channel serves each patient rotation slot (``sms``, ``portal``, ``voice``):
    the channel named like the slot, else the only channel of that type; a slot with
    neither is served by nothing (engine.delivery.rotation.Rotation skips it)."""
    slots: dict[str, str] = {}
    for slot in ROTATION_SLOTS:
        typed = [n for n, s in channels.items() if s.type == slot]
        if slot in channels:
            slots[slot] = slot
        elif len(typed) == 1:
            slots[slot] = typed[0]
    return slots


def unserved_rotation(
    section: Section | None, channels: Mapping[str, ChannelSpec], problems: list[str]
) -> None:
    """An ``escalation.rotation`` entry (``sms``, ``portal``) that no channel serves, or
    ``appointment_reminder: true`` with no SMS channel, is an error: the timers would
    queue messages there that nothing ever sends. ``voice`` is always served (without a
    voice channel the call is a coordinator task), and so are the staff channels ``task``
    and ``coordinator`` (engine.delivery.task_queue, the built-in task queue)."""
    if section is None or not isinstance(section.data, dict):
        return
    served = rotation_slots(channels)
    rotation = section.data.get("rotation")
    for i, slot in enumerate(rotation if isinstance(rotation, list) else ()):
        if slot in ROTATION_SLOTS and slot != "voice" and slot not in served:
            problems.append(
                f"{section.doc.where((*section.path, 'rotation', i))}: no channel serves "
                f"{slot!r}: define channels.{slot} (or a channel of type {slot}) or remove it"
            )
    if section.data.get("appointment_reminder") is True and "sms" not in served:
        problems.append(
            f"{section.doc.where((*section.path, 'appointment_reminder'))}: no channel "
            "serves 'sms' for the reminder: define channels.sms or set it to false"
        )


def section_mapping(section: Section, problems: list[str]) -> dict[str, Any] | None:
    data = section.data
    if data is None:
        return {}
    if not isinstance(data, dict):
        problems.append(f"{section.doc.where(section.path)}: must be a mapping")
        return None
    return data


def compile_channels(
    section: Section | None,
    problems: list[str],
    env: Mapping[str, str] | None,
    practice: PracticeSpec | None = None,
) -> dict[str, ChannelSpec]:
    if section is None:
        return {}
    data = section_mapping(section, problems)
    if data is None:
        return {}
    doc = section.doc
    top = Reader(doc, section.path, problems, env)
    out: dict[str, ChannelSpec] = {}
    for name in data:
        top.raw(name)
        if not NAME.fullmatch(str(name)):
            top.fail(name, "channel names are lower-case letters, digits, - and _")
            continue
        r = top.child(name)
        if not isinstance(data[name], dict):
            continue
        kind = r.choice("type", tuple(CHANNEL_TYPES), "")
        if not r.has("type"):
            r.fail("type", f"is required (one of {', '.join(CHANNEL_TYPES)})")
        r.text("description")
        r.flag("enabled", True)
        settings: dict[str, Any] = {}
        for key in CHANNEL_TYPES.get(kind, ()):
            if not r.has(key):
                r.raw(key)
                continue
            value = r.raw(key)
            if key in SECRET_KEYS and not (isinstance(value, str) and "${" in value):
                r.fail(key, "secrets never live in routes.yaml: use ${env:NAME} or ${file:/path}")
            settings[key] = value
        if kind == "mllp":
            r.text("host", required=True)
            r.integer("port", 0, required=True, lo=1, hi=65535)
        if kind == "direct":
            _direct_settings(r, settings)
        if r.has("max_attempts"):
            settings["max_attempts"] = r.integer("max_attempts", 8, lo=1, hi=1000)
        if r.has("concurrency"):
            settings["concurrency"] = r.integer("concurrency", 4, lo=1, hi=256)
        for key in ("retry_base", "retry_cap"):
            if r.has(key):
                settings[key] = _seconds(r, key)
        allow_specialty = practice.sms_may_name_specialty if practice else False
        templates = _channel_templates(r, kind, doc, allow_specialty)
        r.done(allowed=tuple(CHANNEL_TYPES.get(kind, ())))
        out[str(name)] = ChannelSpec(
            str(name), kind, MappingProxyType(templates), MappingProxyType(settings)
        )
    return out


# A Direct channel's inbound SMTP listener (engine.delivery.direct_inbound; docs/direct.md).
DIRECT_INBOUND_KEYS: Final = ("host", "port", "hostname", "tls_cert", "tls_key", "require_tls")
# Its IMAP mailbox, polled instead of or beside the listener
# (channels.direct.inbound.ImapPoller; docs/direct.md, "What comes back").
DIRECT_IMAP_KEYS: Final = (
    "host",
    "port",
    "username",
    "password",
    "mailbox",
    "interval",
    "tls",
    "ca_file",
)


def _direct_settings(r: Reader, settings: dict[str, Any]) -> None:
    """Checks a ``direct`` channel's typed settings (file:line on every problem)."""
    for key in ("address", "hisp_host", "cert", "key"):
        if not r.has(key):
            r.fail(key, "is required for a direct channel")
    if r.has("mdn_timeout"):
        settings["mdn_timeout"] = _seconds(r, "mdn_timeout")
    if r.has("attach_original"):
        settings["attach_original"] = r.flag("attach_original")
    if r.has("hisp_port"):
        settings["hisp_port"] = r.integer("hisp_port", 587, lo=1, hi=65535)
    if r.has("inbound"):
        _direct_inbound(r.child("inbound"))
    if r.has("imap"):
        _direct_imap(r.child("imap"))
    if (r.has("inbound") or r.has("imap")) and not r.has("trust_anchors"):
        r.fail("trust_anchors", "is required to accept inbound Direct mail")


def _direct_inbound(inbound: Reader) -> None:
    inbound.text("host", "127.0.0.1")
    inbound.integer("port", 2525, lo=0, hi=65535)
    inbound.text("hostname")
    require_tls = inbound.flag("require_tls", True)
    for key in ("tls_cert", "tls_key"):
        value = inbound.raw(key)
        if value is None:
            if require_tls:
                inbound.fail(key, "is required unless require_tls is false")
        elif not (isinstance(value, str) and value.strip().startswith("${file:")):
            inbound.fail(key, "must be a ${file:/path} reference")
    inbound.done()


def _direct_imap(imap: Reader) -> None:
    host = imap.text("host", required=True).strip()
    imap.integer("port", 993, lo=1, hi=65535)
    imap.text("username", required=True)
    password = imap.raw("password")
    if password is None:
        imap.fail("password", "is required")
    elif not (isinstance(password, str) and "${" in password):
        imap.fail("password", "secrets never live in routes.yaml: use ${env:NAME} or ${file:/path}")
    mailbox = imap.text("mailbox", "INBOX")
    if not mailbox.strip() or not mailbox.isascii():
        imap.fail("mailbox", "must be a non-empty ASCII mailbox name")
    imap.number("interval", 60.0, lo=1.0)
    # RFC 8314 §3.2 (implicit TLS); plaintext only for a test server on this machine.
    if not imap.flag("tls", True) and host and not is_loopback(host):
        imap.fail("tls", f"may be false only for a loopback host (127.0.0.1, ::1), not {host!r}")
    ca_file = imap.raw("ca_file")
    if ca_file is not None and file_ref(str(ca_file)) is None:
        imap.fail("ca_file", "must be a ${file:/path} reference")
    imap.done(allowed=DIRECT_IMAP_KEYS)


def _seconds(r: Reader, key: str) -> float:
    """A duration setting: seconds as a number, or ``90m``/``24h``/``7d``/``2w``."""
    raw = r.raw(key)
    if isinstance(raw, (int, float)) and not isinstance(raw, bool) and raw > 0:
        return float(raw)
    seconds = _duration(str(raw)) if isinstance(raw, str) else None
    if not seconds:
        r.fail(key, "must be a positive number of seconds or a duration like 30m, 6h")
        return 1.0
    return float(seconds)


def _channel_templates(
    r: Reader, kind: str, doc: Doc, allow_specialty: bool = False
) -> dict[str, str]:
    if not r.has("templates"):
        r.raw("templates")
        return {}
    data = r.raw("templates")
    path = (*r.path, "templates")
    if not isinstance(data, dict):
        r.fail("templates", "must be a mapping of template name: text or {file: path}")
        return {}
    env = make_environment()
    out: dict[str, str] = {}
    for name, value in data.items():
        where = doc.where((*path, name))
        if isinstance(value, dict):
            unknown = set(value) - {"file"}
            if unknown or "file" not in value:
                r.problems.append(f"{where}: a template is text or {{file: path}}")
                continue
            file = Path(str(value["file"]))
            if not file.is_absolute():
                file = Path(doc.file).parent / file
            try:
                text = file.read_text(encoding="utf-8")
            except OSError as exc:
                r.problems.append(f"{where}: cannot read template file: {exc.strerror}")
                continue
        elif isinstance(value, str):
            text = value
        else:
            r.problems.append(f"{where}: a template is text or {{file: path}}")
            continue
        try:
            env.parse(text)
        except Exception as exc:  # jinja2.TemplateSyntaxError
            r.problems.append(f"{where}: template syntax error: {getattr(exc, 'message', exc)}")
            continue
        if kind in ("sms", "voice"):
            # SMS and automated calls are not secure channels (DESIGN.md: PHI never
            # leaves through SMS): the template may use only the allow-list of
            # channels.sms.templates.
            sms_problems = check_sms_template(text, allow_specialty)
            if sms_problems:
                r.problems.extend(f"{where}: {p} (no PHI over SMS)" for p in sms_problems)
                continue
        out[str(name)] = text
    return out


def _duration(text: str) -> int | None:
    m = _DURATION.fullmatch(text.strip())
    if not m:
        return None
    return int(m[1]) * {"m": 60, "h": 3600, "d": 86400, "w": 604800}[m[2]]
