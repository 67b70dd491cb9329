"""The -mesh-with list: Go's syntax and derper's @sha256-raw: pins (pure)."""

from __future__ import annotations

import pytest

from derper.errors import ConfigError
from derper.mesh.peers import MeshPeer, parse_mesh_with

PIN = "sha256-raw:" + "ab" * 32


def test_go_syntax():
    assert parse_mesh_with("derp1.example.com, derp2.example.com:8443/10.0.0.2,") == [
        MeshPeer("derp1.example.com", "derp1.example.com", 443, "derp1.example.com", None),
        MeshPeer("derp2.example.com:8443/10.0.0.2", "derp2.example.com", 8443, "10.0.0.2", None),
    ]
    assert parse_mesh_with("derp2.example.com:8443/10.0.0.2")[0].url == \
        "https://derp2.example.com:8443/derp"
    assert parse_mesh_with("derp1.example.com")[0].url == "https://derp1.example.com/derp"


def test_ip_entries_and_pins():
    upper = "sha256-raw:" + "AB" * 32  # pins compare lower-case
    v6, v4 = parse_mesh_with(f"[2001:db8::1]:8443@{upper},203.0.113.7@{PIN}")
    assert (v6.host, v6.port, v6.dial_host, v6.pin) == ("2001:db8::1", 8443, "2001:db8::1", PIN)
    assert v6.url == "https://[2001:db8::1]:8443/derp"
    assert (v4.host, v4.port, v4.pin) == ("203.0.113.7", 443, PIN)
    assert parse_mesh_with("2001:db8::2")[0].host == "2001:db8::2"  # bare IPv6, port 443


@pytest.mark.parametrize("entry, why", [
    ("host:notaport", "bad port"),
    ("host:70000", "bad port"),
    (":443", "no host name"),
    ("host@sha256-raw:abc", "64 hex digits"),
    (f"host@md5:{'ab' * 32}", "the pin must be sha256-raw:"),
    ("host/10.0.0.2:443", "the dial host takes no port"),
    ("2001:db8::1:443x", "write an IPv6 address as [ip]:port"),
    ("[2001:db8::1", "unclosed ["),
])
def test_bad_entries_say_why(entry, why):
    with pytest.raises(ConfigError, match=why.replace("[", r"\[")):
        parse_mesh_with(entry)
