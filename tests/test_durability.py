"""An ACKed message is never lost: kill -9 the daemon mid-stream, restart it on the same
state directory, and every ACKed message is in the inbox exactly once, byte for byte.

The stream is a few thousand unique messages over several concurrent connections, so the
kill lands inside group commits with ACKs in flight. Kill points are seeded and
parametrised; after the restart every message that was not ACKed is sent again (a resend
of a stored message must be deduplicated, not stored twice).
"""

from __future__ import annotations

import asyncio
import random
import signal

import pytest
from helpers import Daemon, Reply, hl7, peer, query, routed, run

from engine.hl7v2.mllp import frame

MESSAGES = 3000
CONNECTIONS = 8
WINDOW = 4  # frames in flight per connection (ACKs come back in order)


def corpus(seed: int) -> dict[str, bytes]:
    """Unique messages of varied size, keyed by control id."""
    rng = random.Random(seed)
    out: dict[str, bytes] = {}
    for i in range(MESSAGES):
        cid = f"K{seed:03d}-{i:05d}"
        note = "".join(
            rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789", k=rng.randint(10, 1500))
        )
        out[cid] = hl7(cid, msg_type="ORM^O01", body=("PID|1||1^^^MRN||DOE^JANE", f"NTE|1||{note}"))
    return out


async def stream(
    port: int, messages: dict[str, bytes], *, kill_after: int | None, daemon: Daemon
) -> set[str]:
    """Send everything over CONNECTIONS pipelined connections; return the control ids
    answered AA. With ``kill_after``, SIGKILL the daemon once that many ACKs arrived."""
    ids = list(messages)
    acked: set[str] = set()
    killed = asyncio.Event()

    async def one(share: list[str]) -> None:
        try:
            async with peer(port) as p:
                pending: list[str] = []
                it = iter(share)
                while True:
                    while len(pending) < WINDOW:
                        cid = next(it, None)
                        if cid is None:
                            break
                        p.writer.write(frame(messages[cid]))
                        pending.append(cid)
                    if not pending:
                        return
                    await p.writer.drain()
                    raw = await p.recv(timeout=20.0)
                    if raw is None:
                        return
                    reply = Reply.parse(raw)
                    cid = pending.pop(0)
                    assert reply.control_id == cid, "ACKs out of order"
                    assert reply.code == "AA", reply.raw
                    acked.add(cid)
                    if kill_after is not None and len(acked) >= kill_after and not killed.is_set():
                        killed.set()
                        daemon.signal(signal.SIGKILL)
        except OSError:
            # the daemon was killed under us: whatever was not ACKed is resent later
            assert killed.is_set()

    shares = [ids[i::CONNECTIONS] for i in range(CONNECTIONS)]
    await asyncio.gather(*(one(s) for s in shares))
    return acked


@pytest.mark.slow
@pytest.mark.parametrize("seed", [3, 17, 42], ids=lambda s: f"seed{s}")
def test_kill_9_loses_no_acked_message(daemon: Daemon, seed: int) -> None:
    messages = corpus(seed)
    kill_after = random.Random(seed * 7919).randint(MESSAGES // 10, MESSAGES * 8 // 10)

    daemon.start()
    acked = run(stream(daemon.mllp, messages, kill_after=kill_after, daemon=daemon))
    assert daemon.wait() == -signal.SIGKILL
    assert kill_after <= len(acked) < MESSAGES

    # straight after the crash, before anything else touches the file
    rows = query(daemon.db, "SELECT control_id, count(*) FROM messages GROUP BY control_id")
    counts = dict(rows)
    missing = sorted(cid for cid in acked if counts.get(cid) != 1)
    assert not missing, f"{len(missing)} ACKed messages lost or doubled, e.g. {missing[:5]}"
    for cid, raw in query(
        daemon.db, "SELECT control_id, raw FROM messages JOIN message_raw ON message_id = id"
    ):
        assert raw == messages[cid], f"{cid}: stored bytes differ from what was sent"

    # restart on the same state and resend everything not ACKed
    daemon.start()
    rest = {cid: m for cid, m in messages.items() if cid not in acked}
    resent = run(stream(daemon.mllp, rest, kill_after=None, daemon=daemon))
    assert resent == set(rest)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0, daemon.log_tail()

    if not routed(daemon.db):  # the file's own check; PostgreSQL's pages are the server's
        assert query(daemon.db, "PRAGMA integrity_check") == [("ok",)]
    rows = query(daemon.db, "SELECT control_id, count(*) FROM messages GROUP BY control_id")
    assert dict(rows) == dict.fromkeys(messages, 1)
    for cid, raw, status, ack in query(
        daemon.db,
        "SELECT control_id, raw, status, ack_code "
        "FROM messages JOIN message_raw ON message_id = id",
    ):
        assert raw == messages[cid], cid
        assert ack == "AA"
        assert status != "rejected"
    # messages stored before the kill but not ACKed came again: counted, not stored twice
    (dups,) = query(daemon.db, "SELECT coalesce(sum(duplicates), 0) FROM messages")[0]
    assert 0 <= dups <= CONNECTIONS * WINDOW
