"""The client address a trusted proxy's headers name (pure), fuzzed like every peer parser."""

from __future__ import annotations

import ipaddress

from hypothesis import example, given, strategies as st

from derper.http.forwarded import TrustedProxies, forwarded_for, parse_node
from derper.net.addr import parse_cidrs
from tests.fuzzing import fuzz

PROXY = ("127.0.0.1", 40000)
TRUST = TrustedProxies(parse_cidrs("127.0.0.1/32, 10.0.0.0/8, fd00::/8", "-trusted-proxies"))


def client(*headers: tuple[str, str]):
    return TRUST.client([(k.lower().encode(), v.encode()) for k, v in headers], PROXY)


def test_nodes():
    assert parse_node(" 192.0.2.1 ") == ("192.0.2.1", 0)
    assert parse_node("192.0.2.1:4711") == ("192.0.2.1", 4711)
    assert parse_node("[2001:db8::1]:4711") == ("2001:db8::1", 4711)
    assert parse_node("[2001:db8::1]") == ("2001:db8::1", 0)
    assert parse_node("2001:DB8::1") == ("2001:db8::1", 0)
    assert parse_node("::ffff:192.0.2.1") == ("192.0.2.1", 0)
    for bad in ("unknown", "_hidden", "", "192.0.2.1:70000", "[2001:db8::1]:x",
                "2001:db8::1:80:", "[192.0.2.1", "example.com", "192.0.2.256"):
        assert parse_node(bad) is None, bad


def test_forwarded_elements():
    assert forwarded_for('for=192.0.2.60;proto=http;by=203.0.113.43') == [("192.0.2.60", 0)]
    assert forwarded_for('For="[2001:db8:cafe::17]:4711"') == [("2001:db8:cafe::17", 4711)]
    assert forwarded_for('for=192.0.2.43, for=198.51.100.17') == [("192.0.2.43", 0),
                                                                   ("198.51.100.17", 0)]
    assert forwarded_for('for=unknown, for="_gazonk"') == [None, None]
    assert forwarded_for('proto=https') == [None]  # no for=
    assert forwarded_for('for="a,b;c", for=192.0.2.1') == [None, ("192.0.2.1", 0)]
    assert forwarded_for('garbage!!, for=192.0.2.1') == [None, ("192.0.2.1", 0)]


def test_rightmost_untrusted_address_is_the_client():
    assert client(("X-Forwarded-For", "192.0.2.9")) == ("192.0.2.9", 0)
    # What a client wrote itself is on the left; the proxy appended the address it saw.
    assert client(("X-Forwarded-For", "203.0.113.1, 192.0.2.9")) == ("192.0.2.9", 0)
    # Trusted hops in between are skipped; two header lines are one list.
    assert client(("X-Forwarded-For", "203.0.113.1, 192.0.2.9"),
                  ("X-Forwarded-For", "10.1.1.1")) == ("192.0.2.9", 0)
    # Every hop trusted: the farthest one.
    assert client(("X-Forwarded-For", "10.2.2.2, 10.1.1.1")) == ("10.2.2.2", 0)
    # Garbage ends the walk at the last hop that could be read.
    assert client(("X-Forwarded-For", "192.0.2.9, bogus, 10.1.1.1")) == ("10.1.1.1", 0)
    assert client(("X-Forwarded-For", "bogus")) == PROXY
    assert client(("X-Forwarded-For", "")) == PROXY
    assert client(("Forwarded", 'for="[2001:db8::5]:1234"')) == ("2001:db8::5", 1234)
    assert client(("X-Real-IP", "192.0.2.7")) == ("192.0.2.7", 0)
    assert client(("X-Real-Ip", "not an ip")) == PROXY
    assert client(("Host", "x")) is None  # no header: the peer itself is the client


def test_x_forwarded_for_wins_over_headers_proxies_pass_through():
    """nginx, Caddy and HAProxy append to X-Forwarded-For and pass Forwarded and X-Real-IP
    from the client unchanged: those must not override it."""
    assert client(("Forwarded", "for=203.0.113.66"), ("X-Real-IP", "203.0.113.67"),
                  ("X-Forwarded-For", "192.0.2.9")) == ("192.0.2.9", 0)
    assert client(("X-Real-IP", "203.0.113.67"), ("Forwarded", "for=192.0.2.9")) == \
        ("192.0.2.9", 0)


def test_trust():
    assert TRUST.trusts("127.0.0.1") and TRUST.trusts("::ffff:10.9.9.9")
    assert TRUST.trusts("fd00::1")
    assert not TRUST.trusts("127.0.0.2") and not TRUST.trusts(None)
    assert not TRUST.trusts("garbage")


HEADER = st.sampled_from([b"x-forwarded-for", b"forwarded", b"x-real-ip", b"host"])
VALUE = st.one_of(st.binary(max_size=80),
                  st.lists(st.sampled_from(["for=", "192.0.2.1", "[::1]:80", '"', ";", ",",
                                            " ", "unknown", "10.0.0.1", "\\", "=", "proto",
                                            ":", "[", "]"]), max_size=12)
                  .map(lambda parts: "".join(parts).encode()))


@fuzz(400)
@given(st.lists(st.tuples(HEADER, VALUE), max_size=4))
@example([(b"forwarded", b'for="\\')])
@example([(b"x-forwarded-for", b"\xff\xfe, 10.0.0.1")])
def test_fuzz_any_headers_give_an_address_or_none(headers):
    found = TRUST.client(headers, PROXY)
    if found is None:
        assert not any(k != b"host" for k, _ in headers)
        return
    ip, port = found
    ipaddress.ip_address(ip)
    assert 0 <= port <= 65535
