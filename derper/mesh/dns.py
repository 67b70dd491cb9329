"""Addresses of a mesh peer's name, re-resolved as the region grows and shrinks.

The system resolver by default; with ``-mesh-dns-server`` a plain DNS query over UDP to that
server (A and AAAA), so membership can come from a particular server, e.g. a cluster's DNS.
The query codec is pure (``query``, ``answers``); ``Resolver`` does the I/O.
"""

from __future__ import annotations

import ipaddress
import random
import socket
import struct

import trio

from ..errors import IOFailure
from ..net.addr import parse_addr

QTYPES = {1: socket.AF_INET, 28: socket.AF_INET6}  # A, AAAA
QUERY_TIMEOUT = 2.0
_HEADER = struct.Struct(">HHHHHH")


class ResolveError(IOFailure):
    """The name could not be resolved; the links keep the addresses they had."""


def query(name: str, qtype: int, qid: int) -> bytes:
    """A recursive query for ``name`` (RFC 1035 §4.1)."""
    labels = b"".join(len(p).to_bytes(1, "big") + p
                      for p in name.rstrip(".").encode("idna").split(b"."))
    return _HEADER.pack(qid, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack(">HH", qtype, 1)


def answers(msg: bytes, qid: int, qtype: int) -> list[str]:
    """The addresses of type ``qtype`` in a response to query ``qid``; ResolveError if it is an
    error answer or malformed (an empty list: the name has no such records)."""
    try:
        rid, flags, qd, an, _, _ = _HEADER.unpack_from(msg)
        if rid != qid or not flags & 0x8000:
            raise ResolveError("an answer to another query")
        rcode = flags & 0xF
        if rcode == 3:  # NXDOMAIN
            return []
        if rcode:
            raise ResolveError(f"DNS server answered with rcode {rcode}")
        pos = _HEADER.size
        for _ in range(qd):
            pos = _skip_name(msg, pos) + 4
        out = []
        for _ in range(an):
            pos = _skip_name(msg, pos)
            rtype, _, _, rdlen = struct.unpack_from(">HHIH", msg, pos)
            pos += 10
            rdata = msg[pos:pos + rdlen]
            pos += rdlen
            if rtype == qtype and len(rdata) == (4 if qtype == 1 else 16):
                out.append(str(ipaddress.ip_address(rdata)))
        return out
    except (struct.error, IndexError) as e:
        raise ResolveError("malformed DNS answer") from e


def _skip_name(msg: bytes, pos: int) -> int:
    while True:
        n = msg[pos]
        if n >= 0xC0:  # a compression pointer ends the name
            return pos + 2
        pos += 1 + n
        if n == 0:
            return pos


class Resolver:
    """``server`` is ``host:port`` of a DNS server, or "" for the system resolver."""

    def __init__(self, server: str = "") -> None:
        self.server = parse_addr(server) if server else None

    async def resolve(self, name: str) -> list[str]:
        """Every address of ``name`` (an IP literal is its own), sorted, IPv4 first."""
        try:
            return [str(ipaddress.ip_address(name))]
        except ValueError:
            pass
        if self.server is None:
            try:
                infos = await trio.socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
            except OSError as e:
                raise ResolveError(f"cannot resolve {name}: {e}") from e
            found = {info[4][0] for info in infos}
        else:
            found = set()
            for qtype in QTYPES:
                found.update(await self._ask(name, qtype))
        return sorted(found, key=lambda a: (":" in a, a))

    async def _ask(self, name: str, qtype: int) -> list[str]:
        host, port = self.server
        qid = random.getrandbits(16)
        family = socket.AF_INET6 if ":" in (host or "") else socket.AF_INET
        with trio.socket.socket(family, socket.SOCK_DGRAM) as sock:
            await sock.connect((host or "127.0.0.1", port))
            for _ in range(2):  # one retry: UDP may lose a packet
                await sock.send(query(name, qtype, qid))
                with trio.move_on_after(QUERY_TIMEOUT):
                    while True:
                        try:
                            msg = await sock.recv(4096)
                        except OSError as e:
                            raise ResolveError(f"DNS server {host}:{port}: {e}") from e
                        try:
                            return answers(msg, qid, qtype)
                        except ResolveError:
                            if len(msg) >= 2 and msg[:2] != qid.to_bytes(2, "big"):
                                continue  # a stray datagram: keep waiting for ours
                            raise
        raise ResolveError(f"DNS server {host}:{port} did not answer for {name}")
