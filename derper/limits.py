"""Token buckets: accept rate limiting and the per-sender PeerGone(NotHere) limit.

Pure: callers pass the current time, so behaviour is exact in tests and cheap at run time.
"""

from __future__ import annotations

import math


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; starts full."""

    __slots__ = ("rate", "burst", "tokens", "last")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate < 0 or burst < 0:
            raise ValueError("token bucket rate and burst must not be negative")
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.last = now

    def allow(self, now: float, n: float = 1.0) -> bool:
        """Take ``n`` tokens if they are there."""
        if math.isinf(self.rate):
            return True
        elapsed = now - self.last
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
            self.last = now
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False
