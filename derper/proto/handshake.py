"""The DERP handshake: ServerKey → ClientInfo → ServerInfo (spec §3), both sides, sans-IO.

ClientInfo and ServerInfo are JSON sealed in a NaCl box (X25519 + XSalsa20-Poly1305) between the
client's and the server's static node keys; on the wire a sealed message is
``nonce(24) ‖ tag(16) ‖ ciphertext``. The client's key is authenticated by the box itself.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass, field

from nacl.bindings import crypto_box_afternm, crypto_box_beforenm, crypto_box_open_afternm
from nacl.exceptions import CryptoError

from ..errors import ProtocolError
from . import gojson, wire
from .keys import ZERO_KEY, parse_hex32

NONCE_LEN = wire.NONCE_LEN


class HandshakeError(ProtocolError):
    """The peer's handshake frame is invalid; the message is safe to log."""


@dataclass(frozen=True)
class ClientInfo:
    """What a client tells the server about itself (decoded like Go: case-insensitive keys)."""

    key: bytes
    version: int = 0
    can_ack_pings: bool = False
    is_prober: bool = False
    mesh_key: bytes | None = None
    app_name: str = ""
    # The box's X25519 shared key: ServerInfo is sealed with it instead of a second key
    # agreement (one of the costliest steps of a new connection).
    box_key: bytes = field(default=b"", repr=False, compare=False)

    def has_mesh_key(self, server_mesh_key: bytes | None) -> bool:
        """Constant-time comparison; an absent or all-zero key never matches."""
        if not server_mesh_key or not self.mesh_key or self.mesh_key == bytes(32):
            return False
        return hmac.compare_digest(self.mesh_key, server_mesh_key)


@dataclass(frozen=True)
class ServerInfo:
    version: int = 0
    token_bucket_bytes_per_second: int = 0
    token_bucket_bytes_burst: int = 0


def _box_key(peer_public: bytes, own_private: bytes, what: str) -> bytes:
    try:
        return crypto_box_beforenm(peer_public, own_private)
    except CryptoError:  # a low-order point: no box made with it can open
        raise HandshakeError(f"{what} box does not decrypt with this key") from None


def _seal(plaintext: bytes, box_key: bytes, nonce: bytes | None) -> bytes:
    nonce = nonce if nonce is not None else secrets.token_bytes(NONCE_LEN)
    return nonce + crypto_box_afternm(plaintext, nonce, box_key)


def _open(sealed: bytes, box_key: bytes, what: str) -> bytes:
    if len(sealed) < NONCE_LEN + 16:
        raise HandshakeError(f"{what} box of {len(sealed)} bytes is too short")
    try:
        return crypto_box_open_afternm(bytes(sealed[NONCE_LEN:]), bytes(sealed[:NONCE_LEN]),
                                       box_key)
    except CryptoError:
        raise HandshakeError(f"{what} box does not decrypt with this key") from None


def _json_object(plaintext: bytes, what: str) -> dict:
    try:
        return gojson.load_object(plaintext)
    except ValueError as e:
        raise HandshakeError(f"{what} is {e}") from None


def _field(obj: dict, name: str, kind: type, default, what: str):
    value = obj.get(name.lower())
    if value is None:
        return default
    # bool is a subclass of int in Python but not in Go's JSON.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise HandshakeError(f"{what} field {name!r} has the wrong type")
    return value


# ---- server side ------------------------------------------------------------------------------

def open_client_info(payload: bytes, server_private: bytes) -> ClientInfo:
    """Decode a ClientInfo frame payload: client key ‖ nonce ‖ sealed JSON."""
    if not wire.CLIENT_INFO_MIN <= len(payload) <= wire.CLIENT_INFO_MAX:
        raise HandshakeError(f"ClientInfo of {len(payload)} bytes is outside "
                             f"{wire.CLIENT_INFO_MIN}..{wire.CLIENT_INFO_MAX}")
    key = bytes(payload[:wire.KEY_LEN])
    if key == ZERO_KEY:
        raise HandshakeError("ClientInfo carries the all-zero key")
    box_key = _box_key(key, server_private, "ClientInfo")
    obj = _json_object(_open(payload[wire.KEY_LEN:], box_key, "ClientInfo"), "ClientInfo")
    mesh_text = obj.get("meshkey")
    mesh_key = None
    if mesh_text is not None:
        if not isinstance(mesh_text, str):
            raise HandshakeError("ClientInfo meshKey is not a string")
        try:
            mesh_key = parse_hex32(mesh_text, "ClientInfo meshKey")
        except ValueError as e:
            raise HandshakeError(str(e)) from None
    return ClientInfo(
        key=key,
        version=_field(obj, "version", int, 0, "ClientInfo"),
        can_ack_pings=_field(obj, "CanAckPings", bool, False, "ClientInfo"),
        is_prober=_field(obj, "IsProber", bool, False, "ClientInfo"),
        mesh_key=mesh_key,
        app_name=_field(obj, "AppName", str, "", "ClientInfo"),
        box_key=box_key,
    )


SERVER_INFO_JSON = b'{"version":2}'


def server_info_frame(client_public: bytes, server_private: bytes,
                      nonce: bytes | None = None, *, box_key: bytes = b"") -> bytes:
    """ServerInfo as the Go server sends it: ``{"version":2}``, never a token bucket.

    ``box_key`` (``ClientInfo.box_key``) saves the key agreement with ``client_public``."""
    box_key = box_key or crypto_box_beforenm(client_public, server_private)
    return wire.frame(wire.FrameType.SERVER_INFO, _seal(SERVER_INFO_JSON, box_key, nonce))


# ---- client side ------------------------------------------------------------------------------

def client_info_json(*, mesh_key: bytes | None = None, version: int = wire.PROTOCOL_VERSION,
                     can_ack_pings: bool = False, is_prober: bool = False,
                     app_name: str = "") -> bytes:
    """Marshal ClientInfo exactly as Go does: field order and omitempty rules included."""
    obj: dict = {}
    if mesh_key and mesh_key != bytes(32):
        obj["meshKey"] = mesh_key.hex()
    if version:
        obj["version"] = version
    obj["CanAckPings"] = can_ack_pings
    if is_prober:
        obj["IsProber"] = True
    if app_name:
        obj["AppName"] = app_name
    return gojson.dumps(obj)


def client_info_frame(client_private: bytes, client_public: bytes, server_public: bytes,
                      info_json: bytes, nonce: bytes | None = None) -> bytes:
    return wire.frame(wire.FrameType.CLIENT_INFO,
                      client_public + _seal(info_json, crypto_box_beforenm(server_public,
                                                                           client_private),
                                            nonce))


def open_server_info(payload: bytes, client_private: bytes, server_public: bytes) -> ServerInfo:
    if len(payload) > NONCE_LEN + wire.MAX_INFO_LEN:
        raise HandshakeError(f"ServerInfo of {len(payload)} bytes is too long")
    obj = _json_object(_open(payload, _box_key(server_public, client_private, "ServerInfo"),
                             "ServerInfo"), "ServerInfo")
    return ServerInfo(
        version=_field(obj, "version", int, 0, "ServerInfo"),
        token_bucket_bytes_per_second=_field(obj, "TokenBucketBytesPerSecond", int, 0,
                                             "ServerInfo"),
        token_bucket_bytes_burst=_field(obj, "TokenBucketBytesBurst", int, 0, "ServerInfo"),
    )
