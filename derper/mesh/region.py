"""The region's membership: one link per address of every ``-mesh-with`` entry.

Each entry's dial host is resolved now and every ``interval`` seconds; a name with several
addresses (DNS round robin, a Kubernetes headless Service) gets a link to each, and links come
and go as the records change. A failed lookup, or an answer with no address at all, keeps the
links there are: a DNS hiccup must not cut a region in two (a dead node's link drops anyway).
"""

from __future__ import annotations

import trio

from .. import logs
from ..relay.hub import Relay
from .dns import ResolveError, Resolver
from .link import LinkHealth, run_link
from .peers import MeshPeer

log = logs.get("derper.mesh")

DEFAULT_RESOLVE_INTERVAL = 30.0


class Region:
    def __init__(self, relay: Relay, peers: list[MeshPeer], resolver: Resolver,
                 interval: float = DEFAULT_RESOLVE_INTERVAL) -> None:
        self.relay = relay
        self.peers = peers
        self.resolver = resolver
        self.interval = interval
        self._scopes: dict[tuple[MeshPeer, str], trio.CancelScope] = {}

    @property
    def links(self) -> dict[tuple[str, str], LinkHealth]:
        """(entry, address) → health, shared with the metrics."""
        return self.relay.mesh_links

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                await self.refresh(nursery)
                await trio.sleep(self.interval)

    async def refresh(self, nursery: trio.Nursery) -> None:
        """Resolve every entry once and start or stop links to match."""
        wanted: set[tuple[MeshPeer, str]] = set()
        for peer in self.peers:
            try:
                addresses = await self.resolver.resolve(peer.dial_host)
                if not addresses:
                    raise ResolveError(f"{peer.dial_host} has no addresses")
            except ResolveError as e:
                self.relay.log_throttle.log(log, "warning", "cannot resolve a mesh peer; "
                                            "keeping its links", kind="mesh resolve",
                                            peer=peer.entry, error=str(e))
                wanted.update(k for k in self._scopes if k[0] == peer)
                continue
            wanted.update((peer, a) for a in addresses)
        for key in [k for k in self._scopes if k not in wanted]:
            self._scopes.pop(key).cancel()
            self.links.pop((key[0].entry, key[1]), None)
            log.info("mesh peer address gone; link closed", peer=key[0].entry, address=key[1])
        for key in sorted(wanted - set(self._scopes), key=lambda k: (k[0].entry, k[1])):
            scope = self._scopes[key] = trio.CancelScope()
            health = self.links[(key[0].entry, key[1])] = LinkHealth(key[0].entry, key[1])
            nursery.start_soon(self._link, scope, key, health)

    async def _link(self, scope: trio.CancelScope, key: tuple[MeshPeer, str],
                    health: LinkHealth) -> None:
        with scope:
            await run_link(self.relay, key[0], key[1], health)
        if not scope.cancel_called:  # it reached ourselves: stays abandoned, off the gauge
            self.links.pop((key[0].entry, key[1]), None)
