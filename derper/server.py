"""Wiring: one nursery holding the listeners, the connection tasks and the background jobs.

Every connection runs behind a crash barrier: whatever one peer sends, the worst outcome is a
log line and that one connection closed.
"""

from __future__ import annotations

import math
import os
import signal
from functools import partial
from pathlib import Path

import trio

from stun.counters import StunCounters
from stun.server import check_alternates, open_alternates, open_stun_socket, serve_socket

from . import __version__, logs
from .admission.fairshare import BandwidthLimiter
from .admission.gate import DEFAULT_SOCKET, Admission, AllowList
from .admission.limits import HandshakeSlots, TokenBucket
from .admission.rate_config import load_rate_config, parse_rate
from .certs.acme import AcmeCerts
from .certs.acme_order import AcmeSettings, resolve_directory
from .certs.bundle import CertError, derp_node_json, ensure_ip_cert, parse_ip
from .certs.context import ServerTLS
from .certs.http01 import Http01Responder
from .certs.manual import ManualCerts
from .cli import sdnotify
from .config import CERT_MODES, GO_DEFAULT_HOSTNAME, Config
from .errors import ConfigError
from .http.bootstrap_dns import BootstrapDNS, parse_names
from .http.endpoints import Endpoints, Request, Response, https_redirect
from .http.server import serve_http
from .metrics import prometheus as prom, varz
from .metrics.counters import tls_version_index
from .metrics.exposition import Exposition
from .net.addr import host_literal, parse_addr
from .net.listener import accept_loop, bound_port, open_listener, peer_address, tune
from .net.tls_stream import TLSStream
from .proto import metacert, wire
from .proto.keys import KeyPair, public_text
from .relay import tcp_rtt
from .relay.hub import Relay

log = logs.get("derper.server")

# What Restarting tells clients on shutdown: come back in a second, keep trying for 30 s
# (a systemd or Docker restart takes a few seconds).
RESTART_RECONNECT_MS = 1000
RESTART_TRY_FOR_MS = 30000


class Server:
    def __init__(self, config: Config, keypair: KeyPair, *, mesh_key: bytes | None = None) -> None:
        self.config = config
        if config.certmode not in CERT_MODES:
            raise ConfigError(f"-certmode must be one of {', '.join(CERT_MODES)}, "
                              f"not {config.certmode!r}")
        for name, port in (("-http-port", config.http_port), ("-stun-port", config.stun_port)):
            if not -1 <= port <= 65535:
                raise ConfigError(f"{name} must be a port number (or -1 to disable), not {port}")
        self.bootstrap = BootstrapDNS(parse_names(config.bootstrap_dns_names))
        try:
            self.listen_host, self.listen_port = parse_addr(config.addr)
            check_alternates(self.listen_host, config.stun_port, config.stun_alt_port,
                             config.stun_alt_ip, config.stun_strict)
            self.endpoints = Endpoints(home=config.home, derp_enabled=config.derp,
                                       bootstrap_body=lambda: self.bootstrap.body)
            debug_allow = varz.parse_cidrs(config.debug_allow_cidrs)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if config.metrics_listen:
            try:
                parse_addr(config.metrics_listen)
            except ValueError as e:
                raise ConfigError(f"-metrics-addr: {e}") from None
        self.relay = Relay(keypair, mesh_key, keepalive_interval=config.keepalive_interval,
                           write_timeout=config.tcp_write_timeout,
                           handshake_timeout=config.handshake_timeout,
                           queue_depth=config.queue_depth)
        self._setup_admission_and_limits()
        webroot = config.acme_webroot
        if webroot and not os.path.isdir(webroot):
            raise ConfigError(f"-acme-webroot {webroot}: not a directory")
        if webroot and (not config.tls or config.http_port < 0):
            raise ConfigError("-acme-webroot is served by the HTTP helper, which runs only with "
                              "TLS and -http-port ≥ 0")
        self.challenges = Http01Responder(Path(webroot) if webroot else None)
        self.acme: AcmeCerts | None = None
        self.manual: ManualCerts | None = None
        self.tls = self._load_tls() if config.tls else None
        self.stun_counters = StunCounters()
        self.exposition = Exposition(self.relay, self.stun_counters, __version__)
        self.endpoints.varz = varz.handler(self.exposition.metrics, debug_allow)
        self.metrics_port: int | None = None
        self.main_port: int | None = None
        self.http_port: int | None = None
        self.stun_port: int | None = None
        self._listeners: list[trio.SocketListener] = []
        self._nursery: trio.Nursery | None = None
        self._shutting_down = False

    # ---- admission and limits -----------------------------------------------------------------

    def _setup_admission_and_limits(self) -> None:
        config, relay = self.config, self.relay
        try:
            self.bandwidth_rate = parse_rate(config.bandwidth_limit)
        except ValueError as e:
            raise ConfigError(f"-bandwidth-limit: {e}") from None
        try:
            relay.set_receive_limit(load_rate_config(config.rate_config)
                                    if config.rate_config else None)
            self.allow_list = AllowList(config.allow_keys) if config.allow_keys else None
        except ConfigError as e:
            raise ConfigError(str(e)) from None
        url = config.verify_client_url or None
        if url is not None and not url.startswith(("http://", "https://")):
            raise ConfigError(f"-verify-client-url must be an http:// or https:// URL, not {url!r}")
        if config.max_clients < 0 or config.max_handshakes < 0:
            raise ConfigError("-max-clients and -max-handshakes must be 0 (no cap) or positive")
        relay.max_clients = config.max_clients
        self.handshakes = HandshakeSlots(config.max_handshakes)
        # The port-80 helper's connections never upgrade: all of them count, in a pool of
        # their own so a slowloris there cannot starve the DERP port's handshakes.
        self.helper_connections = HandshakeSlots(config.max_handshakes)
        if self.allow_list or config.verify_clients or url:
            relay.admission = Admission(
                relay.stats, allow_list=self.allow_list,
                localapi_socket=(config.socket or DEFAULT_SOCKET) if config.verify_clients else None,
                url=url, fail_open=config.verify_client_url_fail_open)

    def _reload_limits(self) -> None:
        if self.allow_list is not None:
            self.allow_list.reload("SIGHUP")
        if self.config.rate_config:
            try:
                limit = load_rate_config(self.config.rate_config)
            except ConfigError as e:
                log.error("keeping the previous rate limit: the rate config is broken",
                          error=str(e))
                return
            self.relay.set_receive_limit(limit)
            log.info("rate config reloaded", bytes_per_second=limit and limit.rate,
                     burst=limit and limit.burst)

    # ---- certificates -------------------------------------------------------------------------

    def _load_tls(self) -> ServerTLS:
        config = self.config
        hostname = config.hostname
        ip = parse_ip(hostname)
        tls = ServerTLS(metacert.build(self.relay.public_key),
                        required_sni=None if ip is not None else hostname)
        try:
            if config.certmode == "letsencrypt":
                self.acme = self._acme_certs(tls, ip is not None)
            else:
                if ip is not None and ensure_ip_cert(config.certdir_path, hostname):
                    log.info("created a self-signed certificate for the IP hostname",
                             hostname=hostname, certdir=config.certdir_path)
                self.manual = ManualCerts(config.certdir_path, hostname, tls,
                                          wait_for_files=bool(config.acme_webroot))
        except CertError as e:
            raise ConfigError(str(e)) from None
        if ip is not None and tls.bundle is not None and tls.bundle.self_signed:
            node = derp_node_json(hostname, tls.bundle.pin)
            log.info("self-signed certificate: pin it in your DERP map with this node", node=node)
            print(node, flush=True)
        return tls

    def _acme_certs(self, tls: ServerTLS, is_ip: bool) -> AcmeCerts:
        config = self.config
        if config.hostname == GO_DEFAULT_HOSTNAME:
            raise ConfigError(
                "-certmode letsencrypt (the default) needs -hostname set to this relay's DNS "
                f"name ({GO_DEFAULT_HOSTNAME} is Tailscale's own). No domain? Use "
                "-hostname <public IP> with -acme-ip-certs, or with -certmode manual for a "
                "self-signed certificate; or -dev for plain HTTP on 127.0.0.1:3340")
        if is_ip and not config.acme_ip_certs:
            raise ConfigError(
                f"-hostname {config.hostname} is an IP address: add -acme-ip-certs for a "
                "Let's Encrypt IP certificate (6-day, renewed automatically), or use "
                "-certmode manual for a self-signed certificate pinned in the DERP map")
        if config.acme_ip_certs and not is_ip:
            raise ConfigError("-acme-ip-certs needs an IP address as -hostname, "
                              f"not {config.hostname!r}")
        if config.http_port < 0:
            raise ConfigError("-certmode letsencrypt answers the CA's HTTP-01 challenge on the "
                              "HTTP helper; -http-port -1 turns it off")
        if config.http_port != 80:
            log.warning("the CA validates on port 80: forward port 80 to the HTTP helper",
                        http_port=config.http_port)
        try:
            directory = resolve_directory(config.acme_directory)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if config.acme_ca_bundle and not os.path.isfile(config.acme_ca_bundle):
            raise ConfigError(f"-acme-ca-bundle {config.acme_ca_bundle}: no such file")
        settings = AcmeSettings(directory, config.acme_email, config.acme_ca_bundle)
        return AcmeCerts(config.certdir_path, config.hostname, tls, self.challenges, settings,
                         retry_min=config.acme_retry_min, retry_max=config.acme_retry_max)

    def _serve_helper_request(self, req: Request) -> Response:
        """The HTTP helper: ACME challenges first, then captive-portal checks and redirects."""
        return self.challenges.handle(req) or https_redirect(
            req, hostname=self.config.hostname, tls_port=self.main_port)

    def reload(self) -> None:
        """SIGHUP: re-read what lives on disk."""
        if self.manual is not None:
            self.manual.reload()
        self._reload_limits()

    # ---- running ------------------------------------------------------------------------------

    async def run(self, *, handle_signals: bool = False,
                  task_status=trio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        # Bind before the nursery so a bind error reaches the caller as a plain OSError.
        main = await open_listener(self.listen_host, self.listen_port)
        self._listeners.append(main)
        tune(main.socket, config.tcp_keepalive_time, config.tcp_user_timeout)
        self.main_port = bound_port(main)
        helper = stun = alternates = None
        try:
            if self.tls is not None and config.http_port >= 0:
                helper = await open_listener(self.listen_host, config.http_port)
                self._listeners.append(helper)
                self.http_port = bound_port(helper)
            if config.stun and config.stun_port >= 0:
                stun = await open_stun_socket(self.listen_host, config.stun_port)
                self.stun_port = stun.getsockname()[1]
                alternates = await open_alternates(stun, self.listen_host, config.stun_alt_port,
                                                   config.stun_alt_ip)
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                limiter = None
                if not math.isinf(config.accept_connection_limit):
                    limiter = TokenBucket(config.accept_connection_limit,
                                          config.accept_connection_burst, trio.current_time())
                stats = self.relay.stats
                nursery.start_soon(partial(accept_loop, main, nursery, self._serve_main,
                                           stats=stats, limiter=limiter))
                if helper is not None:
                    nursery.start_soon(partial(accept_loop, helper, nursery, self._serve_helper,
                                               stats=stats))
                if stun is not None:
                    await nursery.start(partial(serve_socket, stun, strict=config.stun_strict,
                                                counters=self.stun_counters,
                                                alternates=alternates))
                if self.bootstrap.names:
                    nursery.start_soon(self.bootstrap.refresh_forever)
                if not os.environ.get("TS_DERP_DISABLE_RTT_STATS"):
                    nursery.start_soon(tcp_rtt.sample_forever, self.relay)
                if self.acme is not None:
                    nursery.start_soon(self.acme.run)
                if self.manual is not None and config.cert_watch_interval > 0:
                    nursery.start_soon(self.manual.watch, config.cert_watch_interval)
                if self.allow_list is not None:
                    nursery.start_soon(self.allow_list.watch, config.allow_keys_poll)
                if self.bandwidth_rate:
                    self.relay.set_bandwidth(BandwidthLimiter(self.bandwidth_rate, stats))
                    nursery.start_soon(self.relay.bandwidth.run)
                if handle_signals:
                    nursery.start_soon(self._signal_loop)
                metrics = self._open_metrics()
                if metrics is not None:
                    nursery.start_soon(metrics.serve, prom.registry(self.exposition.metrics))
                where = host_literal(self.listen_host)
                log.info("derper listening", addr=f"{where}:{self.main_port}",
                         scheme="https" if self.tls else "http",
                         http_helper=f"{where}:{self.http_port}" if helper else None,
                         stun=f"{where}:{self.stun_port}/udp" if stun else None,
                         derp="on" if config.derp else "off",
                         metrics=metrics.url if metrics else None,
                         server_key=public_text(self.relay.public_key))
                sdnotify.notify("READY=1")
                task_status.started(self)
        finally:
            # A bind error, or a cancel from outside (tests, an embedding program): free the
            # ports now, not whenever the garbage collector gets to the sockets.
            with trio.CancelScope(shield=True):
                for listener in self._listeners:
                    await listener.aclose()
            if stun is not None:
                stun.close()
            if alternates is not None:
                alternates.close()

    def _open_metrics(self) -> prom.MetricsListener | None:
        """The /metrics listener; a port that cannot be bound costs the metrics, not the relay."""
        addr = self.config.metrics_listen
        if addr is None:
            return None
        try:
            metrics = prom.MetricsListener(addr)
        except OSError as e:
            log.error("cannot serve metrics; running without them",
                      metrics_addr=addr, error=e.strerror or str(e))
            return None
        self.metrics_port = metrics.port
        return metrics

    async def _signal_loop(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    log.info("SIGHUP: reloading certificates, allowed keys and rate config")
                    self.reload()
                else:
                    log.info("shutting down", signal=signal.Signals(signum).name)
                    await self.shutdown()
                    return

    async def shutdown(self) -> None:
        """Stop accepting, tell every client we are restarting, then close everything."""
        if self._shutting_down or self._nursery is None:
            return
        self._shutting_down = True
        for listener in self._listeners:
            await listener.aclose()
        frame = wire.restarting(RESTART_RECONNECT_MS, RESTART_TRY_FOR_MS)
        sessions = [s for conns in self.relay.router.conns.values() for s in conns]
        for s in sessions:
            s.send_restarting(frame)
        with trio.move_on_after(self.config.shutdown_grace):
            while any(s.restart_pending for s in sessions):
                await trio.sleep(0.02)
        self._nursery.cancel_scope.cancel()

    # ---- connections --------------------------------------------------------------------------

    async def _serve_main(self, stream: trio.SocketStream) -> None:
        config = self.config
        slot = self.handshakes.try_enter()
        if slot is None:
            self.relay.stats.rejected_half_open += 1
            stream.socket.close()
            return
        ip, port = peer_address(stream)
        conn: trio.abc.Stream = stream
        stats = self.relay.stats
        tls_version = None
        try:
            if self.tls is not None:
                if self.tls.context is None:
                    log.debug("closing connection: no certificate yet", remote=f"{ip}:{port}")
                    return
                conn = TLSStream(stream, self.tls.context, server_side=True)
                try:
                    with trio.fail_after(config.handshake_timeout):
                        await conn.do_handshake()
                except trio.TooSlowError:
                    logs.throttled(log, "info", "closing connection: TLS handshake timed out",
                                   remote=f"{ip}:{port}")
                    return
                except trio.BrokenResourceError as e:
                    logs.throttled(log, "info", "closing connection: TLS handshake failed",
                                   remote=f"{ip}:{port}",
                             error=str(e))
                    return
                tls_version = tls_version_index(conn.version())
                stats.tls_handshakes[tls_version] += 1
                stats.tls_active[tls_version] += 1
            await serve_http(conn, ip, port, head_timeout=config.handshake_timeout,
                             handle=self.endpoints.handle,
                             relay=self.relay if config.derp else None)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer went away mid-request; nothing to report
        except Exception:
            log.exception("internal error on a connection; closed it", remote=f"{ip}:{port}")
        finally:
            slot.release()
            if tls_version is not None:
                stats.tls_active[tls_version] -= 1
            with trio.CancelScope(shield=True):
                await conn.aclose()

    async def _serve_helper(self, stream: trio.SocketStream) -> None:
        config = self.config
        slot = self.helper_connections.try_enter()
        if slot is None:
            self.relay.stats.rejected_half_open += 1
            stream.socket.close()
            return
        ip, port = peer_address(stream)
        try:
            await serve_http(stream, ip, port, head_timeout=config.handshake_timeout,
                             handle=self._serve_helper_request)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            log.exception("internal error on an HTTP helper connection; closed it",
                          remote=f"{ip}:{port}")
        finally:
            slot.release()
            await stream.aclose()
