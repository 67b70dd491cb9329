"""TCP listeners: address parsing, binding, socket options and an accept loop that never dies.

Over-limit or failed accepts close that one socket and the loop goes on (the Go derper's accept
limiter can make the whole server exit; spec §4.11). With -proxy-protocol, each connection's
PROXY header is read here too, before TLS (the codec is ``net.proxy_protocol``).
"""

from __future__ import annotations

import errno
import socket
from typing import Awaitable, Callable

import trio

from .. import logs
from ..admission.limits import TokenBucket
from ..admission.pacer import Pacer
from ..logs import Throttle
from ..metrics.counters import Stats
from . import proxy_protocol
from .addr import unmap_ip
from .reading import RECV_SIZE

log = logs.get("derper.net.listener")

BACKLOG = 4096
_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 15, 9  # Go runtime defaults


async def open_listener(host: str | None, port: int, *,
                        reuse_port: bool = False) -> trio.SocketListener:
    """Bind ``host:port``; no host means every interface, IPv6 and IPv4 on one socket.

    ``reuse_port``: SO_REUSEPORT, so worker processes each have a listener on the same port
    and the kernel spreads new connections over them.
    """
    if host is None:
        try:
            return await _bind(socket.AF_INET6, "::", port, reuse_port, dual_stack=True)
        except OSError as e:
            if e.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                raise
            return await _bind(socket.AF_INET, "0.0.0.0", port, reuse_port)
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                          flags=socket.AI_PASSIVE)
    family, _, _, _, sockaddr = infos[0]
    return await _bind(family, sockaddr[0], port, reuse_port)


def adopt_listener(fd: int) -> trio.SocketListener:
    """A listening socket made by another process (the worker supervisor) and inherited."""
    return trio.SocketListener(trio.socket.from_stdlib_socket(socket.socket(fileno=fd)))


async def _bind(family: int, host: str, port: int, reuse_port: bool,
                dual_stack: bool = False) -> trio.SocketListener:
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual_stack else 1)
        await sock.bind((host, port))
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


def bound_port(listener: trio.SocketListener) -> int:
    return listener.socket.getsockname()[1]


def tune(sock: trio.socket.SocketType, keepalive_idle: float, user_timeout: float) -> None:
    """TCP keepalive and TCP_USER_TIMEOUT so dead peers are noticed (spec §4.12).

    Set once on the listening socket: Linux copies these options to every connection it accepts,
    which saves five system calls per connection.
    """
    try:
        if keepalive_idle > 0:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, int(keepalive_idle)))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
        if user_timeout > 0 and hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(user_timeout * 1000))
    except OSError as e:
        log.warning("cannot set TCP keepalive or user timeout", error=e.strerror)


def peer_address(stream: trio.SocketStream) -> tuple[str | None, int]:
    try:
        addr = stream.socket.getpeername()
    except OSError:
        return None, 0
    return unmap_ip(addr[0]), addr[1]


async def read_proxy_header(stream: trio.SocketStream) -> tuple[tuple[str, int] | None, bytes]:
    """The PROXY protocol header opening ``stream`` (-proxy-protocol): the client it names (None:
    the peer itself) and the bytes read past it, the start of TLS or HTTP.

    Raises ProtocolError for a missing or malformed header, EOFError if the peer closes first;
    the caller bounds the time.
    """
    data = b""
    while (header := proxy_protocol.parse(data)) is None:
        chunk = await stream.receive_some(RECV_SIZE)
        if not chunk:
            raise EOFError("peer closed the connection before its PROXY protocol header")
        data += chunk
    return header.source, data[header.length:]


async def accept_loop(listener: trio.SocketListener, nursery: trio.Nursery,
                      handler: Callable[[trio.SocketStream], Awaitable[None]], *,
                      stats: Stats, log_throttle: Throttle, pacer: Pacer,
                      limiter: TokenBucket | None = None) -> None:
    """Accept until the listener is closed; a resource shortage pauses, never stops, it.

    Each accept waits for ``pacer`` to admit it: while the loop's share for connections that
    are not relaying is spent, new ones wait in the kernel's accept queue.
    """
    while True:
        await pacer.admit()
        try:
            stream = await listener.accept()
        except trio.ClosedResourceError:
            return
        except OSError as e:
            if e.errno in _CAPACITY_ERRNOS:
                log_throttle.log(log, "error", "accept failed: out of resources; pausing 100ms",
                                 error=e.strerror)
                await trio.sleep(0.1)
                continue
            if e.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                continue
            raise
        if limiter is not None and not limiter.allow(trio.current_time()):
            stats.rejected_connections += 1
            stream.socket.close()
            continue
        stats.accepted_connections += 1
        with pacer.measured():
            nursery.start_soon(handler, stream)
