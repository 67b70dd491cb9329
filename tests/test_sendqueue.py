"""Per-client send queues (spec §4.4): two queues of 32, head-drop, drain order, drop counters."""

from __future__ import annotations

import pytest

from derper.metrics.counters import DropReason, Stats
from derper.proto import wire
from derper.relay.sendqueue import DEFAULT_DEPTH, SendQueue

SRC = bytes(range(32))


def pkt(size: int, tag: int = 0) -> bytes:
    """A complete RecvPacket frame whose packet is ``size`` bytes (first byte = tag)."""
    return wire.recv_packet(SRC, bytes([tag]) + bytes(size - 1))


def drops(stats: Stats) -> dict[tuple[str, str], tuple[int, int]]:
    """Non-zero drop counters as {(reason, kind): (packets, bytes)}."""
    out = {}
    for reason in DropReason:
        for disco, kind in ((False, "other"), (True, "disco")):
            i = reason * 2 + disco
            if stats.packets_dropped[i] or stats.bytes_dropped[i]:
                out[(reason.name, kind)] = (stats.packets_dropped[i], stats.bytes_dropped[i])
    return out


@pytest.fixture
def stats() -> Stats:
    return Stats()


def test_default_depth_is_32(stats):
    assert DEFAULT_DEPTH == 32 and SendQueue(stats).depth == 32


@pytest.mark.parametrize("disco", [False, True], ids=["other", "disco"])
def test_head_drop_evicts_oldest_and_counts_its_payload(stats, disco):
    q = SendQueue(stats)
    frames = [pkt(10 + i, tag=i) for i in range(DEFAULT_DEPTH)]
    for f in frames:
        q.put(f, disco)
    assert len(q) == 32 and drops(stats) == {}
    q.put(pkt(500, tag=99), disco)
    kind = "disco" if disco else "other"
    assert drops(stats) == {("QUEUE_HEAD", kind): (1, 10)}  # frame length − 37
    q.put(pkt(7, tag=100), disco)
    assert drops(stats) == {("QUEUE_HEAD", kind): (2, 10 + 11)}
    assert stats.dropped(DropReason.QUEUE_HEAD, disco) == 2
    assert stats.dropped(DropReason.QUEUE_HEAD, not disco) == 0
    out = []
    q.take(out)
    assert out == frames[2:] + [pkt(500, tag=99), pkt(7, tag=100)]


def test_queues_are_independent(stats):
    q = SendQueue(stats)
    for i in range(DEFAULT_DEPTH):
        q.put(pkt(62, tag=i), True)
        q.put(pkt(100, tag=i), False)
    assert len(q) == 64 and drops(stats) == {}
    q.put(pkt(62), True)
    assert drops(stats) == {("QUEUE_HEAD", "disco"): (1, 62)}
    assert len(q.other) == 32


def test_take_disco_first_and_totals(stats):
    q = SendQueue(stats)
    q.put(pkt(100, 1), False)
    q.put(pkt(62, 2), True)
    q.put(pkt(200, 3), False)
    q.put(pkt(70, 4), True)
    out = [b"already there"]
    assert q.take(out) == 4 and q.in_flight == [2, 62 + 70, 2, 100 + 200]
    assert out == [b"already there", pkt(62, 2), pkt(70, 4), pkt(100, 1), pkt(200, 3)]
    assert len(q) == 0
    assert q.take(out) == 0 and len(out) == 5 and q.in_flight == [2, 62 + 70, 2, 100 + 200]
    assert drops(stats) == {}


def test_in_flight_settles_as_sent_or_lost(stats):
    q = SendQueue(stats)
    q.put(pkt(100), False)
    q.take([])
    q.put(pkt(62), True)  # a second take before the write settles: both are in flight
    q.take([])
    q.settle_sent()
    assert (stats.packets_sent, stats.bytes_sent, q.in_flight) == (2, 162, [0, 0, 0, 0])
    q.put(pkt(30), False)
    q.take([])
    q.settle_lost()
    assert drops(stats) == {("WRITE_ERROR", "other"): (1, 30)}
    assert q.in_flight == [0, 0, 0, 0] and stats.packets_sent == 2


def test_discard_counts_gone_disconnected(stats):
    q = SendQueue(stats)
    for size in (10, 20, 30):
        q.put(pkt(size), False)
    q.put(pkt(62), True)
    q.discard()
    assert len(q) == 0
    assert drops(stats) == {("GONE_DISCONNECTED", "other"): (3, 60),
                            ("GONE_DISCONNECTED", "disco"): (1, 62)}
    q.discard()
    assert stats.dropped(DropReason.GONE_DISCONNECTED) == 4


def test_custom_depth(stats):
    q = SendQueue(stats, depth=2)
    for i in range(5):
        q.put(pkt(40, i), False)
    out = []
    q.take(out)
    assert out == [pkt(40, 3), pkt(40, 4)]
    assert drops(stats) == {("QUEUE_HEAD", "other"): (3, 120)}
