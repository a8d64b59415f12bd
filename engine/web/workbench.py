"""The analyst's dashboard pages (engine.web.dashboard mixes them in): *Sources*
(``/ui/sources``) and *Try a message* (``/ui/try``: paste or upload HL7 v2 or FHIR
JSON and see what the running routes would do; nothing is stored, sent or logged).
Both need the ``messages`` permission (analyst, admin); the POST carries the session's
CSRF token like every dashboard form (checked before these handlers run)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiohttp import web

from engine.ingest.status import STATUSES
from engine.web.auth import Permission, Principal
from engine.web.pages import Pages
from engine.web.service import ApiError

WorkbenchPage = Callable[[web.Request, Principal], Awaitable[web.StreamResponse]]
MAX_TRY_BYTES: Final = 900_000  # the API's limit too (the HTTP body limit is 1 MiB)


class WorkbenchPages(Pages):
    def workbench_pages(self) -> list[tuple[str, str, Permission | None, WorkbenchPage]]:
        return [
            ("GET", "/sources", "messages", self._sources_page),
            ("GET", "/try", "messages", self._try_form),
            ("POST", "/try", "messages", self._try),
        ]

    async def _sources_page(self, request: web.Request, me: Principal) -> web.StreamResponse:
        return self._render(
            request, me, "sources.html", items=self.service.sources(), statuses=STATUSES
        )

    def _source_names(self) -> list[str]:
        bench = self.service.workbench
        return bench.source_names() if bench is not None else []

    async def _try_form(self, request: web.Request, me: Principal) -> web.StreamResponse:
        return self._render(
            request, me, "try.html", text="", source="", sources=self._source_names(),
            results=None, error="",
        )  # fmt: skip

    async def _try(self, request: web.Request, me: Principal) -> web.StreamResponse:
        """Try the pasted text, or the uploaded file when one was chosen."""
        form = self._form(request)
        upload = form.get("file")
        data = b""
        if isinstance(upload, web.FileField):
            data = upload.file.read(MAX_TRY_BYTES + 1)
        text = str(form.get("message", ""))
        if not data.strip():
            data = text.encode("utf-8")
        elif not text.strip():
            text = data.decode("utf-8", errors="replace")
        source = str(form.get("source", ""))[:64]
        context: dict[str, Any] = {
            "text": text[:MAX_TRY_BYTES], "source": source, "sources": self._source_names(),
            "results": None, "error": "",
        }  # fmt: skip
        status = 200
        if len(data) > MAX_TRY_BYTES:
            context["error"], status = f"Too long: at most {MAX_TRY_BYTES} bytes.", 400
        else:
            try:
                context["results"] = self.service.try_messages(data, source)
            except ApiError as exc:
                if exc.status != 400:
                    raise
                context["error"], status = exc.reason, 400
        return self._render(request, me, "try.html", status=status, **context)
