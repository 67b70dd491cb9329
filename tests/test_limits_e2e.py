"""Limits on a real server: -max-clients, the handshake cap, an accept flood, -rate-config."""

from __future__ import annotations

import signal

import trio

from derper import client as dc
from derper.proto.messages import ReceivedPacket
from tests.conftest import url
from tests.process import derper, free_port
from tests.relay_helpers import assert_relays, connect_opts, recv_kind, wait_until


async def test_max_clients_answers_503_before_the_upgrade(start_server, ca):
    server = await start_server(max_clients=1)
    u = url(server)
    async with dc.connect(u, **connect_opts(server, ca)) as first:
        try:
            async with dc.connect(u, **connect_opts(server, ca, fast_start=False)):
                raise AssertionError("a second client got in over -max-clients 1")
        except dc.DerpClientError as e:
            assert "503" in str(e)
        assert server.relay.stats.rejected_max_clients == 1
        await assert_relays(first, first)
    await wait_until(lambda: server.relay.derp_conns == 0)
    async with dc.connect(u, **connect_opts(server, ca)) as again:
        await assert_relays(again, again)


async def test_handshake_cap_closes_excess_idle_connections(start_server, ca):
    server = await start_server(tls=True, max_handshakes=5)
    idle = [await trio.open_tcp_stream("127.0.0.1", server.main_port) for _ in range(5)]
    try:
        await wait_until(lambda: server.handshakes.count == 5)
        extra = await trio.open_tcp_stream("127.0.0.1", server.main_port)
        with trio.fail_after(5):
            assert await extra.receive_some(1) == b""  # closed at once, no TLS spoken
        await extra.aclose()
        assert server.relay.stats.rejected_half_open == 1
    finally:
        for s in idle:
            await s.aclose()
    await wait_until(lambda: server.handshakes.count == 0)
    async with dc.connect(url(server), **connect_opts(server, ca)) as c:
        await assert_relays(c, c)
        assert server.handshakes.count == 0  # an established session holds no slot


async def test_http_helper_connections_have_their_own_cap(start_server, ca):
    server = await start_server(tls=True, max_handshakes=3, http_port=0)
    idle = [await trio.open_tcp_stream("127.0.0.1", server.http_port) for _ in range(3)]
    try:
        await wait_until(lambda: server.helper_connections.count == 3)
        extra = await trio.open_tcp_stream("127.0.0.1", server.http_port)
        with trio.fail_after(5):
            assert await extra.receive_some(1) == b""  # closed at once
        await extra.aclose()
        assert server.relay.stats.rejected_half_open == 1
        # The DERP port's own pool is untouched by the helper's slowloris.
        async with dc.connect(url(server), **connect_opts(server, ca)) as c:
            await assert_relays(c, c)
    finally:
        for s in idle:
            await s.aclose()
    await wait_until(lambda: server.helper_connections.count == 0)


async def test_accept_flood_does_not_lock_out_a_real_client(start_server, ca):
    """3000 idle connections arrive at once; a client retrying like tailscaled still gets in."""
    server = await start_server(tls=True, max_handshakes=100, handshake_timeout=1.0,
                                accept_connection_limit=500.0, accept_connection_burst=100)
    flood: list[trio.SocketStream] = []
    stats = server.relay.stats
    done = trio.Event()

    async def flood_it():
        for _ in range(3000):
            try:
                flood.append(await trio.open_tcp_stream("127.0.0.1", server.main_port))
            except OSError:
                pass
        done.set()

    async def retrying_client():
        with trio.fail_after(20):
            while True:
                try:
                    async with dc.connect(url(server), **connect_opts(server, ca,
                                                                      timeout=3)) as c:
                        await assert_relays(c, c)
                        return
                except dc.DerpClientError:
                    await trio.sleep(0.2)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood_it)
            await wait_until(lambda: len(flood) >= 500)
            await retrying_client()
        await done.wait()
        assert stats.rejected_connections + stats.rejected_half_open > 1000
        assert server.handshakes.count <= 100
    finally:
        for s in flood:
            s.socket.close()
    async with dc.connect(url(server), **connect_opts(server, ca)) as c:  # still accepting
        await assert_relays(c, c)


async def relayed_rate(server, tx: dc.DerpClient, rx: dc.DerpClient, count: int = 1600) -> float:
    """Bytes/s (as the relay counts them: frame header + key + packet) seen by ``rx`` while
    ``tx`` sends ``count`` 1000-byte packets as fast as it can; the start-up burst is skipped."""
    packet = bytes(1000)
    first, last = count // 5, count - count // 10
    marks = {}
    async with trio.open_nursery() as nursery:
        async def send_all():
            for _ in range(count // 40):
                await tx.send_many([(rx.public_key, packet)] * 40)
        nursery.start_soon(send_all)
        for i in range(1, count + 1):
            await recv_kind(rx, ReceivedPacket)
            if i in (first, last):
                marks[i] = trio.current_time()
    assert sum(server.relay.stats.packets_dropped) == 0  # the sender was slowed instead
    return (last - first) * (len(packet) + 37) / (marks[last] - marks[first])


async def test_rate_config_limits_a_sender_by_back_pressure(start_server, ca, tmp_path):
    rate = 1_000_000
    path = tmp_path / "rate.json"
    path.write_text(f'{{"PerClientRateLimitBytesPerSec": {rate}}}')
    server = await start_server(rate_config=str(path))
    u = url(server)
    async with dc.connect(u, **connect_opts(server, ca)) as rx, \
            dc.connect(u, **connect_opts(server, ca)) as tx:
        measured = await relayed_rate(server, tx, rx)
        assert measured <= 1.10 * rate, measured  # the limit holds (the floor: benchmarks/fairness.py)
        assert server.relay.stats.rate_limit_per_client_waited > 0
        path.write_text('{"PerClientRateLimitBytesPerSec": 0}')
        server.reload()  # SIGHUP: limit lifted, live sessions follow
        assert server.relay.recv_limit is None
        await assert_relays(tx, rx)


async def test_bandwidth_limit_holds_over_real_sockets(start_server, ca):
    server = await start_server(tls=True, bandwidth_limit="8mbit")
    u = url(server)
    async with dc.connect(u, **connect_opts(server, ca)) as rx, \
            dc.connect(u, **connect_opts(server, ca)) as tx:
        measured = await relayed_rate(server, tx, rx)
    assert measured <= 1.10 * 1_000_000, measured  # the floor: benchmarks/fairness.py
    assert server.relay.stats.bandwidth_limit_waited > 0


async def test_rate_config_reload_tightens_live_sessions_and_a_broken_file_keeps_it(
        start_server, ca, tmp_path):
    path = tmp_path / "rate.json"
    path.write_text('{"PerClientRateLimitBytesPerSec": 4000000}')
    server = await start_server(rate_config=str(path))
    u = url(server)
    async with dc.connect(u, **connect_opts(server, ca)) as rx, \
            dc.connect(u, **connect_opts(server, ca)) as tx:
        await assert_relays(tx, rx)
        path.write_text('{"PerClientRateLimitBytesPerSec": 500000}')
        server.reload()  # SIGHUP: the same two sessions are now held to the new limit
        assert server.relay.recv_limit.rate == 500_000
        measured = await relayed_rate(server, tx, rx, count=800)
        assert measured <= 1.10 * 500_000, measured
        path.write_text('{"PerClientRateLimitBytesPerSec": "fast"}')
        server.reload()
        assert server.relay.recv_limit.rate == 500_000  # the broken file changed nothing
        await assert_relays(tx, rx)


async def test_sighup_reloads_the_rate_config_in_the_real_process(tmp_path):
    path = tmp_path / "rate.json"
    path.write_text('{"PerClientRateLimitBytesPerSec": 0}')
    port = free_port()
    async with derper(["-dev", "-a", f"127.0.0.1:{port}", "-stun=false", "-rate-config",
                       str(path)], tmp_path) as proc:
        path.write_text('{"PerClientRateLimitBytesPerSec": 300000}')
        proc.signal(signal.SIGHUP)
        await proc.wait_for_log("rate config reloaded")
        assert "bytes_per_second=300000" in proc.log
        path.write_text("{")
        proc.signal(signal.SIGHUP)
        await proc.wait_for_log("keeping the previous rate limit")
        u = f"http://127.0.0.1:{port}/derp"
        async with dc.connect(u) as rx, dc.connect(u) as tx:
            started = trio.current_time()
            packet = bytes(1000)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(tx.send_many, [(rx.public_key, packet)] * 600)
                for _ in range(600):
                    await recv_kind(rx, ReceivedPacket)
            # 600 x 1037 bytes at most 300 kB/s after a 64 KiB burst: the limit still holds.
            assert trio.current_time() - started >= (600 * 1037 - 70_000) / 300_000 / 1.1
