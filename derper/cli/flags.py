"""The server's flags: Go-derper-compatible names and ``DERP_*`` variables → one ``Config``.

Shared by every command that speaks about the server (serving, ``derpmap``, ``check``), so
each reads the same command line the same way; importing it loads no server module.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from ..config import DEV_ADDR, Config
from ..logs import LEVELS
from .goflags import Flag, UsageError, parse

SERVE_FLAGS = [
    Flag("a", "addr", "string",
         'listen address: ":port" (every interface), "ip:port" or "[ipv6]:port"; STUN and the '
         'HTTP helper bind the same IP. With -dev the default is ' + DEV_ADDR,
         ("DERP_ADDR",)),
    Flag("hostname", "hostname", "string",
         "TLS host name (or IP address) this relay is reached by; names the certificate",
         ("DERP_DOMAIN", "DERP_HOSTNAME")),
    Flag("certmode", "certmode", "string",
         'where the TLS certificate comes from: "letsencrypt" (ACME, obtained and renewed '
         'in-process, see -acme-*), "manual" (<certdir>/<hostname>.crt and .key; an IP '
         '-hostname gets a self-signed one) or "none" (plain HTTP on -a with the key from -c, '
         "for a reverse proxy that terminates TLS; no HTTP helper, STUN still direct)",
         ("DERP_CERT_MODE", "DERP_CERTMODE")),
    Flag("certdir", "certdir", "string",
         "directory of certificates (default $XDG_CACHE_HOME/tailscale/derper-certs)",
         ("DERP_CERT_DIR", "DERP_CERTDIR")),
    Flag("acme-email", "acme_email", "string",
         "contact address for the ACME account (expiry warnings from the CA); optional",
         ("DERP_ACME_EMAIL",)),
    Flag("acme-directory", "acme_directory", "string",
         'ACME directory URL for -certmode letsencrypt; "staging" for Let\'s Encrypt\'s '
         "staging CA, or any RFC 8555 CA", ("DERP_ACME_DIRECTORY",)),
    Flag("acme-ca-bundle", "acme_ca_bundle", "string",
         "PEM file of roots to trust for the ACME server itself (a private CA); default: "
         "the system's", ("DERP_ACME_CA_BUNDLE",)),
    Flag("acme-ip-certs", "acme_ip_certs", "bool",
         "with an IP address as -hostname and -certmode letsencrypt: get a publicly trusted "
         "IP-address certificate (Let's Encrypt shortlived profile, about 6 days, renewed "
         "automatically)", ("DERP_ACME_IP_CERTS",)),
    Flag("acme-webroot", "acme_webroot", "string",
         "serve /.well-known/acme-challenge/ on the HTTP helper from DIR/.well-known/"
         "acme-challenge/, for `certbot certonly --webroot -w DIR` with -certmode manual; "
         "derper then starts without a certificate and serves one once it appears",
         ("DERP_ACME_WEBROOT",)),
    Flag("cert-watch-interval", "cert_watch_interval", "duration",
         "-certmode manual: how often to check the certificate files for changes (a changed "
         "pair is reloaded, as on SIGHUP); 0 disables", ("DERP_CERT_WATCH_INTERVAL",)),
    Flag("c", "config_path", "string",
         "server key file, JSON {\"PrivateKey\": \"privkey:...\"}, created (mode 0600) if missing "
         "(default /var/lib/derper/derper.key as root, else $XDG_STATE_HOME/derper/derper.key; "
         "-dev: a throwaway key)",
         ("DERP_CONFIG",)),
    Flag("dev", "dev", "bool",
         "development mode: plain HTTP on " + DEV_ADDR + " with a throwaway key, no certificates",
         ("DERP_DEV",)),
    Flag("http-port", "http_port", "int",
         "plain-HTTP helper port when serving TLS (captive-portal checks, redirect to HTTPS); "
         "-1 disables", ("DERP_HTTP_PORT",)),
    Flag("stun", "stun", "bool", "run the STUN server (UDP)", ("DERP_STUN",)),
    Flag("stun-port", "stun_port", "int", "UDP port of the STUN server", ("DERP_STUN_PORT",)),
    Flag("stun-strict", "stun_strict", "bool",
         "answer only Tailscale's STUN requests, like the Go derper (default: every RFC 5389/"
         "8489 and RFC 3489 Binding request)", ("DERP_STUN_STRICT",)),
    Flag("stun-alt-port", "stun_alt_port", "int",
         "also answer STUN on this UDP port, as an RFC 5780 server: NAT behaviour discovery for "
         "`derper nat`, coturn's turnutils_natdiscovery and others; -1 disables",
         ("DERP_STUN_ALT_PORT",)),
    Flag("stun-alt-ip", "stun_alt_ip", "string",
         "with -stun-alt-port: a second address of this machine to answer STUN on too (both "
         "ports), so NAT filtering by address can be measured; needs -a IP:port",
         ("DERP_STUN_ALT_IP",)),
    Flag("derp", "derp", "bool",
         "serve DERP at /derp; false keeps STUN and the HTTP endpoints while decommissioning",
         ("DERP_DERP",)),
    Flag("home", "home", "string",
         'what "/" shows: empty for the default page, "blank" for an empty page, or an '
         "http(s) URL to redirect to", ("DERP_HOME",)),
    Flag("bootstrap-dns-names", "bootstrap_dns_names", "string",
         "comma-separated host names whose addresses /bootstrap-dns publishes",
         ("DERP_BOOTSTRAP_DNS_NAMES",)),
    Flag("mesh-psk-file", "mesh_psk_file", "string",
         "file holding the region's mesh key (64 hex digits); clients presenting it may watch "
         "connections, close peers and forward packets; make one with "
         "'openssl rand -hex 32 > FILE'", ("DERP_MESH_PSK_FILE",)),
    Flag("mesh-with", "mesh_with", "string",
         "other relays of this region to mesh with, comma separated: host[:port][/dialhost]"
         "[@sha256-raw:PIN] (listing this node too is fine), e.g. "
         "'derp1.example.com,derp2.example.com,10.0.0.3:8443@sha256-raw:1f2e...'; a name with "
         "several addresses links to each; needs -mesh-psk-file", ("DERP_MESH_WITH",)),
    Flag("mesh-dns-server", "mesh_dns_server", "string",
         "DNS server (ip:port) that resolves -mesh-with names, e.g. a cluster's DNS; empty: "
         "the system resolver", ("DERP_MESH_DNS_SERVER",)),
    Flag("mesh-resolve-interval", "mesh_resolve_interval", "duration",
         "how often -mesh-with names are resolved again, so links follow the DNS records",
         ("DERP_MESH_RESOLVE_INTERVAL",)),
    Flag("tcp-keepalive-time", "tcp_keepalive_time", "duration",
         "TCP keepalive idle time; 0 disables", ("DERP_TCP_KEEPALIVE_TIME",)),
    Flag("tcp-user-timeout", "tcp_user_timeout", "duration",
         "TCP_USER_TIMEOUT: drop connections whose sent data stays unacknowledged this long; "
         "0 disables", ("DERP_TCP_USER_TIMEOUT",)),
    Flag("tcp-write-timeout", "tcp_write_timeout", "duration",
         "give up on a client whose writes block this long; 0 disables",
         ("DERP_TCP_WRITE_TIMEOUT",)),
    Flag("accept-connection-limit", "accept_connection_limit", "float",
         "new connections accepted per second (excess ones are closed at once)",
         ("DERP_ACCEPT_CONNECTION_LIMIT",)),
    Flag("accept-connection-burst", "accept_connection_burst", "int",
         "burst of new connections allowed above -accept-connection-limit",
         ("DERP_ACCEPT_CONNECTION_BURST",)),
    Flag("workers", "workers", "string",
         "worker processes sharing the ports (SO_REUSEPORT), each a full relay linked to the "
         "others, so every core works: a number, or auto (one per CPU); 1 = one process, no "
         "supervisor. Host-wide limits (-max-clients, -max-handshakes, -bandwidth-limit, "
         "-accept-connection-limit) are split evenly among them", ("DERP_WORKERS",)),
    Flag("max-clients", "max_clients", "int",
         "cap on DERP connections; over it new ones get HTTP 503 before the upgrade; 0 = as "
         "many as the open-file limit allows (raised to its hard limit at start) beside the "
         "half-open connections",
         ("DERP_MAX_CLIENTS",)),
    Flag("max-handshakes", "max_handshakes", "int",
         "cap on connections still in their TLS/HTTP/DERP handshake (slowloris); when full, a "
         "newcomer replaces the oldest half-open connection of the address holding the most, "
         "and from half full each gets 2 s in all (the HTTP helper's connections: the same cap, "
         "their own pool); 0 = no cap", ("DERP_MAX_HANDSHAKES",)),
    Flag("max-handshakes-per-source", "max_handshakes_per_source", "int",
         "of those, at most this many from one address (IPv6: one /64); more are closed at "
         "once; 0 = no cap", ("DERP_MAX_HANDSHAKES_PER_SOURCE",)),
    Flag("verify-clients", "verify_clients", "bool",
         "admit only nodes the local tailscaled knows (LocalAPI whois over -socket)",
         ("DERP_VERIFY_CLIENTS",)),
    Flag("socket", "socket", "string",
         "tailscaled LocalAPI socket for -verify-clients (default "
         "/var/run/tailscale/tailscaled.sock)", ("DERP_SOCKET",)),
    Flag("verify-client-url", "verify_client_url", "string",
         "admission controller URL (e.g. Headscale's https://hs.example.com/verify): POSTed "
         '{"NodePublic","Source"}, admits on 200 + {"Allow":true}', ("DERP_VERIFY_CLIENT_URL",)),
    Flag("verify-client-url-fail-open", "verify_client_url_fail_open", "bool",
         "admit clients when the verify URL is unreachable (Go's default; set false on a "
         "public relay)", ("DERP_VERIFY_CLIENT_URL_FAIL_OPEN",)),
    Flag("allow-keys", "allow_keys", "string",
         "file of allowed node keys, one nodekey:<64 hex> per line, # comments; reloaded on "
         "SIGHUP and when it changes", ("DERP_ALLOW_KEYS",)),
    Flag("rate-config", "rate_config", "string",
         'per-client receive limit, Go JSON {"PerClientRateLimitBytesPerSec":N,'
         '"PerClientRateBurstBytes":N}; reloaded on SIGHUP', ("DERP_RATE_CONFIG",)),
    Flag("bandwidth-limit", "bandwidth_limit", "string",
         "relay-wide budget shared fairly by the senders, e.g. 4mbit, 500kbit (bits/s) or "
         "1MB, 2MiB (bytes/s); empty = none", ("DERP_BANDWIDTH_LIMIT",)),
    Flag("metrics-addr", "metrics_addr", "string",
         'where Prometheus scrapes /metrics and the status page /status is served, "ip:port" '
         '(loopback by default: reach it over an SSH tunnel); "off" disables. A port that '
         "cannot be bound is logged and the relay runs on without them",
         ("DERP_METRICS_ADDR",)),
    Flag("debug-allow-cidrs", "debug_allow_cidrs", "string",
         "comma-separated IP prefixes (e.g. 10.0.0.0/8) that may read /debug/varz on the main "
         "port besides loopback; requests carrying X-Forwarded-For are always refused",
         ("DERP_DEBUG_ALLOW_CIDRS",)),
    Flag("status-show-addrs", "status_show_addrs", "bool",
         "show the heaviest senders' IP addresses on /status and in `derper status` (default: "
         "shortened node keys only)", ("DERP_STATUS_SHOW_ADDRS",)),
    Flag("trusted-proxies", "trusted_proxies", "string",
         "comma-separated IP prefixes of reverse proxies (e.g. 127.0.0.1/32,10.0.0.0/8) whose "
         "X-Forwarded-For, Forwarded or X-Real-IP header names the client; others' are ignored",
         ("DERP_TRUSTED_PROXIES",)),
    Flag("proxy-protocol", "proxy_protocol", "bool",
         "every connection to -a starts with a PROXY protocol v1 or v2 header (nginx stream "
         "proxy_protocol on, HAProxy send-proxy-v2) naming the client; connections without "
         "a valid one are closed", ("DERP_PROXY_PROTOCOL",)),
    Flag("log-level", "log_level", "string", "debug, info, warning or error",
         ("DERP_LOG_LEVEL",)),
    Flag("version", "version", "bool", "print the version and exit"),
]


def flag_defaults() -> dict:
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    defaults["version"] = False
    return defaults


def build_config(argv: list[str], environ: Mapping[str, str]) -> tuple[Config, set[str], bool]:
    """Flags and environment → (Config, fields set explicitly, whether -version was given)."""
    values, explicit, rest = parse(SERVE_FLAGS, argv, environ)
    if rest:
        raise UsageError(f"unexpected argument {rest[0]!r}")
    show_version = values.pop("version", False)
    return config_from_values(values, explicit, environ), explicit, show_version


def config_from_values(values: dict, explicit: set[str], environ: Mapping[str, str]) -> Config:
    """Parsed SERVE_FLAGS values → a checked Config (shared by the subcommands)."""
    config = Config(**values)
    if config.dev and "addr" not in explicit:
        config.addr = DEV_ADDR
    depth = environ.get("TS_DEBUG_DERP_PER_CLIENT_SEND_QUEUE_DEPTH")
    if depth:
        try:
            value = int(depth)
        except ValueError:
            raise UsageError("TS_DEBUG_DERP_PER_CLIENT_SEND_QUEUE_DEPTH must be an integer") \
                from None
        if value > 0:  # as in Go, zero or less means "use the default"
            config.queue_depth = value
    if config.log_level not in LEVELS:
        raise UsageError(f"-log-level must be one of {', '.join(LEVELS)}, not {config.log_level!r}")
    return config
