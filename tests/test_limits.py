"""Token buckets (accept limiter, PeerGone(NotHere) 1/s burst 3)."""

from __future__ import annotations

import math

import pytest

from derper.admission.limits import TokenBucket


def allowed(bucket: TokenBucket, now: float, times: int, n: float = 1.0) -> list[bool]:
    return [bucket.allow(now, n) for _ in range(times)]


def test_starts_full_then_refills_at_rate():
    b = TokenBucket(1.0, 3.0, now=100.0)
    assert allowed(b, 100.0, 4) == [True, True, True, False]
    assert b.allow(100.5) is False
    assert allowed(b, 101.0, 2) == [True, False]
    assert allowed(b, 103.0, 3) == [True, True, False]


def test_refill_is_capped_at_burst():
    b = TokenBucket(1.0, 3.0, now=0.0)
    allowed(b, 0.0, 3)
    assert allowed(b, 1000.0, 4) == [True, True, True, False]


def test_multi_token_requests():
    b = TokenBucket(10.0, 100.0, now=0.0)
    assert b.allow(0.0, 60) is True
    assert b.allow(0.0, 60) is False  # 40 left: a failed request takes nothing
    assert b.allow(0.0, 40) is True
    assert b.allow(6.0, 60) is True
    assert b.allow(100.0, 101) is False  # more than the burst never fits


def test_zero_rate_never_refills():
    b = TokenBucket(0.0, 2.0, now=0.0)
    assert allowed(b, 1e9, 3) == [True, True, False]


@pytest.mark.parametrize("burst", [0.0, 5.0])
def test_infinite_rate_always_allows(burst):
    b = TokenBucket(math.inf, burst, now=0.0)
    assert allowed(b, 0.0, 1000, n=1e9) == [True] * 1000


def test_clock_going_backwards_adds_nothing():
    b = TokenBucket(1.0, 1.0, now=10.0)
    assert b.allow(10.0) is True
    assert b.allow(5.0) is False
    assert b.allow(10.5) is False
    assert b.allow(11.0) is True


@pytest.mark.parametrize("rate, burst", [(-1.0, 1.0), (1.0, -1.0)])
def test_negative_parameters_rejected(rate, burst):
    with pytest.raises(ValueError):
        TokenBucket(rate, burst, now=0.0)
