"""Event-loop lag: how late the loop wakes a sleeper, the floor under every relayed packet.

One connection task that hogs the loop (a storm of closes, a slow parse) delays every other
client at once; this is where it shows, sampled four times a second, reported as the worst of
the last ten seconds so a scrape every 15 s still sees a spike.
"""

from __future__ import annotations

from collections import deque

import trio

INTERVAL = 0.25
WINDOW = 40  # samples: ten seconds


class LoopLag:
    def __init__(self) -> None:
        self.recent: deque[float] = deque(maxlen=WINDOW)

    @property
    def worst(self) -> float:
        """The largest lag of the last ``WINDOW`` samples, in seconds."""
        return max(self.recent, default=0.0)

    async def sample_forever(self) -> None:
        while True:
            due = trio.current_time() + INTERVAL
            await trio.sleep_until(due)
            self.recent.append(max(0.0, trio.current_time() - due))
