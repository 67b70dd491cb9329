"""The loop's share for connections that are not relaying, on a real server over TLS: while
packets are relayed, new connections and closing sessions wait their turn and the relaying pair
keeps relaying meanwhile; on a quiet relay nothing waits; a session whose client leaves ends
without cancelling its writer, or with it if the writer is stuck in a send."""

from __future__ import annotations

import socket
import time
from contextlib import AsyncExitStack

import trio
from prometheus_client import generate_latest

from derper import client as dc
from derper.admission.limits import LoopShare
from derper.admission.pacer import MAX_CHARGE
from derper.metrics.counters import DropReason
from derper.metrics.prometheus import registry
from derper.proto.messages import ReceivedPacket
from tests.conftest import url
from tests.relay_helpers import assert_relays, connect_opts, recv_kind, wait_until


async def spend(pacer, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Keep the share spent, as if handshakes ran all the time: every step waits its turn (a
    share of 1 % repays the debt of a slice in 100 ms, longer than any pass of a loaded loop)."""
    pacer.share = LoopShare(time.perf_counter(), share=0.01)  # the pacer's clock
    task_status.started()
    while True:
        pacer.charge(MAX_CHARGE)
        await trio.sleep(0.001)


class Traffic:
    """``a`` relays a packet to ``b`` every 5 ms while running; ``received`` counts them."""

    def __init__(self, a: dc.DerpClient, b: dc.DerpClient) -> None:
        self.a, self.b, self.received = a, b, 0

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._receive)
            task_status.started()
            while True:
                await self.a.send(self.b.public_key, b"canary")
                await trio.sleep(0.005)

    async def _receive(self) -> None:
        while True:
            await recv_kind(self.b, ReceivedPacket)
            self.received += 1


async def test_a_new_connection_waits_its_turn_while_the_pair_keeps_relaying(start_server, ca):
    server = await start_server(tls=True)
    pacer, opts = server.relay.pacer, connect_opts(server, ca)
    async with dc.connect(url(server), **opts) as a, dc.connect(url(server), **opts) as b, \
            trio.open_nursery() as nursery:
        traffic = Traffic(a, b)
        await nursery.start(traffic.run)
        await wait_until(lambda: traffic.received > 0)
        waited, before = pacer.waited, traffic.received
        await nursery.start(spend, pacer)
        async with dc.connect(url(server), **opts) as c:
            during = traffic.received - before
            await assert_relays(c, a)
        nursery.cancel_scope.cancel()
        assert pacer.waited > waited  # its accept or its handshake waited for the share
        assert during > 0  # and packets went on meanwhile
    text = generate_latest(registry(server.exposition.metrics)).decode()
    assert f"derper_loop_turns_waited_total {float(pacer.waited)}" in text


async def test_on_a_quiet_relay_nothing_waits(start_server, ca):
    server = await start_server(tls=True)
    pacer, opts = server.relay.pacer, connect_opts(server, ca)
    async with dc.connect(url(server), **opts) as a, dc.connect(url(server), **opts) as b, \
            trio.open_nursery() as nursery:
        await nursery.start(spend, pacer)
        async with dc.connect(url(server), **opts):
            pass
        assert pacer.waited == 0
        nursery.cancel_scope.cancel()
        await assert_relays(a, b)


async def test_a_mass_disconnect_is_torn_down_in_turns(start_server, ca):
    server = await start_server(tls=True)
    pacer, router, opts = server.relay.pacer, server.relay.router, connect_opts(server, ca)
    async with dc.connect(url(server), **opts) as a, dc.connect(url(server), **opts) as b, \
            trio.open_nursery() as nursery:
        async with AsyncExitStack() as many:
            for _ in range(40):
                await many.enter_async_context(dc.connect(url(server), **opts))
            traffic = Traffic(a, b)
            await nursery.start(traffic.run)
            await wait_until(lambda: traffic.received > 0)
            await wait_until(lambda: router.current_connections == 42)
            waited, before = pacer.waited, traffic.received
            await nursery.start(spend, pacer)
        # every client has left at once
        await wait_until(lambda: router.current_connections == 2)
        await wait_until(lambda: server.open_connections == 2)  # closed too, not only gone
        assert pacer.waited - waited >= 40  # each teardown waited for its turn
        assert traffic.received > before  # and the pair relayed meanwhile
        assert len(server.relay.keepalives.schedule) == 2
        nursery.cancel_scope.cancel()


async def test_a_client_leaving_while_its_writer_is_stuck_ends_its_session(start_server, ca):
    server = await start_server(tls=True, tcp_write_timeout=0)
    relay, opts = server.relay, connect_opts(server, ca)
    async with dc.connect(url(server), **opts) as sender, dc.connect(url(server), **opts) as c, \
            dc.connect(url(server), **opts) as stuck:
        await assert_relays(sender, stuck)
        session = relay.router.active[stuck.public_key]
        session.stream.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        big = bytes(60_000)
        with trio.fail_after(30):  # until its writer waits for a socket that never drains
            while relay.stats.dropped(DropReason.QUEUE_HEAD) == 0:
                await sender.send_many([(stuck.public_key, big)] * 4)
                await trio.sleep(0.01)
        stuck.stream.transport.socket.shutdown(socket.SHUT_WR)  # it leaves, unread data and all
        await wait_until(lambda: stuck.public_key not in relay.router.conns)
        assert session.close_reason == "client closed the connection"
        await assert_relays(sender, c)
