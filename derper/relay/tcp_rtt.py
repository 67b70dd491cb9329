"""Go's ``derp_tcp_rtt``: every 10 s, each connection's kernel RTT estimate into a bucket.

Go samples per connection with a ticker; one sweep over all connections every 10 s gives the
same counts with one task instead of one per connection. ``TS_DERP_DISABLE_RTT_STATS`` turns it
off, as in Go.
"""

from __future__ import annotations

import socket
import struct
import weakref

import trio

from ..metrics.counters import TCP_RTT_LABELS
from .hub import Relay

SAMPLE_INTERVAL = 10.0
_BOUNDS_MS = (10, 20, 50, 100, 150, 250, 500)  # then "inf"
_NON_TCP = TCP_RTT_LABELS.index("non-tcp")
_ERROR = TCP_RTT_LABELS.index("error")
_TCPI_RTT = 68  # struct tcp_info: __u32 tcpi_rtt (µs) after 8 bytes of u8 fields + 15 u32


def rtt_bucket(rtt_us: int) -> int:
    """Index into TCP_RTT_LABELS for an RTT in microseconds (Go's ``rttBucket``)."""
    ms = rtt_us / 1000
    for i, bound in enumerate(_BOUNDS_MS):
        if ms <= bound:
            return i
    return len(_BOUNDS_MS)


def kernel_rtt_us(sock: socket.socket) -> int:
    """The kernel's smoothed RTT for a TCP socket; raises OSError."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    if len(info) < _TCPI_RTT + 4:
        raise OSError("short TCP_INFO")
    return struct.unpack_from("=I", info, _TCPI_RTT)[0]


def _tcp_socket(stream) -> socket.socket | None:
    """The TCP socket under a session's stream (TLS over TCP, or plain TCP); None otherwise."""
    for _ in range(3):
        sock = getattr(stream, "socket", None)
        if sock is not None:
            return sock
        stream = getattr(stream, "transport", None)
    return None


async def sample_forever(relay: Relay) -> None:
    counts = relay.stats.tcp_rtt
    unavailable: weakref.WeakSet = weakref.WeakSet()  # counted once per connection, as Go does
    while True:
        await trio.sleep(SAMPLE_INTERVAL)
        for sessions in relay.router.conns.values():
            for session in sessions:
                sock = _tcp_socket(getattr(session, "stream", None))
                if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
                    if session not in unavailable:
                        unavailable.add(session)
                        counts[_NON_TCP] += 1
                    continue
                try:
                    counts[rtt_bucket(kernel_rtt_us(sock))] += 1
                except OSError:
                    if session not in unavailable:
                        unavailable.add(session)
                        counts[_ERROR] += 1
