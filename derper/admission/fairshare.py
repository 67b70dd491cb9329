"""``-bandwidth-limit``: one relay-wide byte budget shared fairly among the clients sending.

Core (pure, fake-clock testable): deficit round robin (DRR) over the senders' outstanding
demands, served at ``rate`` bytes per second. Each turn gives a sender at most ``quantum``
bytes, so a sender with a few small packets waits at most about one quantum per other active
sender, however much a bulk sender has asked for; idle senders get nothing and lose nothing.

Shell (trio): a session that has read ``n`` bytes awaits ``acquire(self, n)`` before routing
them, so an over-budget sender is slowed by TCP back-pressure, never by dropping packets.
"""

from __future__ import annotations

from collections import deque

import trio

from ..metrics.counters import Stats
from .limits import TokenBucket

QUANTUM = 1500  # one MTU-sized packet per turn: small packets never wait behind a bulk chunk
IDLE_BURST = 0.02  # seconds of budget that may be saved up while nobody is waiting
MIN_TICK = 0.001  # the shell serves at most this often; tokens accrue meanwhile
_DUST = 1e-6  # bytes: float remainders below this count as zero (else time would stand still)


class _Demand:
    __slots__ = ("remaining", "deficit")

    def __init__(self, nbytes: int) -> None:
        self.remaining = nbytes
        self.deficit = 0


class FairShare:
    """DRR over byte demands at ``rate`` bytes/s. Callers pass the time; nothing blocks here."""

    def __init__(self, rate: float, now: float, quantum: int = QUANTUM) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.quantum = quantum
        self.budget = TokenBucket(rate, max(4.0 * quantum, rate * IDLE_BURST), now)
        self.demands: dict[object, _Demand] = {}
        self.ring: deque = deque()  # senders with outstanding demand, in service order

    def request(self, sender: object, nbytes: int, now: float) -> bool:
        """Ask for ``nbytes``. True: granted at once; False: wait until ``advance`` lists it."""
        budget = self.budget
        budget.refill(now)
        if not self.ring and budget.tokens >= nbytes:
            budget.tokens -= nbytes
            return True
        d = self.demands.get(sender)
        if d is None:
            self.demands[sender] = _Demand(nbytes)
            self.ring.append(sender)
        else:
            d.remaining += nbytes
        return False

    def cancel(self, sender: object) -> None:
        """The sender went away while waiting; its demand is forgotten."""
        if self.demands.pop(sender, None) is not None:
            self.ring.remove(sender)

    def advance(self, now: float) -> list:
        """Spend the budget accrued up to ``now``; returns the senders whose demand is now met."""
        budget = self.budget
        budget.refill(now)
        done = []
        ring, demands = self.ring, self.demands
        while ring and budget.tokens > 0:
            sender = ring[0]
            d = demands[sender]
            if d.deficit <= _DUST:
                d.deficit += self.quantum
            give = min(d.deficit, d.remaining, budget.tokens)
            d.remaining -= give
            d.deficit -= give
            budget.tokens -= give
            if d.remaining <= _DUST:
                ring.popleft()
                del demands[sender]
                done.append(sender)
            elif d.deficit <= _DUST:
                ring.rotate(-1)
        return done

    def next_time(self) -> float | None:
        """When ``advance`` can next make progress (None: nobody is waiting)."""
        if not self.ring:
            return None
        d = self.demands[self.ring[0]]
        step = min(d.remaining, d.deficit if d.deficit > _DUST else self.quantum)
        budget = self.budget
        need = step - budget.tokens
        return budget.last + (need / budget.rate if need > _DUST else 0.0)


class BandwidthLimiter:
    """The trio shell: ``acquire`` waits for a share; ``run`` (one task) hands shares out."""

    def __init__(self, rate: float, stats: Stats, quantum: int = QUANTUM) -> None:
        self.core = FairShare(rate, trio.current_time(), quantum)
        self.stats = stats
        self._waiters: dict[object, trio.Event] = {}
        self._kick = trio.Event()

    async def acquire(self, sender: object, nbytes: int) -> None:
        if self.core.request(sender, nbytes, trio.current_time()):
            return
        self.stats.bandwidth_limit_waited += 1
        done = self._waiters.get(sender)
        if done is None:
            done = self._waiters[sender] = trio.Event()
        self._kick.set()
        try:
            await done.wait()
        finally:
            if not done.is_set():  # cancelled: the session is closing
                self._waiters.pop(sender, None)
                self.core.cancel(sender)

    async def run(self) -> None:
        core = self.core
        while True:
            for sender in core.advance(trio.current_time()):
                event = self._waiters.pop(sender, None)
                if event is not None:
                    event.set()
            wake = core.next_time()
            if wake is None:
                await self._kick.wait()
                self._kick = trio.Event()
            else:
                await trio.sleep_until(max(wake, trio.current_time() + MIN_TICK))
