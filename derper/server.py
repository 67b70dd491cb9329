"""Wiring: one nursery holding the listeners, the connection tasks and the background jobs.

Every connection runs behind a crash barrier: whatever one peer sends, the worst outcome is a
log line and that one connection closed.
"""

from __future__ import annotations

import math
import os
import signal
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import trio

from stun.counters import StunCounters
from stun.server import serve_socket

from . import __version__, logs, memory, signals
from .admission.fairshare import BandwidthLimiter
from .admission.gate import DEFAULT_SOCKET, Admission, AllowList
from .admission.limits import (PRESSURE_DEADLINE, HandshakeSlot, HandshakeSlots, TokenBucket,
                               source_key)
from .admission.rate_config import load_rate_config, parse_rate
from .certs.acme import AcmeCerts
from .certs.acme_order import AcmeSettings, resolve_directory
from .certs.bundle import derp_node_json, ensure_ip_cert, parse_ip
from .certs.context import ServerTLS
from .certs.http01 import Http01Responder
from .certs.manual import ManualCerts
from .config import Config
from .config_check import ConfigProblems, check
from .errors import ConfigError, ProtocolError
from .http.bootstrap_dns import BootstrapDNS, parse_names
from .http.endpoints import Endpoints, Request, Response, https_redirect
from .http.forwarded import TrustedProxies
from .http.server import serve_http
from .mesh.dns import Resolver
from .mesh.peers import parse_mesh_with
from .mesh.region import Region
from .metrics import prometheus as prom, varz
from .metrics.counters import tls_version_index
from .metrics.exposition import Exposition
from .metrics.status import StatusBoard
from .net.addr import host_literal, parse_addr, parse_cidrs
from .net.listener import accept_loop, bound_port, peer_address, read_proxy_header, tune
from .net.server_sockets import ServerSockets
from .net.tls_stream import TLSStream
from .proto import metacert, wire
from .proto.keys import KeyPair, public_text
from .relay import tcp_rtt
from .relay.hub import Relay
from .workers import siblings
from .workers.host_metrics import HostMetrics
from .workers.lifeline import wait_for_supervisor_exit
from .workers.plan import WorkerRole, rate_share, share

log = logs.get("derper.server")

# What Restarting tells clients on shutdown: come back in a second, keep trying for 30 s
# (a systemd or Docker restart takes a few seconds).
RESTART_RECONNECT_MS = 1000
RESTART_TRY_FOR_MS = 30000


class HalfOpen:
    """A connection's place in a half-open pool, as its handshake code uses it."""

    def __init__(self, slot: HandshakeSlot, scope: trio.CancelScope) -> None:
        self._slot, self._scope = slot, scope
        self.is_established = False

    def established(self) -> None:
        """Handshakes done: the place is free, and no budget runs any more."""
        self.is_established = True
        if self._slot.release():
            self._scope.deadline = math.inf

    def rekey(self, source: str) -> bool:
        """The client is really ``source`` (a PROXY header said so): count it there."""
        return self._slot.rekey(source)


class Server:
    """One relay: ``Server(...)`` checks and builds, ``run()`` prepares the disk and serves."""

    def __init__(self, config: Config, keypair: KeyPair, *, mesh_key: bytes | None = None,
                 role: WorkerRole | None = None) -> None:
        """Raises ConfigProblems naming everything wrong with ``config``; writes and prints
        nothing (it reads the rate config and the allowed keys).

        ``role``: this server is one of ``-workers`` (``workers.plan``): its sockets come from
        the supervisor, its limits are its share of the host's, and it links to the others.
        """
        problems = check(config, mesh_key=mesh_key)
        if problems:
            raise ConfigProblems(problems)
        self.config = config
        self.role = role
        self.bootstrap = BootstrapDNS(parse_names(config.bootstrap_dns_names))
        self.listen_host, self.listen_port = parse_addr(config.addr)
        nets = parse_cidrs(config.trusted_proxies, "-trusted-proxies")
        self.proxies = TrustedProxies(nets) if nets else None
        self.endpoints = Endpoints(home=config.home, derp_enabled=config.derp,
                                   bootstrap_body=lambda: self.bootstrap.body)
        self.relay = Relay(keypair, mesh_key, sibling_key=role and role.sibling_key,
                           link_keypair=role and KeyPair.generate(),
                           keepalive_interval=config.keepalive_interval,
                           write_timeout=config.tcp_write_timeout,
                           handshake_timeout=config.handshake_timeout,
                           queue_depth=config.queue_depth)
        self._setup_admission_and_limits()
        self.mesh = Region(self.relay, parse_mesh_with(config.mesh_with),
                           Resolver(config.mesh_dns_server),
                           config.mesh_resolve_interval) if config.mesh_with else None
        webroot = config.acme_webroot
        self.challenges = Http01Responder(Path(webroot) if webroot else None,
                                          role and role.challenge_dir)
        self.acme: AcmeCerts | None = None
        self.manual: ManualCerts | None = None
        self.tls = self._build_tls() if config.tls else None
        self.stun_counters = StunCounters()
        self.exposition = Exposition(self.relay, self.stun_counters, __version__)
        self.status = StatusBoard(self.relay, self.stun_counters, config, version=__version__,
                                  tls=self.tls, acme=self.acme)
        self.host_metrics = None
        if role is not None:  # scrapes and the status page show the whole host
            own = self.status.counts
            self.host_metrics = HostMetrics(role, self.exposition.metrics, own,
                                            self.status.top.rank)
            self.status.counts = self.host_metrics.counts
        self.metrics = self.host_metrics or self.exposition.metrics  # what scrapes see
        self.endpoints.varz = varz.handler(self.metrics,
                                           varz.parse_cidrs(config.debug_allow_cidrs))
        self.metrics_port: int | None = None
        self.main_port: int | None = None
        self.http_port: int | None = None
        self.stun_port: int | None = None
        self._listeners: list[trio.SocketListener] = []
        # Main-port and helper connections accepted and not yet closed (handshaking, relaying,
        # closing), and those closed since start: what the memory reclaimer goes by.
        self.open_connections = 0
        self.closed_connections = 0
        self._nursery: trio.Nursery | None = None
        self._shutting_down = False

    # ---- admission and limits -----------------------------------------------------------------

    def _setup_admission_and_limits(self) -> None:
        config, relay = self.config, self.relay
        self.bandwidth_rate = parse_rate(config.bandwidth_limit)
        relay.set_receive_limit(load_rate_config(config.rate_config)
                                if config.rate_config else None)
        self.allow_list = AllowList(config.allow_keys) if config.allow_keys else None
        url = config.verify_client_url or None
        # Under -workers each has its share of the host's limits (workers.plan); the links
        # between the workers are not counted.
        n, i = (self.role.count, self.role.index) if self.role else (1, 0)
        relay.max_clients = share(config.max_clients, n, i)
        handshakes = share(config.max_handshakes, n, i)
        per_source = config.max_handshakes_per_source
        if per_source and handshakes:
            per_source = min(per_source, handshakes)
        self.handshakes = HandshakeSlots(handshakes, per_source, relay.stats)
        # The port-80 helper's connections never upgrade: all of them count, in a pool of
        # their own so a slowloris there cannot starve the DERP port's handshakes.
        self.helper_connections = HandshakeSlots(handshakes, per_source, relay.stats)
        if self.bandwidth_rate:
            self.bandwidth_rate = rate_share(self.bandwidth_rate, n)
        self.accept_rate = rate_share(config.accept_connection_limit, n)
        self.accept_burst = max(1, config.accept_connection_burst // n)
        if self.allow_list or config.verify_clients or url:
            socket = (config.socket or DEFAULT_SOCKET) if config.verify_clients else None
            relay.admission = Admission(relay.stats, relay.log_throttle,
                                        allow_list=self.allow_list,
                                        localapi_socket=socket, url=url,
                                        fail_open=config.verify_client_url_fail_open)

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

    def _build_tls(self) -> ServerTLS:
        """The TLS front and its certificate source; prepare() gives it a certificate."""
        config = self.config
        is_ip = parse_ip(config.hostname) is not None
        tls = ServerTLS(metacert.build(self.relay.public_key),
                        required_sni=None if is_ip else config.hostname)
        if config.certmode == "letsencrypt" and self.role and not self.role.owner:
            # Worker 0 orders and renews; the others serve what it writes to the certdir.
            self.manual = ManualCerts(config.certdir_path, config.hostname, tls,
                                      wait_for_files=True)
        elif config.certmode == "letsencrypt":
            if config.http_port != 80:
                log.warning("the CA validates on port 80: forward port 80 to the HTTP helper",
                            http_port=config.http_port)
            settings = AcmeSettings(resolve_directory(config.acme_directory), config.acme_email,
                                    config.acme_ca_bundle)
            self.acme = AcmeCerts(config.certdir_path, config.hostname, tls, self.challenges,
                                  settings, retry_min=config.acme_retry_min,
                                  retry_max=config.acme_retry_max)
        else:
            self.manual = ManualCerts(config.certdir_path, config.hostname, tls,
                                      wait_for_files=bool(config.acme_webroot))
        return tls

    def prepare(self) -> None:
        """Start-up's effects: make what the certdir lacks (the self-signed IP certificate, the
        ACME account key), load the certificate, and print the DERP map node that pins a
        self-signed one (stdout: scripts and the README's instructions read it there).

        Raises ConfigError (CertError) if the disk does not cooperate. ``run()`` calls it.
        """
        config, tls = self.config, self.tls
        if tls is None:
            return
        hostname = config.hostname
        is_ip = parse_ip(hostname) is not None
        if self.acme is not None:
            self.acme.prepare()
        else:
            if is_ip and ensure_ip_cert(config.certdir_path, hostname):
                log.info("created a self-signed certificate for the IP hostname",
                         hostname=hostname, certdir=config.certdir_path)
            self.manual.load()
        if is_ip and tls.bundle is not None and tls.bundle.self_signed and self.role is None:
            node = derp_node_json(hostname, tls.bundle.pin)  # workers: the supervisor printed it
            log.info("self-signed certificate: pin it in your DERP map with this node", node=node)
            print(node, flush=True)

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

    async def open_sockets(self, *, reuse_port: bool = False,
                           ports: dict[str, int] | None = None) -> ServerSockets:
        """The sockets this configuration asks for; raises OSError. The worker supervisor
        binds one set per worker (``reuse_port``), the later ones on the first set's
        ``ports`` (a port 0 in the flags is chosen once)."""
        config, ports = self.config, ports or {}
        stun = config.stun and config.stun_port >= 0
        return await ServerSockets.bind(
            self.listen_host, ports.get("main", self.listen_port),
            http_port=ports.get("helper", config.http_port) if self.tls is not None else -1,
            stun_port=ports.get("stun", config.stun_port) if stun else -1,
            alt_port=ports.get("alt", config.stun_alt_port), alt_ip=config.stun_alt_ip,
            reuse_port=reuse_port)

    async def run(self, *, handle_signals: bool = False,
                  task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Prepare, bind, then serve until cancelled or shut down; reports ``started`` once
        every listener is bound (systemd readiness, tests)."""
        config = self.config
        if handle_signals:
            signals.block()
        self.prepare()
        # Bind before the nursery so a bind error reaches the caller as a plain OSError.
        sockets = (ServerSockets.adopt(self.role.fds) if self.role
                   else await self.open_sockets())
        main, helper = sockets.main, sockets.helper
        stun, alternates = sockets.stun, sockets.alternates
        self._listeners = [x for x in (main, helper) if x is not None]
        tune(main.socket, config.tcp_keepalive_time, config.tcp_user_timeout)
        self.main_port = bound_port(main)
        self.http_port = bound_port(helper) if helper else None
        self.stun_port = stun.getsockname()[1] if stun else None
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                limiter = None
                if not math.isinf(self.accept_rate):
                    limiter = TokenBucket(self.accept_rate, self.accept_burst,
                                          trio.current_time())
                relay = self.relay
                stats, throttle, pacer = relay.stats, relay.log_throttle, relay.pacer
                nursery.start_soon(pacer.run)
                nursery.start_soon(relay.keepalives.run)
                nursery.start_soon(partial(accept_loop, main, nursery, self._serve_main,
                                           stats=stats, log_throttle=throttle, pacer=pacer,
                                           limiter=limiter))
                if helper is not None:
                    nursery.start_soon(partial(accept_loop, helper, nursery, self._serve_helper,
                                               stats=stats, log_throttle=throttle,
                                               pacer=pacer))
                if stun is not None:
                    await nursery.start(partial(serve_socket, stun, strict=config.stun_strict,
                                                counters=self.stun_counters,
                                                alternates=alternates))
                if self.bootstrap.names:
                    nursery.start_soon(self.bootstrap.refresh_forever)
                nursery.start_soon(memory.trim_forever, lambda: self.closed_connections,
                                   lambda: self.open_connections)
                nursery.start_soon(self.relay.loop_lag.sample_forever)
                if self.mesh is not None:
                    nursery.start_soon(self.mesh.run)
                if self.role is not None:
                    await nursery.start(self._run_as_worker, nursery)
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
                where = host_literal(self.listen_host)
                http_addr = f"{where}:{self.http_port}" if helper else None
                stun_addr = f"{where}:{self.stun_port}/udp" if stun else None
                if metrics is not None:
                    self.status.listen = {
                        "derp": f"{where}:{self.main_port}" if config.derp else None,
                        "http": http_addr, "stun": stun_addr,
                        "metrics": f"{metrics.host}:{metrics.port}"}
                    nursery.start_soon(self.status.sample_forever)
                    nursery.start_soon(metrics.serve, prom.registry(
                        self.metrics, self.host_metrics and self.host_metrics.host_pids),
                        self.status)
                log.info("derper listening", addr=f"{where}:{self.main_port}",
                         scheme="https" if self.tls else "http",
                         http_helper=http_addr, stun=stun_addr,
                         derp="on" if config.derp else "off",
                         metrics=metrics.url if metrics else None,
                         status=metrics.status_url if metrics else None,
                         proxy_protocol="on" if config.proxy_protocol else None,
                         trusted_proxies=config.trusted_proxies or None,
                         server_key=public_text(self.relay.public_key))
                if config.certmode == "none":
                    log.info("-certmode none: plain HTTP, TLS is expected at the reverse proxy "
                             "in front" + ("; STUN is served directly" if stun else ""))
                task_status.started(self)
        finally:
            # A cancel from outside (tests, an embedding program): free the ports now, not
            # whenever the garbage collector gets to the sockets.
            await sockets.aclose()

    async def _run_as_worker(self, nursery: trio.Nursery,
                             task_status=trio.TASK_STATUS_IGNORED) -> None:
        """A worker's part beyond a relay's: the Unix socket the other workers link to, the
        links to each of them, and this worker's metrics snapshot for the host's scrapes."""
        role = self.role
        listener = await siblings.open_listener(role.socket_path(role.index))
        self._listeners.append(listener)
        nursery.start_soon(partial(accept_loop, listener, nursery, self._serve_sibling,
                                   stats=self.relay.stats, log_throttle=self.relay.log_throttle,
                                   pacer=self.relay.pacer))
        nursery.start_soon(self.host_metrics.write_forever)
        await nursery.start(siblings.keep_links, self.relay, role)
        nursery.start_soon(self._shutdown_with_supervisor)
        task_status.started()

    async def _shutdown_with_supervisor(self) -> None:
        await wait_for_supervisor_exit(self.role)
        log.warning("the worker supervisor is gone; shutting down")
        await self.shutdown()

    async def _serve_sibling(self, stream: trio.SocketStream) -> None:
        try:
            await serve_http(stream, None, 0, head_timeout=self.config.handshake_timeout,
                             handle=self.endpoints.handle, log_throttle=self.relay.log_throttle,
                             on_established=lambda: None, pacer=self.relay.pacer,
                             relay=self.relay, capped=False)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    @contextmanager
    def _counted(self):
        """A connection counts as open from here until it is closed."""
        self.open_connections += 1
        try:
            yield
        finally:
            self.open_connections -= 1
            self.closed_connections += 1

    def _open_metrics(self) -> prom.MetricsListener | None:
        """The /metrics listener; a port that cannot be bound costs the metrics, not the relay.
        Under -workers, worker 0 serves the host's."""
        addr = self.config.metrics_listen
        if addr is None or (self.role is not None and not self.role.owner):
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
        async for signum in signals.receive():
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

    @contextmanager
    def _half_open(self, slots: HandshakeSlots, stream: trio.SocketStream, ip: str | None,
                   capped: bool = True):
        """Hold the connection's place among ``slots``' half-open ones while it is half-open.

        Yields a ``HalfOpen`` (its ``established`` ends that; the DERP session calls it on
        registration), or None with the socket closed when the place is refused. The handshakes (TLS, HTTP head, DERP)
        run under one budget, a short one once the pool is half full, and the connection is
        closed early if a newcomer takes its place.
        """
        scope = trio.CancelScope()
        now = trio.current_time()
        # Each phase has its own timeout (TLS + HTTP head, then the DERP handshake); this bounds
        # them together, and much tighter when the pool fills up.
        budget = 2 * self.config.handshake_timeout
        if slots.under_pressure():
            budget = min(budget, PRESSURE_DEADLINE)
        slot = slots.try_enter(source_key(ip), scope.cancel, capped)
        if slot is None:
            stream.socket.close()
            yield None
            return
        scope.deadline = now + budget
        try:
            with scope:
                yield HalfOpen(slot, scope)
        finally:
            slot.release()
        if scope.cancelled_caught and scope.deadline != math.inf:
            self.relay.log_throttle.log(log, "info", "closing connection: still half-open when "
                                        "its place was needed or its time ran out",
                                        remote=ip, pool_full=slots.count >= slots.limit > 0)

    async def _serve_main(self, stream: trio.SocketStream) -> None:
        ip, port = peer_address(stream)
        # A proxy's connections carry many clients: not capped as one address.
        from_proxy = self.config.proxy_protocol or (
            self.proxies is not None and self.proxies.trusts(ip))
        with self._counted(), \
                self._half_open(self.handshakes, stream, ip, capped=not from_proxy) as half_open:
            if half_open is not None:
                await self._serve_connection(stream, ip, port, half_open)

    async def _serve_connection(self, stream: trio.SocketStream, ip: str | None, port: int,
                                half_open: HalfOpen) -> None:
        config = self.config
        conn: trio.abc.Stream = stream
        stats, throttle, pacer = self.relay.stats, self.relay.log_throttle, self.relay.pacer
        tls_version = None
        initial = b""
        deadline = trio.current_time() + config.handshake_timeout  # PROXY header and TLS
        try:
            if config.proxy_protocol:
                try:
                    with trio.fail_at(deadline):
                        source, initial = await read_proxy_header(stream)
                except trio.TooSlowError:
                    throttle.log(log, "info", "closing connection: no PROXY protocol header "
                                 "in time", remote=f"{ip}:{port}")
                    return
                except (ProtocolError, EOFError) as e:
                    throttle.log(log, "info", "closing connection: no valid PROXY protocol "
                                 "header", remote=f"{ip}:{port}", error=str(e))
                    return
                if source is not None:
                    ip, port = source
                    if not half_open.rekey(source_key(ip)):
                        return  # the real client already holds its share of half-open places
            if self.tls is not None:
                if self.tls.context is None:
                    log.debug("closing connection: no certificate yet", remote=f"{ip}:{port}")
                    return
                with pacer.measured():
                    conn = TLSStream(stream, self.tls.context, server_side=True, initial=initial)
                initial = b""
                try:
                    with trio.fail_at(deadline):
                        await conn.do_handshake(pacer)
                except trio.TooSlowError:
                    throttle.log(log, "info", "closing connection: TLS handshake timed out",
                                 remote=f"{ip}:{port}")
                    return
                except trio.BrokenResourceError as e:
                    throttle.log(log, "info", "closing connection: TLS handshake failed",
                                 remote=f"{ip}:{port}", error=str(e))
                    return
                tls_version = tls_version_index(conn.version())
                stats.tls_handshakes[tls_version] += 1
                stats.tls_active[tls_version] += 1
            await serve_http(conn, ip, port, head_timeout=config.handshake_timeout,
                             handle=self.endpoints.handle, log_throttle=throttle,
                             on_established=half_open.established, pacer=pacer,
                             relay=self.relay if config.derp else None, proxies=self.proxies,
                             initial=initial)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer went away mid-request; nothing to report
        except Exception:
            throttle.log(log, "exception", "internal error on a connection; closed it",
                         remote=f"{ip}:{port}")
        finally:
            if tls_version is not None:
                stats.tls_active[tls_version] -= 1
            try:  # a flood's closes take turns too (a session took its own; stopping: now)
                if not half_open.is_established:
                    await pacer.close_turn()
            finally:
                with trio.CancelScope(shield=True), pacer.measured():
                    await conn.aclose()

    async def _serve_helper(self, stream: trio.SocketStream) -> None:
        ip, port = peer_address(stream)
        with self._counted(), self._half_open(self.helper_connections, stream, ip) as half_open:
            if half_open is not None:
                await self._serve_helper_connection(stream, ip, port, half_open)

    async def _serve_helper_connection(self, stream: trio.SocketStream, ip: str | None,
                                       port: int, half_open: HalfOpen) -> None:
        try:
            await serve_http(stream, ip, port, head_timeout=self.config.handshake_timeout,
                             handle=self._serve_helper_request,
                             log_throttle=self.relay.log_throttle,
                             on_established=half_open.established, pacer=self.relay.pacer)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            self.relay.log_throttle.log(
                log, "exception", "internal error on an HTTP helper connection; closed it",
                remote=f"{ip}:{port}")
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()
