"""One sender at a time on a stream that two tasks write to (a client's senders, a WebSocket's
reader answering pings beside the writer), without a scheduler trip when nobody else sends."""

from __future__ import annotations

import trio


async def send_alone(lock: trio.Lock, send, data) -> None:
    """``await send(data)`` holding ``lock``."""
    if lock.locked():
        await lock.acquire()
    else:
        lock.acquire_nowait()
    try:
        await send(data)
    finally:
        lock.release()
