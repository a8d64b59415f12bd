"""e-Fax: the Phaxio adapter against a loopback aiohttp server playing Phaxio, the
callback signature, the webhook handler and the never-backwards status rule."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from helpers import REPO, refloop, run

from channels.fax.phaxio import (
    FaxChannel,
    PhaxioProvider,
    newer,
    normalise_status,
    parse_phaxio_callback,
    phaxio_signature,
    verify_phaxio_signature,
)
from channels.fax.webhook import phaxio_webhook
from engine.errors import ChannelError
from engine.model import Attachment, DeliveryUpdate, OutboundMessage
from engine.routing.channels import CHANNEL_TYPES

PDF = b"%PDF-1.4\nfax me\n%%EOF\n"
TOKEN = "callback-token"
CALLBACK = "https://refloop.example/hooks/fax/phaxio"


class FakePhaxio:
    """Just enough of api.phaxio.com/v2: create, get, list by tag; Basic auth."""

    def __init__(self, *, fail_with: int = 0) -> None:
        self.faxes: dict[int, dict[str, Any]] = {}
        self.posts: list[dict[str, Any]] = []
        self.fail_with = fail_with
        self.app = web.Application()
        self.app.router.add_post("/v2/faxes", self.create)
        self.app.router.add_get("/v2/faxes", self.list)
        self.app.router.add_get("/v2/faxes/{id}", self.get)

    def _authorised(self, request: web.Request) -> bool:
        return (
            request.headers.get("Authorization")
            == "Basic " + base64.b64encode(b"key:secret").decode()
        )

    async def create(self, request: web.Request) -> web.Response:
        if self.fail_with:
            return web.json_response({"success": False}, status=self.fail_with)
        if not self._authorised(request):
            return web.json_response({"success": False, "message": "auth"}, status=401)
        form = await request.post()
        file = form["file"]
        assert isinstance(file, web.FileField)
        fax_id = 1000 + len(self.faxes)
        tags = {k[4:-1]: str(v) for k, v in form.items() if k.startswith("tag[")}
        self.posts.append(
            {"to": form["to"], "callback_url": form["callback_url"], "pdf": file.file.read()}
        )
        self.faxes[fax_id] = {"id": fax_id, "status": "queued", "tags": tags, "num_pages": 1}
        return web.json_response({"success": True, "message": "Fax queued", "data": {"id": fax_id}})

    async def list(self, request: web.Request) -> web.Response:
        want = {k[4:-1]: v for k, v in request.query.items() if k.startswith("tag[")}
        found = [
            f for f in self.faxes.values() if all(f["tags"].get(k) == v for k, v in want.items())
        ]
        return web.json_response({"success": True, "data": found})

    async def get(self, request: web.Request) -> web.Response:
        fax = self.faxes.get(int(request.match_info["id"]))
        if fax is None:
            return web.json_response({"success": False}, status=404)
        return web.json_response({"success": True, "data": fax})


@asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def item(key: str = "outbox-5") -> OutboundMessage:
    return OutboundMessage(
        outbox_id=5,
        idempotency_key=key,
        channel="fax",
        recipient="+15555550100",
        attachments=(Attachment("referral.pdf", "application/pdf", PDF),),
    )


def test_send_and_status_against_loopback_phaxio() -> None:
    fake = FakePhaxio()

    async def go() -> tuple[str, str, str]:
        async with serve(fake.app) as base, httpx.AsyncClient() as client:
            provider = PhaxioProvider(
                api_key="key", api_secret="secret", client=client, base_url=f"{base}/v2"
            )
            ch = FaxChannel(provider, callback_url=CALLBACK)
            first = await ch.send(item())
            again = await ch.send(item())  # a retry of the same outbox row
            fake.faxes[int(first.provider_message_id)]["status"] = "inprogress"
            state = await provider.status(first.provider_message_id)
            return first.provider_message_id, again.provider_message_id, state.status

    first, again, status = run(go())
    assert first == again == "1000"
    assert len(fake.posts) == 1  # idempotent: sent once
    assert fake.posts[0] == {"to": "+15555550100", "callback_url": CALLBACK, "pdf": PDF}
    assert status == "sending"


@pytest.mark.parametrize(
    ("code", "retryable"), [(500, True), (429, True), (422, False), (401, False)]
)
def test_http_errors_map_to_channel_errors(code: int, retryable: bool) -> None:
    fake = FakePhaxio(fail_with=code)

    async def go() -> None:
        async with serve(fake.app) as base, httpx.AsyncClient() as client:
            provider = PhaxioProvider(
                api_key="key", api_secret="secret", client=client, base_url=f"{base}/v2"
            )
            await FaxChannel(provider, callback_url=CALLBACK).send(item())

    with pytest.raises(ChannelError) as err:
        run(go())
    assert err.value.retryable is retryable
    assert "+1555" not in str(err.value)


def test_unreachable_provider_is_retryable() -> None:
    async def go() -> None:
        async with serve(web.Application()) as base:
            pass
        async with httpx.AsyncClient() as client:
            provider = PhaxioProvider(api_key="k", api_secret="s", client=client, base_url=base)
            await provider.send("+15555550100", PDF, callback_url=CALLBACK, idempotency_key="x")

    with pytest.raises(ChannelError) as err:
        run(go())
    assert err.value.retryable


def test_signature_matches_the_documented_recipe() -> None:
    fields = {"success": "true", "is_test": "false", "direction": "sent", "fax": '{"id": 1}'}
    files = {"file": PDF}
    text = CALLBACK + "directionsent" + 'fax{"id": 1}' + "is_testfalse" + "successtrue"
    text += "file" + hashlib.sha1(PDF).hexdigest()
    expected = hmac.new(TOKEN.encode(), text.encode(), hashlib.sha1).hexdigest()
    assert phaxio_signature(CALLBACK, fields, files, TOKEN) == expected
    assert verify_phaxio_signature(CALLBACK, fields, files, TOKEN, expected)
    assert verify_phaxio_signature(CALLBACK, fields, files, TOKEN, expected.upper())
    assert not verify_phaxio_signature(
        CALLBACK, {**fields, "success": "false"}, files, TOKEN, expected
    )
    assert not verify_phaxio_signature(CALLBACK + "/", fields, files, TOKEN, expected)
    assert not verify_phaxio_signature(CALLBACK, fields, files, TOKEN, "")
    assert not verify_phaxio_signature(CALLBACK, fields, files, "", expected)


@pytest.mark.parametrize(
    ("provider", "ours"),
    [
        ("queued", "queued"),
        ("pendingbatch", "queued"),
        ("inprogress", "sending"),
        ("ringing", "sending"),
        ("willretry", "sending"),
        ("success", "success"),
        ("failure", "failure"),
        ("partialsuccess", "failure"),
        ("SUCCESS", "success"),
        ("exploded", None),
    ],
)
def test_normalise_status(provider: str, ours: str | None) -> None:
    assert normalise_status(provider) == ours


@pytest.mark.parametrize(
    ("old", "new", "ok"),
    [
        (None, "queued", True),
        ("queued", "sending", True),
        ("queued", "success", True),
        ("sending", "failure", True),
        ("sending", "queued", False),
        ("success", "sending", False),
        ("success", "failure", False),
        ("failure", "success", False),
        ("sending", "sending", False),
    ],
)
def test_status_never_moves_backwards(old: Any, new: Any, ok: bool) -> None:
    assert newer(old, new) is ok


def callback_fields(status: str, fax_id: int = 1000) -> dict[str, str]:
    fax = {
        "id": fax_id,
        "status": status,
        "num_pages": 2,
        "error_type": "lineError" if status == "failure" else None,
    }
    return {
        "success": str(status == "success").lower(),
        "is_test": "true",
        "direction": "sent",
        "fax": json.dumps(fax),
    }


def test_parse_callback() -> None:
    assert parse_phaxio_callback(callback_fields("failure")) == DeliveryUpdate(
        channel="fax",
        outbox_id=0,
        provider_message_id="1000",
        status="failure",
        error_code="lineError",
    )
    for bad in (
        {"direction": "received", "fax": "{}"},
        {"fax": "not json"},
        {"fax": "[]"},
        {"fax": '{"id": 1, "status": "zzz"}'},
    ):
        with pytest.raises(ValueError):
            parse_phaxio_callback(bad)


def test_webhook_verifies_and_hands_on() -> None:
    updates: list[DeliveryUpdate] = []

    async def store(update: DeliveryUpdate) -> None:
        updates.append(update)

    app = web.Application()
    app.router.add_post(
        "/hooks/fax/phaxio", phaxio_webhook(token=TOKEN, callback_url=CALLBACK, on_update=store)
    )

    async def post(client: httpx.AsyncClient, base: str, fields: dict[str, str], sig: str) -> int:
        files = {"file": ("fax.pdf", PDF, "application/pdf")}
        resp = await client.post(
            f"{base}/hooks/fax/phaxio",
            data=fields,
            files=files,
            headers={"X-Phaxio-Signature": sig},
        )
        return resp.status_code

    async def go() -> list[int]:
        async with serve(app) as base, httpx.AsyncClient() as client:
            ok = callback_fields("success")
            good = phaxio_signature(CALLBACK, ok, {"file": PDF}, TOKEN)
            unreadable = {"direction": "sent", "fax": "nope"}
            return [
                await post(client, base, ok, good),
                await post(
                    client, base, ok, good
                ),  # the provider's retry: handed on again, deduped by fax id downstream
                await post(client, base, ok, "0" * 40),
                await post(
                    client,
                    base,
                    unreadable,
                    phaxio_signature(CALLBACK, unreadable, {"file": PDF}, TOKEN),
                ),
            ]

    assert run(go()) == [200, 200, 403, 400]
    assert [u.status for u in updates] == ["success", "success"]
    assert {u.provider_message_id for u in updates} == {"1000"}


def test_fax_channel_needs_a_pdf() -> None:
    class Never:
        name = "never"

        async def send(self, *a: Any, **k: Any) -> str:
            raise AssertionError

        async def status(self, fax_id: str) -> Any:
            raise AssertionError

    msg = OutboundMessage(outbox_id=1, idempotency_key="k", channel="fax", recipient="+1")
    with pytest.raises(ChannelError) as err:
        run(FaxChannel(Never(), callback_url=CALLBACK).send(msg))
    assert not err.value.retryable


def test_docs_name_the_fax_keys_routes_check_accepts(tmp_path: Path) -> None:
    """docs/fax.md's configuration keys are the ones the validator accepts (and the
    factory reads: ``api_url``); the wrong name is refused with file:line."""
    text = (REPO / "docs" / "fax.md").read_text(encoding="utf-8")
    bullet = text[text.index("* Configuration") :].split("\n\n")[0]
    named = set(re.findall(r"`([a-z_]+)`", bullet)) - {"fax", "phaxio"}
    assert "api_url" in named and named - {"base_url"} <= set(CHANNEL_TYPES["fax"])
    path = tmp_path / "routes.yaml"
    path.write_text(
        "version: 1\nchannels:\n  fax:\n    type: fax\n    api_key: ${env:K}\n"
        "    api_secret: ${env:K}\n    base_url: https://api.phaxio.example/v2\n",
        encoding="utf-8",
    )
    out = refloop("routes", "check", str(path))
    assert out.returncode == 2
    assert f"{path}:7 channels.fax.base_url: unknown key" in out.stderr.decode()
