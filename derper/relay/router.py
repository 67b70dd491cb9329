"""Who is connected under which key, and where a packet for a key goes (spec §4.2, §4.3, §4.7,
§4.8).

Pure state shared by every session of one server in one trio thread: no locks and no awaits.
The router knows connections only through small interfaces, so sessions, mesh links and tests
can all stand behind them: ``Peer`` is anything packets can be handed to (a client session, a
mesh link); ``Client`` is a local connection, which the router also tells about others.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple, Protocol

from ..metrics.counters import Stats
from ..proto.wire import PeerGoneReason


class Peer(Protocol):
    """Where a reader hands packets: a session's or a mesh link's outbox (``relay.outbox``)."""

    key: bytes
    back_pressure: bool  # a reader that fills it awaits ``wait_room`` instead of dropping
    sibling: bool  # another worker process of this host (-workers), not another node

    def deliver(self, frame: bytearray, disco: bool) -> bool:
        """Queue a frame; True when that filled the queue (the caller may yield once)."""
    def full(self, disco: bool) -> bool: ...
    def flush(self) -> None:
        """Write (or wake the writer for) what this read queued; see ``Relay.ready``."""
    def wake(self) -> None: ...
    async def wait_room(self) -> None: ...


class Client(Peer, Protocol):
    """A local client connection, as the router needs it."""

    conn_id: int
    dup: bool
    remote_ip: str | None
    remote_port: int
    present_flags: int
    rx_bytes: int  # bytes read from this connection so far, for the status page's top senders

    def send_peer_gone(self, key: bytes, reason: int) -> None: ...
    def send_peer_present(self, peer: "Client") -> None: ...
    def notify_presence_gone(self, key: bytes) -> None: ...
    def close_by_peer_request(self) -> None: ...


class Presence(NamedTuple):
    """What a PeerPresent says of a key a sibling worker has: enough to announce it again to
    the region's watchers, for whom the whole host is one node."""

    key: bytes
    remote_ip: str | None
    remote_port: int
    present_flags: int


class Router:
    """Key → connections, with last-writer-wins duplicates, mesh forwarders and PeerGone
    bookkeeping.

    ``active`` maps a key to the one connection that receives its packets; the hot path is a
    single ``active.get``. ``conns`` holds every connection of a key (more than one means
    duplicates: a cloned VM or a reconnect racing the old connection). ``forwarders`` holds,
    per key, the mesh links whose node has it, in the order they claimed it: the first is the
    one used, and only while the key has no local connection (Go's rules).

    With ``-workers``, the other worker processes of the host are forwarders too (``sibling``),
    and the region's watchers hear of their keys as of ours. A duplicate key across workers
    follows last-writer-wins like a local one: a sibling announcing a key we also have means
    its connection is the newer one, and we route to it (``_yielded``) until ours sends again.
    """

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.active: dict[bytes, Client] = {}
        self.conns: dict[bytes, list[Client]] = {}
        self.watchers: set[Client] = set()
        self.forwarders: dict[bytes, list[Peer]] = {}
        # PeerGone(Disconnected) bookkeeping: src key → {dst key: dst conn_id} and its reverse,
        # so entries are dropped when either side leaves and the tables stay bounded.
        self._receivers_of: dict[bytes, dict[bytes, int]] = {}
        self._senders_to: dict[bytes, set[bytes]] = {}
        self._activity = itertools.count()
        self._last_activity: dict[int, int] = {}
        self.dup_keys = 0
        self.dup_conns = 0
        self._sibling_presence: dict[bytes, Presence] = {}
        self._yielded: set[bytes] = set()  # local keys whose newest connection is a sibling's
        self.multiforwarder_created = 0
        self.multiforwarder_deleted = 0
        self.forwarder_delete_other = 0  # Go: packet_forwarder_delete_other_value
        self.departures = 0  # keys that left the region: a change voids callers' note_sent caches

    # ---- membership ---------------------------------------------------------------------------

    def register(self, peer: Client) -> None:
        key = peer.key
        self.stats.client_connects += 1
        self._last_activity[peer.conn_id] = next(self._activity)
        conns = self.conns.get(key)
        if conns is None:
            self.conns[key] = [peer]
            peer.dup = False
        else:
            if len(conns) == 1:
                self.dup_keys += 1
                self.dup_conns += 1
                conns[0].dup = True
            conns.append(peer)
            peer.dup = True
            self.dup_conns += 1
            self.stats.total_dup_client_conns += 1
        self.active[key] = peer  # the newest connection wins
        self._yielded.discard(key)
        if key in self._sibling_presence:
            peer.dup = True  # a sibling has it too: track who writes last
        for w in self.watchers:
            w.send_peer_present(peer)

    def unregister(self, peer: Client) -> None:
        key = peer.key
        self._last_activity.pop(peer.conn_id, None)
        self.watchers.discard(peer)
        conns = self.conns.get(key)
        if conns is None or peer not in conns:
            return
        self.stats.client_disconnects += 1
        conns.remove(peer)
        yielded = key in self._yielded
        if not conns:
            del self.conns[key]
            self.active.pop(key, None)
            self._yielded.discard(key)
            on_sibling = key in self._sibling_presence
            for w in self.watchers:  # watchers hear of local departures only; the region's
                if not (on_sibling and not w.sibling):  # still reach it through us
                    w.notify_presence_gone(key)
            if key not in self.forwarders:
                self._left_region(key)
        elif len(conns) == 1:  # a pair of duplicates is back to one ordinary connection
            self.dup_keys -= 1
            self.dup_conns -= 2
            survivor = conns[0]
            survivor.dup = key in self._sibling_presence
            if not yielded:
                self.active[key] = survivor
        else:
            self.dup_conns -= 1
            if self.active.get(key) is peer:  # the most recent writer (or registrant) takes over
                self.active[key] = max(conns, key=lambda c: self._last_activity[c.conn_id])

    def note_activity(self, peer: Client) -> None:
        """A frame arrived from a duplicate: it becomes the receiving one (last writer wins).

        If a sibling worker had the newest connection of the key, this one takes over, and the
        siblings hear so (a PeerPresent from us means: ours is the newer)."""
        self._last_activity[peer.conn_id] = next(self._activity)
        key = peer.key
        self.active[key] = peer
        if key in self._yielded:
            self._yielded.discard(key)
            for w in self.watchers:
                if w.sibling:
                    w.send_peer_present(peer)

    def local(self, key: bytes) -> Client | None:
        """The local connection for ``key`` even while a sibling's is the newer: where a packet
        a sibling forwarded goes (it never goes back)."""
        dst = self.active.get(key)
        if dst is None and key in self._yielded:
            conns = self.conns[key]
            dst = max(conns, key=lambda c: self._last_activity[c.conn_id])
        return dst

    def _left_region(self, key: bytes) -> None:
        """``key`` has neither a local connection nor a forwarder any more."""
        self.departures += 1
        for src in self._senders_to.pop(key, ()):
            receivers = self._receivers_of.get(src)
            if receivers is not None:
                receivers.pop(key, None)
                if not receivers:
                    del self._receivers_of[src]
        for dst_key, conn_id in self._receivers_of.pop(key, {}).items():
            senders = self._senders_to.get(dst_key)
            if senders is not None:
                senders.discard(key)
                if not senders:
                    del self._senders_to[dst_key]
            for c in self.conns.get(dst_key, ()):
                if c.conn_id == conn_id:
                    c.send_peer_gone(key, PeerGoneReason.DISCONNECTED)

    # ---- mesh forwarders (spec §4.8) ------------------------------------------------------------

    def forwarder(self, key: bytes) -> Peer | None:
        """The mesh link to use for ``key``; call only when it has no local connection."""
        fwds = self.forwarders.get(key)
        return fwds[0] if fwds else None

    def sibling_forwarder(self, key: bytes) -> Peer | None:
        """The sibling worker that has ``key``: where a packet from another node of the region
        may go one hop further (never to a third node: the region's rule of one hop)."""
        for fwd in self.forwarders.get(key, ()):
            if fwd.sibling:
                return fwd
        return None

    def add_forwarder(self, key: bytes, fwd: Peer, presence: Presence | None = None) -> None:
        """A mesh link's node has ``key`` (PeerPresent). A second claimant only queues up.

        A sibling worker's claim (``presence`` given) is passed on to the region's watchers,
        and when we have the key too, the sibling's connection is the newer: we route to it."""
        fwds = self.forwarders.get(key)
        if fwds is None:
            self.forwarders[key] = [fwd]
        elif fwd not in fwds:
            if len(fwds) == 1:
                self.multiforwarder_created += 1
            fwds.append(fwd)
        if presence is None:
            return
        announce = key not in self._sibling_presence and key not in self.conns
        self._sibling_presence[key] = presence
        conns = self.conns.get(key)
        if conns is not None:
            for c in conns:
                c.dup = True
            if self.active.pop(key, None) is not None:
                self._yielded.add(key)
        elif announce:
            for w in self.watchers:
                if not w.sibling:
                    w.send_peer_present(presence)

    def remove_forwarder(self, key: bytes, fwd: Peer) -> None:
        """``fwd``'s node no longer has ``key`` (PeerGone, or the link dropped); the oldest
        remaining claimant takes over."""
        fwds = self.forwarders.get(key)
        if fwds is None or fwd not in fwds:
            self.forwarder_delete_other += 1
            return
        fwds.remove(fwd)
        if fwd.sibling and not any(f.sibling for f in fwds):
            self._sibling_gone(key)
        if len(fwds) == 1:
            self.multiforwarder_deleted += 1
        elif not fwds:
            del self.forwarders[key]
            if key not in self.conns:
                self._left_region(key)

    def _sibling_gone(self, key: bytes) -> None:
        """No sibling worker has ``key`` any more: ours (if any) is the host's connection."""
        del self._sibling_presence[key]
        conns = self.conns.get(key)
        if conns is None:
            for w in self.watchers:
                if not w.sibling:
                    w.notify_presence_gone(key)
            return
        if len(conns) == 1:
            conns[0].dup = False
        if key in self._yielded:
            self._yielded.discard(key)
            self.active[key] = max(conns, key=lambda c: self._last_activity[c.conn_id])

    # ---- routing ------------------------------------------------------------------------------

    def note_sent(self, src_key: bytes, dst: Client) -> None:
        """Remember that ``dst`` heard from ``src_key``, for PeerGone when ``src_key`` leaves.

        Callers cache the last destination (and source, with ``departures``) so this runs once
        per change, not per packet.
        """
        receivers = self._receivers_of.get(src_key)
        if receivers is None:
            receivers = self._receivers_of[src_key] = {}
        receivers[dst.key] = dst.conn_id
        senders = self._senders_to.get(dst.key)
        if senders is None:
            senders = self._senders_to[dst.key] = set()
        senders.add(src_key)

    # ---- mesh privileges ----------------------------------------------------------------------

    def add_watcher(self, watcher: Client) -> None:
        """Enrol a mesh watcher and tell it every key that has a routable connection now (to
        another node: the sibling workers' keys too)."""
        self.watchers.add(watcher)
        for peer in self.active.values():
            watcher.send_peer_present(peer)
        if not watcher.sibling:
            conns = self.conns
            for key, presence in self._sibling_presence.items():
                if key not in conns:
                    watcher.send_peer_present(presence)

    def close_key(self, key: bytes) -> int:
        """ClosePeer: disconnect every local connection of ``key``; returns how many."""
        conns = list(self.conns.get(key, ()))
        for c in conns:
            c.close_by_peer_request()
        return len(conns)

    # ---- gauges (read on scrape) --------------------------------------------------------------

    @property
    def current_connections(self) -> int:
        return sum(len(c) for c in self.conns.values())

    @property
    def clients_local(self) -> int:
        return len(self.conns)

    @property
    def clients_remote(self) -> int:
        """Keys only other nodes of the region have (a sibling worker's are this host's)."""
        conns, siblings = self.conns, self._sibling_presence
        return sum(1 for k in self.forwarders if k not in conns and k not in siblings)

    @property
    def region_watchers(self) -> int:
        """Mesh watchers from other nodes (sibling workers watch each other too)."""
        return sum(1 for w in self.watchers if not w.sibling)
