"""The STUN codec against the spec's Go-verified vectors, generic requests, junk and a fuzzer.

aioice's STUN parser is the independent decoder for generic replies.
"""

from __future__ import annotations

import struct
import zlib

import pytest
from aioice import stun as aioice_stun
from hypothesis import example, given, strategies as st

from stun.message import MAX_GROWTH, MAX_REQUEST_SIZE, Disposition, respond, tailscale_request
from tests.fuzzing import fuzz

# derp-protocol.md §7.4
TS_REQUEST = bytes.fromhex(
    "000100142112a442000102030405060708090a0b802200087461696c6e6f6465802800048aabad90")
VECTORS = [
    (TS_REQUEST, "192.0.2.1", 1025,
     "0101000c2112a442000102030405060708090a0b0020000800012513e112a643"),
    (TS_REQUEST, "2001:db8::1", 1025,
     "010100182112a442000102030405060708090a0b00200014000225130113a9fa000102030405060708090a0a"),
    (TS_REQUEST, "::ffff:192.0.2.1", 1025,  # as Go dual-stack sends it
     "010100182112a442000102030405060708090a0b00200014000225132112a442000102030405f9f8c809080a"),
    (bytes.fromhex(
        "000100142112a442010101010101010101010101802200087461696c6e6f646580280004355f9b89"),
     "1.2.3.4", 254, "0101000c2112a44201010101010101010101010100200008000121ec2010a746"),
    (bytes.fromhex(
        "000100142112a442030303030303030303030303802200087461696c6e6f6465802800040ae022bf"),
     "1::4", 254,
     "010100182112a44203030303030303030303030300200014000221ec2113a442030303030303030303030307"),
]
TXID = bytes(range(12))
CLASSIC_ID = bytes(range(1, 17))
CHANGE_NOTHING = (0x0003, b"\x00\x00\x00\x00")


def fingerprinted(msg: bytes) -> bytes:
    """``msg`` with its length field grown by 8 and a FINGERPRINT appended (RFC 5389 §15.5)."""
    msg = msg[:2] + (len(msg) - 12).to_bytes(2, "big") + msg[4:]
    return msg + b"\x80\x28\x00\x04" + (zlib.crc32(msg) ^ 0x5354554E).to_bytes(4, "big")


def request(*attrs: tuple[int, bytes], head: bytes = b"\x21\x12\xa4\x42" + TXID,
            kind: int = 1) -> bytes:
    body = b"".join(struct.pack("!HH", t, len(v)) + v + b"\x00" * (-len(v) & 3) for t, v in attrs)
    return struct.pack("!HH", kind, len(body)) + head + body


# SOFTWARE (comprehension-optional, ignored): makes a request as large as the 420 it draws.
PAD = (0x8022, b"x" * 40)


def with_length(msg: bytes, length: int) -> bytes:
    return msg[:2] + length.to_bytes(2, "big") + msg[4:]


@pytest.mark.parametrize(("req", "ip", "port", "want"), VECTORS)
@pytest.mark.parametrize("strict", [False, True])
def test_go_vectors_byte_exact(req, ip, port, want, strict):
    assert respond(req, ip, port, strict=strict) == (bytes.fromhex(want), Disposition.SUCCESS)


def test_vector_requests_are_what_tailscale_sends():
    for req, *_ in VECTORS:
        assert tailscale_request(req[8:20]) == req


def test_tailscale_request_with_wrong_header_length_is_answered_like_go():
    """Go walks attributes to the end of the datagram and never reads the length field."""
    req = with_length(TS_REQUEST, 0)
    req = req[:36] + (zlib.crc32(req[:32]) ^ 0x5354554E).to_bytes(4, "big")
    reply, disposition = respond(req, "192.0.2.1", 1025)
    assert disposition is Disposition.SUCCESS
    assert reply == bytes.fromhex(VECTORS[0][3])


def test_tailscale_request_with_extra_attributes_gets_go_reply():
    """Any attribute order Go accepts: SOFTWARE not first, another attribute before FINGERPRINT."""
    req = fingerprinted(
        request((0x8023, b"xy"), (0x8022, b"tailnode"), (0x0003, b"\x00\x00\x00\x06")))
    reply, disposition = respond(req, "::ffff:192.0.2.1", 1025)
    assert disposition is Disposition.SUCCESS
    assert reply == bytes.fromhex(VECTORS[2][3])


# Generic RFC 5389/8489 clients

@pytest.mark.parametrize(("ip", "want"), [
    ("192.0.2.1", VECTORS[0][3]),
    ("::ffff:192.0.2.1", VECTORS[0][3]),  # v4-mapped: plain IPv4 for generic clients
    ("2001:db8::1", VECTORS[1][3]),
])
def test_bare_binding_request(ip, want):
    reply, disposition = respond(request(), ip, 1025)
    assert (reply.hex(), disposition) == (want, Disposition.SUCCESS)


@pytest.mark.parametrize(("ip", "family_ip"), [
    ("192.0.2.1", "192.0.2.1"), ("::ffff:192.0.2.1", "192.0.2.1"), ("2001:db8::1", "2001:db8::1"),
    ("fe80::1%lo", "fe80::1")])
@pytest.mark.parametrize("software", [None, b"pion/stun v0.6"])
def test_fingerprint_requested_fingerprint_returned(ip, family_ip, software):
    req = fingerprinted(request(*([(0x8022, software)] if software else [])))
    reply, disposition = respond(req, ip, 40000)
    assert disposition is Disposition.SUCCESS
    parsed = aioice_stun.parse_message(reply)  # checks the FINGERPRINT itself
    assert parsed.message_class == aioice_stun.Class.RESPONSE
    assert parsed.transaction_id == TXID
    assert parsed.attributes["XOR-MAPPED-ADDRESS"] == (family_ip, 40000)
    assert list(parsed.attributes) == ["XOR-MAPPED-ADDRESS", "FINGERPRINT"]


def test_software_without_fingerprint_is_a_generic_request():
    reply, disposition = respond(request((0x8022, b"tailnode")), "192.0.2.1", 1025)
    assert (reply.hex(), disposition) == (VECTORS[0][3], Disposition.SUCCESS)


def test_ice_style_check_is_answered():
    msg = aioice_stun.Message(aioice_stun.Method.BINDING, aioice_stun.Class.REQUEST, TXID, {
        "USERNAME": "a:b", "PRIORITY": 1, "ICE-CONTROLLING": 7, "USE-CANDIDATE": None})
    msg.add_message_integrity(b"secret")
    reply, disposition = respond(bytes(msg), "2001:db8::1", 9)
    assert disposition is Disposition.SUCCESS
    assert aioice_stun.parse_message(reply).attributes["XOR-MAPPED-ADDRESS"] == ("2001:db8::1", 9)


@pytest.mark.parametrize(("attrs", "listed"), [
    ([(0x0003, b"\x00\x00\x00\x04")], [0x0003]),  # CHANGE-REQUEST: change IP
    ([(0x0003, b"\x00\x00\x00\x02")], [0x0003]),  # change port
    ([(0x0027, b"\x12\x34\x00\x00")], [0x0027]),  # RESPONSE-PORT
    ([(0x0026, b"")], [0x0026]),                  # PADDING
    ([(0x0002, b"\x00\x01\x00\x35\x7f\x00\x00\x01"), (0x7FFF, b"x"), (0x7FFF, b"y")],
     [0x0002, 0x7FFF]),                           # RESPONSE-ADDRESS + unknown twice: listed once
])
def test_attributes_we_cannot_honour_get_420(attrs, listed):
    reply, disposition = respond(fingerprinted(request(*attrs, PAD)), "192.0.2.1", 1025)
    assert disposition is Disposition.UNKNOWN_ATTRIBUTE
    parsed = aioice_stun.parse_message(reply)
    assert parsed.message_class == aioice_stun.Class.ERROR
    assert parsed.transaction_id == TXID
    assert parsed.attributes["ERROR-CODE"] == (420, "Unknown Attribute")
    assert reply[48:52] == b"\x00\x0a" + (2 * len(listed)).to_bytes(2, "big")  # UNKNOWN-ATTRIBUTES
    assert list(struct.unpack_from(f"!{len(listed)}H", reply, 52)) == listed


@pytest.mark.parametrize("head", [b"\x21\x12\xa4\x42" + TXID, b"\x00" * 16])
def test_a_420_larger_than_its_request_is_not_sent(head):
    """The attack run's 24-byte request with one unknown attribute drew a 56-byte 420: 2.33x
    towards whoever the source address claims to be. Now it draws nothing."""
    req = request((0x7FFF, b""), head=head)
    assert len(req) == 24
    assert respond(req, "192.0.2.1", 1025) == (None, Disposition.UNKNOWN_ATTRIBUTE)


def test_zero_change_request_is_a_no_op():
    reply, disposition = respond(request(CHANGE_NOTHING), "192.0.2.1", 1025)
    assert (reply.hex(), disposition) == (VECTORS[0][3], Disposition.SUCCESS)


# RFC 3489 classic clients (no magic cookie)

def test_classic_request_gets_mapped_address():
    req = request(CHANGE_NOTHING, head=CLASSIC_ID)  # what Debian's `stun` sends
    reply, disposition = respond(req, "::ffff:192.0.2.1", 1025)
    assert disposition is Disposition.SUCCESS
    assert reply.hex() == "0101000c" + CLASSIC_ID.hex() + "00010008" + "00010401" + "c0000201"


def test_classic_request_over_ipv6():
    reply, _ = respond(request(head=CLASSIC_ID), "2001:db8::1", 1025)
    assert reply.hex() == ("01010018" + CLASSIC_ID.hex() + "00010014" + "00020401"
                           + "20010db8000000000000000000000001")


@pytest.mark.parametrize("flags", [b"\x00\x00\x00\x04", b"\x00\x00\x00\x06"])
def test_classic_change_request_gets_420_with_rfc3489_padding(flags):
    reply, disposition = respond(request((0x0003, flags), PAD, head=CLASSIC_ID), "192.0.2.1",
                                 1025)
    assert disposition is Disposition.UNKNOWN_ATTRIBUTE
    assert reply.hex() == ("01110024" + CLASSIC_ID.hex()
                           + "00090015" + "00000414" + b"Unknown Attribute".hex() + "000000"
                           + "000a0004" + "00030003")


def test_classic_response_address_is_refused_not_followed():
    req = request((0x0002, b"\x00\x01\x00\x35\x08\x08\x08\x08"), PAD, head=CLASSIC_ID)
    reply, disposition = respond(req, "192.0.2.1", 1025)
    assert disposition is Disposition.UNKNOWN_ATTRIBUTE
    assert reply[:2] == b"\x01\x11" and b"\x08\x08\x08\x08" not in reply


# Strict mode: only what the Go server answers

@pytest.mark.parametrize("req", [
    request(), fingerprinted(request()), request((0x8022, b"tailnode")),
    request(head=CLASSIC_ID), request((0x0003, b"\x00\x00\x00\x04"))])
def test_strict_ignores_generic_requests(req):
    assert respond(req, "192.0.2.1", 1025, strict=True) == (None, Disposition.STRICT_IGNORED)


# Junk: each kind with its disposition

def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


NOT_STUN, MALFORMED = Disposition.NOT_STUN, Disposition.MALFORMED
NOT_BINDING = Disposition.NOT_BINDING
JUNK = [
    ("empty", b"", NOT_STUN),
    ("short", TS_REQUEST[:19], NOT_STUN),
    ("top bits set", b"\x40" + TS_REQUEST[1:], NOT_STUN),
    ("oversized", request((0x8022, b"x" * MAX_REQUEST_SIZE)), NOT_STUN),
    ("http", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", NOT_STUN),
    ("cookie-less response", request(head=CLASSIC_ID, kind=0x0101), NOT_STUN),
    ("wrong cookie", _flip(TS_REQUEST, 4), MALFORMED),
    ("bad fingerprint", _flip(TS_REQUEST, 39), MALFORMED),
    ("bad software", _flip(TS_REQUEST, 24), MALFORMED),  # then its fingerprint is wrong
    ("trailing bytes", TS_REQUEST + b"\x00\x00", MALFORMED),
    ("length too long", with_length(request(), 4), MALFORMED),
    ("length too short", with_length(request((0x8022, b"abcd")), 4), MALFORMED),
    ("length not multiple of 4", with_length(request(), 2) + b"\x00\x00", MALFORMED),
    ("attribute overrun", with_length(request(), 8) + b"\x80\x22\x00\x08abcd", MALFORMED),
    ("missing padding", with_length(request(), 8) + b"\x80\x22\x00\x05abcd", MALFORMED),
    ("fingerprint not last", request((0x8028, b"\x00\x00\x00\x00"), (0x8022, b"abcd")), MALFORMED),
    ("fingerprint wrong length", request((0x8028, b"\x00\x00")), MALFORMED),
    ("classic with fingerprint", fingerprinted(request(head=CLASSIC_ID)), MALFORMED),
    ("classic bad length", with_length(request(head=CLASSIC_ID), 4), MALFORMED),
    ("binding response", request(kind=0x0101), NOT_BINDING),
    ("binding error", request(kind=0x0111), NOT_BINDING),
    ("binding indication", request(kind=0x0011), NOT_BINDING),
    ("TURN allocate", request((0x0019, b"\x11\x00\x00\x00"), kind=0x0003), NOT_BINDING),
]


@pytest.mark.parametrize(("name", "data", "disposition"), JUNK, ids=[j[0] for j in JUNK])
@pytest.mark.parametrize("strict", [False, True])
def test_junk_is_dropped_with_its_disposition(name, data, disposition, strict):
    assert respond(data, "192.0.2.1", 1025, strict=strict) == (None, disposition)


# Fuzzing

SOURCES = st.sampled_from([
    ("192.0.2.1", 1025), ("2001:db8::1", 65535), ("::ffff:10.0.0.1", 1), ("fe80::2%lo", 3478)])
ATTRIBUTE = st.tuples(
    st.sampled_from([0x0001, 0x0002, 0x0003, 0x0006, 0x0008, 0x0020, 0x0024, 0x0026, 0x0027,
                     0x7FFF, 0x8022, 0x8028, 0xFFFF]),
    st.one_of(st.binary(max_size=12),
              st.sampled_from([b"tailnode", b"\x00\x00\x00\x00", b"\x00\x00\x00\x04"])))


@st.composite
def stunish(draw) -> bytes:
    """Datagrams close enough to STUN to get past the cheap checks, damaged in random ways."""
    cookie = draw(st.sampled_from([b"\x21\x12\xa4\x42", b"\x01\x02\x03\x04"]))
    msg = request(*draw(st.lists(ATTRIBUTE, max_size=6)),
                  head=cookie + draw(st.binary(min_size=12, max_size=12)),
                  kind=draw(st.sampled_from([1, 1, 1, 0x0101, 0x0011])))
    if draw(st.booleans()):
        msg = fingerprinted(msg)
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, len(msg) - 1))
        msg = msg[:at] + bytes([draw(st.integers(0, 255))]) + msg[at + 1:]
    if draw(st.booleans()):
        msg = msg[:draw(st.integers(0, len(msg)))]
    return msg


def _check_reply(data: bytes, src: tuple[str, int], strict: bool) -> None:
    reply, disposition = respond(data, *src, strict=strict)
    assert isinstance(disposition, Disposition)
    if disposition is Disposition.SUCCESS:
        assert reply is not None
    elif disposition is not Disposition.UNKNOWN_ATTRIBUTE:
        assert reply is None
    if reply is None:
        return
    assert len(reply) <= len(data) + MAX_GROWTH
    if disposition is Disposition.UNKNOWN_ATTRIBUTE:
        assert len(reply) <= len(data)  # errors never amplify
    assert reply[4:20] == data[4:20]  # cookie + transaction id (the whole RFC 3489 id)
    assert reply[:2] == (b"\x01\x01" if disposition is Disposition.SUCCESS else b"\x01\x11")
    assert int.from_bytes(reply[2:4], "big") == len(reply) - 20


@given(data=st.binary(max_size=200), src=SOURCES, strict=st.booleans())
@fuzz(1000)
def test_fuzz_arbitrary_bytes(data, src, strict):
    _check_reply(data, src, strict)


@given(data=stunish(), src=SOURCES, strict=st.booleans())
@fuzz(3000)
@example(data=request(), src=("2001:db8::1", 1), strict=False)  # the MAX_GROWTH case
@example(data=request((0x7FFF, b"")), src=("192.0.2.1", 1), strict=False)  # a 420 not sent
def test_fuzz_stun_like(data, src, strict):
    _check_reply(data, src, strict)


def test_every_one_byte_change_of_a_tailscale_request():
    """All 40 × 256 single-byte mutations, exhaustively (found by fuzzing: a SOFTWARE length of
    13 pads over the FINGERPRINT)."""
    src = ("192.0.2.1", 1025)
    for at in range(len(TS_REQUEST)):
        for value in range(256):
            data = TS_REQUEST[:at] + bytes([value]) + TS_REQUEST[at + 1:]
            _check_reply(data, src, False)
            reply, _ = respond(data, *src)
            # FINGERPRINT covers every byte before it and CRC-32 catches any one-byte change,
            # except where the change removes the FINGERPRINT: another type for it, or a
            # SOFTWARE length whose padded value swallows it. Then it is a valid generic request.
            software_end = 24 + (int.from_bytes(data[22:24], "big") + 3) // 4 * 4
            no_fingerprint = at in (32, 33) or (at in (22, 23) and software_end == len(data))
            if data == TS_REQUEST:
                assert reply is not None
            elif reply is not None:  # only a request that lost its FINGERPRINT gets an answer
                assert no_fingerprint, (at, value)


def test_max_growth_is_reached_and_not_exceeded():
    data = request()  # a bare Binding request from IPv6: XOR-MAPPED-ADDRESS of 24 bytes
    reply, _ = respond(data, "2001:db8::1", 1)
    assert len(reply) == len(data) + MAX_GROWTH
