"""A DERP client's way to the server: TCP, then TLS checked normally, against a pin, or not.

Split out of the client so that every step of the way fails with its own exception: an
``OSError`` from ``open_tcp``, a ``trio.BrokenResourceError`` or ``PinMismatch`` from
``tls_handshake``.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
from dataclasses import dataclass

import trio

from ..errors import IOFailure
from ..proto import metacert
from ..proto.pin import pin_problem
from .tls_stream import TLSStream


class PinMismatch(IOFailure):
    """The server's certificates do not satisfy the ``sha256-raw:`` pin."""


@dataclass(frozen=True)
class TLSFacts:
    version: str | None
    chain: list[bytes]  # DER, leaf first, as the server sent it
    fast_start_key: bytes | None  # the meta certificate's server key, if fast start may be used


async def open_tcp(host: str, port: int, source_ip: str | None = None) -> trio.SocketStream:
    """``trio.open_tcp_stream``, less its happy-eyeballs tasks when there is one address;
    ``source_ip`` binds the local end (a test's "other" client, 127.0.0.2). A ``host`` that is
    a path (starts with ``/``) is a Unix socket: how -workers reach each other."""
    if host.startswith("/"):
        return await trio.open_unix_socket(host)
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return await trio.open_tcp_stream(host, port, local_address=source_ip)
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        if source_ip is not None:
            await sock.bind((source_ip, 0))
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


def pinned_context() -> ssl.SSLContext:
    """A client context for ``sha256-raw:`` pins: the pin replaces chain verification."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def tls_client(transport: trio.SocketStream, *, ssl_context: ssl.SSLContext | None,
               cert_pin: str | None, server_hostname: str) -> TLSStream:
    """The client's TLS stream, not yet handshaken; the context defaults to the system roots,
    or to ``pinned_context`` with a pin."""
    ctx = ssl_context or (pinned_context() if cert_pin else ssl.create_default_context())
    return TLSStream(transport, ctx, server_side=False, server_hostname=server_hostname)


async def tls_handshake(tls: TLSStream, cert_pin: str | None) -> TLSFacts:
    """Handshake, check the pin, and find the meta certificate (spec §1.4, §1.5)."""
    await tls.do_handshake()
    chain = tls.peer_chain_der()
    if cert_pin and (problem := pin_problem(chain, cert_pin)):
        raise PinMismatch(problem)
    version = tls.version()
    meta = next(filter(None, map(metacert.parse, chain)), None)
    usable = version == "TLSv1.3" and meta is not None and meta[0] != bytes(32) and meta[1] != 0
    return TLSFacts(version, chain, meta[0] if usable else None)
