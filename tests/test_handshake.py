"""The sealed handshake frames (spec §3): §3.7 byte-exact vector, ClientInfo JSON rules (§3.3)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, strategies as st
from nacl.bindings import crypto_box

from derper.proto import handshake, wire
from derper.proto.handshake import ClientInfo, HandshakeError, ServerInfo
from derper.proto.keys import KeyPair
from tests.fuzzing import fuzz

CLIENT_PRIV = bytes.fromhex("40ab1b58e9076c7a4d9d07291f5edf9d1aa017eb949624ba683317f48a640369")
CLIENT_PUB = bytes.fromhex("50d20b455ecf12bc453f83c2cfdb2a24925d06cf2598dcaa54e91af82ce9f765")
SERVER_PRIV = bytes.fromhex("202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e7f")
SERVER_PUB = bytes.fromhex("358072d6365880d1aeea329adf9121383851ed21a28e3b75e965d0d2cd166254")
CLIENT_NONCE = bytes(range(0x00, 0x18))
SERVER_NONCE = bytes(range(0x80, 0x98))

CLIENT_INFO_FRAME = bytes.fromhex(
    "02 00000068"
    "50d20b455ecf12bc453f83c2cfdb2a24925d06cf2598dcaa54e91af82ce9f765"
    "000102030405060708090a0b0c0d0e0f1011121314151617"
    "1037c1659912af8b1663c9d8aefab5db"
    "08bd3c98ba229ae706abd011c17aff26d97ac47bb6ffd411d87da243141fc4fc")
SERVER_INFO_FRAME = bytes.fromhex(
    "03 00000035"
    "808182838485868788898a8b8c8d8e8f9091929394959697"
    "76a5beeb1195ef2c222c62448901b2a9"
    "4dc4acd8df07b507e4cc15b83a")

MESH_HEX = "6d529e9d4ef632d22d4a4214cb49da8f1ba1b72697061fb24e312984c35ec8d8"
MESH = bytes.fromhex(MESH_HEX)


def sealed_client_info(plaintext: bytes, server_pub: bytes = SERVER_PUB) -> bytes:
    """A ClientInfo payload (key ‖ nonce ‖ box) from the vector client to ``server_pub``."""
    return CLIENT_PUB + CLIENT_NONCE + crypto_box(plaintext, CLIENT_NONCE, server_pub, CLIENT_PRIV)


def decode(obj_or_text) -> ClientInfo:
    text = obj_or_text if isinstance(obj_or_text, str) else json.dumps(obj_or_text)
    return handshake.open_client_info(sealed_client_info(text.encode()), SERVER_PRIV)


# ---- §3.7 vector ----------------------------------------------------------------------------

def test_vector_keys():
    assert KeyPair(SERVER_PRIV).public == SERVER_PUB
    assert KeyPair(CLIENT_PRIV).public == CLIENT_PUB


def test_client_info_frame_matches_vector():
    info = handshake.client_info_json(version=2, can_ack_pings=True)
    assert info == b'{"version":2,"CanAckPings":true}'
    assert handshake.client_info_frame(CLIENT_PRIV, CLIENT_PUB, SERVER_PUB, info,
                                       nonce=CLIENT_NONCE) == CLIENT_INFO_FRAME


def test_server_info_frame_matches_vector():
    assert handshake.server_info_frame(CLIENT_PUB, SERVER_PRIV,
                                       nonce=SERVER_NONCE) == SERVER_INFO_FRAME


def test_server_info_sealed_with_the_client_info_box_key_matches_vector():
    info = handshake.open_client_info(CLIENT_INFO_FRAME[5:], SERVER_PRIV)
    assert len(info.box_key) == 32
    assert handshake.server_info_frame(b"unused", b"unused", nonce=SERVER_NONCE,
                                       box_key=info.box_key) == SERVER_INFO_FRAME


def test_open_client_info_vector():
    assert handshake.open_client_info(CLIENT_INFO_FRAME[5:], SERVER_PRIV) == ClientInfo(
        key=CLIENT_PUB, version=2, can_ack_pings=True, is_prober=False, mesh_key=None,
        app_name="")


def test_open_server_info_vector():
    assert handshake.open_server_info(SERVER_INFO_FRAME[5:], CLIENT_PRIV,
                                      SERVER_PUB) == ServerInfo(version=2)


def test_random_nonces_differ_and_open():
    a = handshake.server_info_frame(CLIENT_PUB, SERVER_PRIV)
    b = handshake.server_info_frame(CLIENT_PUB, SERVER_PRIV)
    assert a[5:29] != b[5:29]
    assert len(a) == 5 + 24 + 16 + len(b'{"version":2}')
    assert handshake.open_server_info(a[5:], CLIENT_PRIV, SERVER_PUB) == ServerInfo(version=2)
    frame = handshake.client_info_frame(CLIENT_PRIV, CLIENT_PUB, SERVER_PUB, b"{}")
    assert len(frame) == 5 + 32 + 24 + 16 + 2
    assert handshake.open_client_info(frame[5:], SERVER_PRIV) == ClientInfo(key=CLIENT_PUB)


# ---- client_info_json: Go's marshalling ------------------------------------------------------

@pytest.mark.parametrize("kwargs, expected", [
    (dict(can_ack_pings=True), '{"version":2,"CanAckPings":true}'),  # tailscaled
    (dict(is_prober=True), '{"version":2,"CanAckPings":false,"IsProber":true}'),  # derpprobe
    (dict(mesh_key=MESH), '{"meshKey":"%s","version":2,"CanAckPings":false}' % MESH_HEX),
    (dict(mesh_key=MESH, is_prober=True, can_ack_pings=True, app_name="x"),
     '{"meshKey":"%s","version":2,"CanAckPings":true,"IsProber":true,"AppName":"x"}'
     % MESH_HEX),
    (dict(mesh_key=bytes(32)), '{"version":2,"CanAckPings":false}'),  # zero key omitted
    (dict(version=0), '{"CanAckPings":false}'),
    (dict(version=7, app_name="derpprobe"), '{"version":7,"CanAckPings":false,"AppName":"derpprobe"}'),
    (dict(app_name='a"b\\c\n'), '{"version":2,"CanAckPings":false,"AppName":"a\\"b\\\\c\\n"}'),
    pytest.param(dict(app_name="a<b>&c"),
                 '{"version":2,"CanAckPings":false,"AppName":"a\\u003cb\\u003e\\u0026c"}'),
    pytest.param(dict(app_name="café"),
                 '{"version":2,"CanAckPings":false,"AppName":"café"}'),
])
def test_client_info_json_like_go(kwargs, expected):
    assert handshake.client_info_json(**kwargs) == expected.encode()


# ---- open_client_info: decoding rules ---------------------------------------------------------

@pytest.mark.parametrize("payload, expected", [
    ({}, ClientInfo(CLIENT_PUB)),
    ({"Version": 5, "MeshKey": MESH_HEX}, ClientInfo(CLIENT_PUB, version=5, mesh_key=MESH)),
    ({"version": 5, "meshKey": MESH_HEX}, ClientInfo(CLIENT_PUB, version=5, mesh_key=MESH)),
    ({"meshKey": MESH_HEX.upper()}, ClientInfo(CLIENT_PUB, mesh_key=MESH)),
    ({"VERSION": 2, "canackpings": True, "ISPROBER": True, "appname": "x"},
     ClientInfo(CLIENT_PUB, version=2, can_ack_pings=True, is_prober=True, app_name="x")),
    ({"version": 2, "Unknown": [1, {"a": None}], "TokenBucketBytesPerSecond": 5},
     ClientInfo(CLIENT_PUB, version=2)),
    ({"version": None, "meshKey": None, "CanAckPings": None, "AppName": None},
     ClientInfo(CLIENT_PUB)),
    ({"version": -1, "AppName": ""}, ClientInfo(CLIENT_PUB, version=-1)),
])
def test_client_info_decoding(payload, expected):
    assert decode(payload) == expected


def test_duplicate_keys_last_match_wins():
    assert decode('{"version":1,"Version":3}').version == 3
    assert decode('{"CanAckPings":true,"canackpings":false}').can_ack_pings is False


@pytest.mark.parametrize("payload", [
    {"version": 5, "meshKey": "abcdefg"},  # too short (Go TestClientInfoUnmarshal)
    {"version": 5, "meshKey": "f" * 68},  # too long
    {"meshKey": "f" * 63},
    {"meshKey": "zz" * 32},  # 64 chars, not hex
    {"meshKey": ""},
    {"meshKey": 12},
    {"meshKey": ["00" * 32]},
    {"version": "2"},
    {"version": True},
    {"version": 2.5},
    {"CanAckPings": 1},
    {"IsProber": "true"},
    {"AppName": 5},
    {"meshKey": "00" * 15 + "  " + "00" * 16},  # 64 characters, but not 64 hex digits
    {"meshKey": " " + MESH_HEX},
])
def test_invalid_client_info_fields(payload):
    with pytest.raises(HandshakeError):
        decode(payload)


@pytest.mark.parametrize("text", ['[]', '"x"', '5', 'null', '{', '{"version":2}garbage', ''])
def test_non_object_or_invalid_json(text):
    with pytest.raises(HandshakeError):
        decode(text)


def test_invalid_utf8():
    with pytest.raises(HandshakeError):
        handshake.open_client_info(sealed_client_info(b'{"AppName":"\xff"}'), SERVER_PRIV)


def test_deeply_nested_json_is_handshake_error():
    with pytest.raises(HandshakeError):
        decode('{"x":' + "[" * 100_000 + "]" * 100_000 + "}")


def test_box_for_another_server_is_rejected():
    other = KeyPair.generate()
    with pytest.raises(HandshakeError, match="decrypt"):
        handshake.open_client_info(sealed_client_info(b"{}", other.public), SERVER_PRIV)


@pytest.mark.parametrize("offset", [32, 32 + 24, len(CLIENT_INFO_FRAME) - 6])
def test_tampered_client_info_is_rejected(offset):
    payload = bytearray(CLIENT_INFO_FRAME[5:])
    payload[offset] ^= 1
    with pytest.raises(HandshakeError):
        handshake.open_client_info(bytes(payload), SERVER_PRIV)


@pytest.mark.parametrize("payload", [
    b"",
    CLIENT_PUB + CLIENT_NONCE[:23],  # 55 bytes
    CLIENT_PUB + CLIENT_NONCE,  # 56 bytes: no box at all
    CLIENT_PUB + CLIENT_NONCE + bytes(15),  # shorter than a Poly1305 tag
    CLIENT_PUB + CLIENT_NONCE + bytes(wire.CLIENT_INFO_MAX),  # over 256 KiB
    bytes(32) + CLIENT_INFO_FRAME[5 + 32:],  # all-zero client key
    b"\x01" + bytes(31) + CLIENT_INFO_FRAME[5 + 32:],  # a low-order point: no shared key
], ids=["empty", "55", "56", "short-box", "too-long", "zero-key", "low-order-key"])
def test_bad_client_info_payloads(payload):
    with pytest.raises(HandshakeError):
        handshake.open_client_info(payload, SERVER_PRIV)


def test_client_info_at_max_length_is_decoded():
    pad = " " * (wire.CLIENT_INFO_MAX - 32 - 24 - 16 - 2)
    payload = sealed_client_info(("{" + pad + "}").encode())
    assert len(payload) == wire.CLIENT_INFO_MAX
    assert handshake.open_client_info(payload, SERVER_PRIV) == ClientInfo(CLIENT_PUB)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=70),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=4),
    max_leaves=20)
client_info_keys = st.sampled_from(["version", "Version", "meshKey", "MESHKEY", "CanAckPings",
                                    "isprober", "AppName", "other"])


@fuzz(300)
@given(plaintext=st.one_of(
    st.binary(max_size=300),
    st.dictionaries(client_info_keys, json_values, max_size=6).map(
        lambda d: json.dumps(d).encode()),
    st.dictionaries(client_info_keys, st.text(alphabet="0123456789abcdefABCDEFg \t", min_size=60,
                                              max_size=68), max_size=3).map(
        lambda d: json.dumps(d).encode())))
def test_sealed_client_info_never_raises_other_errors(plaintext):
    try:
        info = handshake.open_client_info(sealed_client_info(plaintext), SERVER_PRIV)
    except HandshakeError:
        return
    assert info.key == CLIENT_PUB
    assert type(info.version) is int and type(info.can_ack_pings) is bool
    assert info.mesh_key is None or len(info.mesh_key) == 32


@fuzz(200)
@given(payload=st.binary(max_size=300))
def test_unsealed_garbage_is_handshake_error(payload):
    with pytest.raises(HandshakeError):
        handshake.open_client_info(payload, SERVER_PRIV)


# ---- mesh key comparison and ServerInfo -----------------------------------------------------

@pytest.mark.parametrize("client, server, expected", [
    (MESH, MESH, True),
    (MESH, bytes(32), False),
    (MESH, None, False),
    (None, MESH, False),
    (bytes(32), bytes(32), False),  # an all-zero key never matches
    (MESH, MESH[:-1] + bytes([MESH[-1] ^ 1]), False),
    (MESH[:31], MESH, False),
])
def test_has_mesh_key(client, server, expected):
    assert ClientInfo(CLIENT_PUB, mesh_key=client).has_mesh_key(server) is expected


def sealed_server_info(plaintext: bytes) -> bytes:
    return SERVER_NONCE + crypto_box(plaintext, SERVER_NONCE, CLIENT_PUB, SERVER_PRIV)


@pytest.mark.parametrize("text, expected", [
    ('{"version":2,"TokenBucketBytesPerSecond":1000,"TokenBucketBytesBurst":5000}',
     ServerInfo(2, 1000, 5000)),
    ('{"VERSION":2,"tokenbucketbytespersecond":7}', ServerInfo(2, 7, 0)),
    ('{}', ServerInfo()),
])
def test_open_server_info(text, expected):
    assert handshake.open_server_info(sealed_server_info(text.encode()), CLIENT_PRIV,
                                      SERVER_PUB) == expected


@pytest.mark.parametrize("payload", [
    sealed_server_info(b"[]"),
    sealed_server_info(b'{"version":"2"}'),
    sealed_server_info(b"{"),
    SERVER_NONCE + bytes(15),
    SERVER_NONCE + bytes(wire.MAX_INFO_LEN + 1),
])
def test_bad_server_info(payload):
    with pytest.raises(HandshakeError):
        handshake.open_server_info(payload, CLIENT_PRIV, SERVER_PUB)


def test_server_info_from_wrong_server_is_rejected():
    with pytest.raises(HandshakeError):
        handshake.open_server_info(SERVER_INFO_FRAME[5:], CLIENT_PRIV, KeyPair.generate().public)
