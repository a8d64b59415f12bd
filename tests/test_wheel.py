"""TimerWheel: ordering, cancel/reschedule, cascades, jumps, and a model-based property test."""

from __future__ import annotations

import time
from collections.abc import Hashable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.timers.wheel import TimerWheel

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
DAY = 86_400.0
YEAR = 365 * DAY


def keys(fired: list[tuple[float, Hashable]]) -> list[Hashable]:
    return [key for _, key in fired]


def test_fires_in_due_order_and_only_once() -> None:
    wheel = TimerWheel(T0)
    for key, offset in [("c", 30.0), ("a", 10.0), ("b", 20.5)]:
        wheel.schedule(key, T0 + offset)
    assert wheel.advance(T0 + 5) == []
    assert wheel.advance(T0 + 25) == [(T0 + 10, "a"), (T0 + 20.5, "b")]
    assert wheel.advance(T0 + 25) == []
    assert wheel.advance(T0 + 30) == [(T0 + 30, "c")]
    assert len(wheel) == 0


def test_same_due_fires_in_insertion_order() -> None:
    wheel = TimerWheel(T0)
    for key in ["z", "y", "x", 3, (1, 2)]:
        wheel.schedule(key, T0 + 7)
    assert keys(wheel.advance(T0 + 7)) == ["z", "y", "x", 3, (1, 2)]


@pytest.mark.parametrize(
    "offset", [3.0, 40.0, 300.0, 10**6], ids=["level0", "level1", "level2", "overflow"]
)
def test_same_due_keeps_insertion_order_across_cascades(offset: float) -> None:
    # Unorderable keys: ties must never fall back to comparing keys.
    wheel = TimerWheel(T0, slots=8, levels=3)
    first, second, third = object(), object(), object()
    due = T0 + offset
    wheel.schedule(first, due)
    wheel.schedule(second, due)
    wheel.advance(due - 2)  # cascades both down to level 0 before "third" arrives there
    wheel.schedule(third, due)
    wheel.schedule(first, due)  # a move is a new insertion: now last
    assert keys(wheel.advance(due)) == [second, third, first]


def test_sub_tick_due_waits_for_now() -> None:
    # A 10 s tick buckets 0..10 together, yet nothing fires before its own due time.
    wheel = TimerWheel(T0, tick=10.0)
    wheel.schedule("late", T0 + 13.7)
    wheel.schedule("early", T0 + 12.1)
    assert wheel.advance(T0 + 12.0) == []
    assert wheel.advance(T0 + 13.0) == [(T0 + 12.1, "early")]
    assert wheel.advance(T0 + 13.7) == [(T0 + 13.7, "late")]


def test_cancel() -> None:
    wheel = TimerWheel(T0)
    wheel.schedule("a", T0 + 5)
    wheel.schedule("b", T0 + 5)
    assert wheel.cancel("a") is True
    assert wheel.cancel("a") is False
    assert wheel.cancel("never") is False
    assert "a" not in wheel
    assert len(wheel) == 1
    assert keys(wheel.advance(T0 + 10)) == ["b"]
    assert wheel.cancel("b") is False  # already fired


@pytest.mark.parametrize(
    ("first", "second"),
    [(100.0, 5.0), (5.0, 100.0), (5.0, 5.0), (3 * DAY, 2.0), (2.0, 3 * DAY)],
    ids=["earlier", "later", "same-due", "earlier-across-levels", "later-across-levels"],
)
def test_reschedule_moves_the_timer(first: float, second: float) -> None:
    wheel = TimerWheel(T0)
    wheel.schedule("k", T0 + first)
    wheel.schedule("other", T0 + second)
    wheel.schedule("k", T0 + second)
    assert len(wheel) == 2
    fired = wheel.advance(T0 + 4 * DAY)
    # The move counts as a new insertion, so "k" follows "other" on a tie.
    assert fired == [(T0 + second, "other"), (T0 + second, "k")]


def test_past_due_fires_on_next_advance() -> None:
    wheel = TimerWheel(T0)
    wheel.advance(T0 + 1000)
    wheel.schedule("old", T0 - 50)
    wheel.schedule("older", T0 - 60)
    wheel.schedule("now-ish", T0 + 999.5)
    assert wheel.next_due() == T0 - 60
    assert keys(wheel.advance(T0 + 1000)) == ["older", "old", "now-ish"]


def test_now_moving_backwards_is_harmless() -> None:
    wheel = TimerWheel(T0)
    wheel.schedule("a", T0 + 10)
    assert wheel.advance(T0 + 5) == []
    assert wheel.advance(T0 + 1) == []
    assert keys(wheel.advance(T0 + 10)) == ["a"]


@pytest.mark.parametrize(
    "offset",
    [3.0, 15.0, 63.0, 64.0, 65.0, 200.0, 511.0, 512.0, 513.0, 5000.0, 10**6, 10**9],
    ids=lambda v: f"+{v:g}",
)
def test_cascades_across_levels_and_overflow(offset: float) -> None:
    # 8 slots x 3 levels: level spans 8, 64 and 512 ticks; beyond that is the overflow heap.
    wheel = TimerWheel(T0, tick=1.0, slots=8, levels=3)
    wheel.advance(T0 + 5)  # start mid-rotation so digits are not all zero
    due = T0 + 5 + offset
    wheel.schedule("k", due)
    wheel.schedule("just-before", due - 0.5)
    assert wheel.next_due() == due - 0.5
    assert wheel.advance(due - 1) == []
    assert wheel.advance(due - 0.25) == [(due - 0.5, "just-before")]
    assert wheel.next_due() == due
    assert wheel.advance(due) == [(due, "k")]
    assert wheel.next_due() is None


def test_stepping_tick_by_tick_through_many_cascades() -> None:
    wheel = TimerWheel(T0, slots=4, levels=2)  # top rotation is 16 ticks
    dues = [T0 + n * 1.5 for n in range(1, 120)]
    for n, due in enumerate(reversed(dues)):
        wheel.schedule(n, due)
    fired: list[float] = []
    for second in range(200):
        fired += [due for due, _ in wheel.advance(T0 + second)]
    assert fired == dues


def test_year_jump_is_fast() -> None:
    # A year of 1 s ticks is 31.5M ticks; the wheel must jump over empty spans.
    wheel = TimerWheel(T0)
    wheel.schedule("year", T0 + YEAR)
    wheel.schedule("month", T0 + 30 * DAY)
    wheel.schedule("far", T0 + 200 * YEAR)  # past the top level: overflow
    started = time.perf_counter()
    assert keys(wheel.advance(T0 + YEAR)) == ["month", "year"]
    assert wheel.advance(T0 + 2 * YEAR) == []
    assert keys(wheel.advance(T0 + 300 * YEAR)) == ["far"]
    assert time.perf_counter() - started < 0.1


def test_len_and_contains() -> None:
    wheel = TimerWheel(T0)
    assert len(wheel) == 0
    assert "a" not in wheel
    wheel.schedule("a", T0 + 1)
    wheel.schedule("a", T0 + 2)
    wheel.schedule("b", T0 + 3)
    assert len(wheel) == 2
    assert "a" in wheel
    assert wheel.cancel("a")
    assert "a" not in wheel


def test_next_due_is_exact() -> None:
    wheel = TimerWheel(T0)
    assert wheel.next_due() is None
    wheel.schedule("later", T0 + 3 * DAY + 0.25)
    assert wheel.next_due() == T0 + 3 * DAY + 0.25
    wheel.schedule("sooner", T0 + 3 * DAY + 0.125)  # same bucket, earlier
    assert wheel.next_due() == T0 + 3 * DAY + 0.125
    wheel.cancel("sooner")
    assert wheel.next_due() == T0 + 3 * DAY + 0.25


def test_horizon_moves_forward_with_time() -> None:
    wheel = TimerWheel(T0, tick=0.5, slots=8, levels=2)
    assert wheel.horizon() == T0 + 64 * 0.5
    wheel.advance(T0 + 10)
    assert wheel.horizon() == T0 + 10 + 64 * 0.5


def test_compaction_keeps_live_timers() -> None:
    wheel = TimerWheel(T0)
    for n in range(10_000):
        wheel.schedule(n % 100, T0 + 1 + n)  # 9,900 moves leave stale tuples behind
    assert len(wheel) == 100
    assert keys(wheel.advance(T0 + 20_000)) == list(range(100))


@pytest.mark.parametrize(
    "kwargs",
    [{"tick": 0.0}, {"tick": -1.0}, {"tick": float("nan")}, {"slots": 1}, {"levels": 0}],
    ids=["zero-tick", "negative-tick", "nan-tick", "one-slot", "no-levels"],
)
def test_rejects_bad_shape(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        TimerWheel(T0, **kwargs)


@pytest.mark.parametrize("due", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_rejects_non_finite_due(due: float) -> None:
    with pytest.raises(ValueError):
        TimerWheel(T0).schedule("k", due)


class Model:
    """The obvious implementation: a dict and a sort."""

    def __init__(self) -> None:
        self.pending: dict[Hashable, tuple[float, int]] = {}
        self.seq = 0

    def schedule(self, key: Hashable, due: float) -> None:
        self.pending[key] = (due, self.seq)
        self.seq += 1

    def cancel(self, key: Hashable) -> bool:
        return self.pending.pop(key, None) is not None

    def advance(self, now: float) -> list[tuple[float, Hashable]]:
        due = sorted((d, s, k) for k, (d, s) in self.pending.items() if d <= now)
        for _, _, key in due:
            del self.pending[key]
        return [(d, k) for d, _, k in due]


# Offsets in ticks; a mix of near, bucket-boundary and overflow distances for a small wheel.
# Integer-heavy, so equal due times scheduled at different moments (ties) are common.
offsets = st.one_of(
    st.floats(-20, 600, allow_nan=False),
    st.integers(-5, 600).map(float),
    st.integers(0, 12).map(float),
    st.sampled_from([0.0, 63.0, 64.0, 511.0, 512.0, 4096.0, 1e6]),
)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("schedule"), st.integers(0, 15), offsets),
        st.tuples(st.just("cancel"), st.integers(0, 15), st.just(0.0)),
        st.tuples(st.just("advance"), st.just(0), st.floats(-3, 700, allow_nan=False)),
        st.tuples(st.just("advance"), st.just(0), st.integers(0, 6).map(float)),
        st.tuples(st.just("jump"), st.just(0), st.sampled_from([511.0, 4096.0, 1e6])),
    ),
    max_size=80,
)


@settings(max_examples=400, deadline=None)
@given(operations, st.sampled_from([(1.0, 8, 3), (0.5, 4, 2), (2.0, 256, 1)]))
def test_matches_reference_model(
    ops: list[tuple[str, int, float]], shape: tuple[float, int, int]
) -> None:
    tick, slots, levels = shape
    wheel, model = TimerWheel(0.0, tick, slots, levels), Model()
    now = 0.0
    for op, key, value in ops:
        if op == "schedule":
            wheel.schedule(key, now + value * tick)
            model.schedule(key, now + value * tick)
        elif op == "cancel":
            assert wheel.cancel(key) == model.cancel(key)
        else:
            now += value * tick if op == "jump" else value
            assert wheel.advance(now) == model.advance(now)
        assert len(wheel) == len(model.pending)
        assert wheel.next_due() == min((d for d, _ in model.pending.values()), default=None)
    assert wheel.advance(now + 1e9) == model.advance(now + 1e9)
