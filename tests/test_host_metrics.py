"""-workers' metrics add up to the host's: snapshot round trip and the combine rules."""

from __future__ import annotations

import trio

from derper.metrics import varz
from derper.metrics.exposition import Exposition
from derper.proto.keys import KeyPair
from derper.relay.hub import Relay
from derper.workers.host_metrics import decode, encode, merge
from stun.counters import StunCounters


def exposition() -> Exposition:
    return Exposition(Relay(KeyPair.generate()), StunCounters(), "1.2.3")


def values(metrics, name):
    return {labels: v for m in metrics if m.name == name and m.prom is not None
            for labels, v in m.samples}


def test_a_snapshot_round_trips_exactly():
    async def main():
        e = exposition()
        e.relay.stats.packets_received = 7
        e.relay.stats.buffered_write_frames.observe(3)
        e.relay.stats.buffered_write_frames.observe(500)
        metrics = e.metrics()
        pid, back = decode(encode(metrics, 1234))
        assert pid == 1234
        assert varz.render(back) == varz.render(metrics)
    trio.run(main)


def test_counters_sum_histograms_sum_settings_once_and_worst_lag():
    async def main():
        a, b = exposition(), exposition()
        a.relay.stats.packets_received, b.relay.stats.packets_received = 5, 11
        a.relay.stats.buffered_write_frames.observe(2)
        b.relay.stats.buffered_write_frames.observe(2)
        b.relay.stats.buffered_write_frames.observe(200)
        a.relay.loop_lag.recent.append(0.004)
        b.relay.loop_lag.recent.append(0.25)
        merged = merge([a.metrics(), decode(encode(b.metrics(), 2))[1]])
        assert values(merged, "derp_packets_received") == {(): 16}
        (h,) = [m.histogram for m in merged if m.name == "derp_buffered_write_frames"]
        assert h.by_value[2] == 2 and h.over_sum == 200
        assert values(merged, "derper_event_loop_lag_seconds") == {(): 0.25}
        assert values(merged, "derper_build") == {(("version", "1.2.3"),): 1}
        text = varz.render(merged)
        assert "derp_packets_received 16\n" in text
    trio.run(main)


def test_per_worker_families_get_a_worker_label():
    async def main():
        from derper.mesh.link import LinkHealth
        a, b = exposition(), exposition()
        for e, up in ((a, True), (b, False)):
            health = LinkHealth("derp2.example.com", "192.0.2.2")
            health.up = up
            e.relay.mesh_links[("derp2.example.com", "192.0.2.2")] = health
        merged = merge([a.metrics(), b.metrics()])
        link = ("address", "192.0.2.2"), ("peer", "derp2.example.com")
        assert values(merged, "derper_mesh_link_up") == {
            tuple(sorted(link + (("worker", "0"),))): 1,
            tuple(sorted(link + (("worker", "1"),))): 0}
    trio.run(main)


def test_the_status_pages_counters_sum_over_workers():
    from derper.metrics.counters import DropReason, Stats
    a, b = Stats(), Stats()
    a.packets_received, b.packets_received = 3, 4
    a.drop(DropReason.QUEUE_HEAD, True, 100)
    b.drop(DropReason.QUEUE_HEAD, True, 50)
    b.buffered_write_frames.observe(7)
    a.average_queue_duration_ms, b.average_queue_duration_ms = 1.5, 0.5
    total = Stats.summed([a.to_json(), b.to_json(), {"packets_received": "junk"}])
    assert total.packets_received == 7
    assert total.dropped(DropReason.QUEUE_HEAD) == 2 and sum(total.bytes_dropped) == 150
    assert total.buffered_write_frames.by_value[7] == 1
    assert total.average_queue_duration_ms == 1.5  # the worst, not a sum of averages
