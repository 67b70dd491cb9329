"""STUN Binding codec: request datagram + its source address in, reply datagram (or None) out.

Pure and synchronous so the §7.4 vectors and a fuzzer can drive it without sockets.

What gets answered, and how:

* Tailscale requests -- anything the Go server's own predicate accepts (spec §7.1: cookie, Binding
  request, attributes walked to the end of the datagram, SOFTWARE ``tailnode``, valid trailing
  FINGERPRINT; the header length field is not checked) -- get Go's reply byte for byte: one
  XOR-MAPPED-ADDRESS, the address encoded as received, so an IPv4 client seen on a dual-stack
  socket as ``::ffff:a.b.c.d`` gets family 02 (44 bytes), as from the Go derper.
* RFC 8489/5389 Binding requests (magic cookie) get XOR-MAPPED-ADDRESS, plus FINGERPRINT when the
  request carried one; RFC 3489 requests (no cookie) get MAPPED-ADDRESS with their 16-byte id
  echoed. IPv4-mapped sources are reported as plain IPv4 (family 01). No SOFTWARE, no
  SOURCE-/CHANGED-ADDRESS: there is no alternate address to advertise and replies stay small.
* A comprehension-required attribute we cannot honour -- CHANGE-REQUEST asking for another
  address or port, RESPONSE-ADDRESS, RESPONSE-PORT, PADDING, anything unknown below 0x8000 -- gets
  a 420 (Unknown Attribute) error listing it, as RFC 5389 §12.2 prescribes, but only when that
  error is no larger than the request (else nothing: errors never amplify). A
  zero CHANGE-REQUEST (Vovida ``stun`` and JSTUN-style clients always send one) is a no-op.
* With ``strict`` only Tailscale requests are answered, like the Go server.

Replies only ever go to the datagram's source (the caller's job) and are never more than
``MAX_GROWTH`` bytes longer than the request, so the responder cannot amplify.

RFC 5780 (NAT behaviour discovery), when the server has an alternate port and maybe an alternate
IP (a ``Layout``): ``answer`` also says which socket sends the reply. CHANGE-REQUEST is honoured
by answering from the socket that differs in the asked-for part; generic successes add
OTHER-ADDRESS and RESPONSE-ORIGIN (RFC 3489 ones: CHANGED-ADDRESS and SOURCE-ADDRESS), growing
by at most ``MAX_GROWTH_RFC5780`` bytes.
Tailscale requests still get Go's reply, from the socket they reached.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum

from derper.errors import ConfigError
from derper.net.addr import unmap_ip

COOKIE = b"\x21\x12\xa4\x42"
_COOKIE_INT = 0x2112A442
_FINGERPRINT_XOR = 0x5354554E

MAX_REQUEST_SIZE = 1500
"""Longer datagrams are junk: no Binding request comes near an Ethernet MTU. Bounds parse cost."""
MAX_GROWTH = 24
"""Most a reply can exceed its request by (a bare request from IPv6: its XOR-MAPPED-ADDRESS).
Errors never exceed their request at all."""
MAX_GROWTH_RFC5780 = 72
"""The same with a ``Layout``: three IPv6 address attributes on a bare 20-byte request."""

_BINDING_REQUEST = b"\x00\x01"
ATTR_MAPPED_ADDRESS = 0x0001
ATTR_CHANGE_REQUEST = 0x0003
ATTR_SOURCE_ADDRESS = 0x0004  # RFC 3489's RESPONSE-ORIGIN
ATTR_CHANGED_ADDRESS = 0x0005  # RFC 3489's OTHER-ADDRESS
ATTR_XOR_MAPPED_ADDRESS = 0x0020
ATTR_RESPONSE_ORIGIN = 0x802B
ATTR_OTHER_ADDRESS = 0x802C
CHANGE_IP = 0x04
CHANGE_PORT = 0x02
ATTR_FINGERPRINT = 0x8028
_ATTR_SOFTWARE = 0x8022
_IGNORABLE = frozenset({
    # USERNAME, MESSAGE-INTEGRITY(-SHA256), REALM, NONCE, USERHASH: nobody is authenticated here.
    0x0006, 0x0008, 0x001C, 0x0014, 0x0015, 0x001E,
    # PRIORITY, USE-CANDIDATE: an ICE check sent to a STUN server needs nothing more.
    0x0024, 0x0025,
})

_TAILNODE_SOFTWARE = b"\x80\x22\x00\x08tailnode"
# Tailscale's 40-byte request (spec §7.2) from byte 20 up to the fingerprint value.
_TAILSCALE_MIDDLE = _TAILNODE_SOFTWARE + b"\x80\x28\x00\x04"

_HH = struct.Struct("!HH")
_GO_REPLY_V4 = struct.Struct("!4s4s12s6sHI")  # header, cookie, txid, attr+family, port, address
_REPLY_V4_HEAD = b"\x01\x01\x00\x0c"
_XMA_V4_HEAD = b"\x00\x20\x00\x08\x00\x01"
_ERROR_420 = b"\x00\x09\x00\x15\x00\x00\x04\x14Unknown Attribute\x00\x00\x00"  # padded attribute


class Disposition(IntEnum):
    """What became of one datagram; ``name.lower()`` is the metrics label."""

    SUCCESS = 0            # answered with a Binding success response
    UNKNOWN_ATTRIBUTE = 1  # asked for something we cannot do (a 420 if no larger than it)
    NOT_STUN = 2           # too short or too long, top bits set, or cookie-less and not Binding
    MALFORMED = 3          # a Binding request whose length, attributes or FINGERPRINT are bad
    NOT_BINDING = 4        # STUN but not a Binding request: other method, response, indication
    STRICT_IGNORED = 5     # a valid non-Tailscale request, ignored because of strict mode
    READ_ERROR = 6         # the socket read failed (counted by the responder)
    WRITE_ERROR = 7        # sending the reply failed (counted by the responder, instead)


@dataclass(frozen=True)
class Layout:
    """Where an RFC 5780 responder's sockets are; a socket's index has bit 1 set for the
    alternate IP and bit 0 for the alternate port.

    ``ips`` holds one address (only the port can change) or two, as sockets report them.
    """

    ips: tuple[str, ...]
    ports: tuple[int, int]

    def address(self, index: int) -> tuple[str, int]:
        return self.ips[index >> 1 if len(self.ips) == 2 else 0], self.ports[index & 1]

    def other(self, index: int) -> int:
        """The socket that differs in IP and port (only the port, with one IP): OTHER-ADDRESS."""
        return index ^ (3 if len(self.ips) == 2 else 1)

    @property
    def changes(self) -> int:
        """The CHANGE-REQUEST flags this layout can honour."""
        return CHANGE_IP | CHANGE_PORT if len(self.ips) == 2 else CHANGE_PORT


def respond(data: bytes, src_ip: str, src_port: int, *,
            strict: bool = False) -> tuple[bytes | None, Disposition]:
    """The reply to ``data`` received from ``src_ip``:``src_port``, and the datagram's disposition.

    ``src_ip`` is the host string a socket reports (``"::ffff:…"`` on a dual-stack socket, maybe
    with a ``%scope`` suffix). Never raises on any ``data``.
    """
    reply, disposition, _ = answer(data, src_ip, src_port, strict=strict)
    return reply, disposition


def answer(data: bytes, src_ip: str, src_port: int, *, strict: bool = False,
           layout: Layout | None = None, at: int = 0) -> tuple[bytes | None, Disposition, int]:
    """``respond`` for socket ``at`` of ``layout``: also the index of the socket to reply from."""
    n = len(data)
    if n < 20 or n > MAX_REQUEST_SIZE or data[0] & 0xC0:
        return None, Disposition.NOT_STUN, at
    if data[4:8] != COOKIE:
        return _respond_classic(data, src_ip, src_port, strict, layout, at)
    if data[:2] != _BINDING_REQUEST:
        return None, Disposition.NOT_BINDING, at
    # At 40 bytes the only shape Go accepts is Tailscale's own request: check it without a walk.
    if n == 40:
        tailscale = data[20:36] == _TAILSCALE_MIDDLE and fingerprint_ok(data, 32)
    else:
        tailscale = _is_tailscale(data)
    if tailscale:
        return _go_reply(data[8:20], src_ip, src_port), Disposition.SUCCESS, at
    return _respond_rfc5389(data, src_ip, src_port, strict, layout, at)


def tailscale_request(txid: bytes) -> bytes:
    """The 40-byte Binding request Tailscale clients send (spec §7.2), for probes and load tests."""
    return encode(b"\x00\x01", COOKIE + txid, _TAILNODE_SOFTWARE, fingerprint=True)


def fingerprint_ok(data: bytes, at: int) -> bool:
    """Whether the FINGERPRINT attribute starting at ``at`` matches every byte before it."""
    return data[at + 4:at + 8] == (zlib.crc32(data[:at]) ^ _FINGERPRINT_XOR).to_bytes(4, "big")


def walk_attributes(data: bytes, end: int) -> list[tuple[int, int, int]] | None:
    """(type, value offset, value length) of each attribute in ``data[20:end]``; None on overrun."""
    attrs = []
    pos = 20
    while pos < end:
        if pos + 4 > end:
            return None
        kind, length = _HH.unpack_from(data, pos)
        pos += 4
        padded = (length + 3) & ~3
        if pos + padded > end:
            return None
        attrs.append((kind, pos, length))
        pos += padded
    return attrs


def _is_tailscale(data: bytes) -> bool:
    """Go's ``ParseBindingRequest`` acceptance, for a datagram known to be a Binding request."""
    attrs = walk_attributes(data, len(data))
    if not attrs:
        return False
    kind, at, length = attrs[-1]
    return (kind == ATTR_FINGERPRINT and length == 4
            and any(k == _ATTR_SOFTWARE and data[a:a + n] == b"tailnode" for k, a, n in attrs)
            and fingerprint_ok(data, at - 4))


def _packed(ip: str) -> bytes:
    if ":" not in ip:
        return socket.inet_aton(ip)
    return socket.inet_pton(socket.AF_INET6, ip.partition("%")[0])


def _unmapped(ip: str) -> bytes:
    """The address generic clients are told: an IPv4-mapped IPv6 source is plain IPv4."""
    return _packed(unmap_ip(ip))


def _xor_address(txid: bytes, addr: bytes, port: int) -> bytes:
    """XOR-MAPPED-ADDRESS attribute (header included) for ``addr`` as given: 4 or 16 bytes."""
    if len(addr) == 4:
        xored = int.from_bytes(addr, "big") ^ _COOKIE_INT
        return _XMA_V4_HEAD + struct.pack("!HI", port ^ 0x2112, xored)
    xored = int.from_bytes(addr, "big") ^ int.from_bytes(COOKIE + txid, "big")
    return (b"\x00\x20\x00\x14\x00\x02" + (port ^ 0x2112).to_bytes(2, "big")
            + xored.to_bytes(16, "big"))


def _go_reply(txid: bytes, ip: str, port: int) -> bytes:
    """Go's ``stun.Response``: the source address encoded exactly as the socket reported it."""
    if ":" not in ip:  # the hot path: one pack, no intermediate attribute bytes
        xored = int.from_bytes(socket.inet_aton(ip), "big") ^ _COOKIE_INT
        return _GO_REPLY_V4.pack(_REPLY_V4_HEAD, COOKIE, txid, _XMA_V4_HEAD, port ^ 0x2112, xored)
    return encode(b"\x01\x01", COOKIE + txid, _xor_address(txid, _packed(ip), port))


def encode(kind: bytes, cookie_and_id: bytes, body: bytes, fingerprint: bool = False) -> bytes:
    """Header + ``body``, plus a FINGERPRINT over both when asked."""
    if not fingerprint:
        return kind + len(body).to_bytes(2, "big") + cookie_and_id + body
    msg = kind + (len(body) + 8).to_bytes(2, "big") + cookie_and_id + body
    return msg + b"\x80\x28\x00\x04" + (zlib.crc32(msg) ^ _FINGERPRINT_XOR).to_bytes(4, "big")


def _checked_attributes(data: bytes) -> list[tuple[int, int, int]] | None:
    """The attributes when the header length matches the datagram and they fill it exactly."""
    length = int.from_bytes(data[2:4], "big")
    if length & 3 or length + 20 != len(data):
        return None
    return walk_attributes(data, len(data))


def _unknown(data: bytes, attrs: list[tuple[int, int, int]],
             layout: Layout | None) -> tuple[list[int], int]:
    """Comprehension-required attribute types we cannot honour, in order, without repeats; and
    the CHANGE-REQUEST flags to honour (a request for no change is honoured by every server)."""
    unknown = {}
    honoured = layout.changes if layout is not None else 0
    change = 0
    for kind, at, length in attrs:
        if kind >= 0x8000 or kind in _IGNORABLE:
            continue
        if kind == ATTR_CHANGE_REQUEST and length == 4:
            flags = int.from_bytes(data[at:at + 4], "big")
            if not flags & ~honoured:
                change |= flags
                continue
        unknown[kind] = None
    return list(unknown), change


def _via(at: int, change: int) -> int:
    """The socket that answers a CHANGE-REQUEST with ``change`` received on socket ``at``."""
    return at ^ (2 if change & CHANGE_IP else 0) ^ (1 if change & CHANGE_PORT else 0)


def _plain_address(kind: int, ip: str, port: int) -> bytes:
    """A MAPPED-ADDRESS-shaped attribute (header included): OTHER-ADDRESS, RESPONSE-ORIGIN, …"""
    addr = _unmapped(ip)
    return (struct.pack("!HHH", kind, 4 + len(addr), 1 if len(addr) == 4 else 2)
            + port.to_bytes(2, "big") + addr)


def _where(layout: Layout, at: int, via: int, origin: int, other: int) -> bytes:
    """The two attributes that tell an RFC 5780 client where a reply came from and where else
    the server listens (``origin``/``other``: their RFC 5780 or RFC 3489 types)."""
    return (_plain_address(origin, *layout.address(via))
            + _plain_address(other, *layout.address(layout.other(at))))


def _error_fits(error: bytes, data: bytes, at: int) -> tuple[bytes | None, Disposition, int]:
    """A 420 only when no larger than its request: an error must never amplify (a spoofed
    24-byte request would otherwise draw 56 bytes at its victim). Clients that pad their
    request, or name several attributes, still learn what was refused."""
    if len(error) > len(data):
        return None, Disposition.UNKNOWN_ATTRIBUTE, at
    return error, Disposition.UNKNOWN_ATTRIBUTE, at


def _error_420(unknown: list[int], pad_by_repeat: bool) -> bytes:
    """ERROR-CODE 420 + UNKNOWN-ATTRIBUTES; RFC 3489 pads an odd list by repeating an entry."""
    if len(unknown) & 1 and pad_by_repeat:
        unknown = unknown + unknown[-1:]
    listed = struct.pack(f"!{len(unknown)}H", *unknown)
    return (_ERROR_420 + b"\x00\x0a" + len(listed).to_bytes(2, "big") + listed
            + b"\x00" * (-len(listed) & 3))


def _respond_rfc5389(data: bytes, ip: str, port: int, strict: bool, layout: Layout | None,
                     at: int) -> tuple[bytes | None, Disposition, int]:
    attrs = _checked_attributes(data)
    if attrs is None:
        return None, Disposition.MALFORMED, at
    fingerprint = False
    for i, (kind, start, length) in enumerate(attrs):
        if kind == ATTR_FINGERPRINT:
            if i != len(attrs) - 1 or length != 4 or not fingerprint_ok(data, start - 4):
                return None, Disposition.MALFORMED, at
            fingerprint = True
    if strict:
        return None, Disposition.STRICT_IGNORED, at
    head = data[4:20]
    unknown, change = _unknown(data, attrs, layout)
    if unknown:
        error = encode(b"\x01\x11", head, _error_420(unknown, False), fingerprint)
        return _error_fits(error, data, at)
    body = _xor_address(data[8:20], _unmapped(ip), port)
    via = _via(at, change)
    if layout is not None:
        body += _where(layout, at, via, ATTR_RESPONSE_ORIGIN, ATTR_OTHER_ADDRESS)
    return encode(b"\x01\x01", head, body, fingerprint), Disposition.SUCCESS, via


def _respond_classic(data: bytes, ip: str, port: int, strict: bool, layout: Layout | None,
                     at: int) -> tuple[bytes | None, Disposition, int]:
    """RFC 3489: no cookie, bytes 4-19 are the transaction id; RFC 5389 §12.2 says how to answer."""
    if data[:2] != _BINDING_REQUEST:
        return None, Disposition.NOT_STUN, at
    attrs = _checked_attributes(data)
    if attrs is None or any(kind == ATTR_FINGERPRINT for kind, _, _ in attrs):
        return None, Disposition.MALFORMED, at  # FINGERPRINT only exists with the cookie: damaged
    if strict:
        return None, Disposition.STRICT_IGNORED, at
    head = data[4:20]
    unknown, change = _unknown(data, attrs, layout)
    if unknown:
        return _error_fits(encode(b"\x01\x11", head, _error_420(unknown, True)), data, at)
    body = _plain_address(ATTR_MAPPED_ADDRESS, ip, port)
    via = _via(at, change)
    if layout is not None:
        body += _where(layout, at, via, ATTR_SOURCE_ADDRESS, ATTR_CHANGED_ADDRESS)
    return encode(b"\x01\x01", head, body), Disposition.SUCCESS, via


def check_alternates(host: str | None, port: int, alt_port: int, alt_ip: str,
                     strict: bool) -> None:
    """Refuse -stun-alt-port/-stun-alt-ip settings that cannot give a working RFC 5780 server."""
    if not -1 <= alt_port <= 65535:
        raise ConfigError(f"-stun-alt-port must be a port number (or -1 to disable), not "
                          f"{alt_port}")
    if alt_port < 0:
        if alt_ip:
            raise ConfigError("-stun-alt-ip needs -stun-alt-port too")
        return
    if alt_port == port != 0:
        raise ConfigError("-stun-alt-port must differ from -stun-port")
    if strict:
        raise ConfigError("-stun-strict answers only Tailscale, which never asks for the "
                          "alternate address: drop -stun-strict or -stun-alt-port")
    if alt_ip:
        try:
            primary, alternate = ipaddress.ip_address(host or ""), ipaddress.ip_address(alt_ip)
        except ValueError:
            raise ConfigError("-stun-alt-ip needs IP addresses: -a IP:port for the primary one "
                              "and -stun-alt-ip IP, both of this machine (e.g. -a "
                              "203.0.113.7:443 -stun-alt-ip 203.0.113.8)") from None
        if primary.version != alternate.version or primary == alternate:
            raise ConfigError(f"-stun-alt-ip {alt_ip} must be another address of the same "
                              f"family as {host}")
