"""The client half of STUN: Binding requests out, Binding responses in, for ``derper nat``.

Pure, like the server's codec it shares its encoding with. A response is believed only when
every byte of it parses: whatever does not (wrong transaction, bad FINGERPRINT, an address of an
unknown family, an attribute running past the end) is ``None``, never a half-read answer, so a
server answering garbage is a server that did not answer.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from stun.message import (ATTR_CHANGE_REQUEST, ATTR_CHANGED_ADDRESS, ATTR_FINGERPRINT,
                          ATTR_MAPPED_ADDRESS, ATTR_OTHER_ADDRESS, ATTR_RESPONSE_ORIGIN,
                          ATTR_SOURCE_ADDRESS, ATTR_XOR_MAPPED_ADDRESS, COOKIE, encode,
                          fingerprint_ok, walk_attributes)

Address = tuple[str, int]

_XOR_MAPPED_ALIAS = 0x8020  # pre-RFC 5389 servers (Vovida-derived) still send it
_MAPPED_KINDS = (ATTR_XOR_MAPPED_ADDRESS, _XOR_MAPPED_ALIAS, ATTR_MAPPED_ADDRESS)
_ORIGIN_KINDS = (ATTR_RESPONSE_ORIGIN, ATTR_SOURCE_ADDRESS)
_OTHER_KINDS = (ATTR_OTHER_ADDRESS, ATTR_CHANGED_ADDRESS)
_ADDRESS_KINDS = frozenset(_MAPPED_KINDS + _ORIGIN_KINDS + _OTHER_KINDS)


@dataclass(frozen=True)
class Binding:
    """What a Binding success response says: the mapped address, and where an RFC 5780 server
    answered from (``origin``) and where else it listens (``other``), when it says so."""

    mapped: Address
    origin: Address | None = None
    other: Address | None = None


def binding_request(txid: bytes, change: int = 0) -> bytes:
    """An RFC 5389 Binding request with FINGERPRINT; ``change``: CHANGE-REQUEST flags, if any."""
    body = b""
    if change:
        body = struct.pack("!HHI", ATTR_CHANGE_REQUEST, 4, change)
    return encode(b"\x00\x01", COOKIE + txid, body, fingerprint=True)


def is_request(data: bytes, txid: bytes) -> bool:
    """Whether ``data`` is our own Binding request ``txid`` come back (hairpinning)."""
    return data[:2] == b"\x00\x01" and data[4:20] == COOKIE + txid


def parse_response(data: bytes, txid: bytes) -> Binding | int | None:
    """The Binding success response to ``txid`` as a ``Binding``, an error response as its code
    (e.g. 420: the server cannot honour CHANGE-REQUEST), anything else ``None``."""
    if len(data) < 20 or data[4:20] != COOKIE + txid or data[:2] not in (b"\x01\x01", b"\x01\x11"):
        return None
    end = 20 + int.from_bytes(data[2:4], "big")
    attrs = walk_attributes(data, end) if end <= len(data) and not end & 3 else None
    if attrs is None:
        return None
    found: dict[int, Address] = {}
    error = None
    for i, (kind, at, length) in enumerate(attrs):
        if kind == ATTR_FINGERPRINT and (i != len(attrs) - 1 or length != 4
                                         or not fingerprint_ok(data, at - 4)):
            return None
        if kind == 0x0009 and length >= 4:  # ERROR-CODE
            error = data[at + 2] % 8 * 100 + data[at + 3]
        if kind in _ADDRESS_KINDS and kind not in found:
            address = _address(data[at:at + length], txid if kind != ATTR_MAPPED_ADDRESS
                               and kind in _MAPPED_KINDS else None)
            if address is None:
                return None
            found[kind] = address
    if data[:2] == b"\x01\x11":
        return error if error is not None and 300 <= error <= 699 else None
    mapped = next((found[k] for k in _MAPPED_KINDS if k in found), None)
    if mapped is None:
        return None
    return Binding(mapped, next((found[k] for k in _ORIGIN_KINDS if k in found), None),
                   next((found[k] for k in _OTHER_KINDS if k in found), None))


def _address(value: bytes, txid: bytes | None) -> Address | None:
    """An address attribute's value; XORed with the cookie (and ``txid``) if ``txid`` is given."""
    if len(value) not in (8, 20) or value[1] != (1 if len(value) == 8 else 2):
        return None
    port = int.from_bytes(value[2:4], "big")
    raw = int.from_bytes(value[4:], "big")
    if txid is not None:
        port ^= 0x2112
        raw ^= int.from_bytes((COOKIE + txid)[:len(value) - 4], "big")
    ip = ipaddress.ip_address(raw if len(value) == 8 else raw.to_bytes(16, "big"))
    return str(ip), port
