"""The dashboard / API test rig: the shipped routes.yaml in a real Engine on 127.0.0.1
port 0 (MLLP and HTTP), three users (one per role) with API tokens, and a REF^I12
builder. Used by test_api, test_auth, test_dashboard, test_browser and test_schemathesis.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from engine.app import Engine
from engine.clock import Clock, WallClock
from engine.config import loads
from engine.hl7v2.client import MllpClient

ROOT = Path(__file__).resolve().parent.parent
ADMIN_TOKEN = "config-admin-token-for-ui-tests"
PASSWORD = "correct horse battery"
USERS = {"casey": "coordinator", "ana": "analyst", "ada": "admin"}


def ref_i12(
    placer: str,
    control: str,
    *,
    priority: str = "R",
    specialty: str = "REFCARD",
    pid: str = "MRN1^^^CLINIC^MR||Doe^Jane||19700101|F",
) -> bytes:
    segments = [
        f"MSH|^~\\&|EHR|CLINIC|REFLOOP|CLINIC|20260101090000||REF^I12^REF_I12|{control}|P|2.5.1",
        f"RF1|A^Accepted^HL70283|{priority}^Routine^HL70280|Med||O|{placer}^CLINIC|20260101"
        "|||^Chest pain",
        "PRD|RP^Referring^HL70286|Home^Harriet^^^^MD|||||1234567802^NPI",
        "PRD|RT^Referred to^HL70286|Smith^Ann^^^^MD|||||1234567893^NPI",
        f"PID|1||{pid}",
        f"OBR|1|{placer}^CLINIC||{specialty}^Cardiology referral^L",
    ]
    return "\r".join(segments).encode() + b"\r"


def ui_config(*, public_url: str = "", mllp_port: int = 0, http_port: int = 0) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "routes.yaml").read_text(encoding="utf-8"))
    data["sources"]["ehr"]["port"] = mllp_port
    data["http"] = {"host": "127.0.0.1", "port": http_port, "admin_token": ADMIN_TOKEN}
    if public_url:
        data["http"]["public_url"] = public_url
    return data


@dataclass
class UiRig:
    engine: Engine
    base: str
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def db(self) -> Any:
        assert self.engine.db is not None
        return self.engine.db

    @property
    def mllp_port(self) -> int:
        return self.engine.ports()["ehr"]

    def bearer(self, who: str) -> dict[str, str]:
        token = ADMIN_TOKEN if who == "config" else self.tokens[who]
        return {"Authorization": f"Bearer {token}"}

    async def send(self, *messages: bytes) -> None:
        client = await MllpClient.connect("127.0.0.1", self.mllp_port, timeout=5)
        try:
            for m in messages:
                result = await client.send(m)
                assert result.code == "AA", result
        finally:
            await client.close()

    async def wait_referral(self, placer: str, timeout: float = 5.0) -> int:
        """The referral id once the processor has created it."""
        from engine.store import referrals

        async def poll() -> int:
            while True:
                ids = referrals.find_by_placer(self.db.conn, placer)
                if ids:
                    return ids[0]
                await asyncio.sleep(0.02)

        return await asyncio.wait_for(poll(), timeout)


@contextlib.asynccontextmanager
async def ui_engine(
    tmp_path: Path,
    *,
    clock: Clock | None = None,
    public_url: str = "",
    edit: Callable[[dict[str, Any]], None] | None = None,
) -> AsyncIterator[UiRig]:
    """``edit`` may change the routes.yaml data (add a channel or a route) first."""
    data = ui_config(public_url=public_url)
    if edit is not None:
        edit(data)
    config = loads(
        yaml.safe_dump(data, sort_keys=False),
        file=str(ROOT / "routes.yaml"),
        env={},
    )
    engine = Engine(config, tmp_path / "state", clock=clock or WallClock(), drain_seconds=2.0)
    await engine.start()
    try:
        assert engine.auth is not None and engine.http is not None
        rig = UiRig(engine, f"http://127.0.0.1:{engine.http.port}")
        for name, role in USERS.items():
            engine.auth.add_user(name, role, PASSWORD)
            rig.tokens[name] = engine.auth.new_token(name, "tests")
        yield rig
    finally:
        await engine.stop()


CSRF_FIELD = re.compile(r'name="csrf" value="([^"]*)"')


def csrf_of(html: str) -> str:
    m = CSRF_FIELD.search(html)
    assert m, "no CSRF field in the page"
    return m.group(1)


async def login(http: httpx.AsyncClient, base: str, name: str) -> httpx.Response:
    """Log in through the form (GET for the login CSRF cookie, then POST)."""
    page = await http.get(f"{base}/ui/login")
    return await http.post(
        f"{base}/ui/login",
        data={"name": name, "password": PASSWORD, "csrf": csrf_of(page.text), "next": "/ui/"},
    )


@contextlib.contextmanager
def no_proxy() -> Iterator[None]:
    yield
