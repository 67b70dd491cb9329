"""The STUN UDP responder: drain the socket, answer each datagram through ``stun.message``, count.

The socket is a non-blocking stdlib socket driven by ``trio.lowlevel.wait_readable``: every
datagram already queued is read and answered with plain calls, and the task only parks when the
socket is empty (or yields once per ``_BATCH`` under a flood). Going through ``trio.socket``'s
async ``recvfrom``/``sendto`` instead costs two trips through the scheduler per datagram: about
a third of the throughput (see benchmarks/stun_bench.py).

With an alternate port (and maybe IP) the responder serves RFC 5780 from every socket of an
``Rfc5780Sockets``; ``stun.message.answer`` picks the socket each reply leaves from. Wildcard
sockets learn the address each request reached (IP_PKTINFO) and send the reply from that same
address, so RESPONSE-ORIGIN is where the reply really comes from.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
from typing import Callable

import trio

from stun.counters import IPV4, IPV6, StunCounters
from stun.message import MAX_REQUEST_SIZE, Disposition, Layout, answer, respond

log = logging.getLogger("derper.stun")

_READ_SIZE = MAX_REQUEST_SIZE + 1
"""A longer datagram arrives cut to this, which is still too long: junk either way."""
_BATCH = 256
"""Datagrams handled between two checkpoints while the socket stays readable."""
_NO_IPV6 = frozenset({errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT, errno.EADDRNOTAVAIL})
_IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)  # Linux's value; Python 3.11 lacks the name
_CMSG_SPACE = socket.CMSG_SPACE(20)
_WILDCARDS = ("::", "0.0.0.0")


class Rfc5780Sockets:
    """The primary STUN socket and its alternates, by ``Layout`` index (0 is the primary)."""

    def __init__(self, sockets: list[socket.socket]) -> None:
        self.sockets = sockets
        bound = [s.getsockname()[:2] for s in sockets]
        self.ports = (bound[0][1], bound[1][1])
        self.wildcard = bound[0][0] in _WILDCARDS
        self.layout = None if self.wildcard else Layout(
            tuple(dict.fromkeys(ip for ip, _ in bound)), self.ports)
        self.v6 = sockets[0].family == socket.AF_INET6
        for sock in sockets if self.wildcard else ():
            if self.v6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, _IP_PKTINFO, 1)

    def describe(self) -> str:
        ips = self.layout.ips if self.layout else ("*",)
        return f"RFC 5780 on {' and '.join(ips)}, UDP ports {self.ports[0]} and {self.ports[1]}"

    def receive(self, index: int) -> tuple[bytes, tuple, Layout]:
        """A datagram on socket ``index``, its source, and the layout it is answered with."""
        if not self.wildcard:
            data, addr = self.sockets[index].recvfrom(_READ_SIZE)
            return data, addr, self.layout
        data, ancillary, _, addr = self.sockets[index].recvmsg(_READ_SIZE, _CMSG_SPACE)
        here = None
        for level, kind, value in ancillary:
            if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO:
                here = socket.inet_ntop(socket.AF_INET6, value[:16])
            elif level == socket.IPPROTO_IP and kind == _IP_PKTINFO:
                here = socket.inet_ntoa(value[8:12])
        if here is None:
            raise OSError(errno.EPROTO, "no IP_PKTINFO on a wildcard RFC 5780 socket")
        return data, addr, Layout((here,), self.ports)

    def send(self, via: int, reply: bytes, addr: tuple, layout: Layout) -> None:
        """``reply`` to ``addr`` from socket ``via`` (from the address it was sent to, if wild)."""
        sock = self.sockets[via]
        if not self.wildcard:
            sock.sendto(reply, addr)
        elif self.v6:
            info = socket.inet_pton(socket.AF_INET6, layout.ips[0]) + struct.pack("I", 0)
            sock.sendmsg([reply], [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, info)], 0, addr)
        else:
            info = struct.pack("I", 0) + socket.inet_aton(layout.ips[0]) + bytes(4)
            sock.sendmsg([reply], [(socket.IPPROTO_IP, _IP_PKTINFO, info)], 0, addr)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


async def open_alternates(primary: socket.socket, host: str | None, alt_port: int,
                          alt_ip: str = "", *, reuse_port: bool = False
                          ) -> Rfc5780Sockets | None:
    """The sockets RFC 5780 needs besides ``primary`` (bound to ``host``); None without
    ``alt_port``. With ``alt_ip`` there are four, ``host`` must be an address, and each socket is
    bound to its own address so that a reply leaves from the address it names."""
    if alt_port < 0:
        return None
    port = primary.getsockname()[1]
    wanted = [(host, alt_port)] + ([(alt_ip, port), (alt_ip, alt_port)] if alt_ip else [])
    sockets = [primary]
    try:
        for where in wanted:
            sockets.append(await open_stun_socket(*where, reuse_port=reuse_port))
        return Rfc5780Sockets(sockets)
    except BaseException:
        for sock in sockets[1:]:
            sock.close()
        raise


async def serve_stun(host: str | None, port: int, *, strict: bool = False,
                     counters: StunCounters | None = None,
                     task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Answer STUN on ``host``:``port`` until cancelled; ``host=None`` means dual-stack wildcard.

    ``task_status.started`` gets the list of ``(host, port)`` actually bound.
    """
    sock = await open_stun_socket(host, port)
    await serve_socket(sock, strict=strict, counters=counters, task_status=task_status)


async def serve_socket(sock: socket.socket, *, strict: bool = False,
                       counters: StunCounters | None = None,
                       alternates: Rfc5780Sockets | None = None,
                       task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Answer STUN on an already bound socket (see ``open_stun_socket``) until cancelled; closes it
    (and the ``alternates``, which make it an RFC 5780 server: see ``open_alternates``).

    Binding first lets a server report a port conflict before it starts anything else.
    """
    counters = counters if counters is not None else StunCounters()
    with sock:
        bound = sock.getsockname()[:2]
        log.info("STUN on %s UDP port %d%s%s", bound[0], bound[1], " (strict)" if strict else "",
                 f" ({alternates.describe()})" if alternates else "")
        if alternates is None:
            task_status.started([bound])
            await _serve(sock, _responder(sock, strict, counters), counters)
            return
        try:
            task_status.started([s.getsockname()[:2] for s in alternates.sockets])
            async with trio.open_nursery() as nursery:
                for index, each in enumerate(alternates.sockets):
                    nursery.start_soon(_serve, each,
                                       _rfc5780_responder(alternates, index, strict, counters),
                                       counters)
        finally:
            alternates.close()


async def open_stun_socket(host: str | None, port: int, *,
                           reuse_port: bool = False) -> socket.socket:
    """The responder's UDP socket: ``host`` exactly, or dual-stack ``::`` when it is None.

    ``reuse_port``: SO_REUSEPORT, one socket per worker process on the same port (the kernel
    spreads clients over them by address).
    """
    if host is None:
        try:
            return _udp_socket(socket.AF_INET6, ("::", port), reuse_port, dual_stack=True)
        except OSError as exc:
            if exc.errno not in _NO_IPV6:
                raise
            log.info("no IPv6 here (%s): STUN on 0.0.0.0 only", exc)
            return _udp_socket(socket.AF_INET, ("0.0.0.0", port), reuse_port)
    family, _, _, _, sockaddr = (await trio.socket.getaddrinfo(
        host, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE))[0]
    return _udp_socket(family, sockaddr, reuse_port)


def adopt_udp_socket(fd: int) -> socket.socket:
    """A UDP socket made by another process (the worker supervisor) and inherited."""
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    return sock


def _udp_socket(family: int, sockaddr: tuple, reuse_port: bool,
                dual_stack: bool = False) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if dual_stack:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(sockaddr)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _family(ip: str) -> int:
    return IPV6 if ":" in ip and not ip.startswith("::ffff:") else IPV4


def _responder(sock: socket.socket, strict: bool,
               counters: StunCounters) -> Callable[[], Disposition]:
    """Reads one datagram and answers it from ``sock``; raises BlockingIOError when empty."""
    recvfrom, sendto, families = sock.recvfrom, sock.sendto, counters.families

    def one() -> Disposition:
        data, addr = recvfrom(_READ_SIZE)
        ip = addr[0]
        reply, disposition = respond(data, ip, addr[1], strict=strict)
        if reply is not None:
            families[_family(ip)] += 1
            try:
                sendto(reply, addr)
            except OSError:
                return Disposition.WRITE_ERROR
        return disposition

    return one


def _rfc5780_responder(group: Rfc5780Sockets, index: int, strict: bool,
                       counters: StunCounters) -> Callable[[], Disposition]:
    """``_responder`` for socket ``index`` of ``group``: the reply may leave from another one."""
    families = counters.families

    def one() -> Disposition:
        data, addr, layout = group.receive(index)
        reply, disposition, via = answer(data, addr[0], addr[1], strict=strict, layout=layout,
                                         at=index)
        if reply is not None:
            families[_family(addr[0])] += 1
            try:
                group.send(via, reply, addr, layout)
            except OSError:
                return Disposition.WRITE_ERROR
        return disposition

    return one


async def _serve(sock: socket.socket, one: Callable[[], Disposition],
                 counters: StunCounters) -> None:
    """Drain ``sock`` with ``one`` (one datagram per call), parking only when it is empty."""
    requests = counters.requests
    while True:
        for _ in range(_BATCH):
            try:
                disposition = one()
            except BlockingIOError:
                break
            except OSError as exc:
                requests[Disposition.READ_ERROR] += 1
                log.warning("STUN read failed: %s; pausing 1 s", exc)
                await trio.sleep(1)
                break
            requests[disposition] += 1
        else:
            await trio.lowlevel.checkpoint()  # still readable after a full batch: be fair, go on
            continue
        await trio.lowlevel.wait_readable(sock)
