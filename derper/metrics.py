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


class Stats:
    __slots__ = (
        "accepts", "websocket_accepts",
        "packets_received", "bytes_received", "packets_received_disco",
        "packets_sent", "bytes_sent",
        "packets_forwarded_in", "packets_forwarded_out",
        "got_ping", "sent_pong",
        "peer_gone_disconnected_frames", "peer_gone_not_here_frames",
        "home_moves_in", "home_moves_out",
        "sclient_write_timeouts", "total_dup_client_conns",
        "current_home_connections", "current_notideal_connections",
        "accepted_connections", "rejected_connections",
        "handshake_failures",
        # Admission and limits (not in the Go derper's set; names say what they count).
        "admission_allowed", "admission_rejected", "admission_fail_open",
        "admission_cache_hits", "admission_mesh_bypass",
        "rejected_max_clients", "rejected_half_open", "rate_limit_per_client_waited",
        "bandwidth_limit_waited",
        "packets_dropped", "bytes_dropped",
    )

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)
        # [reason * 2 + is_disco], pre-created for every combination as the Go server does.
        self.packets_dropped = [0] * (len(DropReason) * 2)
        self.bytes_dropped = [0] * (len(DropReason) * 2)

    def drop(self, reason: DropReason, disco: bool, nbytes: int, packets: int = 1) -> None:
        i = reason * 2 + disco
        self.packets_dropped[i] += packets
        self.bytes_dropped[i] += nbytes

    def dropped(self, reason: DropReason, disco: bool | None = None) -> int:
        """Packets dropped for ``reason`` (of one kind, or both)."""
        if disco is None:
            return self.packets_dropped[reason * 2] + self.packets_dropped[reason * 2 + 1]
        return self.packets_dropped[reason * 2 + disco]
