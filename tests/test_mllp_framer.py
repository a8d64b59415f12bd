"""engine.hl7v2.mllp.Framer: example tables and hypothesis properties.

Whatever way a stream of valid frames is cut into reads, with stray bytes between
frames and the <CR> after <FS> sometimes missing, the framer yields exactly the
payloads, in order, and never complains while each frame and each run of garbage fits
in ``max_frame``.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import FramingError
from engine.hl7v2.mllp import CARRIAGE_RETURN, END_BLOCK, START_BLOCK, Framer, frame

VT, FS, CR = START_BLOCK, END_BLOCK, CARRIAGE_RETURN

# payload bytes: anything but the block characters
payloads = st.binary(max_size=64).map(lambda b: b.replace(VT, b"").replace(FS, b""))
# stray bytes between frames: anything but a start block
strays = st.binary(max_size=24).map(lambda b: b.replace(VT, b""))


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, list[bytes], list[int], int]:
    """(stream, payloads, cut points, max_frame)"""
    items = draw(st.lists(st.tuples(payloads, strays, st.booleans()), max_size=12))
    stream = bytearray(draw(strays))
    sent = []
    for payload, stray, with_cr in items:
        stream += VT + payload + FS + (CR if with_cr else b"") + stray
        sent.append(payload)
    data = bytes(stream)
    cuts = draw(st.lists(st.integers(0, len(data)), max_size=len(data) // 2 + 1))
    largest = max([len(p) for p in sent] + [len(s) + 1 for _, s, _ in items] + [24, 1])
    max_frame = draw(st.integers(largest, largest + 16))
    return data, sent, sorted(set(cuts)), max_frame


def feed_in_chunks(framer: Framer, data: bytes, cuts: list[int]) -> list[bytes]:
    out: list[bytes] = []
    last = 0
    for cut in [*cuts, len(data)]:
        out.extend(framer.feed(data[last:cut]))
        last = cut
    return out


@settings(max_examples=400, deadline=None)
@given(streams())
def test_any_chunking_yields_exactly_the_frames(
    case: tuple[bytes, list[bytes], list[int], int],
) -> None:
    data, sent, cuts, max_frame = case
    framer = Framer(max_frame)
    assert feed_in_chunks(framer, data, cuts) == sent
    assert framer.pending == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(payloads, min_size=1, max_size=8), st.data())
def test_byte_by_byte_equals_all_at_once(sent: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(frame(p) for p in sent)
    one = Framer()
    assert one.feed(stream) == sent
    split = Framer()
    got = [f for i in range(len(stream)) for f in split.feed(stream[i : i + 1])]
    assert got == sent


@settings(max_examples=200, deadline=None)
@given(st.integers(16, 256), st.integers(1, 40))
def test_stray_bytes_between_frames_never_add_up_to_an_error(max_frame: int, n: int) -> None:
    # a peer that sends CR LF keep-alives after every frame: each gap is small, their
    # total is not; only a run of garbage longer than max_frame is an error
    framer = Framer(max_frame)
    gap = b"\r\n" * (max_frame // 2)
    got = []
    for i in range(n):
        got += framer.feed(frame(b"m%d" % i) + gap)
    assert got == [b"m%d" % i for i in range(n)]


FRAMING_ERRORS = {
    "oversize-complete-frame": (frame(b"x" * 65), 64),
    "oversize-unfinished-frame": (VT + b"x" * 65, 64),
    "garbage-run-over-limit": (b"\r\n" * 33, 64),
}


@pytest.mark.parametrize("case", FRAMING_ERRORS.values(), ids=FRAMING_ERRORS.keys())
def test_framing_errors(case: tuple[bytes, int]) -> None:
    data, max_frame = case
    with pytest.raises(FramingError):
        Framer(max_frame).feed(data)


EXAMPLES = {
    # (reads, frames, stray)
    "exactly-max-frame": ([frame(b"x" * 64)], [b"x" * 64], 0),
    "empty-frame": ([VT + FS + CR], [b""], 0),
    # a CR that arrives after its frame was cut off reads as a stray byte, harmlessly
    "cr-arrives-in-next-read": ([VT + b"a" + FS, CR + VT + b"b" + FS + CR], [b"a", b"b"], 1),
    "stray-counted": ([b"\n\n" + frame(b"a") + b"\n"], [b"a"], 3),
    "restart-inside-frame": ([VT + b"lost" + VT + b"kept" + FS + CR], [b"kept"], 5),
}


@pytest.mark.parametrize("case", EXAMPLES.values(), ids=EXAMPLES.keys())
def test_examples(case: tuple[list[bytes], list[bytes], int]) -> None:
    reads, frames, stray = case
    framer = Framer(64)
    assert [f for r in reads for f in framer.feed(r)] == frames
    assert framer.stray == stray
