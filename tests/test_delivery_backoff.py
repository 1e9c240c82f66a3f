"""Backoff arithmetic and the dead-letter decision (plugin.delivery.backoff)."""

from __future__ import annotations

import random

import pytest

from plugin.delivery import SendOutcome
from plugin.delivery.backoff import next_delay, should_dead_letter

OK = SendOutcome("1.2.3", ok=True, retryable=False, detail="stored")
TRANSIENT = SendOutcome("1.2.3", ok=False, retryable=True, detail="peer out of resources")
PERMANENT = SendOutcome("1.2.3", ok=False, retryable=False, detail="cannot understand")


def test_delays_grow_by_factor_up_to_cap() -> None:
    delays = [next_delay(a, base=5, factor=2, cap=60) for a in range(1, 7)]
    assert delays == [5, 10, 20, 40, 60, 60]


def test_factor_one_is_constant_and_base_above_cap_is_capped() -> None:
    assert [next_delay(a, 3, 1, 60) for a in (1, 50)] == [3, 3]
    assert next_delay(1, base=100, factor=2, cap=30) == 30


def test_huge_attempt_counts_do_not_overflow() -> None:
    assert next_delay(100_000, base=1, factor=2, cap=3600) == 3600


def test_jitter_stays_in_range_varies_and_is_reproducible() -> None:
    draws = [next_delay(4, 5, 2, 3600, jitter=0.5, rng=random.Random(s)) for s in range(200)]
    assert all(20 <= d <= 40 for d in draws)
    assert max(draws) - min(draws) > 10, "jitter should spread delays over the range"
    again = [next_delay(4, 5, 2, 3600, jitter=0.5, rng=random.Random(s)) for s in range(200)]
    assert draws == again
    full = [next_delay(2, 5, 2, 3600, jitter=1.0, rng=random.Random(s)) for s in range(200)]
    assert min(full) < 1 and all(0 <= d <= 10 for d in full)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(attempt=0, base=1, factor=2, cap=5), "attempt counts failed tries from 1"),
        (dict(attempt=1, base=-1, factor=2, cap=5), "base and cap must be >= 0"),
        (dict(attempt=1, base=1, factor=0.5, cap=5), "factor must be >= 1"),
        (dict(attempt=1, base=1, factor=2, cap=5, jitter=1.5), "jitter is a fraction"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        next_delay(**kwargs)


def test_dead_letter_decision() -> None:
    assert not should_dead_letter(10, 10, OK)
    assert should_dead_letter(1, 10, PERMANENT)
    assert not should_dead_letter(9, 10, TRANSIENT)
    assert should_dead_letter(10, 10, TRANSIENT)
    assert should_dead_letter(11, 10, TRANSIENT)
    with pytest.raises(ValueError, match="count from 1"):
        should_dead_letter(0, 10, TRANSIENT)
