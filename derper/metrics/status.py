"""``/status.json``: the relay's health at a glance, from the counters the relay already keeps.

A trio task samples those counters into two history rings (every second for the last 10
minutes, every 10 s for the last hour), dates the moments drop and limit counters move, and
every few seconds ranks the connections by the bytes they sent. Building the JSON reads the
live counters and the rings. Nothing here runs per packet: sessions only add each read's length
to their ``rx_bytes``.

The keys are stable (``SCHEMA`` changes if one has to change meaning); the README documents them.
Times are Unix seconds, rates per second, sizes in bytes.
"""

from __future__ import annotations

import heapq
import time
from typing import Callable, NamedTuple, Protocol

import trio

from stun.counters import StunCounters
from stun.message import Disposition

from ..certs.acme import AcmeCerts
from ..certs.context import ServerTLS
from ..config import Config
from ..proto.keys import public_text
from ..relay.hub import Relay
from .counters import DropReason, Stats
from .history import LastChange, Ring

SCHEMA = 1
FINE_STEP, FINE_POINTS = 1.0, 600  # the last 10 minutes
COARSE_EVERY, COARSE_POINTS = 10, 360  # every 10th fine sample: the last hour
SENDERS_EVERY = 5  # fine samples between rankings of the heaviest senders
TOP_SENDERS = 10
RATE_WINDOW = 5.0  # "now" rates are averaged over this many seconds
RECENT = 300.0  # a limit hit or a bad drop this recent makes the relay "warning"
CERT_WARN_DAYS = 14  # ACME renews 30 days ahead: under this, renewal is failing
KEY_CHARS = 8  # hex digits of a node key shown; enough to find it in the logs

STUN_KINDS = tuple(d.name.lower() for d in Disposition)
# The ring's columns: gauges as read, counters as running totals.
COLUMNS = ("clients", "connections", "connects", "disconnects", "packets_in", "packets_out",
           "bytes_in", "bytes_out", "drops", "stun") + tuple("stun_" + k for k in STUN_KINDS)
# The chart series /status.json offers: key → ring column.
GAUGES = {"clients": "clients", "connections": "connections"}
TRAFFIC = {"bytes_in_per_second": "bytes_in", "bytes_out_per_second": "bytes_out",
           "packets_in_per_second": "packets_in", "packets_out_per_second": "packets_out"}
RATES = {**TRAFFIC, "drops_per_second": "drops", "stun_per_second": "stun"}
# Drops and limit hits that make the relay "warning" when recent, and what they mean. Drops for
# peers that left are normal; so is a per-client -rate-config slowing one heavy sender.
BAD_DROPS = {
    "queue_head": "a client fell behind and lost its oldest queued packets",
    "queue_tail": "a client fell behind and lost queued packets",
    "write_error": "writes to a client failed",
}
LIMIT_HITS = {
    "max_handshakes": "-max-handshakes closed connections still in their handshake",
    "max_clients": "-max-clients turned clients away (HTTP 503)",
    "accept_connection_limit": "-accept-connection-limit closed new connections",
    "bandwidth_limit": "-bandwidth-limit held senders back: the relay's budget is used up",
    "tcp_write_timeout": "clients too slow to take their packets were cut off "
                         "(-tcp-write-timeout)",
}


class MeshLink(Protocol):
    """What the status page shows of one mesh link (``Relay.mesh_links`` values:
    ``mesh.link.LinkHealth``)."""

    peer: str  # the other relay's host name
    state: str  # e.g. "connected", "connecting", "failed"
    since: float  # Unix time of the last state change
    remote_clients: int  # keys the peer says are connected to it


def short_key(key: bytes) -> str:
    """A node key as the page shows it: the log's ``nodekey:`` text, shortened."""
    return public_text(key)[:len("nodekey:") + KEY_CHARS] + "…"


class Counts(NamedTuple):
    """What the board reads: one relay's counters, or (-workers) the sum of a host's."""

    stats: Stats
    clients: int
    connections: int
    stun: list[int]  # STUN requests by Disposition
    senders: list[dict]  # the heaviest senders, as /status.json shows them


class TopSenders:
    """The connections that sent the most bytes between two rankings (a connection new since
    then counts from its start)."""

    def __init__(self, relay: Relay, show_addrs: bool) -> None:
        self.relay, self.show_addrs = relay, show_addrs
        self.senders: list[dict] = []
        self._rx_seen: dict[int, int] = {}  # conn_id → rx_bytes at the last ranking
        self._rx_at: float | None = None

    def rank(self, now: float) -> None:
        seen, current, show_addrs = self._rx_seen, {}, self.show_addrs
        ranked = []
        for conns in self.relay.router.conns.values():
            for peer in conns:
                current[peer.conn_id] = peer.rx_bytes
                sent = peer.rx_bytes - seen.get(peer.conn_id, 0)
                if sent > 0:
                    ranked.append((sent, peer.conn_id, peer))
        elapsed = FINE_STEP if self._rx_at is None else max(now - self._rx_at, FINE_STEP)
        self.senders = [
            {"key": short_key(peer.key), "bytes_per_second": round(sent / elapsed),
             **({"addr": _addr(peer.remote_ip, peer.remote_port)} if show_addrs else {})}
            for sent, _, peer in heapq.nlargest(TOP_SENDERS, ranked)]
        self._rx_seen, self._rx_at = current, now


def local_counts(relay: Relay, stun: StunCounters, senders: TopSenders) -> Counts:
    router = relay.router
    return Counts(relay.stats, router.clients_local, router.current_connections,
                  stun.requests, senders.senders)


class StatusBoard:
    """The history of one server's counters (or a host's: ``counts``) and the JSON built
    from it."""

    def __init__(self, relay: Relay, stun: StunCounters, config: Config, *, version: str,
                 tls: ServerTLS | None, acme: AcmeCerts | None) -> None:
        self.relay, self.stun, self.config, self.version = relay, stun, config, version
        self.tls, self.acme = tls, acme
        self.fine = Ring(COLUMNS, FINE_POINTS, FINE_STEP)
        self.coarse = Ring(COLUMNS, COARSE_POINTS, FINE_STEP * COARSE_EVERY)
        self.last = LastChange()
        self.top = TopSenders(relay, config.status_show_addrs)
        # What it reads; under -workers the host's sum (workers.host_metrics) replaces it.
        self.counts: Callable[[], Counts] = lambda: local_counts(relay, stun, self.top)
        self.listen: dict[str, str | None] = {}  # the server fills it in once bound
        self.started_at = time.time()
        self._ticks = 0

    @property
    def senders(self) -> list[dict]:
        return self.counts().senders

    # ---- sampling (the timer) -----------------------------------------------------------------

    async def sample_forever(self) -> None:
        """One sample a second, on the second of trio's clock; a stall skips, never bunches."""
        due = trio.current_time()
        while True:
            self.sample(trio.current_time())
            due += FINE_STEP
            now = trio.current_time()
            if due <= now:
                due = now + FINE_STEP
            await trio.sleep_until(due)

    def sample(self, now: float) -> None:
        values = self._values()
        self.fine.append(now, values)
        if self._ticks % COARSE_EVERY == 0:
            self.coarse.append(now, values)
        if self._ticks % SENDERS_EVERY == 0:
            self.top.rank(now)
        self._ticks += 1
        self.last.observe(now, self._events())

    def _values(self, counts: Counts | None = None) -> list[float]:
        c = counts or self.counts()
        s, stun = c.stats, c.stun
        return [c.clients, c.connections, s.client_connects,
                s.client_disconnects, s.packets_received, s.packets_sent, s.bytes_received,
                s.bytes_sent, sum(s.packets_dropped), sum(stun), *stun]

    def _events(self) -> dict[str, float]:
        """Counters whose last movement the page shows: drops by reason, admission, limits."""
        s = self.counts().stats
        events = {"drop_" + r.name.lower(): s.dropped(r) for r in DropReason}
        events.update(admission_rejected=s.admission_rejected,
                      admission_fail_open=s.admission_fail_open, **self._limit_counts())
        return events

    def _limit_counts(self, s: Stats | None = None) -> dict[str, int]:
        s = s or self.counts().stats
        return {"max_handshakes": s.rejected_half_open, "max_clients": s.rejected_max_clients,
                "accept_connection_limit": s.rejected_connections,
                "rate_config": s.rate_limit_per_client_waited,
                "bandwidth_limit": s.bandwidth_limit_waited,
                "tcp_write_timeout": s.sclient_write_timeouts}

    # ---- the JSON -----------------------------------------------------------------------------

    def snapshot(self, since: float | None = None) -> dict:
        """Everything /status.json shows. ``since`` (Unix time): chart points after it only,
        so a page that already has the history fetches a few points per refresh."""
        now, wall = trio.current_time(), time.time()
        counts = self.counts()
        live = dict(zip(COLUMNS, self._values(counts), strict=True))
        to_wall = wall - now
        minute_ago = self.fine.at_or_before(now - 60.0)
        recently = self.fine.at_or_before(now - RATE_WINDOW)

        def change(name: str) -> float:
            """How much counter ``name`` went up in the last minute (or since the oldest
            sample, if younger)."""
            return live[name] - minute_ago[1][name] if minute_ago else 0

        def rate(name: str) -> float:
            """Counter ``name``'s rate over the last RATE_WINDOW seconds."""
            if recently is None or now - recently[0] <= 0:
                return 0.0
            return (live[name] - recently[1][name]) / (now - recently[0])
        relay, config = self.relay, self.config
        data = {
            "schema": SCHEMA,
            "generated_at": round(wall, 3),
            "server": {
                "version": self.version,
                "started_at": round(self.started_at, 3),
                "uptime_seconds": round(wall - self.started_at, 1),
                "server_key": public_text(relay.public_key),
                "listen": self.listen,
                "tls": self._tls_mode(),
                "derp": config.derp,
            },
            "clients": {
                "local": live["clients"],
                "remote": sum(link.remote_clients for link in relay.mesh_links.values()),
                "connections": live["connections"],
                "connects_total": live["connects"],
                "disconnects_total": live["disconnects"],
                "connects_per_minute": change("connects"),
                "disconnects_per_minute": change("disconnects"),
            },
            "traffic": {
                "packets_in_total": live["packets_in"], "packets_out_total": live["packets_out"],
                "bytes_in_total": live["bytes_in"], "bytes_out_total": live["bytes_out"],
                **{key: round(rate(name)) for key, name in TRAFFIC.items()},
            },
            "drops": self._drops(counts.stats, to_wall),
            "admission": self._admission(counts.stats, to_wall),
            "limits": self._limits(counts.stats, to_wall),
            "certificate": self._certificate(wall),
            "stun": {
                "enabled": config.stun,
                "requests_total": live["stun"],
                "per_second": round(rate("stun"), 2),
                "by_kind": {k: {"total": live["stun_" + k],
                                "per_second": round(rate("stun_" + k), 2)}
                            for k in STUN_KINDS},
            },
            "heaviest_senders": counts.senders,
            "mesh": {"configured": bool(relay.mesh_links),
                     "links": [{"peer": link.peer, "state": link.state,
                                "since": round(link.since, 3),
                                "remote_clients": link.remote_clients}
                               for link in relay.mesh_links.values()]},
            "history": {name: self._series(ring, to_wall, since)
                        for name, ring in (("fine", self.fine), ("coarse", self.coarse))},
        }
        data["health"] = health(data, wall)
        return data

    def _tls_mode(self) -> str:
        """off (plain HTTP), letsencrypt, or manual (files in -certdir)."""
        if self.tls is None:
            return "off"
        return "letsencrypt" if self.acme is not None else "manual"

    def _last(self, event: str, to_wall: float) -> float | None:
        at = self.last.at.get(event)
        return None if at is None else round(at + to_wall, 3)

    def _drops(self, s: Stats, to_wall: float) -> list[dict]:
        out = []
        for r in DropReason:
            name = r.name.lower()
            out.append({"reason": name, "packets": s.dropped(r),
                        "bytes": s.bytes_dropped[r * 2] + s.bytes_dropped[r * 2 + 1],
                        "last_at": self._last("drop_" + name, to_wall)})
        return out

    def _admission(self, s: Stats, to_wall: float) -> dict:
        config = self.config
        return {"enabled": self.relay.admission is not None,
                "allowed": s.admission_allowed, "rejected": s.admission_rejected,
                "mesh_bypass": s.admission_mesh_bypass, "fail_open": s.admission_fail_open,
                "last_rejected_at": self._last("admission_rejected", to_wall),
                "last_fail_open_at": self._last("admission_fail_open", to_wall),
                "by": [name for name, on in (("allow-keys", config.allow_keys),
                                             ("verify-clients", config.verify_clients),
                                             ("verify-client-url", config.verify_client_url))
                       if on]}

    def _limits(self, s: Stats, to_wall: float) -> list[dict]:
        relay, config = self.relay, self.config
        limit = relay.recv_limit
        accept = config.accept_connection_limit
        settings = {  # as the operator set them, for the page; None = off
            "max_handshakes": f"{config.max_handshakes} half-open" if config.max_handshakes
            else None,
            "max_clients": f"{config.max_clients} connections" if config.max_clients else None,
            "accept_connection_limit": None if accept == float("inf") else f"{accept:g}/s",
            "rate_config": f"{limit.rate:g} B/s, burst {limit.burst:g} B" if limit else None,
            "bandwidth_limit": config.bandwidth_limit or None,
            "tcp_write_timeout": f"{config.tcp_write_timeout:g} s" if config.tcp_write_timeout
            else None,
        }
        return [{"limit": name, "setting": settings[name], "hits": hits,
                 "last_at": self._last(name, to_wall)}
                for name, hits in self._limit_counts(s).items()]

    def _certificate(self, wall: float) -> dict | None:
        tls = self.tls
        if tls is None:
            return None
        bundle, acme = tls.bundle, self.acme
        out: dict = {"installed": bundle is not None, "subject": None, "issuer": None,
                     "not_after": None, "days_left": None, "self_signed": None,
                     "renewal": "acme" if acme else "files", "next_renewal_at": None,
                     "last_error": None, "last_error_at": None}
        if bundle is not None:
            not_after = bundle.not_after.timestamp()
            out.update(subject=bundle.leaf.subject.rfc4514_string(),
                       issuer=bundle.leaf.issuer.rfc4514_string(),
                       not_after=not_after, days_left=round((not_after - wall) / 86400, 2),
                       self_signed=bundle.self_signed)
        if acme is not None:
            out.update(next_renewal_at=round(acme.next_attempt_at(), 3),
                       last_error=acme.last_error, last_error_at=acme.last_error_at)
        return out

    def _series(self, ring: Ring, to_wall: float, since: float | None) -> dict:
        """A ring's chart columns: times to 0.01 s, byte rates and gauges as integers, other
        rates to 0.01 (int arithmetic, not ``round``: a page's first load rounds thousands of
        values while the relay waits). Times are compared after rounding, so a page asking
        ``since`` its newest point never gets that point again."""
        after = float("-inf") if since is None else since - to_wall - 0.01  # rounding's margin
        raw = ring.series(rates=RATES, gauges=GAUGES, after=after)
        times = [int((t + to_wall) * 100 + 0.5) / 100 for t in raw.pop("t")]
        first = 0 if since is None else next(
            (k for k, t in enumerate(times) if t > since), len(times))
        out: dict = {"step": ring.step, "points": ring.capacity, "t": times[first:]}
        for key, values in raw.items():  # all ≥ 0: counters only go up
            values = values[first:]
            out[key] = ([int(v + 0.5) for v in values] if key in GAUGES or key.startswith("bytes")
                        else [int(v * 100 + 0.5) / 100 for v in values])
        return out


def _addr(ip: str | None, port: int) -> str | None:
    if ip is None:
        return None
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def health(data: dict, wall: float) -> dict:
    """The verdict at the top of the page: ``ok``, ``warning`` or ``error``, and why."""
    errors, warnings = [], []
    cert = data["certificate"]
    if cert is not None:
        if not cert["installed"]:
            errors.append("no TLS certificate yet: clients cannot connect")
        elif cert["days_left"] < 0:
            errors.append("the TLS certificate has expired")
        elif cert["days_left"] < CERT_WARN_DAYS and not cert["self_signed"]:
            warnings.append(f"the TLS certificate expires in {cert['days_left']:.0f} days")
        if cert["last_error"]:
            warnings.append(f"the last certificate order failed: {cert['last_error']}")
    if not data["server"]["derp"]:
        warnings.append("DERP is off (-derp=false): this relay relays nothing")
    recent = wall - RECENT
    for drop in data["drops"]:
        if drop["reason"] in BAD_DROPS and drop["last_at"] and drop["last_at"] >= recent:
            warnings.append(f"in the last 5 minutes, {BAD_DROPS[drop['reason']]} "
                            f"({drop['reason']} drops)")
    for hit in data["limits"]:
        if hit["limit"] in LIMIT_HITS and hit["last_at"] and hit["last_at"] >= recent:
            warnings.append(f"in the last 5 minutes, {LIMIT_HITS[hit['limit']]}")
    for link in data["mesh"]["links"]:
        if link["state"] != "connected":
            warnings.append(f"mesh link to {link['peer']} is {link['state']}")
    state = "error" if errors else "warning" if warnings else "ok"
    return {"state": state, "notes": errors + warnings}
