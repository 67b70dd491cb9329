"""What every DERP session of one server shares: identity, routing table, counters, settings."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from ..admission.fairshare import BandwidthLimiter
from ..admission.gate import Admission
from ..admission.pacer import Pacer
from ..admission.rate_config import ReceiveLimit
from ..logs import Throttle
from ..metrics.counters import Stats
from ..metrics.loop_lag import LoopLag
from ..proto.keys import KeyPair
from .keepalive import Keepalives
from .router import Router
from .sendqueue import DEFAULT_DEPTH


@dataclass
class Relay:
    keypair: KeyPair
    mesh_key: bytes | None = None
    # -workers: the secret of the links between this host's workers, and the key their links
    # (to siblings and to the region) present, one per worker so that no node sees the host's
    # workers as duplicates of one key. Without workers: none, and the server's own key.
    sibling_key: bytes | None = None
    link_keypair: KeyPair | None = None
    # Timers (seconds). Keepalive: Go sends one every 60 s plus a per-connection jitter in
    # [0, 5) s (a twelfth of the period), and clients give up after 120 s of silence.
    keepalive_interval: float = 60.0
    write_timeout: float = 2.0  # per batch for ordinary clients; 0 disables
    mesh_write_timeout: float = 30.0
    handshake_timeout: float = 10.0
    queue_depth: int = DEFAULT_DEPTH
    stats: Stats = field(default_factory=Stats)
    # Lines a peer can trigger at will (bad TLS, HTTP, DERP handshakes), rate-limited per server.
    log_throttle: Throttle = field(default_factory=Throttle)
    loop_lag: LoopLag = field(default_factory=LoopLag)
    # Admission and limits; all off by default, and then the read loop pays one test per read.
    admission: Admission | None = None
    max_clients: int = 0  # DERP connections (handshaking or live); 0 = no cap
    derp_conns: int = 0
    recv_limit: ReceiveLimit | None = None  # per client (-rate-config); mesh peers exempt
    bandwidth: BandwidthLimiter | None = None  # relay-wide fair budget (-bandwidth-limit)
    pacing: bool = False  # either of the two above is set
    router: Router = field(init=False)
    # The event loop's share for connections not relaying yet (or any more), and the one timer
    # for every session's KeepAlive; the server's nursery runs both.
    pacer: Pacer = field(init=False)
    keepalives: Keepalives = field(init=False)
    # Sessions whose idle writer a reader just queued packets for; that reader writes or wakes
    # each before it next awaits, so the list is empty whenever another task runs.
    ready: list = field(default_factory=list, repr=False)
    # Regional mesh links (-mesh-with): (entry, address) → mesh.link.LinkHealth, for the metrics
    # and the status page.
    mesh_links: dict = field(default_factory=dict, repr=False)
    _conn_ids: itertools.count = field(default_factory=lambda: itertools.count(1), repr=False)

    def __post_init__(self) -> None:
        self.router = Router(self.stats)
        if self.link_keypair is None:
            self.link_keypair = self.keypair
        stats = self.stats
        self.pacer = Pacer(lambda: stats.packets_received + stats.packets_forwarded_in)
        self.keepalives = Keepalives(self.keepalive_interval)

    @property
    def public_key(self) -> bytes:
        return self.keypair.public

    def set_receive_limit(self, limit: ReceiveLimit | None) -> None:
        """Install (or, with None, lift) the per-client receive limit; live sessions follow."""
        self.recv_limit = limit
        self.pacing = limit is not None or self.bandwidth is not None

    def set_bandwidth(self, limiter: BandwidthLimiter | None) -> None:
        self.bandwidth = limiter
        self.pacing = limiter is not None or self.recv_limit is not None

    def next_conn_id(self) -> int:
        return next(self._conn_ids)
