"""A region of our relays on loopback over TLS (spec §4.8): links, forwarding, failures."""

from __future__ import annotations

import logging
import os

import pytest
import trio
from prometheus_client import generate_latest

from derper import client as dc
from derper.metrics import prometheus as prom, varz
from derper.metrics.counters import DropReason
from derper.proto.keys import KeyPair
from derper.proto.messages import PeerGoneMessage, ReceivedPacket
from derper.proto.wire import PeerGoneReason
from tests.mesh_nodes import Node, knows, meshed
from tests.relay_helpers import assert_relays, recv_kind, wait_until

MESH_KEY = os.urandom(32)


@pytest.fixture
def trust_ca(ca, tmp_path, monkeypatch):
    """Mesh links verify peers against the system roots, which honour SSL_CERT_FILE."""
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    monkeypatch.setenv("SSL_CERT_FILE", str(path))


async def region(nursery, tmp_path, ca, n: int, **fields) -> list[Node]:
    nodes = [Node(nursery, tmp_path, ca, MESH_KEY, **fields) for _ in range(n)]
    mesh_with = ",".join(node.entry for node in nodes)  # each lists itself too, as Go allows
    for node in nodes:
        await node.start(mesh_with=mesh_with)
    await meshed(nodes)
    return nodes


async def test_two_nodes_forward_both_ways(nursery, tmp_path, ca, trust_ca):
    a, b = await region(nursery, tmp_path, ca, 2)
    async with a.connect() as ca_, b.connect() as cb:
        await knows(a, cb.public_key)
        await knows(b, ca_.public_key)
        await assert_relays(ca_, cb, b"a to b")
        await assert_relays(cb, ca_, b"b to a")
        # Go's mesh names on /debug/varz, and the link gauge on /metrics.
        # Remote: cb and A's own link (a client of B, announced like any); local: ca_ and
        # B's link. Go counts them the same way.
        assert set(a.router.forwarders) == {cb.public_key, a.keypair.public}
        text = varz.render(a.server.exposition.metrics())
        assert "derp_clients_remote 2\n" in text and "derp_clients_total 4\n" in text
        assert "derp_multiforwarder_created 0\n" in text and "derp_watchers 1\n" in text
        exposed = generate_latest(prom.registry(a.server.exposition.metrics)).decode()
        assert (f'derper_mesh_link_up{{address="127.0.0.1",peer="{b.entry}"}} 1.0'
                in exposed)
        assert "derp_packets_forwarded_out_total 1.0" in exposed
        mesh = a.server.status.snapshot()["mesh"]  # the status page shows the same link
        assert mesh["configured"] and [(link["peer"], link["state"]) for link in mesh["links"]] \
            == [(b.entry, "connected")]
        assert mesh["links"][0]["remote_clients"] == 2  # B's client and A's own watcher
    sa, sb = a.server.relay.stats, b.server.relay.stats
    assert (sa.packets_forwarded_out, sb.packets_forwarded_in) == (1, 1)
    assert (sb.packets_forwarded_out, sa.packets_forwarded_in) == (1, 1)
    # A link to ourselves was abandoned: one link per node in the gauge, both up.
    assert [h.up for h in a.server.relay.mesh_links.values()] == [True]


@pytest.mark.parametrize("pinned", [True, False])
async def test_self_signed_nodes_mesh_with_a_pin(nursery, tmp_path, ca, pinned, caplog):
    """No CA the system trusts: a sha256-raw: pin on each entry is what lets them link."""
    a, b = Node(nursery, tmp_path, ca, MESH_KEY), Node(nursery, tmp_path, ca, MESH_KEY)
    pin = {n: f"@{n.pin}" if pinned else "" for n in (a, b)}
    await a.start(mesh_with=b.entry + pin[b])
    await b.start(mesh_with=a.entry + pin[a])
    if pinned:
        await meshed([a, b])
        return
    with trio.fail_after(10):
        while not any(r.getMessage() == "mesh link down" and
                      r.fields["reason"].startswith("tls:") for r in caplog.records):
            await trio.sleep(0.05)
    assert not any(h.up for h in a.server.relay.mesh_links.values())


async def test_three_nodes_restart_move_and_duplicates(nursery, tmp_path, ca, trust_ca):
    a, b, c = await region(nursery, tmp_path, ca, 3)
    async with a.connect() as on_a, b.connect() as on_b, c.connect() as on_c:
        for node in (a, c):
            await knows(node, on_b.public_key)
        await knows(a, on_c.public_key)
        await assert_relays(on_a, on_b)  # A reaches clients on B and on C
        await assert_relays(on_a, on_c)
        await assert_relays(on_b, on_a)  # so on_a has heard from on_b: PeerGone when it goes

        # B killed: its keys vanish from A and C; on_a learns its sender left the region.
        b_key = on_b.keypair
        await b.stop()
        await knows(a, b_key.public, present=False)
        await knows(c, b_key.public, present=False)
        gone = await recv_kind(on_a, PeerGoneMessage)
        assert gone == PeerGoneMessage(b_key.public, PeerGoneReason.DISCONNECTED)
        await on_a.send(b_key.public, b"nobody there")
        await wait_until(lambda: a.server.relay.stats.dropped(DropReason.UNKNOWN_DEST) == 1)

    # B back (same key, same port) and its client reconnects: the keys come back.
    await b.start()
    await meshed([a, b, c])
    async with a.connect() as on_a, b.connect(b_key) as on_b:
        await knows(a, b_key.public)
        await knows(c, b_key.public)
        await assert_relays(on_a, on_b, b"after the restart")

        # A client moving from A to B keeps receiving from C.
        mover = KeyPair.generate()
        async with c.connect() as sender:
            async with a.connect(mover) as m:
                await knows(c, mover.public)
                await sender.send(mover.public, b"while on A")
                assert (await recv_kind(m, ReceivedPacket)).data == b"while on A"
            async with b.connect(mover) as m:
                await wait_until(lambda: c.router.forwarder(mover.public) is not None and
                                 c.router.forwarder(mover.public).key == b.keypair.public,
                                 timeout=20)
                await sender.send(mover.public, b"now on B")
                assert (await recv_kind(m, ReceivedPacket)).data == b"now on B"

        # The same key on A and on B at once: C sends to the first that claimed it, and to the
        # other when that one leaves; the key never leaves the region meanwhile.
        twin = KeyPair.generate()
        async with c.connect() as sender, a.connect(twin) as on_a_twin:
            await knows(c, twin.public)
            created = c.router.multiforwarder_created
            async with b.connect(twin) as on_b_twin:
                await wait_until(lambda: len(c.router.forwarders.get(twin.public, ())) == 2)
                assert c.router.multiforwarder_created == created + 1
                assert c.router.forwarder(twin.public).key == a.keypair.public
                await sender.send(twin.public, b"to the first")
                assert (await recv_kind(on_a_twin, ReceivedPacket)).data == b"to the first"
                await on_a_twin.aclose()
                await wait_until(lambda: len(c.router.forwarders.get(twin.public, ())) == 1)
                assert c.router.forwarder(twin.public).key == b.keypair.public
                await sender.send(twin.public, b"to the other")
                assert (await recv_kind(on_b_twin, ReceivedPacket)).data == b"to the other"


async def test_wrong_mesh_key_is_logged_on_both_sides_and_retried_slowly(
        nursery, tmp_path, ca, trust_ca, caplog):
    caplog.set_level(logging.INFO)
    a = Node(nursery, tmp_path, ca, MESH_KEY)
    b = Node(nursery, tmp_path, ca, os.urandom(32))
    await a.start(mesh_with=b.entry)
    await b.start(mesh_with=a.entry)
    def refused() -> int:  # links that were told "not our key" (the dialling side's line)
        return sum("does not accept our mesh key" in r.fields.get("reason", "")
                   for r in caplog.records if r.getMessage() == "mesh link down")

    def wrong() -> int:  # the accepting side's line; may be logged a moment later
        return sum(r.getMessage().startswith("a client presented a mesh key that is not this "
                                             "region's") for r in caplog.records)

    with trio.fail_after(10):
        while refused() < 2 or wrong() < 2:  # each node saw the other's key
            await trio.sleep(0.05)
    await trio.sleep(1.0)
    downs = [r for r in caplog.records if r.getMessage() == "mesh link down"]
    assert len(downs) <= 6  # two links, backing off: no tight reconnect loop
    assert not a.router.forwarders and not b.router.forwarders


async def test_mesh_peers_bypass_admission(nursery, tmp_path, ca, trust_ca):
    """Meshed relays with -allow-keys that lists only the clients still link (a Go pitfall)."""
    on_a, on_b, stranger = KeyPair.generate(), KeyPair.generate(), KeyPair.generate()
    allowed = tmp_path / "allowed"
    allowed.write_text(f"nodekey:{on_a.public.hex()}\nnodekey:{on_b.public.hex()}\n")
    a, b = await region(nursery, tmp_path, ca, 2, allow_keys=str(allowed))
    async with a.connect(on_a) as ca_, b.connect(on_b) as cb:
        await knows(a, on_b.public)
        await assert_relays(ca_, cb)
        await assert_relays(cb, ca_)
    assert a.server.relay.stats.admission_mesh_bypass >= 1
    with pytest.raises(dc.DerpClientError):
        async with a.connect(stranger) as s:
            await s.recv()
