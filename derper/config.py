"""Everything the server can be told, with every default in one place.

Field defaults match the Go derper's flags (spec §5.1) unless a comment says why not. The CLI
fills a ``Config`` from flags and ``DERP_*`` variables; tests build one directly.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

DEV_ADDR = "127.0.0.1:3340"  # Go's -dev binds every interface; a dev server should not
CERT_MODES = ("letsencrypt", "manual", "none")  # none: TLS is terminated by a proxy in front
LETSENCRYPT_DIRECTORY = "https://acme-v02.api.letsencrypt.org/directory"
GO_DEFAULT_HOSTNAME = "derp.tailscale.com"  # Go's -hostname default: Tailscale's own name


def default_certdir() -> str:
    """Go's default: the user cache dir + tailscale/derper-certs."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "tailscale", "derper-certs")


def default_key_path() -> Path:
    """``/var/lib/derper/derper.key`` as root (as Go), else under the user's state directory."""
    if os.geteuid() == 0:
        return Path("/var/lib/derper/derper.key")
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                             "state")
    return Path(state) / "derper" / "derper.key"


@dataclass
class Config:
    addr: str = ":443"
    hostname: str = GO_DEFAULT_HOSTNAME
    certmode: str = "letsencrypt"
    certdir: str = ""  # "" → default_certdir()
    acme_email: str = ""
    acme_directory: str = LETSENCRYPT_DIRECTORY
    acme_ca_bundle: str = ""
    acme_ip_certs: bool = False
    acme_webroot: str = ""
    cert_watch_interval: float = 5.0  # -certmode manual: poll the files; 0 → SIGHUP only
    config_path: str = ""  # -c; "" → default_key_path(), or a throwaway key with -dev
    dev: bool = False
    http_port: int = 80
    stun: bool = True
    stun_port: int = 3478
    stun_strict: bool = False  # answer only Tailscale's STUN requests, as the Go derper does
    stun_alt_port: int = -1  # RFC 5780's alternate port; -1 = off (not in the Go derper)
    stun_alt_ip: str = ""  # RFC 5780's alternate IP, with -stun-alt-port
    derp: bool = True
    home: str = ""
    bootstrap_dns_names: str = ""
    mesh_psk_file: str = ""
    mesh_with: str = ""  # Go's -mesh-with list; derper adds @sha256-raw: pins (mesh/peers.py)
    mesh_dns_server: str = ""  # host:port resolving -mesh-with names; "" = the system's
    mesh_resolve_interval: float = 30.0
    tcp_keepalive_time: float = 600.0
    tcp_user_timeout: float = 15.0
    tcp_write_timeout: float = 2.0
    accept_connection_limit: float = math.inf
    accept_connection_burst: int = sys.maxsize
    # Admission (spec §4.9) and limits; see README "Secure a public relay".
    verify_clients: bool = False
    socket: str = ""  # tailscaled's LocalAPI socket; "" → /var/run/tailscale/tailscaled.sock
    verify_client_url: str = ""
    verify_client_url_fail_open: bool = True  # Go's default; README recommends false
    allow_keys: str = ""
    rate_config: str = ""
    bandwidth_limit: str = ""  # e.g. "4mbit"; "" or "0" = no relay-wide budget
    max_clients: int = 0  # 0 = no cap
    max_handshakes: int = 1024  # connections not yet through TLS+HTTP+DERP handshake; 0 = no cap
    max_handshakes_per_source: int = 64  # of those, from one address (IPv6: one /64); 0 = no cap
    # Behind a reverse proxy or CDN; see README "Behind a reverse proxy or CDN".
    trusted_proxies: str = ""  # peers whose Forwarded/X-Forwarded-For/X-Real-IP are believed
    proxy_protocol: bool = False  # a PROXY v1/v2 header opens every main-listener connection
    log_level: str = "info"
    workers: str = "1"  # processes sharing the ports (SO_REUSEPORT); "auto" = one per CPU
    metrics_addr: str = "127.0.0.1:9437"  # /metrics; "" or "off" disables. Not Prometheus's 9090
    debug_allow_cidrs: str = ""  # /debug/varz beyond loopback
    status_show_addrs: bool = False  # client IP addresses on /status (off: keys only)
    # Not flags: protocol timers and sizes that tests (and the Go debug env knob
    # TS_DEBUG_DERP_PER_CLIENT_SEND_QUEUE_DEPTH) may change.
    keepalive_interval: float = 60.0
    handshake_timeout: float = 10.0  # TLS handshake + HTTP head, and again for the DERP handshake
    queue_depth: int = 32
    shutdown_grace: float = 2.0  # time to flush Restarting frames before closing
    acme_retry_min: float = 60.0  # a failed ACME order is retried after this, doubling …
    acme_retry_max: float = 1800.0  # … up to this (Go's autocert: 1 min to 30 min)
    allow_keys_poll: float = 5.0  # how often the -allow-keys file is checked for changes

    @property
    def metrics_listen(self) -> str | None:
        """-metrics-addr, or None if disabled ("off" too: an empty DERP_* variable means unset)."""
        return None if self.metrics_addr in ("", "off") else self.metrics_addr

    @property
    def tls(self) -> bool:
        """TLS always, except -certmode none (a proxy terminates it) and -dev (plain HTTP)
        unless -certmode manual was asked for."""
        return self.certmode != "none" and (not self.dev or self.certmode == "manual")

    @property
    def certdir_path(self) -> Path:
        return Path(self.certdir or default_certdir())
