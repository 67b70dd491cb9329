"""A client's two bounded send queues (disco and everything else) with head-drop (spec §4.4).

The reader that routes a packet must never block, so a full queue evicts its oldest packet:
fresh packets are worth more than stale ones to a latency-sensitive tunnel. Disco packets get
their own queue so path discovery survives a bulk flow that fills the other one.
"""

from __future__ import annotations

from collections import deque

from ..metrics.counters import DropReason, Stats

DEFAULT_DEPTH = 32
RECV_OVERHEAD = 5 + 32  # frame header + source key in front of the packet bytes


class SendQueue:
    __slots__ = ("disco", "other", "depth", "stats")

    def __init__(self, stats: Stats, depth: int = DEFAULT_DEPTH) -> None:
        self.disco: deque = deque()
        self.other: deque = deque()
        self.depth = depth
        self.stats = stats

    def __len__(self) -> int:
        return len(self.disco) + len(self.other)

    def put(self, frame: bytes | bytearray, disco: bool) -> bool:
        """Queue a complete RecvPacket frame, evicting the oldest one if the queue is full.

        Returns whether the queue is now full: the next put to it would evict.
        """
        q = self.disco if disco else self.other
        if len(q) >= self.depth:
            self.stats.drop(DropReason.QUEUE_HEAD, disco, len(q.popleft()) - RECV_OVERHEAD)
        q.append(frame)
        return len(q) >= self.depth

    def full(self, disco: bool) -> bool:
        return len(self.disco if disco else self.other) >= self.depth

    def take(self, out: list) -> tuple[int, int, int, int]:
        """Move every queued frame into ``out``, disco first.

        Returns (disco packets, disco payload bytes, other packets, other payload bytes).
        """
        d, o = self.disco, self.other
        nd, no = len(d), len(o)
        bd = sum(map(len, d)) - nd * RECV_OVERHEAD if nd else 0
        bo = sum(map(len, o)) - no * RECV_OVERHEAD if no else 0
        out.extend(d)
        out.extend(o)
        d.clear()
        o.clear()
        return nd, bd, no, bo

    def discard(self) -> None:
        """The client is gone: count what it will never receive."""
        for disco, q in ((True, self.disco), (False, self.other)):
            for frame in q:
                self.stats.drop(DropReason.GONE_DISCONNECTED, disco, len(frame) - RECV_OVERHEAD)
            q.clear()
