"""The fair bandwidth scheduler's core with a fake clock: exact rates, fair shares, low latency."""

from __future__ import annotations

import pytest

from derper.admission.fairshare import QUANTUM, FairShare

RATE = 500_000.0  # 4 Mbit/s in bytes/s
CHUNK = 16 << 10  # what a paced session reads at once


def simulate(fs: FairShare, *, seconds: float, bulk: list[str], small: dict[str, float],
             small_size: int = 100):
    """Bulk senders always have a chunk waiting; ``small`` senders send one packet per period.

    Returns (bytes granted per sender, list of small-packet latencies).
    """
    now = 0.0
    granted = {s: 0 for s in bulk + list(small)}
    waiting: dict[str, tuple[int, float]] = {}  # sender → (bytes, asked at)
    next_small = dict.fromkeys(small, 0.0)
    latencies = []

    def ask(sender: str, n: int) -> None:
        while fs.request(sender, n, now):
            granted[sender] += n
            if sender in small:
                latencies.append(0.0)
                return
        waiting[sender] = (n, now)  # a bulk sender asks again until it has to wait

    for s in bulk:
        ask(s, CHUNK)
    for _ in range(10 ** 6):
        if now >= seconds:
            break
        due = min((t for s, t in next_small.items() if s not in waiting), default=seconds)
        wake = fs.next_time()
        now = min(due, wake if wake is not None else seconds, seconds)
        for s in fs.advance(now):
            n, asked = waiting.pop(s)
            granted[s] += n
            if s in small:
                latencies.append(now - asked)
            else:
                ask(s, CHUNK)  # a bulk sender reads its next chunk at once
        for s, t in next_small.items():
            if t <= now and s not in waiting:
                ask(s, small_size)
                next_small[s] = t + small[s]
    return granted, latencies


def test_uncontended_sender_gets_the_whole_rate_within_one_percent():
    fs = FairShare(RATE, now=0.0)
    granted, _ = simulate(fs, seconds=10.0, bulk=["bulk"], small={})
    assert granted["bulk"] == pytest.approx(RATE * 10, rel=0.01)


def test_bulk_senders_share_equally_and_use_the_whole_rate():
    fs = FairShare(RATE, now=0.0)
    granted, _ = simulate(fs, seconds=10.0, bulk=["a", "b", "c"], small={})
    assert sum(granted.values()) == pytest.approx(RATE * 10, rel=0.01)
    for n in granted.values():
        assert n == pytest.approx(RATE * 10 / 3, rel=0.02)


def test_interactive_sender_waits_about_one_quantum_per_bulk_sender():
    fs = FairShare(RATE, now=0.0)
    granted, latencies = simulate(fs, seconds=10.0, bulk=["bulk1", "bulk2"],
                                  small={"ssh": 0.02})
    assert len(latencies) == pytest.approx(500, abs=2)  # every keystroke got through
    bound = (2 * QUANTUM + 100) / RATE  # one turn of each bulk sender, then its own packet
    assert max(latencies) <= bound + 1e-9
    assert granted["bulk1"] + granted["bulk2"] == pytest.approx(RATE * 10 - 500 * 100, rel=0.01)


def test_one_big_quantum_is_what_hurts_interactive_latency():
    """Same scenario, quantum = a whole chunk: the keystroke waits behind bulk chunks."""
    fs = FairShare(RATE, now=0.0, quantum=CHUNK)
    _, latencies = simulate(fs, seconds=5.0, bulk=["bulk1", "bulk2"], small={"ssh": 0.02})
    assert max(latencies) > 2 * CHUNK / RATE * 0.9


def test_cancel_forgets_the_demand():
    fs = FairShare(1000.0, now=0.0, quantum=100)  # idle burst: 4 quanta
    assert fs.request("a", 300, 0.0) is True
    assert fs.request("a", 500, 0.0) is False
    assert fs.request("b", 50, 0.0) is False
    fs.cancel("a")
    assert fs.advance(0.0) == ["b"]
    assert fs.next_time() is None


def test_idle_budget_is_capped():
    fs = FairShare(RATE, now=0.0)
    assert fs.request("a", 1, 100.0)
    assert fs.budget.tokens <= fs.budget.burst
