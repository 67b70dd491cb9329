"""Relay counters, kept as plain integers so the hot path pays one attribute add per event.

Names follow the Go derper's expvar names (spec §6) so the exporter can publish them unchanged;
gauges such as current connections are derived from live state when read, not counted here.
"""

from __future__ import annotations

from enum import IntEnum


class DropReason(IntEnum):
    UNKNOWN_DEST = 0
    UNKNOWN_DEST_ON_FWD = 1
    GONE_DISCONNECTED = 2
    QUEUE_HEAD = 3
    QUEUE_TAIL = 4
    WRITE_ERROR = 5
    DUP_CLIENT = 6


KINDS = ("other", "disco")  # indexed by int(is_disco)

# Go's derper_tls_request_version labels; index of what ``SSLObject.version()`` said.
TLS_VERSIONS = ("1.0", "1.1", "1.2", "1.3", "unknown")
_TLS_INDEX = {"TLSv1": 0, "TLSv1.1": 1, "TLSv1.2": 2, "TLSv1.3": 3}


def tls_version_index(version: str | None) -> int:
    return _TLS_INDEX.get(version or "", len(TLS_VERSIONS) - 1)


# Upper bounds of Go's histogram buckets (spec §6.1), before the implicit +Inf.
BUFFERED_WRITE_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 15, 20, 25, 50, 100)
MESH_UPDATE_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
MESH_LOOP_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100)
TCP_RTT_LABELS = ("10ms", "20ms", "50ms", "100ms", "150ms", "250ms", "500ms", "inf", "non-tcp",
                  "error")


class Histogram:
    """Integer observations counted per exact value up to the last bound, so observing is one
    list add (the hot path inlines it); buckets and the sum are worked out on scrape."""

    __slots__ = ("bounds", "cap", "by_value", "over_sum")

    def __init__(self, bounds: tuple[int, ...]) -> None:
        self.bounds = bounds
        self.cap = bounds[-1] + 1
        self.by_value = [0] * (self.cap + 1)  # the last slot counts everything ≥ cap
        self.over_sum = 0  # sum of those

    def observe(self, n: int) -> None:
        if n < self.cap:
            self.by_value[n] += 1
        else:
            self.by_value[self.cap] += 1
            self.over_sum += n

    @property
    def sum(self) -> int:
        return sum(i * c for i, c in enumerate(self.by_value[:self.cap])) + self.over_sum

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations ≤ bound) pairs ending with +Inf, as exposition wants."""
        out, total, i = [], 0, 0
        for bound in self.bounds:
            while i <= bound:
                total += self.by_value[i]
                i += 1
            out.append((bound, total))
        out.append((float("inf"), total + self.by_value[self.cap]))
        return out


class Stats:
    __slots__ = (
        "accepts", "websocket_accepts",
        "packets_received", "bytes_received", "packets_received_disco",
        "packets_sent", "bytes_sent",
        "packets_forwarded_in", "packets_forwarded_out",
        "packets_to_siblings", "packets_from_siblings",  # between -workers of one host
        "got_ping", "sent_pong",
        "peer_gone_disconnected_frames", "peer_gone_not_here_frames",
        "home_moves_in", "home_moves_out",
        "sclient_write_timeouts", "total_dup_client_conns",
        "current_home_connections", "current_notideal_connections",
        "accepted_connections", "rejected_connections",
        "handshake_failures",
        "client_connects", "client_disconnects",  # registered with the router, and gone again
        # Admission and limits (not in the Go derper's set; names say what they count).
        "admission_allowed", "admission_rejected", "admission_fail_open",
        "admission_cache_hits", "admission_mesh_bypass",
        "rejected_max_clients", "rejected_half_open", "evicted_half_open", "rate_limit_per_client_waited",
        "bandwidth_limit_waited",
        "packets_dropped", "bytes_dropped",
        "average_queue_duration_ms", "buffered_write_frames", "mesh_update_batch_size",
        "mesh_update_loop_count", "tcp_rtt", "tls_handshakes", "tls_active",
    )

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)
        # [reason * 2 + is_disco], pre-created for every combination as the Go server does.
        self.packets_dropped = [0] * (len(DropReason) * 2)
        self.bytes_dropped = [0] * (len(DropReason) * 2)
        # Go's EMA (α = 0.1) of the queue wait, updated by a busy writer per batch (session.py).
        self.average_queue_duration_ms = 0.0
        self.buffered_write_frames = Histogram(BUFFERED_WRITE_BUCKETS)  # frames per socket write
        self.mesh_update_batch_size = Histogram(MESH_UPDATE_BUCKETS)  # presence notes per write
        # Go's loop passes per mesh update; derper's writer sends a watcher's notes in one pass.
        self.mesh_update_loop_count = Histogram(MESH_LOOP_BUCKETS)
        self.tcp_rtt = [0] * len(TCP_RTT_LABELS)  # RTT samples by bucket (tcp_rtt.py)
        # Completed TLS handshakes, and live TLS connections, by TLS_VERSIONS index.
        self.tls_handshakes = [0] * len(TLS_VERSIONS)
        self.tls_active = [0] * len(TLS_VERSIONS)

    def to_json(self) -> dict:
        """Every counter as JSON values (a -workers snapshot)."""
        out = {}
        for name in self.__slots__:
            v = getattr(self, name)
            out[name] = [list(v.bounds), v.by_value, v.over_sum] if isinstance(v, Histogram) \
                else v
        return out

    @classmethod
    def summed(cls, parts: list[dict]) -> Stats:
        """The host's counters from its workers' ``to_json``: sums (the queue-wait average:
        the worst); a part that lacks a counter or disagrees in shape adds nothing to it."""
        total = cls()
        for part in parts:
            for name in cls.__slots__:
                mine, theirs = getattr(total, name), part.get(name)
                if isinstance(mine, Histogram):
                    if isinstance(theirs, list) and len(theirs) == 3 and \
                            len(theirs[1]) == len(mine.by_value):
                        mine.by_value = [a + b for a, b in zip(mine.by_value, theirs[1])]
                        mine.over_sum += theirs[2]
                elif isinstance(mine, list):
                    if isinstance(theirs, list) and len(theirs) == len(mine):
                        setattr(total, name, [a + b for a, b in zip(mine, theirs)])
                elif isinstance(theirs, (int, float)):
                    setattr(total, name, max(mine, theirs) if name == "average_queue_duration_ms"
                            else mine + theirs)
        return total

    def drop(self, reason: DropReason, disco: bool, nbytes: int, packets: int = 1) -> None:
        i = reason * 2 + disco
        self.packets_dropped[i] += packets
        self.bytes_dropped[i] += nbytes

    def dropped(self, reason: DropReason, disco: bool | None = None) -> int:
        """Packets dropped for ``reason`` (of one kind, or both)."""
        if disco is None:
            return self.packets_dropped[reason * 2] + self.packets_dropped[reason * 2 + 1]
        return self.packets_dropped[reason * 2 + disco]
