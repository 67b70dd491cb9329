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
  a 420 (Unknown Attribute) error listing it, as RFC 5389 §12.2 prescribes and coturn does. A
  zero CHANGE-REQUEST (Vovida ``stun`` and JSTUN-style clients always send one) is a no-op.
* With ``strict`` only Tailscale requests are answered, like the Go server.

Replies only ever go to the datagram's source (the caller's job) and are never more than
``MAX_GROWTH`` bytes longer than the request, so the responder cannot amplify.
"""

from __future__ import annotations

import socket
import struct
import zlib
from enum import IntEnum

from derper.net.addr import unmap_ip

COOKIE = b"\x21\x12\xa4\x42"
_COOKIE_INT = 0x2112A442
_FINGERPRINT_XOR = 0x5354554E

MAX_REQUEST_SIZE = 1500
"""Longer datagrams are junk: no Binding request comes near an Ethernet MTU. Bounds parse cost."""
MAX_GROWTH = 32
"""Most a reply can exceed its request by (the worst case: a 420 naming one empty attribute)."""

_BINDING_REQUEST = b"\x00\x01"
_ATTR_CHANGE_REQUEST = 0x0003
_ATTR_FINGERPRINT = 0x8028
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
    UNKNOWN_ATTRIBUTE = 1  # answered with a 420 error: it asked for something we cannot do
    NOT_STUN = 2           # too short or too long, top bits set, or cookie-less and not Binding
    MALFORMED = 3          # a Binding request whose length, attributes or FINGERPRINT are bad
    NOT_BINDING = 4        # STUN but not a Binding request: other method, response, indication
    STRICT_IGNORED = 5     # a valid non-Tailscale request, ignored because of strict mode
    READ_ERROR = 6         # the socket read failed (counted by the responder)
    WRITE_ERROR = 7        # sending the reply failed (counted by the responder, instead)


def respond(data: bytes, src_ip: str, src_port: int, *,
            strict: bool = False) -> tuple[bytes | None, Disposition]:
    """The reply to ``data`` received from ``src_ip``:``src_port``, and the datagram's disposition.

    ``src_ip`` is the host string a socket reports (``"::ffff:…"`` on a dual-stack socket, maybe
    with a ``%scope`` suffix). Never raises on any ``data``.
    """
    n = len(data)
    if n < 20 or n > MAX_REQUEST_SIZE or data[0] & 0xC0:
        return None, Disposition.NOT_STUN
    if data[4:8] != COOKIE:
        return _respond_classic(data, src_ip, src_port, strict)
    if data[:2] != _BINDING_REQUEST:
        return None, Disposition.NOT_BINDING
    # At 40 bytes the only shape Go accepts is Tailscale's own request: check it without a walk.
    if n == 40:
        tailscale = data[20:36] == _TAILSCALE_MIDDLE and _fingerprint_ok(data, 32)
    else:
        tailscale = _is_tailscale(data)
    if tailscale:
        return _go_reply(data[8:20], src_ip, src_port), Disposition.SUCCESS
    return _respond_rfc5389(data, src_ip, src_port, strict)


def tailscale_request(txid: bytes) -> bytes:
    """The 40-byte Binding request Tailscale clients send (spec §7.2), for probes and load tests."""
    return _message(b"\x00\x01", COOKIE + txid, _TAILNODE_SOFTWARE, fingerprint=True)


def _fingerprint_ok(data: bytes, at: int) -> bool:
    """Whether the FINGERPRINT attribute starting at ``at`` matches every byte before it."""
    return data[at + 4:at + 8] == (zlib.crc32(data[:at]) ^ _FINGERPRINT_XOR).to_bytes(4, "big")


def _attributes(data: bytes, end: int) -> list[tuple[int, int, int]] | None:
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
    attrs = _attributes(data, len(data))
    if not attrs:
        return False
    kind, at, length = attrs[-1]
    return (kind == _ATTR_FINGERPRINT and length == 4
            and any(k == _ATTR_SOFTWARE and data[a:a + n] == b"tailnode" for k, a, n in attrs)
            and _fingerprint_ok(data, at - 4))


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
    return _message(b"\x01\x01", COOKIE + txid, _xor_address(txid, _packed(ip), port))


def _message(kind: bytes, cookie_and_id: bytes, body: bytes, fingerprint: bool = False) -> bytes:
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
    return _attributes(data, len(data))


def _unknown(data: bytes, attrs: list[tuple[int, int, int]]) -> list[int]:
    """Comprehension-required attribute types we cannot honour, in order, without repeats."""
    unknown = {}
    for kind, at, length in attrs:
        if kind >= 0x8000 or kind in _IGNORABLE:
            continue
        if kind == _ATTR_CHANGE_REQUEST and data[at:at + length] == b"\x00\x00\x00\x00":
            continue  # asks for no change: nothing to honour
        unknown[kind] = None
    return list(unknown)


def _error_420(unknown: list[int], pad_by_repeat: bool) -> bytes:
    """ERROR-CODE 420 + UNKNOWN-ATTRIBUTES; RFC 3489 pads an odd list by repeating an entry."""
    if len(unknown) & 1 and pad_by_repeat:
        unknown = unknown + unknown[-1:]
    listed = struct.pack(f"!{len(unknown)}H", *unknown)
    return (_ERROR_420 + b"\x00\x0a" + len(listed).to_bytes(2, "big") + listed
            + b"\x00" * (-len(listed) & 3))


def _respond_rfc5389(data: bytes, ip: str, port: int,
                     strict: bool) -> tuple[bytes | None, Disposition]:
    attrs = _checked_attributes(data)
    if attrs is None:
        return None, Disposition.MALFORMED
    fingerprint = False
    for i, (kind, at, length) in enumerate(attrs):
        if kind == _ATTR_FINGERPRINT:
            if i != len(attrs) - 1 or length != 4 or not _fingerprint_ok(data, at - 4):
                return None, Disposition.MALFORMED
            fingerprint = True
    if strict:
        return None, Disposition.STRICT_IGNORED
    head = data[4:20]
    unknown = _unknown(data, attrs)
    if unknown:
        error = _message(b"\x01\x11", head, _error_420(unknown, False), fingerprint)
        return error, Disposition.UNKNOWN_ATTRIBUTE
    xma = _xor_address(data[8:20], _unmapped(ip), port)
    return _message(b"\x01\x01", head, xma, fingerprint), Disposition.SUCCESS


def _respond_classic(data: bytes, ip: str, port: int,
                     strict: bool) -> tuple[bytes | None, Disposition]:
    """RFC 3489: no cookie, bytes 4-19 are the transaction id; RFC 5389 §12.2 says how to answer."""
    if data[:2] != _BINDING_REQUEST:
        return None, Disposition.NOT_STUN
    attrs = _checked_attributes(data)
    if attrs is None or any(kind == _ATTR_FINGERPRINT for kind, _, _ in attrs):
        return None, Disposition.MALFORMED  # FINGERPRINT only exists with the cookie: damaged
    if strict:
        return None, Disposition.STRICT_IGNORED
    head = data[4:20]
    unknown = _unknown(data, attrs)
    if unknown:
        return _message(b"\x01\x11", head, _error_420(unknown, True)), Disposition.UNKNOWN_ATTRIBUTE
    addr = _unmapped(ip)
    family = b"\x00\x01" if len(addr) == 4 else b"\x00\x02"
    mapped = (b"\x00\x01" + (4 + len(addr)).to_bytes(2, "big") + family + port.to_bytes(2, "big")
              + addr)
    return _message(b"\x01\x01", head, mapped), Disposition.SUCCESS
