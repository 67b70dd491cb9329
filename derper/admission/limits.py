"""Token buckets (accept rate, PeerGone(NotHere), per-client receive rate) and the cap on
connections still in their handshake.

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

    def refill(self, now: float) -> None:
        """Add what accrued since the last call, up to ``burst``."""
        elapsed = now - self.last
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
            self.last = now

    def allow(self, now: float, n: float = 1.0) -> bool:
        """Take ``n`` tokens if they are there."""
        if math.isinf(self.rate):
            return True
        self.refill(now)
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False

    def take(self, now: float, n: float) -> float:
        """Take ``n`` tokens, going into debt if needed; returns the seconds to wait it off.

        Back-pressure for byte streams: the caller has already read ``n`` bytes and pauses
        reading for the returned time, so the long-run rate is exact whatever the read sizes.
        """
        self.refill(now)
        self.tokens -= n
        return -self.tokens / self.rate if self.tokens < 0 else 0.0


class HandshakeSlot:
    """One connection's place among the half-open ones; released once, whoever is first."""

    __slots__ = ("_slots",)

    def __init__(self, slots: HandshakeSlots) -> None:
        self._slots: HandshakeSlots | None = slots

    def release(self) -> None:
        if self._slots is not None:
            self._slots.count -= 1
            self._slots = None


class HandshakeSlots:
    """Caps connections that have not finished TLS + HTTP + DERP handshake (slowloris bound).

    The connection task hands its slot's ``release`` down to the DERP session, which calls it
    on registration; the task releases it again when it ends, whichever comes first.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0

    def try_enter(self) -> HandshakeSlot | None:
        if self.limit > 0 and self.count >= self.limit:
            return None
        self.count += 1
        return HandshakeSlot(self)
