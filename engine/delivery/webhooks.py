"""Inbound provider webhooks and the confirmation link, mounted on the engine's HTTP
server (docs/delivery.md, "Webhooks").

* ``POST /hooks/twilio/sms``: patient replies; X-Twilio-Signature over the public URL;
* ``POST /hooks/twilio/status``: SMS delivery status; X-Twilio-Signature likewise;
* ``POST /hooks/twilio/voice-status``: automated-call status (the voice channel's
  ``status_callback_url``); signed with the voice channel's auth token;
* ``POST /hooks/fax/phaxio``: fax delivery status; X-Phaxio-Signature
  (channels.fax.webhook);
* ``GET``/``POST /confirm/<token>``: the specialist confirms receipt; the token's HMAC
  (channels.confirm).

A request whose signature does not verify gets **403** and nothing is read further.
Signatures are computed over ``http.public_url`` + the path and query refloop received,
so a reverse proxy must forward the path unchanged (or strip exactly the prefix that
``public_url`` carries).

Effects are written in one durable transaction before the 2xx answer (a provider that
got 2xx will not send again): STOP-type replies put the number on refloop's suppression
list, START/UNSTOP lift it, HELP answers with the practice's ``help`` text (TwiML), YES
records ``booking-requested`` on the referral last texted at that number and queues a
coordinator "call to book" task. Replies are deduped on Twilio's MessageSid. Delivery
statuses never move backwards (``channels.sms.newer_status``); ``failed``/
``undelivered`` moves the referral's patient rotation to the next channel.

Logs name the outbox id, the MessageSid, the keyword and the status, never a phone number
or a message body.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

from aiohttp import web

from channels import confirm
from channels.fax import phaxio as fax
from channels.fax.webhook import phaxio_webhook
from channels.sms import twilio as sms
from channels.voice import twilio as voice
from engine.canonical import canonical_json
from engine.clock import Clock
from engine.delivery import direct_inbound as direct_flow
from engine.delivery.dispatch import Renderer, Tracker
from engine.delivery.rotation import Rotation
from engine.errors import ChannelError, StoreError
from engine.metrics import Metrics
from engine.model import DeliveryUpdate
from engine.store import outbox
from engine.store import referrals as referral_store
from engine.store.db import Database
from engine.tracking import states

log = logging.getLogger(__name__)

TWIML: Final = "application/xml"
SMS_PATH: Final = "/hooks/twilio/sms"
STATUS_PATH: Final = "/hooks/twilio/status"
VOICE_STATUS_PATH: Final = "/hooks/twilio/voice-status"
FAX_PATH: Final = "/hooks/fax/phaxio"
CONFIRM_PATH: Final = "/confirm/{token}"
CALL_TO_BOOK: Final = "call-to-book"
_CONFIRM_STATUS: Final[dict[str, int]] = {"malformed": 400, "bad-signature": 403, "expired": 410}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Hooks:
    """The webhook handlers. ``sms_channel`` is the routes.yaml name of the SMS channel
    (its ``auth_token`` verifies Twilio); ``fax_channels`` the fax channel names (their
    ``callback_token`` verifies Phaxio); ``coordinator_channel`` receives the "call to
    book" tasks; ``on_new_rows`` wakes the dispatcher. ``sms_advanced_opt_out`` (the SMS
    channel's ``advanced_opt_out``): Twilio's Advanced Opt-Out confirms a STOP itself, so
    refloop does not answer it with ``stop_confirm``."""

    def __init__(
        self,
        db: Database,
        *,
        clock: Clock,
        public_url: str,
        renderer: Renderer,
        rotation: Rotation,
        tracker: Tracker | None = None,
        metrics: Metrics | None = None,
        sms_channel: str = "",
        sms_auth_token: str = "",
        fax_channels: Sequence[str] = (),
        fax_token: str = "",
        confirm_key: bytes = b"",
        coordinator_channel: str = "task",
        on_new_rows: Callable[[], None] | None = None,
        sms_advanced_opt_out: bool = False,
        voice_channel: str = "",
        voice_auth_token: str = "",
    ) -> None:
        self.db = db
        self.clock = clock
        self.public_url = public_url.rstrip("/")
        self.renderer = renderer
        self.rotation = rotation
        self.tracker = tracker
        self.metrics = metrics
        self.sms_channel = sms_channel
        self.sms_auth_token = sms_auth_token
        self.fax_channels = tuple(fax_channels)
        self.fax_token = fax_token
        self.confirm_key = confirm_key
        self.coordinator_channel = coordinator_channel
        self.on_new_rows = on_new_rows
        self.sms_advanced_opt_out = sms_advanced_opt_out
        self.voice_channel = voice_channel
        self.voice_auth_token = voice_auth_token

    def register(self, app: web.Application) -> list[str]:
        """Add the routes this configuration can serve; returns their paths."""
        mounted: list[str] = []
        if self.public_url and self.sms_channel and self.sms_auth_token:
            app.router.add_post(SMS_PATH, self.twilio_sms)
            app.router.add_post(STATUS_PATH, self.twilio_status)
            mounted += [SMS_PATH, STATUS_PATH]
        if self.public_url and self.voice_channel and self.voice_auth_token:
            app.router.add_post(VOICE_STATUS_PATH, self.twilio_voice_status)
            mounted.append(VOICE_STATUS_PATH)
        if self.public_url and self.fax_token:
            handler = phaxio_webhook(
                token=self.fax_token,
                callback_url=f"{self.public_url}{FAX_PATH}",
                on_update=self.fax_update,
            )
            app.router.add_post(FAX_PATH, self._counted("fax", handler))
            mounted.append(FAX_PATH)
        if self.confirm_key:
            app.router.add_get(CONFIRM_PATH, self.confirm_page)
            app.router.add_post(CONFIRM_PATH, self.confirm_post)
            mounted.append(CONFIRM_PATH)
        return mounted

    # -- helpers -----------------------------------------------------------------

    def _count(self, hook: str, result: str) -> None:
        if self.metrics is not None:
            self.metrics.webhooks.labels(hook, result).inc()

    def _counted(self, hook: str, handler: Handler) -> Handler:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            response = await handler(request)
            status = response.status
            result = (
                "ok"
                if status < 300
                else {403: "forbidden", 400: "bad-request"}.get(status, "error")
            )
            self._count(hook, result)
            return response

        return wrapped

    def _wake(self) -> None:
        if self.on_new_rows is not None:
            self.on_new_rows()

    async def _verified_form(
        self, request: web.Request, hook: str, token: str = ""
    ) -> tuple[dict[str, str], str] | None:
        """The form and the public URL of a Twilio request whose signature verifies."""
        try:
            form = await request.post()
        except ValueError:
            return None
        pairs = [(k, str(v)) for k, v in form.items()]
        url = f"{self.public_url}{request.rel_url.path_qs}"
        algorithm = sms.signature_algorithm(request.headers.get(sms.SIGNATURE_SETTINGS_HEADER))
        ok = sms.verify_twilio_signature(
            url,
            pairs,
            request.headers.get(sms.SIGNATURE_HEADER),
            token or self.sms_auth_token,
            algorithm=algorithm,
        )
        if not ok:
            log.warning("%s: %s with a bad or missing signature refused", request.remote, hook)
            return None
        return dict(pairs), url

    # -- Twilio: patient replies -----------------------------------------------------

    async def twilio_sms(self, request: web.Request) -> web.Response:
        verified = await self._verified_form(request, "twilio sms webhook")
        if verified is None:
            self._count("twilio-sms", "forbidden")
            return web.Response(status=403, text="bad signature")
        form, _url = verified
        reply = sms.parse_inbound_sms(form)
        if not reply.provider_message_id or not reply.from_number:
            self._count("twilio-sms", "bad-request")
            return web.Response(status=400, text="no MessageSid or From")
        now = self.clock.now()
        queued = stopped = False
        try:
            with self.db.transaction() as conn:  # durable: Twilio will not send it again
                rid = outbox.last_referral_texted(conn, self.sms_channel, reply.from_number)
                new = outbox.record_reply(
                    conn,
                    message_sid=reply.provider_message_id,
                    from_number=reply.from_number,
                    keyword=reply.keyword,
                    body=reply.body,
                    referral_id=rid,
                    now=now,
                )
                if new and reply.keyword == "stop":
                    stopped = outbox.suppress(conn, reply.from_number, "stop", now)
                elif new and reply.keyword == "start":
                    outbox.unsuppress(conn, reply.from_number)
                elif new and reply.keyword == "yes" and rid is not None:
                    queued = self._booking_requested(conn, rid, reply.provider_message_id, now)
        except StoreError:
            log.exception("sms %s: reply not stored", reply.provider_message_id)
            self._count("twilio-sms", "error")
            return web.Response(status=503, text="try again")
        log.info("sms %s: reply %s", reply.provider_message_id, reply.keyword)
        self._count("twilio-sms", "ok")
        if queued:
            self._wake()
        answer = sms.twiml_empty()
        template = {"help": "help", "yes": "yes_confirm"}.get(reply.keyword)
        if stopped and self._confirms_stop(form):
            template = sms.OPT_OUT_CONFIRMATION
        if template is not None:
            try:
                answer = sms.twiml_message(
                    self.renderer.render_sms_text(self.sms_channel, template, None)
                )
            except ChannelError as exc:
                log.error(
                    "sms %s: %s reply not rendered: %s", reply.provider_message_id, template, exc
                )
        return web.Response(text=answer, content_type=TWIML)

    def _confirms_stop(self, form: dict[str, str]) -> bool:
        """Whether refloop answers a STOP that put the number on the list: the one
        opt-out confirmation (CTIA), unless Twilio's Advanced Opt-Out sends it (the
        channel's ``advanced_opt_out: true``, or the webhook carries its ``OptOutType``)."""
        return not self.sms_advanced_opt_out and not form.get("OptOutType")

    def _booking_requested(self, conn: referral_store.Conn, rid: int, sid: str, now: float) -> bool:
        """YES: ``booking-requested`` on the referral and a coordinator "call to book"
        task (key ``<referral>:call-to-book:<MessageSid>``)."""
        if self.tracker is not None:
            self.tracker.apply_internal(
                rid,
                states.InternalEvent("booking-requested", occurred_at=now),
                conn,
                actor="patient-sms",
            )
        payload = {
            "kind": "coordinator-task",
            "subject": "Patient replied YES: call to book",
            "referral_id": rid,
            "reason": "patient-replied-yes",
        }
        return referral_store.enqueue_outbox(
            conn,
            rid,
            self.coordinator_channel,
            CALL_TO_BOOK,
            canonical_json(payload),
            f"{rid}:{CALL_TO_BOOK}:{sid}",
            now,
            now=now,
        )

    # -- Twilio: delivery status ---------------------------------------------------------

    async def twilio_status(self, request: web.Request) -> web.Response:
        verified = await self._verified_form(request, "twilio status callback")
        if verified is None:
            self._count("twilio-status", "forbidden")
            return web.Response(status=403, text="bad signature")
        form, url = verified
        update = sms.parse_status_callback(form, url=url)
        try:
            moved = self._apply_sms_status(update)
        except StoreError:
            log.exception("sms %s: status not stored", update.provider_message_id)
            self._count("twilio-status", "error")
            return web.Response(status=503, text="try again")
        self._count("twilio-status", "ok")
        if moved:
            self._wake()
        return web.Response(status=204)

    def _apply_sms_status(self, update: DeliveryUpdate) -> bool:
        """A text's status: forward-only; an undelivered text moves the rotation on."""
        return self._apply_status(
            update, self.sms_channel, "sms", sms.newer_status, sms.is_delivery_failure
        )

    def _apply_status(
        self,
        update: DeliveryUpdate,
        channel: str,
        what: str,
        newer: Callable[[str, str], bool],
        failed: Callable[[str], bool],
    ) -> bool:
        """Record a provider status on its outbox row of ``channel`` if it moves forward
        (``newer``); a ``failed`` one moves the patient rotation on. True when a row was
        queued on the next channel. ``what`` names the kind in logs ("sms", "call")."""
        now = self.clock.now()
        with self.db.transaction() as conn:
            item = outbox.get(conn, update.outbox_id) if update.outbox_id else None
            if item is None or item.channel != channel:
                item = outbox.find_by_provider_id(conn, channel, update.provider_message_id)
            if item is None:
                log.warning("%s %s: status for no known outbox row", what,
                            update.provider_message_id)  # fmt: skip
                return False
            if not newer(item.provider_status, update.status):
                log.info("outbox %d: %s status %s ignored (have %s)", item.id, what,
                         update.status, item.provider_status or "none")  # fmt: skip
                return False
            outbox.set_provider_status(conn, item.id, update.status, now)
            log.info("outbox %d: %s %s", item.id, what, update.status)
            if not failed(update.status):
                return False
            referral = (
                referral_store.get_referral(conn, item.referral_id)
                if item.referral_id is not None
                else None
            )
            nxt = self.rotation.advance(conn, item, referral, f"{what} {update.status}", now)
            if nxt is not None:
                log.info("outbox %d: %s %s; rotation moves to outbox %d", item.id, what,
                         update.status, nxt)  # fmt: skip
            return nxt is not None

    # -- Twilio: call status -------------------------------------------------------------

    async def twilio_voice_status(self, request: web.Request) -> web.Response:
        """An automated call's status: recorded forward-only on its outbox row; a call
        that ``failed`` (the number cannot be called) moves the rotation on, as an
        undelivered text does; ``busy`` and ``no-answer`` are recorded only."""
        verified = await self._verified_form(
            request, "twilio voice status callback", self.voice_auth_token
        )
        if verified is None:
            self._count("twilio-voice-status", "forbidden")
            return web.Response(status=403, text="bad signature")
        form, url = verified
        update = voice.parse_call_status(form, url=url)
        try:
            moved = self._apply_call_status(update)
        except StoreError:
            log.exception("voice %s: status not stored", update.provider_message_id)
            self._count("twilio-voice-status", "error")
            return web.Response(status=503, text="try again")
        self._count("twilio-voice-status", "ok")
        if moved:
            self._wake()
        return web.Response(status=204)

    def _apply_call_status(self, update: DeliveryUpdate) -> bool:
        """A call's status: forward-only; a call that ``failed`` moves the rotation on."""
        return self._apply_status(
            update, self.voice_channel, "call", voice.newer_call_status,
            lambda status: status in voice.CALL_FAILED,
        )  # fmt: skip

    # -- Phaxio --------------------------------------------------------------------------

    async def fax_update(self, update: DeliveryUpdate) -> None:
        """A verified fax callback: forward-only status; ``success`` records
        ``packet-delivered`` on the referral (delivered, not confirmed); ``failure`` of a
        faxed packet queues a coordinator task to call the specialist office."""
        now = self.clock.now()
        queued = False
        with self.db.transaction() as conn:
            item = None
            for name in self.fax_channels:
                item = outbox.find_by_provider_id(conn, name, update.provider_message_id)
                if item is not None:
                    break
            if item is None:
                log.warning("fax %s: status for no known outbox row", update.provider_message_id)
                return
            old = _fax_status(item.provider_status) if item.provider_status else None
            new = _fax_status(update.status)
            if new is None or not fax.newer(old, new):
                return
            outbox.set_provider_status(conn, item.id, new, now)
            if new == "success" and item.referral_id is not None and self.tracker is not None:
                self.tracker.apply_internal(
                    item.referral_id,
                    states.InternalEvent("packet-delivered", occurred_at=now),
                    conn,
                    actor=f"outbox:{item.channel}",
                )
            elif new == "failure":
                reason = f"fax failed ({update.error_code or 'no reason given'})"
                queued = direct_flow.fax_failed(conn, item, reason, now, actor="fax-callback")
        if queued:
            self._wake()

    # -- /confirm/<token> -------------------------------------------------------------------

    def _check(self, token: str) -> int | web.Response:
        try:
            referral_id = confirm.check_token(token, self.confirm_key, self.clock.now())
        except confirm.TokenError as exc:
            self._count("confirm", "forbidden" if exc.reason == "bad-signature" else "bad-request")
            return web.Response(status=_CONFIRM_STATUS[exc.reason], text=f"link {exc.reason}")
        if not referral_id.isdigit():
            return web.Response(status=404, text="no such referral")
        return int(referral_id)

    async def confirm_page(self, request: web.Request) -> web.Response:
        """GET shows a button: link scanners that prefetch a GET confirm nothing."""
        checked = self._check(request.match_info["token"])
        if isinstance(checked, web.Response):
            return checked
        html = (
            "<!doctype html><title>Confirm referral</title>"
            "<p>Please confirm that your office received this referral.</p>"
            '<form method="post"><button type="submit">Confirm receipt</button></form>'
        )
        return web.Response(text=html, content_type="text/html")

    async def confirm_post(self, request: web.Request) -> web.Response:
        checked = self._check(request.match_info["token"])
        if isinstance(checked, web.Response):
            return checked
        try:
            with self.db.transaction() as conn:
                if referral_store.get_referral(conn, checked) is None:
                    return web.Response(status=404, text="no such referral")
                if self.tracker is not None:
                    self.tracker.apply_internal(
                        checked,
                        states.InternalEvent("specialist-confirmed", occurred_at=self.clock.now()),
                        conn,
                        actor="specialist-link",
                    )
        except StoreError:
            log.exception("referral %d: confirmation not stored", checked)
            return web.Response(status=503, text="try again")
        log.info("referral %d: specialist confirmed receipt by link", checked)
        self._count("confirm", "ok")
        return web.Response(
            text="<!doctype html><title>Thank you</title><p>Receipt confirmed. Thank you.</p>",
            content_type="text/html",
        )


def _fax_status(status: str) -> fax.FaxStatus | None:
    """A stored or reported fax status in refloop's words: already normalised
    (``sending``), or Phaxio's word (``inprogress``)."""
    if status in fax.RANK:
        return status
    return fax.normalise_status(status)
