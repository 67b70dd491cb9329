"""Follow files that other tools rewrite (certificates, key lists) by polling their metadata.

Polling inode, size and mtime every few seconds needs no inotify and sees editors that replace
a file as well as tools that rewrite it in place.
"""

from __future__ import annotations

import os
from typing import Callable

import trio

Signature = tuple[tuple[int, int, int] | None, ...]


def signature(*paths) -> Signature:
    """What changes when any of ``paths`` (or a symlink's target) is rewritten; None: missing."""
    result = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            result.append(None)
        else:
            result.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(result)


async def follow(current: Callable[[], Signature], loaded: Callable[[], Signature],
                 interval: float, on_change: Callable[[], object]) -> None:
    """Call ``on_change`` when the files differ from what was ``loaded`` and then stayed
    unchanged for one more interval, so a file caught mid-rewrite is not reported as broken."""
    previous = loaded()
    while True:
        await trio.sleep(interval)
        now = current()
        if now != loaded() and now == previous:
            on_change()
        previous = now
