"""What every DERP session of one server shares: identity, routing table, counters, settings."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from .keys import KeyPair
from .metrics import Stats
from .router import Router
from .sendqueue import DEFAULT_DEPTH


@dataclass
class Relay:
    keypair: KeyPair
    mesh_key: bytes | None = None
    # Timers (seconds). Keepalive: Go sends one every 60 s plus a per-connection jitter in
    # [0, 5) s (a twelfth of the period), and clients give up after 120 s of silence.
    keepalive_interval: float = 60.0
    write_timeout: float = 2.0  # per batch for ordinary clients; 0 disables
    mesh_write_timeout: float = 30.0
    handshake_timeout: float = 10.0
    queue_depth: int = DEFAULT_DEPTH
    stats: Stats = field(default_factory=Stats)
    router: Router = field(init=False)
    _conn_ids: itertools.count = field(default_factory=lambda: itertools.count(1), repr=False)

    def __post_init__(self) -> None:
        self.router = Router(self.stats)

    @property
    def public_key(self) -> bytes:
        return self.keypair.public

    def next_conn_id(self) -> int:
        return next(self._conn_ids)
