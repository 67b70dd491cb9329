"""The STUN UDP responder: drain the socket, answer each datagram through ``stun.message``, count.

The socket is a non-blocking stdlib socket driven by ``trio.lowlevel.wait_readable``: every
datagram already queued is read and answered with plain calls, and the task only parks when the
socket is empty (or yields once per ``_BATCH`` under a flood). Going through ``trio.socket``'s
async ``recvfrom``/``sendto`` instead costs two trips through the scheduler per datagram: about
a third of the throughput (see benchmarks/stun_bench.py).
"""

from __future__ import annotations

import errno
import logging
import socket

import trio

from stun.counters import IPV4, IPV6, StunCounters
from stun.message import MAX_REQUEST_SIZE, Disposition, respond

log = logging.getLogger("derper.stun")

_READ_SIZE = MAX_REQUEST_SIZE + 1
"""A longer datagram arrives cut to this, which is still too long: junk either way."""
_BATCH = 256
"""Datagrams handled between two checkpoints while the socket stays readable."""
_NO_IPV6 = frozenset({errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT, errno.EADDRNOTAVAIL})


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
                       task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Answer STUN on an already bound socket (see ``open_stun_socket``) until cancelled; closes it.

    Binding first lets a server report a port conflict before it starts anything else.
    """
    counters = counters if counters is not None else StunCounters()
    with sock:
        bound = sock.getsockname()[:2]
        log.info("STUN on %s UDP port %d%s", bound[0], bound[1], " (strict)" if strict else "")
        task_status.started([bound])
        await _serve(sock, strict, counters)


async def open_stun_socket(host: str | None, port: int) -> socket.socket:
    """The responder's UDP socket: ``host`` exactly, or dual-stack ``::`` when it is None."""
    if host is None:
        try:
            return _udp_socket(socket.AF_INET6, ("::", port), dual_stack=True)
        except OSError as exc:
            if exc.errno not in _NO_IPV6:
                raise
            log.info("no IPv6 here (%s): STUN on 0.0.0.0 only", exc)
            return _udp_socket(socket.AF_INET, ("0.0.0.0", port))
    family, _, _, _, sockaddr = (await trio.socket.getaddrinfo(
        host, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE))[0]
    return _udp_socket(family, sockaddr)


def _udp_socket(family: int, sockaddr: tuple, dual_stack: bool = False) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if dual_stack:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(sockaddr)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def _serve(sock: socket.socket, strict: bool, counters: StunCounters) -> None:
    requests, families = counters.requests, counters.families
    recvfrom, sendto = sock.recvfrom, sock.sendto
    write_error = Disposition.WRITE_ERROR
    while True:
        for _ in range(_BATCH):
            try:
                data, addr = recvfrom(_READ_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                requests[Disposition.READ_ERROR] += 1
                log.warning("STUN read failed: %s; pausing 1 s", exc)
                await trio.sleep(1)
                break
            ip = addr[0]
            reply, disposition = respond(data, ip, addr[1], strict=strict)
            if reply is not None:
                families[IPV6 if ":" in ip and not ip.startswith("::ffff:") else IPV4] += 1
                try:
                    sendto(reply, addr)
                except OSError:
                    disposition = write_error
            requests[disposition] += 1
        else:
            await trio.lowlevel.checkpoint()  # still readable after a full batch: be fair, go on
            continue
        await trio.lowlevel.wait_readable(sock)
