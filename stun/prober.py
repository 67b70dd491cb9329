"""The trio side of ``derper nat``: send the probes ``stun.nat`` asks for, record what comes back.

Three UDP sockets: the mapping socket (plain requests to every server address, then the hairpin
and the control requests), a fresh filtering socket (its only holes are toward the server's
primary address, so a reply from elsewhere tests the NAT's filter) and an IPv6 one. Each request
is resent four times within ``wait``; a phase never takes longer than ``wait``, and there are
three, so a run ends within about ``3 × wait`` whatever the servers do. Every server is asked
twice from the mapping socket, so one that makes mappings up is caught.
"""

from __future__ import annotations

import os
import socket

import trio

from stun.client import Address, Binding, binding_request, is_request, parse_response
from stun.nat import (FILTERING_SOCKET, IPV6_SOCKET, MAPPING_SOCKET, Observations, Probe,
                      alternates, change_tests)

_TRIES = 4


class _Socket:
    """A UDP socket whose datagrams are matched to the requests waiting for them by txid."""

    def __init__(self, family: int, name: str) -> None:
        self.name = name
        self.sock = trio.socket.socket(family, socket.SOCK_DGRAM)
        self._waiting: dict[bytes, tuple[trio.Event, list]] = {}
        self.heard = False

    async def receive_forever(self) -> None:
        while True:
            try:
                data, source = await self.sock.recvfrom(2048)
            except OSError:  # an ICMP error reported on the socket: the probe will time out
                continue
            self.heard = True
            waiter = self._waiting.get(data[8:20])
            if waiter is None:
                continue
            event, got = waiter
            answer = parse_response(data, data[8:20])
            if answer is not None or is_request(data, data[8:20]):  # a request: hairpinned
                got.append((answer, source[:2]))
                event.set()

    async def exchange(self, dest: Address, change: int, wait: float) -> Probe:
        """One request to ``dest``, resent until answered or ``wait`` is over. Our own request
        coming back (sent to our public address: hairpinning) is an answer of None from
        ``source``."""
        txid = os.urandom(12)
        event, got = self._waiting[txid] = trio.Event(), []
        request = binding_request(txid, change)
        try:
            for _ in range(_TRIES):
                try:
                    await self.sock.sendto(request, dest)
                except OSError:
                    pass  # no route (e.g. no IPv6 here): as good as no answer
                with trio.move_on_after(wait / _TRIES):
                    await event.wait()
                if got:
                    break
        finally:
            del self._waiting[txid]
        answer, source = got[0] if got else (None, None)
        return Probe(self.name, dest, change, answer, source)


async def _all(jobs: list) -> list:
    """Run the zero-argument async callables ``jobs`` at once; their results, in order."""
    results: list = [None] * len(jobs)

    async def one(i: int) -> None:
        results[i] = await jobs[i]()

    async with trio.open_nursery() as nursery:
        for i in range(len(jobs)):
            nursery.start_soon(one, i)
    return results


def _local_address(family: int, toward: Address, port: int) -> Address:
    """The source address the kernel picks toward ``toward`` (a UDP connect sends nothing)."""
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(toward)
        except OSError:
            return ("0.0.0.0" if family == socket.AF_INET else "::", port)
        return probe.getsockname()[0], port


async def observe(servers: list[Address], servers6: list[Address], wait: float) -> Observations:
    """Probe the IPv4 ``servers`` (the first RFC 5780 one in depth) and the IPv6 ``servers6``."""
    mapping = _Socket(socket.AF_INET, MAPPING_SOCKET)
    filtering = _Socket(socket.AF_INET, FILTERING_SOCKET)
    v6 = _Socket(socket.AF_INET6, IPV6_SOCKET) if servers6 else None
    sockets = [s for s in (mapping, filtering, v6) if s is not None]
    for s in sockets:
        await s.sock.bind(("::" if s is v6 else "0.0.0.0", 0))
    local_port = mapping.sock.getsockname()[1]
    obs = Observations(_local_address(socket.AF_INET, servers[0], local_port) if servers
                       else ("0.0.0.0", local_port))
    if v6 is not None:
        obs.local6 = _local_address(socket.AF_INET6, servers6[0], v6.sock.getsockname()[1])

    def ask(s: _Socket, dest: Address, change: int = 0):
        return lambda: s.exchange(dest, change, wait)

    async with trio.open_nursery() as nursery:
        for s in sockets:
            nursery.start_soon(s.receive_forever)
        first = await _all([ask(mapping, d) for d in servers] + [ask(v6, d) for d in servers6])
        obs.probes += first
        server: tuple[Address, ...] = ()
        for probe in first[:len(servers)]:
            if isinstance(probe.answer, Binding) and probe.source == probe.dest:
                server = alternates(probe.dest, probe.answer)
                if server:
                    break
        obs.server = server
        mapped = next((p.answer.mapped for p in first[:len(servers)]
                       if isinstance(p.answer, Binding)), None)
        second = [ask(mapping, d) for d in server[1:]]
        if server:
            second.append(ask(filtering, server[0]))
            second += [ask(filtering, server[0], flags) for flags, _ in change_tests(server)]
        hairpin = mapped is not None and mapped != obs.local
        if hairpin:
            second.append(ask(mapping, mapped))
        results = await _all(second)
        if hairpin:
            obs.hairpin = results.pop().source is not None
        obs.probes += results
        # Ask every server again: one giving another mapping for the same socket is lying. And
        # the mapping socket now has holes toward every address of the RFC 5780 server, so its
        # replies from the other addresses must get in, unless the server does not send them.
        obs.probes += await _all([ask(mapping, d) for d in servers] + [
            ask(mapping, server[0], flags) for flags, _ in (change_tests(server) if server
                                                            else ())])
        nursery.cancel_scope.cancel()
    obs.heard = mapping.heard or filtering.heard
    for s in sockets:
        s.sock.close()
    return obs
