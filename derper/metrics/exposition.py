"""Every metric the server exports, read from live state when scraped (spec §6).

One table feeds both expositions: ``/debug/varz`` (the Go derper's names and text, so its
dashboards and alerts work unchanged) and ``/metrics`` (Prometheus conventions: ``_total`` on
counters, base units, HELP everywhere). The hot path only bumps integers in ``Stats``; all the
naming, labelling and summing happens here, on scrape.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import trio

from stun.counters import StunCounters
from stun.message import Disposition

from ..relay.hub import Relay
from .counters import KINDS, TCP_RTT_LABELS, TLS_VERSIONS, DropReason, Histogram
from .procstat import rss_bytes

Labels = tuple[tuple[str, str], ...]

# What Go's four STUN dispositions cover of our finer ones (Go lumps them into not_stun).
GO_STUN_DISPOSITION = {Disposition.SUCCESS: "success", Disposition.READ_ERROR: "read_error",
                       Disposition.WRITE_ERROR: "write_error"}

DROP_HELP = {
    "packets": "DERP packets dropped by reason and by kind",
    "bytes": "DERP bytes dropped by reason and by kind",
}


@dataclass(frozen=True)
class Metric:
    """One metric family. ``name`` is Go's varz name; ``prom`` how /metrics shows it.

    ``order`` reproduces Go's varz order: top-level expvars sorted by name, members of the
    ``derp`` set sorted by their raw expvar key (type prefix included).
    """

    name: str
    kind: str  # counter, gauge, untyped or histogram
    help: str
    samples: tuple[tuple[Labels, float], ...] = ()
    histogram: Histogram | None = None
    order: tuple[str, str] = ("", "")
    varz: bool = True  # part of Go's exposition; False for derper's own extras
    prom: str | None = ""  # /metrics base name: "" = same as name, None = varz only
    prom_kind: str = ""  # "" = same as kind
    prom_scale: float = 1.0
    varz_help: bool = False  # Go prints HELP only for a few families
    # How -workers' values add up to the host's: "sum", "max" (worst of them), "first" (the
    # same everywhere: settings, the build) or "worker" (each worker's own, labelled).
    combine: str = "sum"

    @property
    def prom_name(self) -> str:
        return self.prom or self.name


def _one(value: float) -> tuple[tuple[Labels, float], ...]:
    return (((), value),)


def _by(label: str, values: dict[str, float]) -> tuple[tuple[Labels, float], ...]:
    return tuple((((label, k),), v) for k, v in sorted(values.items()))


def _open_fds() -> int:
    """Linux 6.2 and later give the count as the directory's size, in microseconds where a
    listing of thousands of descriptors takes milliseconds (each worker's snapshot, every
    second); older kernels say 0 there, and get the listing."""
    try:
        return os.stat("/proc/self/fd").st_size or len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


class Exposition:
    """The live state of one server, as a list of ``Metric`` built on demand."""

    def __init__(self, relay: Relay, stun: StunCounters, version: str) -> None:
        self.relay = relay
        self.stun = stun
        self.version = version
        self.sys0 = rss_bytes()  # Go: runtime memory at server creation

    def metrics(self) -> list[Metric]:
        out = self._derp_set() + self._drops() + self._others() + self._limits()
        return sorted(out, key=lambda m: m.order)

    def _derp_set(self) -> list[Metric]:
        s, r = self.relay.stats, self.relay.router
        local, remote = r.clients_local, r.clients_remote
        disco = s.packets_received_disco

        def m(key: str, kind: str, help: str, value: float | None = None, **kw) -> Metric:
            name = "derp_" + key.removeprefix("gauge_").removeprefix("counter_")
            if value is not None:
                kw["samples"] = _one(value)
            return Metric(name, kind, help, order=("derp", key), **kw)

        return [
            m("accepts", "counter", "DERP connections started (after the HTTP upgrade)",
              s.accepts),
            m("average_queue_duration_ms", "untyped",
              "moving average (alpha 0.1, per batch) of the send-queue wait of packets that "
              "found their writer busy",
              s.average_queue_duration_ms, prom="derp_average_queue_duration_seconds",
              prom_kind="gauge", prom_scale=0.001, combine="max"),
            m("bytes_received", "counter", "payload bytes of SendPacket frames received",
              s.bytes_received),
            m("bytes_sent", "counter", "payload bytes of RecvPacket frames written",
              s.bytes_sent),
            m("counter_buffered_write_frames", "histogram", "frames per socket write",
              histogram=s.buffered_write_frames),
            m("counter_mesh_update_batch_size", "histogram",
              "PeerPresent/PeerGone notes per write to a mesh watcher",
              histogram=s.mesh_update_batch_size),
            m("counter_mesh_update_loop_count", "histogram",
              "passes needed to write a mesh watcher's pending notes",
              histogram=s.mesh_update_loop_count),
            m("counter_tcp_rtt", "counter",
              "connection RTT samples (every 10 s) by bucket; non-tcp/error once per connection",
              samples=_by("le", dict(zip(TCP_RTT_LABELS, s.tcp_rtt))), prom=None),
            # Prometheus reserves "le" for histogram buckets: /metrics says "bucket".
            m("counter_tcp_rtt", "counter",
              "connection RTT samples (every 10 s) by bucket; non-tcp/error once per connection",
              samples=_by("bucket", dict(zip(TCP_RTT_LABELS, s.tcp_rtt))), varz=False),
            m("counter_packets_received_kind", "counter", "SendPacket frames received by kind",
              samples=_by("kind", {"disco": disco, "other": s.packets_received - disco})),
            m("counter_total_dup_client_conns", "counter",
              "connections accepted while their key was already connected",
              s.total_dup_client_conns, prom="derp_dup_client_conns"),
            m("gauge_clients_local", "gauge", "distinct keys connected here", local),
            m("gauge_clients_remote", "gauge", "distinct keys connected to mesh peers only",
              remote),
            m("gauge_clients_total", "gauge", "distinct keys known here or via mesh peers",
              local + remote, prom="derp_clients"),
            m("gauge_current_connections", "gauge", "registered DERP connections (dups included)",
              r.current_connections),
            m("gauge_current_dup_client_conns", "gauge",
              "connections of keys that have more than one", r.dup_conns),
            m("gauge_current_dup_client_keys", "gauge", "keys with more than one connection",
              r.dup_keys),
            m("gauge_current_file_descriptors", "gauge", "open file descriptors", _open_fds(),
              prom=None),  # process_open_fds on /metrics
            m("gauge_current_home_connections", "gauge",
              "connections whose client prefers this relay (NotePreferred)",
              s.current_home_connections),
            m("gauge_current_notideal_connections", "gauge",
              "connections whose client says another relay would be better (Ideal-Node)",
              s.current_notideal_connections),
            m("gauge_memstats_sys0", "gauge", "resident memory at server start (bytes)",
              self.sys0, prom=None),  # process_resident_memory_bytes on /metrics
            m("gauge_watchers", "gauge", "mesh watchers enrolled (WatchConns) by other nodes",
              r.region_watchers),
            m("got_ping", "counter", "Ping frames received", s.got_ping),
            m("home_moves_in", "counter", "clients that made this their home relay",
              s.home_moves_in),
            m("home_moves_out", "counter", "clients that moved their home relay away",
              s.home_moves_out),
            m("multiforwarder_created", "counter", "keys claimed by several mesh peers",
              r.multiforwarder_created),
            m("multiforwarder_deleted", "counter", "keys back to one claiming mesh peer",
              r.multiforwarder_deleted),
            m("packet_forwarder_delete_other_value", "counter",
              "removals of a forwarder that was not registered for the key",
              r.forwarder_delete_other),
            m("packets_forwarded_in", "counter", "packets forwarded in by mesh peers",
              s.packets_forwarded_in),
            m("packets_forwarded_out", "counter", "packets forwarded out to mesh peers",
              s.packets_forwarded_out),
            m("packets_received", "counter", "SendPacket frames received", s.packets_received),
            m("packets_sent", "counter", "RecvPacket frames written", s.packets_sent),
            m("peer_gone_disconnected_frames", "counter",
              "PeerGone(Disconnected) frames written", s.peer_gone_disconnected_frames),
            m("peer_gone_not_here_frames", "counter", "PeerGone(NotHere) frames written",
              s.peer_gone_not_here_frames),
            m("sent_pong", "counter", "Pong frames written", s.sent_pong),
            m("sclient_write_timeouts", "counter",
              "connections ended because a write hit -tcp-write-timeout",
              s.sclient_write_timeouts),
            m("unknown_frames", "counter", "unknown frames received (never counted, as in Go)",
              0, prom=None),
        ]

    def _drops(self) -> list[Metric]:
        s = self.relay.stats
        out = []
        for what, counts in (("packets", s.packets_dropped), ("bytes", s.bytes_dropped)):
            samples = tuple(
                ((("reason", reason.name.lower()), ("kind", kind)), counts[reason * 2 + disco])
                for reason in DropReason for disco, kind in enumerate(KINDS))
            name = f"derp_{what}_dropped"
            out.append(Metric(name, "counter", DROP_HELP[what],
                              samples=tuple(sorted(samples, key=_label_text)),
                              order=(name, ""), varz_help=True))
        return out

    def _others(self) -> list[Metric]:
        s = self.relay.stats
        go_stun: dict[str, int] = dict.fromkeys(("not_stun", "read_error", "success",
                                                 "write_error"), 0)
        for d in Disposition:
            go_stun[GO_STUN_DISPOSITION.get(d, "not_stun")] += self.stun.requests[d]
        versions = dict(zip(TLS_VERSIONS, s.tls_handshakes, strict=True))
        active = dict(zip(TLS_VERSIONS, s.tls_active, strict=True))
        links = sorted(self.relay.mesh_links.values(), key=lambda h: (h.peer, h.address))
        return [
            Metric("derp_websocket_accepts", "counter", "DERP-over-WebSocket sessions accepted",
                   _one(s.websocket_accepts), order=("derp_websocket_accepts", "")),
            Metric("derper_tls_active_version", "gauge", "open TLS connections by TLS version",
                   _by("version", active), order=("derper_tls_active_version", "")),
            Metric("derper_tls_request_version", "untyped",
                   "TLS handshakes completed, by TLS version", _by("version", versions),
                   order=("derper_tls_request_version", ""), prom_kind="counter"),
            Metric("stun_addrfamily", "counter", "answered STUN requests by client address family",
                   _by("family", self.stun.by_family()), order=("stun", "counter_addrfamily")),
            Metric("stun_requests", "counter", "STUN datagrams by disposition",
                   _by("disposition", go_stun), order=("stun", "counter_requests"),
                   prom=None),
            Metric("stun_requests", "counter", "STUN datagrams by disposition",
                   _by("disposition", self.stun.by_disposition()), varz=False),
            Metric("tls_listener_accepted_connections", "counter",
                   "TCP connections accepted on the main listener",
                   _one(s.accepted_connections),
                   order=("tls_listener", "counter_accepted_connections")),
            Metric("tls_listener_rejected_connections", "counter",
                   "TCP connections closed at once by -accept-connection-limit",
                   _one(s.rejected_connections),
                   order=("tls_listener", "counter_rejected_connections")),
            Metric("derper_client_connects", "counter",
                   "DERP clients registered (past the handshake and admission)",
                   _one(s.client_connects), varz=False),
            Metric("derper_client_disconnects", "counter", "registered DERP clients gone again",
                   _one(s.client_disconnects), varz=False),
            Metric("derper_handshake_failures", "counter",
                   "DERP connections that failed the DERP handshake",
                   _one(s.handshake_failures), varz=False),
            Metric("derper_worker_packets", "counter",
                   "packets handed from one -workers process of this host to another, by "
                   "direction", _by("direction", {"out": s.packets_to_siblings,
                                                  "in": s.packets_from_siblings}), varz=False),
            Metric("derper_log_lines_suppressed", "counter",
                   "repetitive log lines left out by the log rate limiter",
                   _one(self.relay.log_throttle.total), varz=False),
            Metric("derper_loop_turns_waited", "counter",
                   "handshake and close steps that waited for their turn on the event loop "
                   "while packets were relayed", _one(self.relay.pacer.waited), varz=False),
            Metric("derper_event_loop_lag_seconds", "gauge",
                   "worst lateness of the event loop over the last 10 s (sampled 4x a second)",
                   _one(self.relay.loop_lag.worst), varz=False, combine="max"),
            Metric("derper_tasks", "gauge", "trio tasks alive (two per client)",
                   _one(trio.lowlevel.current_statistics().tasks_living), varz=False),
            Metric("derper_mesh_link_up", "gauge",
                   "regional mesh links (-mesh-with) by entry and address: 1 up, 0 down",
                   tuple(((("address", h.address), ("peer", h.peer)), int(h.up))
                         for h in links), varz=False, combine="worker"),
            Metric("derper_mesh_link_reconnects", "counter",
                   "times each mesh link went down and was retried",
                   tuple(((("address", h.address), ("peer", h.peer)), h.reconnects)
                         for h in links), varz=False, combine="worker"),
            Metric("derper_build", "gauge", "derper build information",
                   (((("version", self.version),), 1),), varz=False, prom_kind="info",
                   combine="first"),
        ]


    def _limits(self) -> list[Metric]:
        """Admission and limits. Go shows ``rate_limit_per_client_*`` only with
        ``-rate-config``; so does varz here, while /metrics always has them (0 = off)."""
        s, limit = self.relay.stats, self.relay.recv_limit
        go_too = limit is not None

        def rate_limit(key: str, kind: str, help: str, value: float, **kw) -> Metric:
            return Metric("derp_" + key, kind, help, _one(value), order=("derp", key),
                          varz=go_too, **kw)

        return [
            Metric("derper_admission_results", "counter",
                   "DERP clients by admission verdict (-verify-clients, -verify-client-url, "
                   "-allow-keys); mesh-key holders bypass it",
                   _by("result", {"allowed": s.admission_allowed,
                                  "rejected": s.admission_rejected,
                                  "mesh_bypass": s.admission_mesh_bypass}), varz=False),
            Metric("derper_admission_fail_open", "counter",
                   "clients admitted unverified because the verify URL was unreachable",
                   _one(s.admission_fail_open), varz=False),
            Metric("derper_admission_cache_hits", "counter",
                   "admission verdicts answered from the 10 s cache", _one(s.admission_cache_hits),
                   varz=False),
            Metric("derper_limit_rejections", "counter",
                   "connections refused by -max-clients (HTTP 503) or -max-handshakes",
                   _by("limit", {"max_clients": s.rejected_max_clients,
                                 "max_handshakes": s.rejected_half_open}), varz=False),
            Metric("derper_half_open_evicted", "counter",
                   "half-open connections closed to make room for a newcomer (-max-handshakes "
                   "full; the oldest of the address holding the most)",
                   _one(s.evicted_half_open), varz=False),
            Metric("derper_bandwidth_limit_waited", "counter",
                   "reads paused by -bandwidth-limit", _one(s.bandwidth_limit_waited),
                   varz=False),
            rate_limit("rate_limit_per_client_waited", "counter",
                       "reads paused by the per-client -rate-config limit",
                       s.rate_limit_per_client_waited),
            rate_limit("rate_limit_per_client_bytes_per_second", "untyped",
                       "per-client receive rate of -rate-config (0: off)",
                       limit.rate if limit else 0, prom_kind="gauge", combine="first"),
            rate_limit("rate_limit_per_client_burst_bytes", "untyped",
                       "per-client receive burst of -rate-config (0: off)",
                       limit.burst if limit else 0, prom_kind="gauge", combine="first"),
        ]


def _label_text(sample: tuple[Labels, float]) -> str:
    return ",".join(f'{k}="{v}"' for k, v in sample[0])
