"""Every session's KeepAlive from one timer: no task, no timer and nothing to cancel per session.

Go gives each connection a ticker (60 s plus a jitter in [0, 5) chosen once per connection) and
sends a KeepAlive on every tick. Here one task ticks for all of them: ``KeepaliveSchedule``
(pure) files each session under the tick its next KeepAlive is due in and hands back the
sessions due; ``Keepalives.run`` tells them. An idle session so costs two table entries, and a
closing one two deletions, instead of a task whose sleep must be cancelled.
"""

from __future__ import annotations

import math
import random
from typing import Hashable

import trio

JITTER = 5 / 60  # Go: 60 s + [0, 5) s, a twelfth of the period
TICKS_PER_PERIOD = 60  # the timer's resolution: a second for Go's 60 s


class KeepaliveSchedule:
    """Items filed by the tick their next KeepAlive is due in; each item has its own period.

    An item is handed out at the first tick at or after its due time (never early, at most a
    tick late) and is then due a period after it was due, so it does not drift; a timer late by
    more than a period skips what it missed, as Go's ticker does.
    """

    def __init__(self, tick: float) -> None:
        self.tick = tick
        self._slots: dict[int, set] = {}
        self._where: dict[Hashable, tuple[int, float, float]] = {}  # item -> slot, due, period
        self._next = 0  # the first slot not yet handed out

    def __len__(self) -> int:
        return len(self._where)

    def add(self, item: Hashable, now: float, period: float) -> None:
        """A KeepAlive for ``item`` every ``period`` seconds from ``now``."""
        if not self._where:
            self._next = self._slot(now)
        self._file(item, now + period, period)

    def remove(self, item: Hashable) -> None:
        where = self._where.pop(item, None)
        if where is not None:
            slot = self._slots[where[0]]
            slot.discard(item)
            if not slot:
                del self._slots[where[0]]

    def due(self, now: float) -> list:
        """The items whose KeepAlive is due by ``now``, each filed again for its next one."""
        out: list = []
        last = math.floor(now / self.tick)
        slots, where = self._slots, self._where
        for n in range(self._next, last + 1) if slots else ():
            items = slots.pop(n, None)
            if items:
                out.extend(items)
        self._next = last + 1
        for item in out:
            _, due, period = where[item]
            due += period
            self._file(item, due if due > now else now + period, period)
        return out

    def _slot(self, t: float) -> int:
        return math.ceil(t / self.tick)

    def _file(self, item: Hashable, due: float, period: float) -> None:
        slot = self._slot(due)
        self._where[item] = (slot, due, period)
        items = self._slots.get(slot)
        if items is None:
            items = self._slots[slot] = set()
        items.add(item)


class Keepalives:
    """The server's keepalive timer: ``add`` a session when it registers, ``remove`` it when it
    goes; ``run`` (in the server's nursery) calls each one's ``keepalive()`` when it is due."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.schedule = KeepaliveSchedule(interval / TICKS_PER_PERIOD)

    def add(self, session: Hashable) -> None:
        self.schedule.add(session, trio.current_time(),
                          self.interval * (1 + random.uniform(0, JITTER)))

    def remove(self, session: Hashable) -> None:
        self.schedule.remove(session)

    async def run(self) -> None:
        tick = self.schedule.tick
        while True:
            await trio.sleep(tick)
            for session in self.schedule.due(trio.current_time()):
                session.keepalive()
