"""Token buckets (accept limiter, PeerGone(NotHere) 1/s burst 3) and the loop share."""

from __future__ import annotations

import math

import pytest

from derper.admission.limits import LoopShare, TokenBucket


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


# ---- the loop's share for work that is not relaying (LoopShare) -------------------------------

def test_loop_share_holds_nothing_back_on_a_quiet_relay():
    share = LoopShare(now=0.0, share=0.5, slice=0.004, quiet=0.5)
    for t in range(100):  # nothing relayed: however much is charged, everything runs at once
        share.charge(t * 0.001, 0.01)
        assert share.may_run(t * 0.001, relayed=0)


def test_loop_share_while_relaying_is_a_slice_then_the_share():
    share = LoopShare(now=0.0, share=0.5, slice=0.004, quiet=0.5)
    assert share.may_run(0.0, relayed=1)  # a packet: busy from now on, with a full slice
    share.charge(0.0, 0.003)
    assert share.may_run(0.0, relayed=1)  # 1 ms of the slice is left
    share.charge(0.0, 0.003)  # 2 ms into debt, paid back at half the loop's time
    assert not share.may_run(0.0, relayed=2)
    assert not share.may_run(0.0039, relayed=3)
    assert share.may_run(0.004, relayed=4)
    # Over a long busy stretch, what runs at once gets half the time: 1 ms pieces
    now, at_once = 0.004, 0
    for _ in range(2000):
        if share.may_run(now, relayed=int(now * 1000) + 5):
            share.charge(now, 0.001)
            at_once += 1
        now += 0.001
    assert at_once == pytest.approx(1000, abs=5)


def test_loop_share_debt_is_at_most_a_slice():
    share = LoopShare(now=0.0, share=0.5, slice=0.004, quiet=0.5)
    share.may_run(0.0, relayed=1)
    share.charge(0.0, 10.0)  # a flood's worth of turns, charged while busy
    assert not share.may_run(0.0079, relayed=2)
    assert share.may_run(0.008, relayed=3)  # a slice of debt, paid back at half the time


def test_loop_share_quiet_again_after_quiet_seconds_without_a_packet():
    share = LoopShare(now=0.0, share=0.5, slice=0.004, quiet=0.5)
    share.may_run(0.0, relayed=7)
    share.charge(0.0, 1.0)  # in debt
    assert not share.may_run(0.004, relayed=7)  # still busy: the last packet was 4 ms ago
    assert share.may_run(0.5, relayed=7)  # quiet: the debt is forgiven
    assert share.may_run(0.6, relayed=8)  # busy again, with a fresh slice


@pytest.mark.parametrize("value", [0.0, -0.5, 1.0, 1.5])
def test_loop_share_must_be_a_fraction(value):
    with pytest.raises(ValueError):
        LoopShare(now=0.0, share=value)
