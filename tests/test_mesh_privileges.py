"""Clients holding the mesh key: WatchConns, PeerPresent/PeerGone, ClosePeer, ForwardPacket."""

from __future__ import annotations

import os

from derper import client as dc
from derper.metrics.counters import DropReason
from derper.proto import wire
from derper.proto.keys import KeyPair
from derper.proto.messages import PeerGoneMessage, PeerPresentMessage, ReceivedPacket
from derper.proto.wire import PeerPresentFlags
from tests.conftest import url
from tests.relay_helpers import assert_relays, connect_opts, expect_closed, recv_kind, wait_until

MESH_KEY = os.urandom(32)


async def test_watcher_sees_presence_and_departures(start_server, ca):
    server = await start_server(mesh_key=MESH_KEY)
    u = url(server)
    async with dc.connect(u, **connect_opts(server, ca)) as early:
        async with dc.connect(u, **connect_opts(server, ca, mesh_key=MESH_KEY)) as watcher:
            await watcher.watch_conns()
            present = {}
            while len(present) < 2:  # the early client and the watcher itself
                m = await recv_kind(watcher, PeerPresentMessage)
                present[m.key] = m
            assert present[early.public_key].ip == "127.0.0.1"
            assert present[early.public_key].port == early.stream.socket.getsockname()[1]
            assert present[early.public_key].flags == PeerPresentFlags.REGULAR
            assert present[watcher.public_key].flags == PeerPresentFlags.MESH
            async with dc.connect(u, **connect_opts(server, ca, is_prober=True,
                                                    ideal_node="900a")) as late:
                m = await recv_kind(watcher, PeerPresentMessage)
                assert m.key == late.public_key
                assert m.flags == PeerPresentFlags.PROBER | PeerPresentFlags.NOT_IDEAL
            m = await recv_kind(watcher, PeerGoneMessage)
            assert m == PeerGoneMessage(late.public_key, wire.PeerGoneReason.DISCONNECTED)


async def test_close_peer_and_forward_packet(start_server, ca):
    server = await start_server(mesh_key=MESH_KEY)
    u = url(server)
    remote_sender = KeyPair.generate().public  # a client of another region node
    async with dc.connect(u, **connect_opts(server, ca)) as local, \
            dc.connect(u, **connect_opts(server, ca, mesh_key=MESH_KEY)) as mesh:
        await mesh.forward(remote_sender, local.public_key, b"via the mesh")
        m = await recv_kind(local, ReceivedPacket)
        assert (m.source, m.data) == (remote_sender, b"via the mesh")
        await mesh.forward(remote_sender, KeyPair.generate().public, b"nobody")
        await wait_until(lambda: server.relay.stats.dropped(DropReason.UNKNOWN_DEST_ON_FWD) == 1)
        assert server.relay.stats.packets_forwarded_in == 2
        assert server.relay.stats.packets_received == 0
        await mesh.close_peer(local.public_key)
        await expect_closed(local)
        await wait_until(lambda: local.public_key not in server.relay.router.conns)


async def test_short_forward_packet_closes_the_mesh_connection(start_server, ca, caplog):
    server = await start_server(mesh_key=MESH_KEY)
    u = url(server)
    async with dc.connect(u, **connect_opts(server, ca)) as a, \
            dc.connect(u, **connect_opts(server, ca)) as b:
        async with dc.connect(u, **connect_opts(server, ca, mesh_key=MESH_KEY)) as mesh:
            await mesh.send_raw(wire.frame(wire.FrameType.FORWARD_PACKET, bytes(63)))
            await expect_closed(mesh)
        await assert_relays(a, b)
    assert any("ForwardPacket shorter than two keys" in str(getattr(r, "fields", {}))
               for r in caplog.records)


async def test_forwarded_source_that_left_and_came_back_is_noted_again(start_server, ca):
    """PeerGone(Disconnected) reaches a receiver each time a forwarded-in sender leaves the
    region, however often the same sender comes back (the reader caches what it noted)."""
    server = await start_server(mesh_key=MESH_KEY)
    u = url(server)
    sender = KeyPair.generate()  # a client of another node, here for a while now and then
    async with dc.connect(u, **connect_opts(server, ca)) as local, \
            dc.connect(u, **connect_opts(server, ca, mesh_key=MESH_KEY)) as mesh:
        for round in range(2):
            await mesh.forward(sender.public, local.public_key, b"%d" % round)
            m = await recv_kind(local, ReceivedPacket)
            assert (m.source, m.data) == (sender.public, b"%d" % round)
            async with dc.connect(u, sender, **connect_opts(server, ca)):
                pass  # its last connection here goes: the key leaves the region
            gone = await recv_kind(local, PeerGoneMessage)
            assert gone == PeerGoneMessage(sender.public, wire.PeerGoneReason.DISCONNECTED)


async def test_mesh_peers_are_never_paced(start_server, ca):
    """-bandwidth-limit slows a client's sends, never a mesh peer's forwarding (as in Go:
    a mesh peer carries a whole node's clients)."""
    server = await start_server(tls=True, mesh_key=MESH_KEY, bandwidth_limit="1mbit")
    stats = server.relay.stats
    u = url(server)
    packets = [bytes(1000)] * 150  # over a second of the 125 kB/s budget
    async with dc.connect(u, **connect_opts(server, ca)) as local, \
            dc.connect(u, **connect_opts(server, ca, mesh_key=MESH_KEY)) as mesh:
        sender = KeyPair.generate().public
        await mesh.send_frames([wire.forward_packet(sender, local.public_key, p)
                                for p in packets])
        for _ in packets:
            await recv_kind(local, ReceivedPacket)
        assert stats.bandwidth_limit_waited == 0
        async with dc.connect(u, **connect_opts(server, ca)) as client:  # the limit is on
            await client.send_many([(local.public_key, p) for p in packets])
            for _ in packets:
                await recv_kind(local, ReceivedPacket)
        assert stats.bandwidth_limit_waited > 0


async def test_wrong_mesh_key_gets_no_privileges(start_server, ca):
    server = await start_server(mesh_key=MESH_KEY)
    async with dc.connect(url(server), **connect_opts(server, ca, mesh_key=os.urandom(32))) as c:
        await c.watch_conns()
        await expect_closed(c)
