"""One mesh link: this relay watching another node of the region, and forwarding to it.

The link is a DERP client of the peer (THE client, ``derper.client``) with this server's own
key and the mesh key; it sends WatchConns, and every PeerPresent makes it a forwarder for that
key in our router, every PeerGone undoes one (spec §4.8). Packets for those keys reach it
through its ``Outbox`` as ForwardPacket frames, written by its own writer only (never by the
readers that queue them, so one write carries every frame one scheduler pass queued), under a
5 s deadline (Go's). When the link drops, everything learned over it is forgotten and it
reconnects after a jittered, growing delay; a link that turns out to reach ourselves is
abandoned.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import trio

from .. import client as dc, logs
from ..proto.keys import public_text
from ..proto.messages import PeerGoneMessage, PeerPresentMessage
from ..relay.hub import Relay
from ..relay.outbox import Outbox, WriteTimeout, lost
from ..relay.router import Presence
from ..relay.sendqueue import FORWARD_OVERHEAD
from .peers import MeshPeer

log = logs.get("derper.mesh")

FORWARD_WRITE_TIMEOUT = 5.0  # Go: mesh ForwardPacket writes; the link closes on expiry
# Packets queued per link and kind: a link carries many clients' packets, so a reader that
# fills it waits for the link's writer (back-pressure to the sender, as in Go) instead of
# dropping; the write deadline bounds that wait.
LINK_QUEUE_DEPTH = 1024
RETRY_MIN, RETRY_MAX = 1.0, 30.0  # reconnect delay, doubled per failure, reset once up
SIBLING_RETRY_MIN, SIBLING_RETRY_MAX = 0.1, 2.0  # a restarted worker is back within a second
CONNECT_TIMEOUT = 10.0
LOG_BURST, LOG_EVERY = 50, 10.0  # link up/down lines: a flapping peer cannot flood the log


@dataclass
class LinkHealth:
    """What the logs, the link gauge and the status page say about one link."""
    peer: str
    address: str
    up: bool = False
    reconnects: int = 0
    last_error: str = ""
    since: float = field(default_factory=time.time)  # Unix time of the last up/down change
    remote_clients: int = 0  # keys the peer has announced over this link

    def mark(self, up: bool) -> None:
        if up != self.up:
            self.up, self.since = up, time.time()
        if not up:
            self.remote_clients = 0

    @property
    def state(self) -> str:
        return "connected" if self.up else "failed" if self.last_error else "connecting"


class MeshLink(Outbox):
    """A connected, watching link: the router's ``Peer`` for the keys the peer has."""

    def __init__(self, relay: Relay, client: dc.DerpClient, on_up, health: LinkHealth,
                 sibling: bool = False) -> None:
        super().__init__(client.stream, relay.stats, relay.ready, depth=LINK_QUEUE_DEPTH,
                         write_timeout=FORWARD_WRITE_TIMEOUT, overhead=FORWARD_OVERHEAD,
                         counts_sent=False, back_pressure=True, direct=False)
        self.key = client.server_key
        self.router = relay.router
        self.client = client
        self.keys: set[bytes] = set()
        self.heard = False  # a watched node announces at least its watcher: the key was right
        self.sibling = sibling
        self._on_up = on_up
        self._health = health

    async def run(self) -> str:
        """Watch and forward until the link breaks; the reason it did."""
        with self.cancel_scope:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._guard, self.write_loop, nursery.cancel_scope)
                    await self._guard(self._watch, nursery.cancel_scope)
            finally:
                self.forget()
        return self.close_reason

    async def _guard(self, loop, scope: trio.CancelScope) -> None:
        try:
            await loop()
        except WriteTimeout as e:
            self.close_reason = f"forwarding {e}"
        except dc.DerpClientError as e:
            self.close_reason = str(e)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            self.close_reason = lost(e)
        finally:
            scope.cancel()

    async def _watch(self) -> None:
        client, router = self.client, self.router
        await client.watch_conns()
        while True:
            m = await client.recv()
            if isinstance(m, PeerPresentMessage):
                if not self.heard:
                    self.heard = True
                    self._on_up()
                self.keys.add(m.key)
                router.add_forwarder(m.key, self, Presence(m.key, m.ip, m.port, m.flags)
                                     if self.sibling else None)
                self._health.remote_clients = len(self.keys)
            elif isinstance(m, PeerGoneMessage):
                if m.peer in self.keys:
                    self.keys.discard(m.peer)
                    router.remove_forwarder(m.peer, self)
                    self._health.remote_clients = len(self.keys)

    def forget(self) -> None:
        """The link is gone: so is every key learned over it, and what waits to be sent."""
        for key in self.keys:
            self.router.remove_forwarder(key, self)
        self.keys.clear()
        self.discard()


async def run_link(relay: Relay, peer: MeshPeer, address: str, health: LinkHealth) -> None:
    """Keep one link to ``peer`` at ``address`` up until cancelled (or it reaches ourselves)."""
    throttle = relay.log_throttle
    low, high = ((SIBLING_RETRY_MIN, SIBLING_RETRY_MAX) if peer.sibling
                 else (RETRY_MIN, RETRY_MAX))
    delay = low
    ever_up = False
    where = {"peer": peer.entry, "address": address}
    while True:
        reason, heard = await _connect_once(relay, peer, address, health)
        if reason is None:
            throttle.log(log, "info", "mesh peer is this node (or has this node's server key); not linking to it",
                         kind="mesh self", **where)
            return
        health.mark(False)
        health.reconnects += 1
        health.last_error = reason
        if heard:
            delay = low
        wait = delay * random.uniform(0.5, 1.0)
        # Workers start together: a sibling not listening yet is no news for a second or two.
        ever_up = ever_up or heard
        level = "debug" if peer.sibling and not ever_up and delay < high else "warning"
        throttle.log(log, level, "mesh link down", kind="mesh link down", burst=LOG_BURST,
                     every=LOG_EVERY, reason=reason, retry_in=f"{wait:.1f}s",
                     reconnects=health.reconnects, **where)
        await trio.sleep(wait)
        delay = min(delay * 2, high)


async def _connect_once(relay: Relay, peer: MeshPeer, address: str,
                        health: LinkHealth) -> tuple[str | None, bool]:
    """One connection's life: (why it ended, or None if it reached ourselves; whether the
    peer accepted us as a watcher)."""
    mesh_key = relay.sibling_key if peer.sibling else relay.mesh_key
    try:
        async with dc.connect(peer.url, relay.link_keypair, mesh_key=mesh_key,
                              dial=(address, peer.port), cert_pin=peer.pin,
                              server_hostname=peer.host, timeout=CONNECT_TIMEOUT) as client:
            if client.server_key == relay.public_key and not peer.sibling:
                return None, False

            def up() -> None:
                health.mark(True)
                relay.log_throttle.log(log, "info", "mesh link up", kind="mesh link up",
                                       burst=LOG_BURST, every=LOG_EVERY, peer=peer.entry,
                                       address=address, reconnects=health.reconnects,
                                       server_key=public_text(client.server_key))

            link = MeshLink(relay, client, up, health, peer.sibling)
            try:
                reason = await link.run()
            finally:
                health.mark(False)
            if not link.heard:
                reason = (f"{reason}; the peer closed the link without announcing anyone: it "
                          "does not accept our mesh key (every node's -mesh-psk-file must hold "
                          "the same key)")
            return reason, link.heard
    except dc.DerpClientError as e:
        if e.step == "handshake":
            return (f"{e} (a wrong mesh key with admission checks on the peer looks like "
                    "this)"), False
        return str(e), False
