"""Token buckets (accept rate, PeerGone(NotHere), per-client receive rate), the cap on
connections still in their handshake, and the event loop's share for them.

Pure: callers pass the current time, so behaviour is exact in tests and cheap at run time.
"""

from __future__ import annotations

import ipaddress
import math
from collections import deque
from typing import Callable

from ..metrics.counters import Stats


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


# The half-open budget (TLS, HTTP head and DERP handshake together) once the pool is half full.
PRESSURE_DEADLINE = 2.0

# While packets are relayed, work on connections that are not relaying (handshakes, closes)
# runs at once within this share of the event loop, in slices of at most LOOP_SLICE seconds
# (a TLS handshake step is 0.3-0.5 ms); the rest waits for turns, one per scheduler pass.
LOOP_SHARE = 0.25
LOOP_SLICE = 0.001
QUIET = 0.5  # no packet relayed for this long: the relay is quiet, nothing takes turns


class LoopShare:
    """Whether work on connections that are not relaying may run at once, or takes its turn.

    One event loop runs every connection, one ready task after another: a flood of TLS
    handshakes, HTTP requests or closing sessions would make every relayed packet wait behind
    all of it. While packets are being relayed, such work runs at once only within a budget:
    ``share`` of the loop's time, in slices of at most ``slice`` seconds (a token bucket of
    loop seconds, charged as the work runs). Beyond it each piece waits for its turn, one per
    pass of the scheduler (``admission.pacer``), so a relayed packet waits for at most a slice
    and a piece; the turns come as fast as the loop goes round, so nothing idles while work
    waits. On a quiet relay (no packet for ``quiet`` seconds) everything runs at once: nobody's
    latency is at stake, and reconnecting clients get the whole loop.
    """

    __slots__ = ("bucket", "quiet", "_relayed", "_busy_until")

    def __init__(self, now: float, share: float = LOOP_SHARE, slice: float = LOOP_SLICE,
                 quiet: float = QUIET) -> None:
        if not 0 < share < 1:
            raise ValueError("the loop share must be between 0 and 1")
        self.bucket = TokenBucket(share, slice, now)
        self.quiet = quiet
        self._relayed = 0
        self._busy_until = -math.inf

    def may_run(self, now: float, relayed: int) -> bool:
        """Whether the next piece may run at once. ``relayed``: packets relayed so far (any
        counter that grows with them)."""
        bucket = self.bucket
        if relayed != self._relayed:
            self._relayed = relayed
            self._busy_until = now + self.quiet
        if now >= self._busy_until:
            bucket.tokens, bucket.last = bucket.burst, now
            return True
        bucket.refill(now)
        return bucket.tokens >= 0

    def charge(self, now: float, seconds: float) -> None:
        """Work that just ran took ``seconds`` of the loop: into debt, up to a slice."""
        bucket = self.bucket
        bucket.take(now, seconds)
        bucket.tokens = max(bucket.tokens, -bucket.burst)


def source_key(ip: str | None) -> str:
    """Whose half-open connections these are: an IPv4 address, or an IPv6 /64 (one subscriber
    gets a whole /64, so counting addresses would count nothing)."""
    if not ip or ":" not in ip:
        return ip or ""
    try:
        return str(ipaddress.IPv6Network((ip.split("%", 1)[0], 64), strict=False))
    except ValueError:
        return ip


class HandshakeSlot:
    """One connection's place among the half-open ones; released once, whoever is first."""

    __slots__ = ("_slots", "source", "_evict")

    def __init__(self, slots: HandshakeSlots, source: str, evict: Callable[[], None]) -> None:
        self._slots: HandshakeSlots | None = slots
        self.source = source
        self._evict = evict

    def release(self) -> bool:
        """Leave the pool; whether the place was still held (not yet released or evicted)."""
        if self._slots is None:
            return False
        self._slots._remove(self)
        self._slots = None
        return True

    def rekey(self, source: str) -> bool:
        """Count this place under ``source`` from now on (the real client behind a PROXY
        header); False, with the place released, if ``source`` already holds its share."""
        slots = self._slots
        if slots is None:
            return False
        if not slots._move(self, source):
            self.release()
            return False
        return True

    def evict(self) -> None:
        """Give the place up to a newcomer: released now, its connection told to close."""
        self.release()
        self._evict()


class HandshakeSlots:
    """Bounds connections that have not finished TLS + HTTP + DERP handshake (slowloris).

    A cap an attacker can fill would be a lockout switch, so filling it is not enough: each
    source (address, IPv6 /64) holds at most ``per_source`` places, and when the pool is full
    a newcomer from a source holding fewer than the biggest holder takes the place of that
    holder's oldest half-open connection (see ``_victim``). The connection task hands its slot's ``release`` down to the DERP session, which
    calls it on registration; the task releases it again when it ends, whichever comes first.
    """

    def __init__(self, limit: int, per_source: int, stats: Stats) -> None:
        self.limit = limit
        self.per_source = per_source
        self.stats = stats
        self.count = 0
        self._by_source: dict[str, deque[HandshakeSlot]] = {}

    def under_pressure(self) -> bool:
        """Half full or more: new connections get ``PRESSURE_DEADLINE``."""
        return self.limit > 0 and 2 * self.count >= self.limit

    def try_enter(self, source: str, evict: Callable[[], None],
                  capped: bool = True) -> HandshakeSlot | None:
        """A place for a connection from ``source``, or None (refused: close it at once).

        ``evict`` is called if the place is later given to a newcomer. ``capped=False`` skips
        the per-source cap: a reverse proxy's connections carry many clients (a PROXY header
        re-keys each to its client with ``HandshakeSlot.rekey``).
        """
        mine = self._by_source.get(source)
        if capped and self.per_source and mine is not None and len(mine) >= self.per_source:
            self.stats.rejected_half_open += 1
            return None
        if self.limit > 0 and self.count >= self.limit:
            victim = self._victim(len(mine) if mine is not None else 0)
            if victim is None:
                self.stats.rejected_half_open += 1
                return None
            victim.evict()
            self.stats.evicted_half_open += 1
            mine = self._by_source.get(source)
        if mine is None:
            mine = self._by_source[source] = deque()
        slot = HandshakeSlot(self, source, evict)
        mine.append(slot)
        self.count += 1
        return slot

    def _victim(self, holding: int) -> HandshakeSlot | None:
        """The oldest half-open connection of the biggest holder, if it holds at least two
        more than the newcomer's source: a source below its fair share takes a place, one at
        its share is refused, so attackers cannot churn each other (or a real client) out."""
        biggest = max(self._by_source.values(), key=len)
        return biggest[0] if len(biggest) > holding + 1 else None

    def _move(self, slot: HandshakeSlot, source: str) -> bool:
        theirs = self._by_source.get(source)
        if self.per_source and theirs is not None and len(theirs) >= self.per_source:
            self.stats.rejected_half_open += 1
            return False
        self._remove(slot)
        slot.source = source
        self._by_source.setdefault(source, deque()).append(slot)
        self.count += 1
        return True

    def _remove(self, slot: HandshakeSlot) -> None:
        slots = self._by_source[slot.source]
        slots.remove(slot)
        if not slots:
            del self._by_source[slot.source]
        self.count -= 1
