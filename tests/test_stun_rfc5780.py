"""RFC 5780 in the codec: which socket answers, what it says, and how large replies can get.

The client codec (``stun.client``) reads the server's replies and aioice checks them too.
"""

from __future__ import annotations

import pytest
from aioice import stun as aioice_stun
from hypothesis import given, settings, strategies as st

from derper.errors import ConfigError
from stun.client import Binding, binding_request, is_request, parse_response
from stun.message import (CHANGE_IP, CHANGE_PORT, MAX_GROWTH, MAX_GROWTH_RFC5780, Disposition,
                          Layout, answer, check_alternates, respond, tailscale_request)
from tests.test_stun_message import CLASSIC_ID, TXID, fingerprinted, request

FOUR = Layout(("203.0.113.1", "203.0.113.2"), (3478, 3479))
TWO = Layout(("2001:db8::1",), (3478, 3479))
ADDRESSES = {0: ("203.0.113.1", 3478), 1: ("203.0.113.1", 3479), 2: ("203.0.113.2", 3478),
             3: ("203.0.113.2", 3479)}


@pytest.mark.parametrize("at", range(4))
@pytest.mark.parametrize(("change", "flip"), [(0, 0), (CHANGE_PORT, 1), (CHANGE_IP, 2),
                                              (CHANGE_IP | CHANGE_PORT, 3)])
def test_change_request_is_answered_from_the_other_socket(at, change, flip):
    reply, disposition, via = answer(binding_request(TXID, change), "198.51.100.9", 40000,
                                     layout=FOUR, at=at)
    assert (disposition, via) == (Disposition.SUCCESS, at ^ flip)
    assert parse_response(reply, TXID) == Binding(("198.51.100.9", 40000), ADDRESSES[at ^ flip],
                                                  ADDRESSES[at ^ 3])
    attrs = aioice_stun.parse_message(reply).attributes  # checks the FINGERPRINT too
    assert attrs["OTHER-ADDRESS"] == ADDRESSES[at ^ 3]
    assert attrs["RESPONSE-ORIGIN"] == ADDRESSES[at ^ flip]


def test_one_ip_changes_only_the_port_and_refuses_change_ip():
    reply, _, via = answer(binding_request(TXID, CHANGE_PORT), "2001:db8::9", 5, layout=TWO)
    assert via == 1
    assert parse_response(reply, TXID) == Binding(("2001:db8::9", 5), ("2001:db8::1", 3479),
                                                  ("2001:db8::1", 3479))
    # A 420 would be larger than this request, so there is no reply at all.
    for flags in (CHANGE_IP, CHANGE_IP | CHANGE_PORT):
        assert answer(binding_request(TXID, flags), "2001:db8::9", 5, layout=TWO) == (
            None, Disposition.UNKNOWN_ATTRIBUTE, 0)


def test_error_is_sent_when_no_larger_than_the_request():
    req = fingerprinted(request((0x0027, b"\x12\x34\x00\x00"), (0x8022, b"x" * 40)))
    reply, disposition, via = answer(req, "198.51.100.9", 1, layout=FOUR, at=2)
    assert (disposition, via) == (Disposition.UNKNOWN_ATTRIBUTE, 2)
    assert len(reply) <= len(req) and parse_response(reply, TXID) == 420


def test_classic_clients_get_rfc3489_names_for_the_same_addresses():
    req = request((0x0003, CHANGE_PORT.to_bytes(4, "big")), head=CLASSIC_ID)
    reply, disposition, via = answer(req, "::ffff:198.51.100.9", 7, layout=FOUR, at=0)
    assert (disposition, via) == (Disposition.SUCCESS, 1)
    assert reply.hex() == ("01010024" + CLASSIC_ID.hex() + "000100080001" + "0007c6336409"
                           + "000400080001" + "0d97cb007101"  # SOURCE-ADDRESS 203.0.113.1:3479
                           + "000500080001" + "0d97cb007102")  # CHANGED-ADDRESS 203.0.113.2:3479


def test_tailscale_is_answered_as_by_go_from_the_socket_it_reached():
    req = tailscale_request(TXID)
    for at in range(4):
        assert answer(req, "192.0.2.1", 1025, layout=FOUR, at=at) == (
            *respond(req, "192.0.2.1", 1025), at)


def test_without_a_layout_change_requests_get_420_when_it_does_not_amplify():
    assert respond(binding_request(TXID, CHANGE_PORT), "192.0.2.1", 1) == (
        None, Disposition.UNKNOWN_ATTRIBUTE)  # the 420 would be larger than the request
    req = fingerprinted(request((0x0003, CHANGE_PORT.to_bytes(4, "big")), (0x8022, b"x" * 40)))
    reply, disposition = respond(req, "192.0.2.1", 1)
    assert disposition is Disposition.UNKNOWN_ATTRIBUTE and parse_response(reply, TXID) == 420


# Amplification: the largest reply/request size ratio per kind of request (README, "Why are my
# devices relayed?"). The smallest request of each kind gets the largest reply.
V4, V6 = ("192.0.2.1", 1), ("2001:db8::1", 1)
RATIOS = [  # (kind, request, source, layout, reply size, request size)
    ("Tailscale", tailscale_request(TXID), V6, None, 44, 40),
    ("Tailscale, RFC 5780 on", tailscale_request(TXID), V6, TWO, 44, 40),
    ("RFC 5389", request(), V6, None, 44, 20),
    ("RFC 5389, RFC 5780 on", request(), V6, TWO, 92, 20),
    ("RFC 5389 IPv4, RFC 5780 on", request(), V4, FOUR, 56, 20),
    ("RFC 3489", request(head=CLASSIC_ID), V6, None, 44, 20),
    ("RFC 3489, RFC 5780 on", request(head=CLASSIC_ID), V6, TWO, 92, 20),
    ("420", request((0x7FFF, b"x" * 32)), V4, None, 56, 56),
    ("420, RFC 5780 on", request((0x7FFF, b"x" * 32)), V4, FOUR, 56, 56),
]


@pytest.mark.parametrize(("kind", "req", "src", "layout", "reply_size", "request_size"), RATIOS,
                         ids=[r[0] for r in RATIOS])
def test_amplification_ratio(kind, req, src, layout, reply_size, request_size):
    reply, _, _ = answer(req, *src, layout=layout)
    assert (len(reply), len(req)) == (reply_size, request_size)
    # Documented: at most 1.1 for Tailscale, 2.2 (4.6 with RFC 5780 on, IPv6) for generic
    # replies, and 1.0 for an error in either mode (a larger 420 is not sent).


SOURCES = st.sampled_from([("192.0.2.1", 1), ("::ffff:192.0.2.1", 2), ("2001:db8::1", 3)])
LAYOUTS = st.sampled_from([FOUR, TWO, Layout(("::ffff:203.0.113.1",), (1, 2))])
ATTRS = st.lists(st.tuples(st.sampled_from([0x0003, 0x0026, 0x0027, 0x7FFF, 0x8022, 0x0006]),
                           st.binary(max_size=12)), max_size=4)


@given(attrs=ATTRS, classic=st.booleans(), fp=st.booleans(), src=SOURCES, layout=LAYOUTS,
       at=st.integers(0, 3))
@settings(max_examples=1500)
def test_fuzz_rfc5780_replies_stay_small_and_come_from_a_real_socket(attrs, classic, fp, src,
                                                                     layout, at):
    req = request(*attrs, head=CLASSIC_ID if classic else b"\x21\x12\xa4\x42" + TXID)
    if fp and not classic:
        req = fingerprinted(req)
    at &= 3 if len(layout.ips) == 2 else 1
    reply, disposition, via = answer(req, *src, layout=layout, at=at)
    assert 0 <= via <= (3 if len(layout.ips) == 2 else 1)
    if reply is None:
        return
    assert len(reply) <= len(req) + MAX_GROWTH_RFC5780
    if disposition is Disposition.UNKNOWN_ATTRIBUTE:
        assert len(reply) <= len(req) and via == at
    elif not classic:
        assert isinstance(parse_response(reply, TXID), Binding)


@given(data=st.binary(max_size=120), txid=st.binary(min_size=12, max_size=12))
@settings(max_examples=1000)
def test_client_parser_never_raises(data, txid):
    parse_response(data, txid)
    parse_response(data[:8] + txid + data[20:], txid)


def test_client_parser_refuses_what_does_not_add_up():
    reply, _ = respond(binding_request(TXID), "192.0.2.1", 9)
    assert parse_response(reply, TXID) == Binding(("192.0.2.1", 9))
    assert parse_response(reply, bytes(12)) is None  # someone else's transaction
    assert parse_response(reply[:-1] + bytes([reply[-1] ^ 1]), TXID) is None  # FINGERPRINT
    assert parse_response(reply[:2] + b"\x00\x10" + reply[4:], TXID) is None  # length overrun
    broken = bytearray(reply)
    broken[25] = 3  # XOR-MAPPED-ADDRESS of family 3
    assert parse_response(bytes(broken), TXID) is None
    assert is_request(binding_request(TXID), TXID) and not is_request(reply, TXID)
    assert MAX_GROWTH < MAX_GROWTH_RFC5780


@pytest.mark.parametrize(("host", "port", "alt_port", "alt_ip", "strict", "error"), [
    (None, 3478, 3478, "", False, "must differ"),
    (None, 3478, 70000, "", False, "port number"),
    (None, 3478, -1, "203.0.113.2", False, "needs -stun-alt-port"),
    (None, 3478, 3479, "203.0.113.2", False, "-a IP:port"),
    ("derp.example.com", 3478, 3479, "203.0.113.2", False, "-a IP:port"),
    ("203.0.113.1", 3478, 3479, "2001:db8::2", False, "same family"),
    ("203.0.113.1", 3478, 3479, "203.0.113.1", False, "same family"),
    (None, 3478, 3479, "", True, "-stun-strict"),
])
def test_settings_that_cannot_work_are_refused(host, port, alt_port, alt_ip, strict, error):
    with pytest.raises(ConfigError, match=error):
        check_alternates(host, port, alt_port, alt_ip, strict)


@pytest.mark.parametrize(("host", "alt_port", "alt_ip"), [
    (None, -1, ""), (None, 3479, ""), ("203.0.113.1", 3479, "203.0.113.2"), ("::1", 0, "::2")])
def test_settings_that_work(host, alt_port, alt_ip):
    check_alternates(host, 3478, alt_port, alt_ip, False)
