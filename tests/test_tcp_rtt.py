"""derp_tcp_rtt: kernel RTT samples of live connections, in Go's buckets."""

from __future__ import annotations

import pytest

from derper import client as dc
from derper.metrics.counters import TCP_RTT_LABELS
from derper.relay import tcp_rtt
from tests.conftest import url
from tests.relay_helpers import connect_opts, wait_until


@pytest.mark.parametrize("rtt_us,label", [(0, "10ms"), (10_000, "10ms"), (10_001, "20ms"),
                                          (149_000, "150ms"), (500_000, "500ms"),
                                          (500_001, "inf")])
def test_buckets(rtt_us, label):
    assert TCP_RTT_LABELS[tcp_rtt.rtt_bucket(rtt_us)] == label


async def test_live_tls_connections_are_sampled(start_server, ca, monkeypatch):
    monkeypatch.setattr(tcp_rtt, "SAMPLE_INTERVAL", 0.05)
    server = await start_server(tls=True)
    counts = server.relay.stats.tcp_rtt
    async with dc.connect(url(server), **connect_opts(server, ca)), \
            dc.connect(url(server), **connect_opts(server, ca)):
        # Two connections, two sweeps; whatever the RTT (a loaded machine can exceed 10 ms).
        rtt_buckets = TCP_RTT_LABELS.index("inf") + 1
        await wait_until(lambda: sum(counts[:rtt_buckets]) >= 4)
    assert counts[TCP_RTT_LABELS.index("error")] == counts[TCP_RTT_LABELS.index("non-tcp")] == 0
