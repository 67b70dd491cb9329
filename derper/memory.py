"""Give memory back to the system after a connection storm.

Thousands of connections that come and go leave their memory freed but kept: by glibc, which
keeps freed pages for reuse (``malloc_trim`` returns them; a few milliseconds for a 100 MB
heap, so every 10 s costs nothing worth measuring), and by Python, which keeps freed objects
in free lists and frees objects in reference cycles (a closed connection's exceptions and their
tracebacks) only in a full collection, which the server's collector settings make rare
(``cli/gc_tuning``). Both kinds sit between the pages still in use, so glibc cannot return
those pages either. So once many connections have come and gone since the last full
collection and few are left, the server runs one (its pause grows with what is live: about
10 ms per 1,000 connections) and then trims; with few open, every periodic trim follows one.

That is enough with glibc's allocator, which returns memory page by page; Python's own
small-object allocator returns a 1 MiB arena only when nothing at all is left in it, and after
a storm a few surviving objects pin nearly every arena it grew (``cli/allocator`` runs the server
on glibc's). Measured: 3,000 DERP sessions opened and closed, RSS 60 -> 188 -> 64 MB (Python's
allocator: 59 -> 184 -> 103 MB after a collection, 124 MB without).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from typing import Callable

import trio

TRIM_INTERVAL = 10.0
CHECK_INTERVAL = 1.0
COLLECT_AFTER = 1000  # connections closed since the last full collection
COLLECT_MAX_LIVE = 1000  # connections open at most, for its pause to stay short


class CollectPolicy:
    """When a full collection is worth its pause (pure: callers pass the counts)."""

    def __init__(self, closed: int) -> None:
        self._closed = closed  # connections closed by the last full collection

    def due(self, closed: int, live: int, trimming: bool) -> bool:
        """``closed``: connections closed so far; ``live``: open now; ``trimming``: the periodic
        trim is due. True means collect now (and counts as done): with few connections open,
        at once after a storm of closes, else with the trim if any closed since the last one."""
        since = closed - self._closed
        if since > 0 and live <= COLLECT_MAX_LIVE and (trimming or since >= COLLECT_AFTER):
            self._closed = closed
            return True
        return False


def _malloc_trim():
    """glibc's ``malloc_trim``, or None on a libc without it (musl: nothing to do)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


async def trim_forever(closed: Callable[[], int], live: Callable[[], int],
                       interval: float = TRIM_INTERVAL, check: float = CHECK_INTERVAL) -> None:
    """Trim every ``interval`` seconds, after a full collection when ``CollectPolicy`` says so
    (asked every ``check`` seconds: after a storm, collect and trim at once)."""
    malloc_trim = _malloc_trim()
    policy = CollectPolicy(closed())
    next_trim = trio.current_time() + interval
    while True:
        await trio.sleep(check)
        now = trio.current_time()
        trimming = now >= next_trim
        if policy.due(closed(), live(), trimming):
            gc.collect()
        elif not trimming:
            continue
        if malloc_trim is not None:
            malloc_trim(0)
        next_trim = now + interval
