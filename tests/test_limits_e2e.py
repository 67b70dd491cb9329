"""Limits on a real server: -max-clients, the handshake cap, an accept flood, -rate-config."""

from __future__ import annotations

import signal

import pytest
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


async def tcp_from(source: str, port: int) -> trio.SocketStream:
    """A TCP connection to 127.0.0.1:``port`` from ``source`` (any 127/8 address is ours)."""
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect(("127.0.0.1", port))
    return trio.SocketStream(sock)


async def closed_soon(stream: trio.SocketStream) -> bool:
    with trio.move_on_after(5):
        return await stream.receive_some(1) == b""
    return False


async def test_one_address_is_capped_per_source(start_server, ca):
    server = await start_server(tls=True, max_handshakes=50, max_handshakes_per_source=5)
    idle = [await tcp_from("127.0.0.2", server.main_port) for _ in range(5)]
    try:
        await wait_until(lambda: server.handshakes.count == 5)
        extra = await tcp_from("127.0.0.2", server.main_port)
        assert await closed_soon(extra)  # closed at once, no TLS spoken
        await extra.aclose()
        assert server.relay.stats.rejected_half_open == 1
        async with dc.connect(url(server), **connect_opts(server, ca)) as c:  # from 127.0.0.1
            await assert_relays(c, c)
            assert server.handshakes.count == 5  # an established session holds no slot
    finally:
        for s in idle:
            await s.aclose()
    await wait_until(lambda: server.handshakes.count == 0)


async def test_a_full_pool_makes_room_by_closing_the_oldest_idle_connection(start_server, ca):
    """Slowloris just above the cap used to lock everyone out; now a newcomer gets in."""
    server = await start_server(tls=True, max_handshakes=5)
    idle = [await tcp_from(f"127.0.0.{2 + i % 2}", server.main_port) for i in range(5)]
    try:
        await wait_until(lambda: server.handshakes.count == 5)
        async with dc.connect(url(server), **connect_opts(server, ca)) as c:
            await assert_relays(c, c)
        assert server.relay.stats.evicted_half_open == 1
        assert await closed_soon(idle[0])  # the oldest of the address holding the most
        assert server.handshakes.count == 4
    finally:
        for s in idle:
            await s.aclose()


async def test_under_pressure_idle_connections_get_a_short_budget(start_server):
    server = await start_server(max_handshakes=4, handshake_timeout=10.0)
    idle = [await tcp_from("127.0.0.2", server.main_port) for _ in range(3)]  # 2 of 4: pressure
    try:
        await wait_until(lambda: server.handshakes.count == 3)
        started = trio.current_time()
        assert await closed_soon(idle[2])  # the one that arrived under pressure
        assert trio.current_time() - started < 5  # PRESSURE_DEADLINE, not the 10 s
        await wait_until(lambda: server.handshakes.count == 2)  # the first two keep 10 s
    finally:
        for s in idle:
            await s.aclose()


@pytest.mark.parametrize("sources", [1, 50])
async def test_ten_times_the_cap_in_slowloris_sockets_locks_nobody_out(start_server, ca,
                                                                        sources):
    """The attack run's lockout: 10x the cap in idle sockets, from one address and from 50;
    sockets the server closes are reopened. A real client from elsewhere still gets in."""
    cap = 100  # per-source default 64: the default pool's ratio (1024 : 64) is stricter still
    server = await start_server(tls=True, max_handshakes=cap)
    stop = trio.Event()

    async def slowloris(source: str) -> None:
        while not stop.is_set():
            s = await tcp_from(source, server.main_port)
            with trio.move_on_after(30):
                await s.receive_some(1)  # until the server closes it (or the test ends)
            await s.aclose()

    async with trio.open_nursery() as nursery:
        for i in range(10 * cap):
            nursery.start_soon(slowloris, f"127.0.0.{2 + i % sources}")
        await wait_until(lambda: server.handshakes.count == min(cap, 64 * sources))
        for _ in range(3):
            async with dc.connect(url(server), **connect_opts(server, ca, timeout=5)) as c:
                await assert_relays(c, c)
        stop.set()
        nursery.cancel_scope.cancel()
    assert server.relay.stats.rejected_half_open > 0  # the rest of the flood was refused


async def test_http_helper_connections_have_their_own_pool(start_server, ca):
    server = await start_server(tls=True, max_handshakes=3, max_handshakes_per_source=3,
                                http_port=0)
    idle = [await tcp_from("127.0.0.2", server.http_port) for _ in range(3)]
    try:
        await wait_until(lambda: server.helper_connections.count == 3)
        extra = await tcp_from("127.0.0.2", server.http_port)
        assert await closed_soon(extra)  # closed at once
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
        assert (stats.rejected_connections + stats.rejected_half_open
                + stats.evicted_half_open) > 1000
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
