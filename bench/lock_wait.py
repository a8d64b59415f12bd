"""How long a sender waits for its AE while another process holds the database.

What is measured
    A live daemon (``refloop run``) on a fresh state directory takes one message (AA);
    then another connection holds SQLite's write lock (``BEGIN IMMEDIATE``) and the
    sender sends N messages one after the other (default 3), each waiting for its ACK.
    Reported per message: the ACK code (``AE``: not stored, send again) and the seconds
    from sending to the ACK, plus how long one ``GET /readyz`` takes meanwhile. Run with
    the shipped routes.yaml (processing and the outbox channels poll the store) and with
    bench/ingest-only.yaml (no routes, no channels) to see where the wait comes from: the
    inbox writer's 10 s busy timeout (on its own thread), plus the event loop held by the
    main connection's 5 s busy waits (processing, each outbox channel's round), during
    which no frame is read and no ACK written.

Run::

    .venv/bin/python bench/lock_wait.py
    .venv/bin/python bench/lock_wait.py --routes bench/ingest-only.yaml --messages 2
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from helpers import HOST, Daemon, hl7, peer, run  # noqa: E402


def _readyz(port: int, out: dict[str, float]) -> None:
    started = time.monotonic()
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/readyz", timeout=120) as resp:
            out["status"] = resp.status
    except urllib.error.HTTPError as exc:
        out["status"] = exc.code
        exc.close()
    out["seconds"] = time.monotonic() - started


async def _measure(daemon: Daemon, messages: int) -> None:
    async with peer(daemon.mllp) as p:
        assert (await p.ask(hl7("BEFORE"))).code == "AA"
        blocker = sqlite3.connect(daemon.db, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        probe: dict[str, float] = {}
        thread = threading.Thread(target=_readyz, args=(daemon.http, probe))
        try:
            thread.start()
            for i in range(messages):
                started = time.monotonic()
                reply = await p.ask(hl7(f"LOCKED-{i}"), timeout=120)
                print(f"message {i + 1}: {reply.code} after {time.monotonic() - started:.1f} s")
            await asyncio.to_thread(thread.join)
            print(f"GET /readyz: {probe.get('status')} after {probe.get('seconds', 0):.1f} s")
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--routes", type=Path, default=REPO / "routes.yaml")
    parser.add_argument("--messages", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="refloop-lock-wait-") as tmp:
        daemon = Daemon(state_dir=Path(tmp) / "state", log_path=Path(tmp) / "daemon.log")
        daemon.routes = args.routes.resolve()
        daemon.start()
        try:
            run(_measure(daemon, args.messages), timeout=600)
        finally:
            daemon.kill()


if __name__ == "__main__":
    main()
