"""A connection's two bounded send queues (disco and everything else) with head-drop (spec §4.4).

The reader that routes a packet must never block, so a full queue evicts its oldest packet:
fresh packets are worth more than stale ones to a latency-sensitive tunnel. Disco packets get
their own queue so path discovery survives a bulk flow that fills the other one.

Packets taken for a write stay "in flight" until that write is settled: sent (counted as sent)
or lost (counted as dropped), so the writer carries no counters of its own.
"""

from __future__ import annotations

from collections import deque

from ..metrics.counters import DropReason, Stats

DEFAULT_DEPTH = 32
RECV_OVERHEAD = 5 + 32  # frame header + source key in front of the packet bytes
FORWARD_OVERHEAD = 5 + 64  # frame header + source and destination keys


class SendQueue:
    __slots__ = ("disco", "other", "depth", "stats", "overhead", "in_flight")

    def __init__(self, stats: Stats, depth: int = DEFAULT_DEPTH,
                 overhead: int = RECV_OVERHEAD) -> None:
        self.disco: deque = deque()
        self.other: deque = deque()
        self.depth = depth
        self.stats = stats
        self.overhead = overhead  # frame bytes that are not packet payload
        # Taken but not settled: [disco packets, disco bytes, other packets, other bytes].
        self.in_flight = [0, 0, 0, 0]

    def __len__(self) -> int:
        return len(self.disco) + len(self.other)

    def put(self, frame: bytes | bytearray, disco: bool) -> bool:
        """Queue a complete frame, evicting the oldest one if the queue is full.

        Returns whether the queue is now full: the next put to it would evict.
        """
        q = self.disco if disco else self.other
        if len(q) >= self.depth:
            self.stats.drop(DropReason.QUEUE_HEAD, disco, len(q.popleft()) - self.overhead)
        q.append(frame)
        return len(q) >= self.depth

    def full(self, disco: bool) -> bool:
        return len(self.disco if disco else self.other) >= self.depth

    def take(self, out: list) -> int:
        """Move every queued frame into ``out``, disco first, and put them in flight.

        Returns how many packets moved.
        """
        d, o = self.disco, self.other
        nd, no = len(d), len(o)
        if not (nd or no):
            return 0
        oh, f = self.overhead, self.in_flight
        if nd:
            f[0] += nd
            f[1] += sum(map(len, d)) - nd * oh
            out.extend(d)
            d.clear()
        if no:
            f[2] += no
            f[3] += sum(map(len, o)) - no * oh
            out.extend(o)
            o.clear()
        return nd + no

    def settle_sent(self) -> None:
        """The write holding the in-flight packets went out: count them sent."""
        f = self.in_flight
        if f[0] or f[2]:
            self.stats.packets_sent += f[0] + f[2]
            self.stats.bytes_sent += f[1] + f[3]
            f[:] = (0, 0, 0, 0)

    def settle_lost(self) -> None:
        """The write failed: the in-flight packets are dropped as write errors."""
        f = self.in_flight
        self.stats.drop(DropReason.WRITE_ERROR, True, f[1], packets=f[0])
        self.stats.drop(DropReason.WRITE_ERROR, False, f[3], packets=f[2])
        f[:] = (0, 0, 0, 0)

    def forget_in_flight(self) -> None:
        """The write went out but is not ours to count (a mesh link counts at forwarding)."""
        self.in_flight[:] = (0, 0, 0, 0)

    def discard(self) -> None:
        """The connection is gone: count what it will never send."""
        for disco, q in ((True, self.disco), (False, self.other)):
            for frame in q:
                self.stats.drop(DropReason.GONE_DISCONNECTED, disco, len(frame) - self.overhead)
            q.clear()
