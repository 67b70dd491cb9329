"""Every problem with a configuration at once, found without side effects.

The server refuses to start on any of them and names them all, so one round of fixes is enough;
``derper check`` asks the same on the relay host with the server's own flags. The check reads
files (rate config, allowed keys, certificates, the ACME account key) and looks at directories,
but creates, writes and prints nothing. Each message says what to change.
"""

from __future__ import annotations

import os
from typing import Callable, Iterator

from stun.message import check_alternates

from .admission.gate import read_allow_keys
from .admission.rate_config import load_rate_config, parse_rate
from .certs.acme import unwritable_certdir
from .certs.acme_order import load_account_key, resolve_directory
from .certs.bundle import (CertError, load_manual, manual_paths, pair_on_disk, parse_ip,
                           unwritable_ip_certdir)
from .config import CERT_MODES, DEV_ADDR, GO_DEFAULT_HOSTNAME, Config
from .disk.files import unwritable_reason
from .errors import ConfigError
from .http.endpoints import validate_home
from .mesh.peers import parse_mesh_with
from .metrics.varz import parse_cidrs
from .net.addr import parse_addr, parse_cidrs as parse_prefixes
from .workers.plan import worker_count


class ConfigProblems(ConfigError):
    """Everything ``check`` found wrong, as one error; ``problems`` holds each of them."""

    def __init__(self, problems: list[ConfigError]) -> None:
        self.problems = problems
        if len(problems) == 1:
            super().__init__(str(problems[0]))
        else:
            super().__init__(f"{len(problems)} problems with the configuration:\n"
                             + "\n".join(f"  - {p}" for p in problems))


def check(config: Config, *, mesh_key: bytes | None = None) -> list[ConfigError]:
    """Every problem with ``config``, in flag order within each area; empty if it can run.

    ``mesh_key``: the region's key if one was loaded (in -dev it may come from the
    environment rather than -mesh-psk-file).
    """
    parts = (_listening, _endpoints, _admission, _webroot, _certificates)
    problems = [problem for part in parts for problem in part(config) if problem is not None]
    return problems + [p for p in _mesh(config, mesh_key) if p is not None]


def _failure(parse: Callable, *args, flag: str = "") -> ConfigError | None:
    """What ``parse(*args)`` raises, as a ConfigError (prefixed with ``flag`` if given, and
    caused by the original); None if it succeeds."""
    try:
        parse(*args)
    except ValueError as e:  # ConfigError included
        if isinstance(e, ConfigError) and not flag:
            return e
        problem = ConfigError(f"{flag}: {e}" if flag else str(e))
        problem.__cause__ = e
        return problem
    return None


def _listening(config: Config) -> Iterator[ConfigError | None]:
    if config.certmode not in CERT_MODES:
        yield ConfigError(f"-certmode must be one of {', '.join(CERT_MODES)}, "
                          f"not {config.certmode!r}")
    for name, port in (("-http-port", config.http_port), ("-stun-port", config.stun_port)):
        if not -1 <= port <= 65535:
            yield ConfigError(f"{name} must be a port number (or -1 to disable), not {port}")
    addr_problem = _failure(parse_addr, config.addr, flag="-a")
    yield addr_problem
    if addr_problem is None:  # the RFC 5780 sockets depend on the address -a names
        yield _failure(check_alternates, parse_addr(config.addr)[0], config.stun_port,
                       config.stun_alt_port, config.stun_alt_ip, config.stun_strict)
    if config.metrics_listen:
        yield _failure(parse_addr, config.metrics_listen, flag="-metrics-addr")


def _endpoints(config: Config) -> Iterator[ConfigError | None]:
    yield _failure(validate_home, config.home)
    yield _failure(parse_cidrs, config.debug_allow_cidrs)
    yield _failure(parse_prefixes, config.trusted_proxies, "-trusted-proxies")


def _admission(config: Config) -> Iterator[ConfigError | None]:
    yield _failure(parse_rate, config.bandwidth_limit, flag="-bandwidth-limit")
    if config.rate_config:
        yield _failure(load_rate_config, config.rate_config)
    if config.allow_keys:
        yield _failure(read_allow_keys, config.allow_keys)
    url = config.verify_client_url
    if url and not url.startswith(("http://", "https://")):
        yield ConfigError(f"-verify-client-url must be an http:// or https:// URL, not {url!r}")
    if config.max_clients < 0 or config.max_handshakes < 0:
        yield ConfigError("-max-clients and -max-handshakes must be 0 (no cap) or positive")
    yield _failure(worker_count, config.workers)
    if config.max_handshakes_per_source < 0:
        yield ConfigError("-max-handshakes-per-source must be 0 (no cap) or positive")


def _mesh(config: Config, mesh_key: bytes | None) -> Iterator[ConfigError | None]:
    if not config.mesh_with:
        return
    yield _failure(parse_mesh_with, config.mesh_with)
    if mesh_key is None and not config.mesh_psk_file:
        yield ConfigError("-mesh-with needs the region's mesh key: give every node the same "
                          "-mesh-psk-file (make it once with 'openssl rand -hex 32 > FILE'"
                          "; in -dev, TAILSCALE_DERPER_MESH_KEY also works)")
    if config.mesh_dns_server:
        yield _failure(parse_addr, config.mesh_dns_server, flag="-mesh-dns-server")
    if config.mesh_resolve_interval <= 0:
        yield ConfigError("-mesh-resolve-interval must be positive, e.g. 30s")


def _webroot(config: Config) -> Iterator[ConfigError | None]:
    webroot = config.acme_webroot
    if not webroot:
        return
    if not os.path.isdir(webroot):
        yield ConfigError(f"-acme-webroot {webroot}: not a directory; create it, or give the "
                          "directory certbot's --webroot -w writes to")
    if not config.tls or config.http_port < 0:
        yield ConfigError("-acme-webroot is served by the HTTP helper, which runs only with "
                          "TLS and -http-port ≥ 0: drop -dev and -certmode none (or use "
                          "-certmode manual) and set -http-port, or drop -acme-webroot")


def _certificates(config: Config) -> Iterator[ConfigError | None]:
    if config.certmode == "none" and config.acme_ip_certs:
        yield ConfigError("-acme-ip-certs orders a certificate, and -certmode none serves "
                          "none (TLS is terminated by the proxy in front): drop one of them")
    if not config.tls or config.certmode not in CERT_MODES:
        return
    if config.certmode == "letsencrypt":
        yield from _acme(config)
    else:
        yield from _manual(config)


def _acme(config: Config) -> Iterator[ConfigError | None]:
    hostname = config.hostname
    is_ip = parse_ip(hostname) is not None
    if hostname == GO_DEFAULT_HOSTNAME:
        yield ConfigError(
            "-certmode letsencrypt (the default) needs -hostname set to this relay's DNS "
            f"name ({GO_DEFAULT_HOSTNAME} is Tailscale's own). No domain? Use "
            "-hostname <public IP> with -acme-ip-certs, or with -certmode manual for a "
            "self-signed certificate; -certmode none behind a reverse proxy that terminates "
            f"TLS; or -dev for plain HTTP on {DEV_ADDR}")
    if is_ip and not config.acme_ip_certs:
        yield ConfigError(
            f"-hostname {hostname} is an IP address: add -acme-ip-certs for a "
            "Let's Encrypt IP certificate (6-day, renewed automatically), or use "
            "-certmode manual for a self-signed certificate pinned in the DERP map")
    if config.acme_ip_certs and not is_ip:
        yield ConfigError(f"-acme-ip-certs needs an IP address as -hostname, not {hostname!r}")
    if config.http_port < 0:
        yield ConfigError("-certmode letsencrypt answers the CA's HTTP-01 challenge on the "
                          "HTTP helper; -http-port -1 turns it off")
    yield _failure(resolve_directory, config.acme_directory)
    if config.acme_ca_bundle and not os.path.isfile(config.acme_ca_bundle):
        yield ConfigError(f"-acme-ca-bundle {config.acme_ca_bundle}: no such file; give the "
                          "PEM file of the ACME server's roots, or leave it empty for the "
                          "system's")
    certdir = config.certdir_path
    reason = unwritable_reason(certdir)
    if reason is not None:
        yield unwritable_certdir(certdir, reason)
        return
    try:
        load_account_key(certdir)
    except ConfigError as e:
        yield e
    except OSError as e:
        problem = ConfigError(f"cannot read the ACME account key {e.filename}: {e.strerror}; "
                              "let derper read it, or remove it to create a new account")
        problem.__cause__ = e
        yield problem


def _manual(config: Config) -> Iterator[ConfigError | None]:
    certdir, hostname = config.certdir_path, config.hostname
    if parse_ip(hostname) is not None:  # derper makes the self-signed pair if it is missing
        try:
            on_disk = pair_on_disk(certdir, hostname)
        except CertError as e:
            yield e
            return
        if not on_disk:
            reason = unwritable_reason(certdir)
            yield None if reason is None else unwritable_ip_certdir(certdir, reason)
            return
    elif config.acme_webroot and not any(p.exists() for p in manual_paths(certdir, hostname)):
        return  # served once certbot has put the pair there
    yield _failure(load_manual, certdir, hostname)
