"""DERP framing (spec §2): encoders against the §2.5 hex vectors, decoders, FrameReader."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, strategies as st

from derper.proto import wire
from derper.proto.wire import FrameReader, FrameType, PeerGoneReason, PeerPresent, ProtocolError
from tests.fuzzing import fuzz

K = bytes.fromhex("50d20b455ecf12bc453f83c2cfdb2a24925d06cf2598dcaa54e91af82ce9f765")
S = bytes.fromhex("358072d6365880d1aeea329adf9121383851ed21a28e3b75e965d0d2cd166254")
DISCO = b"TS\xf0\x9f\x92\xac"


def h(text: str) -> bytes:
    """Hex with spaces allowed, ``K``/``S`` standing for the two example keys."""
    return bytes.fromhex(text.replace("K", K.hex()).replace("S", S.hex()))


# ---- encoders -------------------------------------------------------------------------------

@pytest.mark.parametrize("encoded, expected", [
    (wire.server_key(S), "01 00000028 44455250f09f9491 S"),
    (wire.send_packet(S, b"hello"), "04 00000025 S 68656c6c6f"),
    (wire.recv_packet(K, b"hello"), "05 00000025 K 68656c6c6f"),
    (wire.KEEP_ALIVE, "06 00000000"),
    (wire.note_preferred(True), "07 00000001 01"),
    (wire.note_preferred(False), "07 00000001 00"),
    (wire.peer_gone(K, PeerGoneReason.NOT_HERE), "08 00000021 K 01"),
    (wire.peer_gone(K, PeerGoneReason.DISCONNECTED), "08 00000021 K 00"),
    (wire.peer_present(K, "198.51.100.7", 41641, wire.PeerPresentFlags.REGULAR),
     "09 00000033 K 00000000000000000000ffffc6336407 a2a9 01"),
    (wire.forward_packet(S, K, b"hi"), "0a 00000042 S K 6869"),
    (wire.WATCH_CONNS, "10 00000000"),
    (wire.close_peer(K), "11 00000020 K"),
    (wire.ping(h("010203040506072a")), "12 00000008 010203040506072a"),
    (wire.pong(h("010203040506072a")), "13 00000008 010203040506072a"),
    (wire.health("duplicate"), "14 00000009 6475706c6963617465"),
    (wire.health(""), "14 00000000"),
    (wire.restarting(1500, 10000), "15 00000008 000005dc 00002710"),
    (wire.header(FrameType.SEND_PACKET, 1024), "04 00000400"),
    (wire.header(FrameType.RECV_PACKET, 0xFFFFFFFF), "05 ffffffff"),
    (wire.frame(FrameType.CLIENT_INFO, b"\xaa"), "02 00000001 aa"),
])
def test_encoder_matches_spec_vector(encoded, expected):
    assert encoded == h(expected)


@pytest.mark.parametrize("ip, port, flags, ip16", [
    ("2001:db8::1", 1, wire.PeerPresentFlags.MESH | wire.PeerPresentFlags.PROBER,
     "20010db8000000000000000000000001"),
    (None, 0, wire.PeerPresentFlags.NOT_IDEAL, "00" * 16),
    ("::ffff:192.0.2.1", 65535, 1, "00000000000000000000ffffc0000201"),
])
def test_peer_present_address_forms(ip, port, flags, ip16):
    assert wire.peer_present(K, ip, port, flags) == (
        h(f"09 00000033 K {ip16}") + port.to_bytes(2, "big") + bytes((flags,)))


@pytest.mark.parametrize("encode", [
    lambda p: wire.send_packet(S, p),
    lambda p: wire.recv_packet(K, p),
    lambda p: wire.forward_packet(S, K, p),
], ids=["send", "recv", "forward"])
def test_packet_encoders_enforce_64k_limit(encode):
    frame = encode(bytes(wire.MAX_PACKET_SIZE))
    assert int.from_bytes(frame[1:5], "big") == len(frame) - 5
    with pytest.raises(ValueError):
        encode(bytes(wire.MAX_PACKET_SIZE + 1))


# ---- decoders -------------------------------------------------------------------------------

@pytest.mark.parametrize("payload, expected", [
    (h("K 00000000000000000000ffffc6336407 a2a9 01"), PeerPresent(K, "198.51.100.7", 41641, 1)),
    (h("K 20010db8000000000000000000000001 0001 06"), PeerPresent(K, "2001:db8::1", 1, 6)),
    (h("K 00000000000000000000000000000000 0000 08"), PeerPresent(K, None, 0, 8)),
    (h("K 00000000000000000000ffffc6336407 a2a9"), PeerPresent(K, "198.51.100.7", 41641, 0)),
    (h("K"), PeerPresent(K, None, 0, 0)),
    (h("K 0000000000"), PeerPresent(K, None, 0, 0)),  # too short for ip+port: old form
    (h("K 00000000000000000000ffffc6336407 a2a9 02 ffeeddcc"),  # future, longer
     PeerPresent(K, "198.51.100.7", 41641, 2)),
], ids=["51-v4mapped", "51-v6", "51-zero-ip", "50-no-flags", "32-old", "37", "55-future"])
def test_parse_peer_present(payload, expected):
    assert wire.parse_peer_present(payload) == expected


@pytest.mark.parametrize("ip", ["192.0.2", "not an address", "2001:db8::g", "192.0.2.1.5"])
def test_peer_present_refuses_what_is_no_address(ip):
    """IPv4 goes through a fast path of its own, the rest through ``ipaddress``: both
    refuse alike."""
    with pytest.raises(ValueError):
        wire.peer_present(K, ip, 1, 1)


@given(st.one_of(
    st.lists(st.integers(0, 300).map(str) | st.sampled_from(["00", "01", "007", "", "+1", "１"]),
             min_size=3, max_size=5).map(".".join),
    st.text(alphabet="0123456789.:abcdef ", min_size=1, max_size=20)))  # "": no address
def test_peer_present_reads_addresses_as_ipaddress_does(ip):
    """IPv4 has a fast path of its own; what it accepts and encodes is what ``ipaddress``
    would (no leading zeros, no non-ASCII digits, octets up to 255)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        with pytest.raises(ValueError):
            wire.peer_present(K, ip, 1, 1)
        return
    mapped = addr.packed if addr.version == 6 else b"\0" * 10 + b"\xff\xff" + addr.packed
    assert wire.peer_present(K, ip, 1, 1)[5 + 32:5 + 48] == mapped


@pytest.mark.parametrize("ip, port, flags", [("198.51.100.7", 41641, 1), ("2001:db8::1", 3, 15),
                                            (None, 0, 2), ("0.0.0.0", 9, 1)])
def test_peer_present_round_trip(ip, port, flags):
    encoded = wire.peer_present(S, ip, port, flags)
    assert wire.parse_peer_present(encoded[5:]) == PeerPresent(S, ip, port, flags)


@pytest.mark.parametrize("parse", [wire.parse_peer_present, wire.parse_peer_gone],
                         ids=["present", "gone"])
def test_short_key_payloads_are_frame_errors(parse):
    with pytest.raises(ProtocolError):
        parse(K[:31])


@pytest.mark.parametrize("payload, expected", [
    (h("K 01"), (K, PeerGoneReason.NOT_HERE)),
    (h("K 00"), (K, PeerGoneReason.DISCONNECTED)),
    (h("K"), (K, PeerGoneReason.DISCONNECTED)),  # old servers omitted the reason
    (h("K f0"), (K, PeerGoneReason.MESH_CONN_BROKE)),
])
def test_parse_peer_gone(payload, expected):
    key, reason = wire.parse_peer_gone(payload)
    assert (key, reason) == expected
    assert type(key) is bytes


def test_parse_restarting():
    assert wire.parse_restarting(h("000005dc 00002710")) == (1500, 10000)
    assert wire.parse_restarting(h("000005dc 00002710 ff")) == (1500, 10000)
    with pytest.raises(ProtocolError):
        wire.parse_restarting(h("000005dc 000027"))


def test_parse_server_key():
    assert wire.parse_server_key(wire.server_key(S)[5:]) == S
    assert wire.parse_server_key(wire.server_key(S)[5:] + b"future") == S
    with pytest.raises(ProtocolError):
        wire.parse_server_key(wire.server_key(S)[5:44])  # one byte short
    with pytest.raises(ProtocolError):
        wire.parse_server_key(b"DERP\xf0\x9f\x94\x92" + S)  # wrong magic


@pytest.mark.parametrize("buf, start, end, expected", [
    (DISCO + bytes(56), 0, None, True),
    (DISCO + bytes(55), 0, None, False),  # 61 bytes: too short
    (b"TS\xf0\x9f\x92\xad" + bytes(56), 0, None, False),
    (bytes(37) + DISCO + bytes(56), 37, None, True),
    (bytes(37) + DISCO + bytes(56) + bytes(10), 37, 37 + 61, False),
    (bytes(37) + DISCO + bytes(56), 36, None, False),
])
def test_is_disco(buf, start, end, expected):
    assert wire.is_disco(buf, start, end) is expected


# ---- FrameReader ----------------------------------------------------------------------------

LIMITS = {FrameType.SEND_PACKET: 100, FrameType.PING: 8, FrameType.WATCH_CONNS: 0}


def drain(reader: FrameReader) -> list[tuple[int, bytes]]:
    out = []
    while (f := reader.next()) is not None:
        ftype, start, end = f
        out.append((ftype, reader.data[start:end]))
    return out


def test_reader_returns_offsets_into_data():
    r = FrameReader(LIMITS)
    r.feed(wire.ping(b"12345678") + wire.WATCH_CONNS)
    ftype, start, end = r.next()
    assert (ftype, r.data[start:end]) == (FrameType.PING, b"12345678")
    assert r.next()[0] == FrameType.WATCH_CONNS
    assert r.next() is None
    assert r.buffered == 0


def test_reader_waits_for_header_and_payload():
    r = FrameReader(LIMITS)
    stream = wire.ping(b"abcdefgh")
    r.feed(stream[:4])
    assert r.next() is None
    assert r.peek_type() == FrameType.PING
    r.feed(stream[4:9])
    assert r.next() is None
    assert r.buffered == 9
    r.feed(stream[9:])
    assert drain(r) == [(FrameType.PING, b"abcdefgh")]


def test_peek_type_of_empty_reader_is_none():
    assert FrameReader(LIMITS).peek_type() is None


@pytest.mark.parametrize("ftype, length", [(FrameType.PING, 9), (FrameType.WATCH_CONNS, 1),
                                           (FrameType.SEND_PACKET, 101)])
def test_over_limit_is_error_as_soon_as_header_arrives(ftype, length):
    r = FrameReader(LIMITS)
    r.feed(wire.header(ftype, length))
    with pytest.raises(ProtocolError, match=str(length)):
        r.next()


def test_frame_at_limit_is_accepted():
    r = FrameReader(LIMITS)
    r.feed(wire.frame(FrameType.SEND_PACKET, bytes(100)))
    assert drain(r) == [(FrameType.SEND_PACKET, bytes(100))]


def test_unknown_types_use_default_limit_even_when_skipped():
    r = FrameReader(LIMITS, default_limit=10)
    r.feed(wire.frame(0x42, bytes(10)) + wire.ping(bytes(8)))
    assert drain(r) == [(FrameType.PING, bytes(8))]
    r.feed(wire.header(0x42, 11))
    with pytest.raises(ProtocolError):
        r.next()


def test_unwanted_frames_are_skipped_without_buffering():
    r = FrameReader(LIMITS, default_limit=1 << 20, wanted={FrameType.PING})
    big = 1 << 20
    r.feed(wire.header(FrameType.KEEP_ALIVE, big) + bytes(100))
    assert r.next() is None
    assert r.buffered == 0
    sent = 100
    while sent < big:
        chunk = bytes(min(4096, big - sent))
        r.feed(chunk)
        sent += len(chunk)
        assert r.next() is None
        assert len(r.data) == 0
    r.feed(wire.ping(b"after!!!"))
    assert drain(r) == [(FrameType.PING, b"after!!!")]


def test_skip_ends_inside_a_chunk():
    r = FrameReader(LIMITS, wanted={FrameType.PING})
    skipped = wire.frame(FrameType.SEND_PACKET, bytes(range(50)))
    r.feed(skipped[:10])
    assert r.next() is None
    r.feed(skipped[10:] + wire.ping(b"ABCDEFGH"))
    assert drain(r) == [(FrameType.PING, b"ABCDEFGH")]


def test_want_changes_returned_types():
    r = FrameReader(LIMITS, wanted={FrameType.PING})
    r.feed(wire.WATCH_CONNS + wire.ping(bytes(8)))
    assert drain(r) == [(FrameType.PING, bytes(8))]
    r.want({FrameType.WATCH_CONNS})
    r.feed(wire.ping(bytes(8)) + wire.WATCH_CONNS)
    assert drain(r) == [(FrameType.WATCH_CONNS, b"")]


def test_wanted_defaults_to_limit_keys():
    r = FrameReader({FrameType.PING: 8})
    r.feed(wire.KEEP_ALIVE + wire.ping(bytes(8)))
    assert drain(r) == [(FrameType.PING, bytes(8))]


# ---- properties -----------------------------------------------------------------------------

WANTED = {FrameType.SEND_PACKET, FrameType.PING, FrameType.WATCH_CONNS}
frames_st = st.lists(st.tuples(
    st.sampled_from([FrameType.SEND_PACKET, FrameType.PING, FrameType.WATCH_CONNS,
                     FrameType.KEEP_ALIVE, FrameType.HEALTH, 0x77]),
    st.binary(max_size=200)), max_size=20)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0] + points, points + [len(data)])]


@fuzz(300)
@given(frames=frames_st, cuts=st.lists(st.integers(min_value=0), max_size=30))
def test_any_split_of_a_valid_stream_yields_the_wanted_frames(frames, cuts):
    limits = {t: 200 for t in WANTED}
    stream = b"".join(wire.frame(t, p) for t, p in frames)
    r = FrameReader(limits, default_limit=200, wanted=WANTED)
    got = []
    for chunk in split(stream, cuts):
        r.feed(chunk)
        got.extend(drain(r))
    assert got == [(t, p) for t, p in frames if t in WANTED]
    assert r.buffered == 0


@fuzz(300)
@given(garbage=st.binary(max_size=400), cuts=st.lists(st.integers(min_value=0), max_size=10),
       wanted=st.sets(st.integers(0, 255), max_size=5))
def test_garbage_raises_only_frame_error(garbage, cuts, wanted):
    r = FrameReader({t: 64 for t in wanted}, default_limit=128, wanted=wanted)
    try:
        for chunk in split(garbage, cuts):
            r.feed(chunk)
            for ftype, payload in drain(r):
                assert ftype in wanted and len(payload) <= 64
    except ProtocolError:
        pass
