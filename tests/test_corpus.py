"""Every file of the shared HL7 corpus, sent over a real socket to an in-process engine.

Each file is cut with ``split_messages`` and each message's exact bytes go out as one
frame (a file with no MSH goes whole). A message whose MSH ``read_msh`` can read is
answered with an ACK whose MSA-2 is its MSH-10; anything else is answered AR/AE or the
connection is closed — never silence, never a crash: the server answers a probe after
every file. The inbox holds exactly the bytes that were sent.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import CORPUS, Peer, Reply, hl7, mllp_port, query, run, running_engine

from engine.errors import MessageRejected
from engine.hl7v2.message import read_msh, split_messages

if not CORPUS.is_dir():  # every corpus file must be checked: a missing corpus fails
    raise RuntimeError(f"shared HL7 corpus not found at {CORPUS} (clone beside ../shared)")

FILES = sorted(p for p in CORPUS.rglob("*") if p.is_file() and not p.name.startswith("."))


def test_corpus_is_not_empty() -> None:
    assert len(FILES) > 10


@pytest.mark.store  # every corpus message through the listener into PostgreSQL too
@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(CORPUS)) for p in FILES])
def test_corpus_file_is_answered_and_stored_exactly(tmp_path: Path, path: Path) -> None:
    data = path.read_bytes()
    messages = split_messages(data).messages or (data,)

    async def go() -> list[bytes]:
        stored_expected: list[bytes] = []
        async with running_engine(tmp_path) as engine:
            port = mllp_port(engine)
            p = await Peer.connect(port)
            try:
                for n, message in enumerate(messages, 1):
                    where = f"{path.name}#{n}"
                    try:
                        expected: str | None = read_msh(message)[0].control_id
                    except MessageRejected:
                        expected = None
                    await p.send(message)
                    raw = await p.recv()  # TimeoutError here is silence: a failure
                    if raw is None:
                        assert expected is None, f"{where}: closed instead of an ACK"
                        await p.close()
                        p = await Peer.connect(port)
                        continue
                    reply = Reply.parse(raw)
                    if expected is None:
                        assert reply.code in ("AR", "AE"), f"{where}: {reply.raw!r}"
                        assert reply.has("ERR"), f"{where}: a NAK names the error"
                    else:
                        assert reply.code == "AA", f"{where}: {reply.raw!r}"
                        assert reply.control_id == expected, where
                    stored_expected.append(message)
                # still serving: the same connection and a new one both answer
                probe = hl7("PROBE-1")
                assert (await p.ask(probe)).control_id == "PROBE-1"
                p2 = await Peer.connect(port)
                try:
                    assert (await p2.ask(hl7("PROBE-2"))).code == "AA"
                finally:
                    await p2.close()
            finally:
                await p.close()
        return stored_expected

    sent = run(go())
    stored = [
        raw
        for (raw,) in query(
            tmp_path / "refloop.db", "SELECT raw FROM messages JOIN message_raw ON message_id = id"
        )
    ]
    stored_set = set(stored)
    for n, message in enumerate(sent, 1):
        assert message in stored_set, f"{path.name}#{n}: stored bytes differ from those sent"
    probes = {hl7("PROBE-1"), hl7("PROBE-2")}
    assert set(stored) - probes <= set(sent)
