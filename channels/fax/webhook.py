"""The e-fax status webhook, ``POST /hooks/fax/<provider>``, as an aiohttp handler.

The engine's HTTP server mounts what :func:`phaxio_webhook` returns and passes the
callback that stores the update (deduped on the provider's fax id, applied only when
:func:`channels.fax.newer` allows). Answers: 403 for a missing or wrong signature (nothing
is read further), 400 for a signed but unreadable body, 503 when storing failed (the
provider retries), 200 otherwise. Logs name the fax id and status only.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web

from channels.fax.phaxio import SIGNATURE_HEADER, parse_phaxio_callback, verify_phaxio_signature
from engine.model import DeliveryUpdate

log = logging.getLogger(__name__)

OnUpdate = Callable[[DeliveryUpdate], Awaitable[None]]
MAX_FILE_BYTES: Final = 20 * 1024 * 1024


def phaxio_webhook(
    *, token: str, callback_url: str, on_update: OnUpdate
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A handler for Phaxio send callbacks. ``callback_url`` must be the URL exactly as
    given to Phaxio (it is part of the signed string), not the URL as seen behind a
    proxy."""

    async def handle(request: web.Request) -> web.Response:
        peer = request.remote or "-"
        signature = request.headers.get(SIGNATURE_HEADER, "")
        fields: dict[str, str] = {}
        files: dict[str, bytes] = {}
        try:
            form = await request.post()
        except ValueError:
            return web.Response(status=400, text="unreadable form")
        for name, value in form.items():
            if isinstance(value, web.FileField):
                files[name] = value.file.read(MAX_FILE_BYTES + 1)
            else:
                fields[name] = str(value)
        if not verify_phaxio_signature(callback_url, fields, files, token, signature):
            log.warning("%s: fax callback with a bad signature refused", peer)
            return web.Response(status=403, text="bad signature")
        try:
            update = parse_phaxio_callback(fields)
        except ValueError as exc:
            log.warning("%s: fax callback unreadable (%s)", peer, exc)
            return web.Response(status=400, text="unreadable callback")
        try:
            await on_update(update)
        except Exception:
            log.exception("fax %s: callback not stored", update.provider_message_id)
            return web.Response(status=503, text="try again")
        log.info("fax %s: %s", update.provider_message_id, update.status)
        return web.Response(status=200, text="ok")

    return handle
