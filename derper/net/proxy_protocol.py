"""HAProxy's PROXY protocol, versions 1 (text) and 2 (binary): the header an L4 proxy (nginx
``stream`` with ``proxy_protocol on``, HAProxy ``send-proxy-v2``) writes before the client's
first byte, naming the client's address. Pure: bytes in, the header out.

``parse`` is incremental: it says "need more" while the bytes so far can still start a valid
header, and refuses as soon as they cannot, so a client that is not a proxy (a TLS
ClientHello, an HTTP request) is turned away at its first read.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import NamedTuple

from ..errors import ProtocolError
from .addr import ip_text

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest v1 line, CRLF included (spec §2.1)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16  # signature, version/command, family/protocol, length
_V2_LEN = struct.Struct(">H")
_LOCAL, _PROXY = 0x0, 0x1
_UNSPEC, _INET, _INET6, _UNIX = 0x0, 0x1, 0x2, 0x3
_STREAM = 0x1
_V2_ADDRESSES = {_INET: (4, 12), _INET6: (16, 36)}  # address bytes, address block length


class ProxyHeader(NamedTuple):
    """``source``: the client as (ip, port); None when the proxy names none (a LOCAL health
    check, v1 UNKNOWN, a unix-socket or unspecified client): the connection's own peer."""

    source: tuple[str, int] | None
    length: int  # bytes the header took; what follows is the client's stream


def parse(data: bytes) -> ProxyHeader | None:
    """The header at the start of ``data``; None while more bytes are needed.

    Raises ProtocolError when ``data`` cannot start a valid header.
    """
    if data[:len(V2_SIGNATURE)] == V2_SIGNATURE[:len(data)]:
        return _parse_v2(data) if len(data) >= V2_FIXED else None
    if data[:len(V1_PREFIX)] == V1_PREFIX[:len(data)]:
        return _parse_v1(data) if len(data) > len(V1_PREFIX) else None
    raise ProtocolError("the connection does not start with a PROXY protocol header")


def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProtocolError("PROXY v1 header longer than 107 bytes")
        if b"\n" in data[:V1_MAX]:
            raise ProtocolError("PROXY v1 header line not ended by CRLF")
        return None
    parts = data[:end].split(b" ")
    proto = parts[1]
    if proto == b"UNKNOWN":
        return ProxyHeader(None, end + 2)
    if proto not in (b"TCP4", b"TCP6") or len(parts) != 6:
        raise ProtocolError("PROXY v1 header is not 'PROXY TCP4|TCP6 src dst sport dport'")
    version = 4 if proto == b"TCP4" else 6
    src = _v1_ip(parts[2], version)
    _v1_ip(parts[3], version)
    sport = _v1_port(parts[4])
    _v1_port(parts[5])
    return ProxyHeader((src, sport), end + 2)


def _v1_ip(text: bytes, version: int) -> str:
    try:
        ip = ipaddress.ip_address(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError("PROXY v1 header has a malformed address") from None
    if ip.version != version:
        raise ProtocolError(f"PROXY v1 TCP{version} header has an IPv{ip.version} address")
    return ip_text(ip)


def _v1_port(text: bytes) -> int:
    if not (text.isdigit() and len(text) <= 5 and int(text) <= 65535):
        raise ProtocolError("PROXY v1 header has a malformed port")
    return int(text)


def _parse_v2(data: bytes) -> ProxyHeader | None:
    version, command = data[12] >> 4, data[12] & 0xF
    if version != 2:
        raise ProtocolError(f"PROXY v2 signature with version {version}")
    if command not in (_LOCAL, _PROXY):
        raise ProtocolError(f"PROXY v2 header has unknown command {command}")
    family, proto = data[13] >> 4, data[13] & 0xF
    if family > _UNIX or proto > 2:
        raise ProtocolError("PROXY v2 header has an unknown address family or protocol")
    length = V2_FIXED + _V2_LEN.unpack_from(data, 14)[0]
    if len(data) < length:
        return None
    if command == _LOCAL or family in (_UNSPEC, _UNIX):
        return ProxyHeader(None, length)
    if proto != _STREAM:
        raise ProtocolError("PROXY v2 header names a datagram client on a TCP listener")
    size, block = _V2_ADDRESSES[family]
    if length - V2_FIXED < block:
        raise ProtocolError("PROXY v2 address block shorter than its family needs")
    raw = bytes(data[V2_FIXED:V2_FIXED + size])
    ip = ipaddress.IPv4Address(raw) if size == 4 else ipaddress.IPv6Address(raw)
    port = _V2_LEN.unpack_from(data, V2_FIXED + 2 * size)[0]
    return ProxyHeader((ip_text(ip), port), length)
