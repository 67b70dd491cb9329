"""Give memory back to the system after a connection storm.

Thousands of connections that come and go leave their memory freed but kept: by glibc, which
keeps freed pages for reuse until ``malloc_trim`` returns them, and by Python, which keeps freed
objects in free lists and frees objects in reference cycles only in a full collection (the
server's collector settings make those rare, ``cli/gc_tuning``). Both kinds sit between pages
that are otherwise free, and keep glibc from returning them.

So the server trims every 10 s; and when many connections have closed since the last full
collection (a thousand, or a hundred once the closes die down) and few are open, it runs one
and trims at once; with few open, every periodic trim follows one too. A collection's pause
grows with what is live, about 0.12 ms per open connection (12 ms with 100, 120 ms with
1,000), hence "few": a relay that always holds more gets its trims only. A trim's pause grows
with what it returns, about 0.35 ms per MB (45 ms after 3,000 sessions); trimming while a
storm's memory is still being freed costs more, not less (43 ms a trim, walking every freed
piece between the live ones).

This works with glibc's allocator, which returns memory page by page. Python's own
small-object allocator returns a 1 MiB arena only when nothing at all is left in it, and after
a storm a few surviving objects pin nearly every arena it grew (``cli/allocator`` runs the
server on glibc's). Measured, 3,000 DERP sessions opened and closed: RSS 60 -> 188 -> 64 MB
(Python's allocator: 59 -> 184 -> 103 MB after a collection, 124 MB without).
"""

from __future__ import annotations

import ctypes
import gc
from typing import Callable

import trio

TRIM_INTERVAL = 10.0
CHECK_INTERVAL = 0.25
COLLECT_AFTER = 1000  # connections closed since the last full collection: collect now
COLLECT_MAX_LIVE = 100  # connections open at most: its pause grows by ~0.12 ms with each
STORM_OVER = 5.0  # closes per second below which a storm of them is over
COLLECT_MIN = 100  # closes since the last collection worth one when a storm is over


class Reclaim:
    """When to collect and when to trim (pure: callers pass the counts and the time)."""

    def __init__(self, closed: int, now: float, interval: float = TRIM_INTERVAL) -> None:
        self.interval = interval
        self._collected = closed  # connections closed by the last full collection
        self._next_trim = now + interval
        self._window = (now, closed)  # where the current second of closes began
        self._calm = False  # until a second of closes says otherwise

    def step(self, closed: int, live: int, now: float) -> tuple[bool, bool]:
        """(collect, trim) now. ``closed``: connections closed so far; ``live``: open now.

        A collection needs few connections open, and some closed since the last one: at
        once after a storm of closes, at the end of a smaller one, or with the periodic trim.
        """
        periodic = now >= self._next_trim
        began, closed_then = self._window
        if now - began >= 1.0:
            self._calm = closed - closed_then < STORM_OVER * (now - began)
            self._window = (now, closed)
        since = closed - self._collected
        collect = since > 0 and live <= COLLECT_MAX_LIVE and (
            periodic or since >= COLLECT_AFTER or (self._calm and since >= COLLECT_MIN))
        if collect:
            self._collected = closed
        if collect or periodic:
            self._next_trim = now + self.interval
        return collect, collect or periodic


def _malloc_trim():
    """glibc's ``malloc_trim``, or None on a libc without it (musl: nothing to do). Looked up
    in the symbols the interpreter already has (its libc among them): ``find_library`` would
    run ``ldconfig``, and on some systems ``gcc``, ``ld`` and ``objdump``, at every start."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


async def trim_forever(closed: Callable[[], int], live: Callable[[], int],
                       interval: float = TRIM_INTERVAL, check: float = CHECK_INTERVAL) -> None:
    """Collect and trim as ``Reclaim`` says, asked every ``check`` seconds."""
    malloc_trim = _malloc_trim()
    policy = Reclaim(closed(), trio.current_time(), interval)
    while True:
        await trio.sleep(check)
        collect, trim = policy.step(closed(), live(), trio.current_time())
        if collect:
            gc.collect()
        if trim and malloc_trim is not None:
            malloc_trim(0)
