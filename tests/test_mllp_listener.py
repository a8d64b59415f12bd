"""MLLP listener edge cases over real sockets, as parametrised tables.

Each test starts an in-process engine on 127.0.0.1 port 0 with a fresh SQLite file,
talks to it with a raw peer that writes exactly the bytes a case gives, and checks the
ACKs on the wire and the rows in the inbox.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    Peer,
    Reply,
    batch_acks,
    config,
    hl7,
    mllp_port,
    peer,
    query,
    run,
    running_engine,
)

from engine.app import Engine
from engine.hl7v2.mllp import CARRIAGE_RETURN, END_BLOCK, START_BLOCK, frame

pytestmark = pytest.mark.store  # every test here uses the store

VT, FS, CR = START_BLOCK, END_BLOCK, CARRIAGE_RETURN
M1 = hl7("CTRL-1")
M2 = hl7("CTRL-2", msg_type="ORM^O01")


def rows(state: Path, columns: str = "control_id, raw") -> list[tuple[Any, ...]]:
    return query(
        state / "refloop.db",
        f"SELECT {columns} FROM messages JOIN message_raw ON message_id = id ORDER BY id",
    )


# ---------------------------------------------------------------------------
# Framing on the wire


@dataclass(frozen=True)
class Wire:
    writes: tuple[bytes, ...]  # each written (and drained) on its own
    acked: tuple[str, ...]  # MSA-2 of the ACKs expected, in order
    stored: tuple[bytes, ...]  # raw of the inbox rows expected, in order


WIRE = {
    "split-frame-byte-by-byte": Wire(tuple(bytes([b]) for b in frame(M1)), ("CTRL-1",), (M1,)),
    "split-inside-end-block": Wire((VT + M1 + FS, CR + frame(M2)), ("CTRL-1", "CTRL-2"), (M1, M2)),
    "two-frames-in-one-read": Wire((frame(M1) + frame(M2),), ("CTRL-1", "CTRL-2"), (M1, M2)),
    "garbage-before-start-block": Wire(
        (b"GET / HTTP/1.1\r\n\r\n\x00\xff", frame(M1)), ("CTRL-1",), (M1,)
    ),
    "bytes-after-end-block": Wire(
        (frame(M1) + b"\r\n trailing junk \n", frame(M2)), ("CTRL-1", "CTRL-2"), (M1, M2)
    ),
    "missing-cr-after-fs": Wire((VT + M1 + FS, VT + M2 + FS), ("CTRL-1", "CTRL-2"), (M1, M2)),
    "missing-cr-same-read": Wire((VT + M1 + FS + VT + M2 + FS,), ("CTRL-1", "CTRL-2"), (M1, M2)),
    "lf-instead-of-cr": Wire((VT + M1 + FS + b"\n" + frame(M2),), ("CTRL-1", "CTRL-2"), (M1, M2)),
    "abandoned-partial-frame": Wire((VT + M1[:20], frame(M2)), ("CTRL-2",), (M2,)),
    "keepalive-newlines-between-frames": Wire(
        tuple(frame(hl7(f"KA-{i}")) + b"\r\n" * 100 for i in range(8)),
        tuple(f"KA-{i}" for i in range(8)),
        tuple(hl7(f"KA-{i}") for i in range(8)),
    ),
}


@pytest.mark.parametrize("case", WIRE.values(), ids=WIRE.keys())
def test_framing(tmp_path: Path, case: Wire) -> None:
    async def go() -> list[str]:
        # max_frame_bytes small: 1600 stray bytes in total must not count as one garbage run
        async with (
            running_engine(tmp_path, max_frame_bytes=1024) as engine,
            peer(mllp_port(engine)) as p,
        ):
            for chunk in case.writes:
                await p.write(chunk)
            got = []
            for _ in case.acked:
                raw = await p.recv()
                assert raw is not None
                reply = Reply.parse(raw)
                assert reply.code == "AA"
                got.append(reply.control_id)
            # and the connection still works
            assert (await p.ask(hl7("AFTER"))).control_id == "AFTER"
            return got

    assert run(go()) == list(case.acked)
    assert [raw for _, raw in rows(tmp_path)] == [*case.stored, hl7("AFTER")]


CLOSING = {
    # (what is written, max_frame_bytes)
    "oversize-frame": (frame(hl7("BIG", body=("NTE|1||" + "x" * 3000,))), 1024),
    "oversize-unfinished-frame": (VT + b"MSH|" + b"y" * 5000, 1024),
    "only-garbage": (b"\x00garbage without a start block\r\n" * 100, 1024),
}


@pytest.mark.parametrize("case", CLOSING.values(), ids=CLOSING.keys())
def test_framing_error_closes_only_that_connection(tmp_path: Path, case: tuple[bytes, int]) -> None:
    data, max_frame = case

    async def go() -> None:
        async with running_engine(tmp_path, max_frame_bytes=max_frame) as engine:
            port = mllp_port(engine)
            async with peer(port) as bystander, peer(port) as bad:
                assert (await bystander.ask(M1)).code == "AA"
                await bad.write(data)
                assert await bad.closed_by_server()
                # the connection opened before and a new one are both still served
                assert (await bystander.ask(M2)).control_id == "CTRL-2"
                async with peer(port) as fresh:
                    assert (await fresh.ask(hl7("CTRL-3"))).control_id == "CTRL-3"

    run(go())
    assert [cid for cid, _ in rows(tmp_path)] == ["CTRL-1", "CTRL-2", "CTRL-3"]


def test_small_garbage_is_ignored_without_reply(tmp_path: Path) -> None:
    async def go() -> None:
        async with running_engine(tmp_path) as engine, peer(mllp_port(engine)) as p:
            await p.write(b"\r\n\x00 not mllp \xff\r\n")
            # nothing to answer; the next frame is the first thing answered
            assert (await p.ask(M1)).control_id == "CTRL-1"

    run(go())


# ---------------------------------------------------------------------------
# Message content: accepted, answered AA, stored byte for byte


def latin1(control_id: str, msh18: str) -> bytes:
    return hl7(
        control_id,
        msh18=msh18,
        body=("PID|1||1^^^MRN||MÜLLER^JOSÉ^Ñ||19750315|M",),
        codec="latin-1",
    )


@dataclass(frozen=True)
class Content:
    message: bytes
    control_id: str
    charset: str  # the codec the inbox row records
    type: str = "ADT^A01"


CONTENT = {
    "utf8-declared": Content(
        hl7("U8-1", msh18="UNICODE UTF-8", body=("PID|1||1^^^MRN||MÜLLER^JOSÉ",), codec="utf-8"),
        "U8-1",
        "utf-8",
    ),
    "utf8-undeclared": Content(
        hl7("U8-2", body=("PID|1||1^^^MRN||Straße^Zoë",), codec="utf-8"), "U8-2", "utf-8"
    ),
    "latin1-declared-8859-1": Content(latin1("L1-1", "8859/1"), "L1-1", "latin-1"),
    "latin1-undeclared-invalid-utf8": Content(latin1("L1-2", ""), "L1-2", "latin-1"),
    "latin1-declared-utf8-but-invalid": Content(latin1("L1-3", "UNICODE UTF-8"), "L1-3", "latin-1"),
    "msh-only": Content(b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01|ONLY-1|P|2.5.1\r", "ONLY-1", "ascii"),
    "msh-only-no-terminator": Content(
        b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01|ONLY-2|P|2.5.1", "ONLY-2", "ascii"
    ),
    "crlf-segment-ends": Content(hl7("CRLF-1", end="\r\n"), "CRLF-1", "ascii"),
    "lf-segment-ends": Content(hl7("LF-1", end="\n"), "LF-1", "ascii"),
    "utf8-bom-and-leading-blank-lines": Content(
        b"\xef\xbb\xbf\r\n" + hl7("BOM-1"), "BOM-1", "utf-8"
    ),
    "z-segment-and-escapes": Content(
        hl7("ESC-1", body=("ZXX|1|a\\F\\b\\S\\c|\\X0D0A\\",)), "ESC-1", "ascii"
    ),
    "v2.3-message": Content(
        hl7("V23-1", version="2.3", msg_type="SIU^S12"), "V23-1", "ascii", "SIU^S12"
    ),
}


@pytest.mark.parametrize("case", CONTENT.values(), ids=CONTENT.keys())
def test_content_is_accepted_and_stored_exactly(tmp_path: Path, case: Content) -> None:
    async def go() -> Reply:
        async with running_engine(tmp_path) as engine, peer(mllp_port(engine)) as p:
            return await p.ask(case.message)

    reply = run(go())
    assert reply.code == "AA", reply.raw
    assert reply.control_id == case.control_id
    assert reply.field("MSH", 9).startswith("ACK")
    ((control_id, raw, charset, message_type),) = rows(
        tmp_path, "control_id, raw, charset, message_type"
    )
    assert (control_id, charset, message_type) == (case.control_id, case.charset, case.type)
    assert raw == case.message
    raw.decode(charset)  # the recorded charset decodes the stored bytes


def test_custom_delimiters_are_echoed(tmp_path: Path) -> None:
    message = hl7("CUSTOM-1", fs="#", enc="!@%*", body=("PID|1||12345^^^MRN||DOE^JOHN",))
    assert message.startswith(b"MSH#!@%*#")

    async def go() -> Reply:
        async with running_engine(tmp_path) as engine, peer(mllp_port(engine)) as p:
            return await p.ask(message)

    reply = run(go())
    assert reply.raw.startswith(b"MSH#!@%*#"), reply.raw
    assert reply.code == "AA"
    assert reply.control_id == "CUSTOM-1"
    assert reply.field("MSH", 9) == "ACK!A01!ACK"
    assert reply.field("MSH", 5) == "TESTAPP"  # MSH-3/4 and MSH-5/6 swapped
    ((message_type, raw),) = rows(tmp_path, "message_type, raw")
    assert message_type == "ADT^A01"
    assert raw == message


@pytest.mark.parametrize(
    ("msh18", "codec"), [("8859/1", "latin-1"), ("UNICODE UTF-8", "utf-8")], ids=["latin1", "utf8"]
)
def test_ack_echoes_a_non_ascii_sender_in_the_message_charset(
    tmp_path: Path, msh18: str, codec: str
) -> None:
    message = hl7("SENDER-1", sending_app="MÜNCHEN", msh18=msh18, codec=codec)

    async def go() -> bytes:
        async with running_engine(tmp_path) as engine, peer(mllp_port(engine)) as p:
            await p.send(message)
            raw = await p.recv()
            assert raw is not None
            return raw

    raw = run(go())
    assert raw.decode(codec).split("|")[4] == "MÜNCHEN"  # MSH-5 of the ACK is our MSH-3


@pytest.mark.parametrize(
    "version", ["2\u00b33", "2.\u0665", "2.5\u00b9"], ids=["sup3", "arabic5", "sup1"]
)
def test_a_version_with_non_ascii_digits_is_answered(tmp_path: Path, version: str) -> None:
    """MSH-12 such as ``2³3`` in a message rejected at the door (a flipped byte, found by
    bench/fuzz.py): ``str.isdigit`` is true for ``³`` but ``int`` refuses it, and laying
    out the ERR segment raised, so the frame was never answered and the connection hung.
    It is answered AR (ERR laid out by the ASCII digits that can be read: ``2`` is taken
    for v2.5+, ``2.5¹`` for ``2``, pre-2.5), and the connection goes on."""
    message = hl7("VER-1", version=version, codec="utf-8", msg_type="A!T^A01")

    async def go() -> tuple[bytes, str]:
        async with running_engine(tmp_path) as engine, peer(mllp_port(engine)) as p:
            await p.send(message)
            raw = await p.recv()
            assert raw is not None, "connection closed instead of an ACK"
            after = await p.ask(hl7("VER-2"))
            return raw, after.code

    raw, after = run(go())
    reply = Reply.parse(raw)
    assert (reply.control_id, reply.code) == ("VER-1", "AR")
    assert "200" in "|".join(reply.segment("ERR"))  # ERR laid out by the digits read
    assert after == "AA"


# ---------------------------------------------------------------------------
# Rejected messages: AR with an ERR segment saying where and why


@dataclass(frozen=True)
class Reject:
    message: bytes
    msa2: str  # MSA-2 echoed (empty when MSH-10 is not readable)
    location: str  # ERR-2 (v2.5+) as SEG^seq^field
    code: str  # HL7 table 0357
    legacy: bool = False  # before v2.5: ERR-1 carries location and code


REJECTS = {
    "missing-msh9": Reject(hl7("NO9-1", msg_type=""), "NO9-1", "MSH^1^9", "101"),
    "missing-msh10": Reject(hl7(""), "", "MSH^1^10", "101"),
    "blank-msh10": Reject(hl7("   "), "", "MSH^1^10", "101"),
    "invalid-msh9": Reject(hl7("BAD9-1", msg_type="A-D^01"), "BAD9-1", "MSH^1^9", "200"),
    "missing-msh9-v2.3": Reject(
        hl7("NO9-2", msg_type="", version="2.3"), "NO9-2", "MSH^1^9", "101", legacy=True
    ),
    "missing-msh10-custom-delimiters": Reject(hl7("", fs="#", enc="!@%*"), "", "MSH^1^10", "101"),
    "no-msh-segment": Reject(b"PID|1||12345^^^MRN||DOE^JOHN\r", "", "MSH", "100"),
    # MSH-1 still delimits the fields, so MSH-10 is readable and echoed (§2.15.8.2)
    "unusable-encoding-characters": Reject(
        b"MSH|^^^^|A|B|C|D|2026||ADT^A01|ENC-1|P|2.5.1\r", "ENC-1", "MSH^1^2", "102"
    ),
    "bare-msh-segment-cr": Reject(b"MSH\rPID|1||12345^^^MRN\r", "", "MSH^1^1", "101"),
    "bare-msh-segment-lf": Reject(b"MSH\nPID|1||12345^^^MRN\n", "", "MSH^1^1", "101"),
    "alphanumeric-field-separator": Reject(
        b"MSHX^~\\&XAXBXCXDX2026XXADT^A01XSEP-1XPX2.5.1\r", "", "MSH^1^1", "102"
    ),
    "empty-frame": Reject(b"", "", "MSH", "100"),
}


@pytest.mark.parametrize("case", REJECTS.values(), ids=REJECTS.keys())
def test_rejected_message_gets_ar_with_err(tmp_path: Path, case: Reject) -> None:
    async def go() -> tuple[Reply, Reply]:
        async with running_engine(tmp_path) as engine, peer(mllp_port(engine)) as p:
            nak = await p.ask(case.message)
            return nak, await p.ask(M1)  # and the connection goes on

    nak, after = run(go())
    assert nak.code == "AR", nak.raw
    assert nak.control_id == case.msa2
    assert nak.field("MSA", 3)  # a reason, never field values
    cs = nak.component_sep
    if case.legacy:
        eld = nak.field("ERR", 1).split(cs)
        assert cs.join(eld[:3]) == case.location.replace("^", cs)
        assert eld[3].split("&")[0] == case.code
    else:
        assert nak.field("ERR", 2) == case.location.replace("^", cs)
        assert nak.field("ERR", 3).split(cs)[0] == case.code
        assert nak.field("ERR", 3).split(cs)[2] == "HL70357"
        assert nak.field("ERR", 4) == "E"
    assert after.code == "AA"
    (stored, _after) = rows(tmp_path, "raw, status, ack_code, error")
    assert stored[0] == case.message
    assert stored[1:3] == ("rejected", "AR")
    assert stored[3]


# ---------------------------------------------------------------------------
# Resends of the same MSH-10


def test_identical_resend_is_acked_again_and_stored_once(tmp_path: Path) -> None:
    async def go() -> list[Reply]:
        async with running_engine(tmp_path) as engine:
            port = mllp_port(engine)
            async with peer(port) as p:
                replies = [await p.ask(M1), await p.ask(M1)]
            async with peer(port) as p:  # a resend after reconnecting, as senders do
                replies.append(await p.ask(M1))
            return replies

    replies = run(go())
    assert [(r.code, r.control_id) for r in replies] == [("AA", "CTRL-1")] * 3
    assert rows(tmp_path, "control_id, duplicates, flags, raw") == [("CTRL-1", 2, "", M1)]


def test_same_control_id_different_bytes_is_stored_and_flagged(tmp_path: Path) -> None:
    first = hl7("REUSED-1", body=("PID|1||111^^^MRN",))
    second = hl7("REUSED-1", body=("PID|1||222^^^MRN",))

    async def go() -> list[Reply]:
        async with running_engine(tmp_path) as engine, peer(mllp_port(engine)) as p:
            return [await p.ask(first), await p.ask(second), await p.ask(second)]

    replies = run(go())
    assert [(r.code, r.control_id) for r in replies] == [("AA", "REUSED-1")] * 3
    assert rows(tmp_path, "control_id, duplicates, flags, raw") == [
        ("REUSED-1", 0, "", first),
        ("REUSED-1", 1, "control-id-reused", second),
    ]


def test_same_control_id_from_another_sender_is_not_a_duplicate(tmp_path: Path) -> None:
    other = hl7("CTRL-1", sending_facility="OTHERFAC")

    async def go() -> None:
        async with running_engine(tmp_path) as engine, peer(mllp_port(engine)) as p:
            assert (await p.ask(M1)).code == "AA"
            assert (await p.ask(other)).code == "AA"

    run(go())
    assert rows(tmp_path, "control_id, duplicates, flags") == [
        ("CTRL-1", 0, ""),
        ("CTRL-1", 0, ""),
    ]


# ---------------------------------------------------------------------------
# Enhanced acknowledgment mode (HL7 v2.5.1 §2.9.3)


ENHANCED = {
    # (MSH-15, MSH-16) -> the ACK codes that come back, in order
    "ne-ne-nothing": (("NE", "NE"), ()),
    "al-ne-commit-only": (("AL", "NE"), ("CA",)),
    "al-al-commit-then-application": (("AL", "AL"), ("CA", "AA")),
    "ne-al-application-only": (("NE", "AL"), ("AA",)),
    "er-su-application-only": (("ER", "SU"), ("AA",)),
    "neither-valued-original-mode": (("", ""), ("AA",)),
}


@pytest.mark.parametrize("case", ENHANCED.values(), ids=ENHANCED.keys())
def test_enhanced_mode(tmp_path: Path, case: tuple[tuple[str, str], tuple[str, ...]]) -> None:
    (msh15, msh16), expected = case
    message = hl7("ENH-1", msh15=msh15, msh16=msh16)
    # a sentinel after it that only wants an application ACK: replies go out in arrival
    # order and processing runs in arrival order, so everything ENH-1 gets arrives before
    # the sentinel's AA and "no ACK" is observed without waiting for a timeout
    sentinel = hl7("SENTINEL", msh15="NE", msh16="AL")

    async def go() -> list[Reply]:
        async with (
            running_engine(tmp_path, ack_mode="enhanced") as engine,
            peer(mllp_port(engine)) as p,
        ):
            await p.send(message)
            await p.send(sentinel)
            got = []
            while True:
                raw = await p.recv()
                assert raw is not None
                reply = Reply.parse(raw)
                if reply.control_id == "SENTINEL":
                    assert reply.code == "AA"
                    return got
                got.append(reply)

    replies = run(go())
    assert [r.code for r in replies] == list(expected)
    assert all(r.control_id == "ENH-1" for r in replies)
    assert all(r.field("MSH", 9) == "ACK^A01^ACK" for r in replies)
    assert [cid for (cid,) in rows(tmp_path, "control_id")] == ["ENH-1", "SENTINEL"]


def test_original_mode_acks_even_when_msh15_is_ne(tmp_path: Path) -> None:
    async def go() -> Reply:
        async with running_engine(tmp_path) as engine, peer(mllp_port(engine)) as p:
            return await p.ask(hl7("NE-1", msh15="NE", msh16="NE"))

    reply = run(go())
    assert (reply.code, reply.control_id) == ("AA", "NE-1")


# ---------------------------------------------------------------------------
# Batches (HL7 v2.5.1 §2.10.3)


def batch(*messages: bytes, bad: bytes = b"") -> bytes:
    return (
        b"FHS|^~\\&|SENDER|FAC|||20260101\r"
        + b"BHS|^~\\&|SENDER|FAC|||20260101||||BATCH-7\r"
        + b"".join(messages)
        + bad
        + f"BTS|{len(messages) + bool(bad)}\r".encode()
        + b"FTS|1\r"
    )


def test_batch_frame_gets_one_reply_batch(tmp_path: Path) -> None:
    messages = [hl7(f"B-{i}", msg_type="ORU^R01") for i in range(1, 4)]

    async def go() -> bytes:
        async with running_engine(tmp_path) as engine, peer(mllp_port(engine)) as p:
            await p.send(batch(*messages))
            reply = await p.recv()
            assert reply is not None
            assert await nothing_more(p), "one frame in, one reply batch out"
            return reply

    reply = run(go())
    header, acks = batch_acks(reply)
    assert header.startswith("BHS|")
    assert header.split("|")[11] == "BATCH-7"  # BHS-12 names the batch answered
    assert [a.control_id for a in acks] == ["B-1", "B-2", "B-3"]
    assert {a.code for a in acks} == {"AA"}
    assert reply.rstrip(b"\r").endswith(b"BTS|3")
    assert rows(tmp_path, "control_id, raw, batch_ref")[:3] == [
        (f"B-{i}", m, "BATCH-7") for i, m in enumerate(messages, 1)
    ]


def test_batch_with_a_bad_message_answers_each(tmp_path: Path) -> None:
    good = [hl7("G-1"), hl7("G-2")]
    bad = hl7("", msg_type="ADT^A08")

    async def go() -> bytes:
        async with running_engine(tmp_path) as engine, peer(mllp_port(engine)) as p:
            await p.send(batch(*good, bad=bad))
            reply = await p.recv()
            assert reply is not None
            return reply

    _, acks = batch_acks(run(go()))
    assert [(a.code, a.control_id) for a in acks] == [("AA", "G-1"), ("AA", "G-2"), ("AR", "")]
    assert acks[2].field("ERR", 2) == "MSH^1^10"
    assert [s for (s,) in rows(tmp_path, "status")][2] == "rejected"


def test_two_messages_in_one_frame_without_envelope(tmp_path: Path) -> None:
    async def go() -> bytes:
        async with running_engine(tmp_path) as engine, peer(mllp_port(engine)) as p:
            await p.send(M1 + M2)
            reply = await p.recv()
            assert reply is not None
            return reply

    _, acks = batch_acks(run(go()))
    assert [a.control_id for a in acks] == ["CTRL-1", "CTRL-2"]
    assert [raw for _, raw in rows(tmp_path)] == [M1, M2]


async def nothing_more(p: Peer) -> bool:
    """Whether the server had nothing more to say: a probe's ACK is the next frame
    (ACKs go out in arrival order, so this needs no timeout)."""
    reply = await p.ask(hl7("PROBE"))
    return reply.control_id == "PROBE"


# ---------------------------------------------------------------------------
# Peers that pipeline, hang up early, or ask to wait for processing


def test_pipelined_frames_are_all_acked_in_order(tmp_path: Path) -> None:
    # more unanswered frames than the listener holds before it pauses reading
    messages = [hl7(f"PIPE-{i}") for i in range(600)]

    async def go() -> list[str]:
        async with running_engine(tmp_path) as engine, peer(mllp_port(engine)) as p:
            await p.write(b"".join(frame(m) for m in messages))
            got = []
            for _ in messages:
                raw = await p.recv()
                assert raw is not None
                got.append(Reply.parse(raw).control_id)
            return got

    assert run(go()) == [f"PIPE-{i}" for i in range(600)]
    assert [raw for _, raw in rows(tmp_path)] == messages


def test_peer_hanging_up_before_its_ack_costs_nothing(tmp_path: Path) -> None:
    async def go() -> None:
        async with running_engine(tmp_path) as engine:
            port = mllp_port(engine)
            for i in range(5):
                gone = await Peer.connect(port)
                await gone.send(hl7(f"GONE-{i}"))
                await gone.close()
            async with peer(port) as p:
                # resending after the hang-up is a duplicate, ACKed again
                assert (await p.ask(hl7("GONE-4"))).code == "AA"

    run(go())
    assert sorted(cid for cid, _ in rows(tmp_path)) == [f"GONE-{i}" for i in range(5)]


def test_ack_on_processed_waits_for_processing(tmp_path: Path) -> None:
    async def go() -> list[Reply]:
        async with (
            running_engine(tmp_path, ack_when="on-processed") as engine,
            peer(mllp_port(engine)) as p,
        ):
            return [await p.ask(M1), await p.ask(hl7("", msg_type="ADT^A08"))]

    ok, rejected = run(go())
    assert (ok.code, ok.control_id) == ("AA", "CTRL-1")
    assert rejected.code == "AR"
    # the ACK came after processing: the row is already past "received"
    assert [status for (status,) in rows(tmp_path, "status")] == ["filtered", "rejected"]


def test_stop_drains_every_frame_it_read(tmp_path: Path) -> None:
    # stopping mid-stream: each frame the listener read is ACKed before the connection
    # closes, and nothing is stored that was not ACKed
    messages = [hl7(f"DRAIN-{i}") for i in range(400)]

    async def go() -> list[str]:
        engine = Engine(config(), tmp_path, drain_seconds=5.0)
        await engine.start()
        try:
            async with peer(mllp_port(engine)) as p:
                await p.write(b"".join(frame(m) for m in messages))
                first = await p.recv()
                assert first is not None
                stopping = asyncio.create_task(engine.stop())
                got = [Reply.parse(first)]
                while (raw := await p.recv()) is not None:
                    got.append(Reply.parse(raw))
                await stopping
        finally:
            await engine.stop()
        assert {r.code for r in got} == {"AA"}
        return [r.control_id for r in got]

    acked = run(go())
    assert acked == [f"DRAIN-{i}" for i in range(len(acked))]
    assert [cid for cid, _ in rows(tmp_path)] == acked


def test_a_bug_in_the_commit_callback_closes_the_connection(tmp_path: Path) -> None:
    # a callback that raises after the commit must cost that connection, not leave it
    # open forever: close() would wait for the reply the failed callback never readied,
    # and the sweeper skips a connection that owes replies, so its slot was never freed
    async def go() -> tuple[bool, int, str]:
        async with running_engine(tmp_path) as engine:
            processor = engine.processor
            assert processor is not None
            notify = processor.notify
            calls = 0

            def broken() -> None:
                nonlocal calls
                calls += 1
                if calls == 1:
                    raise RuntimeError("planted bug")
                notify()

            processor.notify = broken  # type: ignore[method-assign]
            port = mllp_port(engine)
            async with peer(port) as bad:
                await bad.send(hl7("BUG-1"))
                closed = await bad.closed_by_server()
            await asyncio.sleep(0.2)  # let connection_lost run
            open_slots = len(engine.servers[0].connections)
            async with peer(port) as p:  # and the listener still takes messages
                code = (await p.ask(hl7("BUG-1"))).code
            return closed, open_slots, code

    closed, open_slots, code = run(go())
    assert closed
    assert open_slots == 0
    assert code == "AA"  # the resend finds the row stored, as a duplicate
    assert [cid for cid, _ in rows(tmp_path)] == ["BUG-1"]
