"""PROXY protocol v1/v2 (``-proxy-protocol``): the codec (pure, fuzzed) and the main listener
behind a small prefixing forwarder on loopback. nginx ``stream`` and HAProxy send the real
headers in test_deploy_proxies.py."""

from __future__ import annotations

import ipaddress
import logging
import struct

import pytest
import trio
from hypothesis import example, given, strategies as st

from derper import client as dc
from derper.errors import ProtocolError
from derper.net.proxy_protocol import V2_SIGNATURE, ProxyHeader, parse
from tests.client_address import addresses_seen, allow_all_backend
from tests.conftest import url
from tests.fuzzing import fuzz
from tests.relay_helpers import assert_relays, connect_opts, expect_closed, wait_until


def v2(command: int, family: int, body: bytes) -> bytes:
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack(">H", len(body)) + body


def v2_tcp4(src: str, sport: int, tlv: bytes = b"") -> bytes:
    body = (ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address("127.0.0.1").packed
            + struct.pack(">HH", sport, 443) + tlv)
    return v2(1, 0x11, body)


def v2_tcp6(src: str, sport: int) -> bytes:
    body = (ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address("::1").packed
            + struct.pack(">HH", sport, 443))
    return v2(1, 0x21, body)


V1 = b"PROXY TCP4 192.0.2.9 127.0.0.1 4711 443\r\n"
VALID = [
    (V1, ("192.0.2.9", 4711)),
    (b"PROXY TCP6 2001:db8::9 ::1 65535 443\r\n", ("2001:db8::9", 65535)),
    (b"PROXY TCP6 ::ffff:192.0.2.9 ::1 1 443\r\n", ("192.0.2.9", 1)),
    (b"PROXY UNKNOWN\r\n", None),
    (b"PROXY UNKNOWN ffff::1 ::1 1 2\r\n", None),
    (v2_tcp4("192.0.2.9", 4711), ("192.0.2.9", 4711)),
    (v2_tcp4("192.0.2.9", 4711, tlv=b"\x04\x00\x03abc"), ("192.0.2.9", 4711)),  # a TLV
    (v2_tcp6("2001:db8::9", 80), ("2001:db8::9", 80)),
    (v2(0, 0x11, bytes(12)), None),  # LOCAL: the proxy's own health check
    (v2(1, 0x00, b""), None),  # UNSPEC
    (v2(1, 0x31, bytes(216)), None),  # a unix-socket client
]
INVALID = [
    b"\x16\x03\x01\x02\x00",  # a TLS ClientHello: no proxy in front
    b"GET /derp HTTP/1.1\r\n",
    b"PROXY TCP4 192.0.2.9 127.0.0.1 4711\r\n",  # a field missing
    b"PROXY TCP4 2001:db8::9 127.0.0.1 4711 443\r\n",  # IPv6 under TCP4
    b"PROXY TCP4 192.0.2.9 127.0.0.1 70000 443\r\n",
    b"PROXY TCP4 192.0.2.9 127.0.0.1 -1 443\r\n",
    b"PROXY TCP4  192.0.2.9 127.0.0.1 1 443\r\n",  # two spaces
    b"PROXY TCP5 192.0.2.9 127.0.0.1 1 443\r\n",
    b"PROXY TCP4 192.0.2.9 127.0.0.1 1 443\n",  # LF without CR
    b"PROXY " + b"A" * 120,  # no end within 107 bytes
    V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12),  # version 1 under the v2 signature
    V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12),  # command 2
    v2(1, 0x12, bytes(12)),  # UDP
    v2(1, 0x41, bytes(12)),  # family 4
    v2(1, 0x11, bytes(11)),  # address block too short
    v2(1, 0x21, bytes(12)),
]


@pytest.mark.parametrize("header, source", VALID)
def test_valid_headers_and_each_of_their_prefixes(header, source):
    after = b"\x16\x03\x01"  # the start of TLS, left for the caller
    assert parse(header + after) == ProxyHeader(source, len(header))
    for n in range(len(header)):
        assert parse(header[:n]) is None, n


@pytest.mark.parametrize("data", INVALID)
def test_invalid_headers_are_refused(data):
    with pytest.raises(ProtocolError):
        parse(data)


@fuzz(600)
@given(st.one_of(st.binary(max_size=120),
                 st.sampled_from([h for h, _ in VALID] + INVALID).flatmap(
                     lambda h: st.tuples(st.just(h), st.integers(0, len(h) - 1), st.binary(
                         max_size=4)).map(lambda t: t[0][:t[1]] + t[2] + t[0][t[1] + 1:]))))
@example(b"PROXY TCP4 1.2.3.4 1.2.3.4 00000001 1\r\n")
def test_fuzz_garbage_is_refused_or_needs_more_never_crashes(data):
    try:
        header = parse(data)
    except ProtocolError:
        return
    if header is not None:
        assert header.length <= len(data)
        if header.source is not None:
            ipaddress.ip_address(header.source[0])
            assert 0 <= header.source[1] <= 65535


# ---- the listener, through a forwarder that writes a given header first ----------------------

async def forwarder(nursery: trio.Nursery, target: int, header: bytes) -> int:
    """An L4 proxy on loopback: each connection to it reaches ``target`` after ``header``."""
    async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
        try:
            while data := await src.receive_some(65536):
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            with trio.CancelScope(shield=True):
                await dst.aclose()

    async def handle(client: trio.SocketStream) -> None:
        upstream = await trio.open_tcp_stream("127.0.0.1", target)
        await upstream.send_all(header)
        async with trio.open_nursery() as pumps:
            pumps.start_soon(pump, client, upstream)
            pumps.start_soon(pump, upstream, client)

    [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, handle, [listener])
    return listener.socket.getsockname()[1]


def through(server, ca, port: int, **kw) -> dict:
    return connect_opts(server, ca, dial=("127.0.0.1", port), **kw)


@pytest.mark.parametrize("tls", [False, True], ids=["http", "tls"])
@pytest.mark.parametrize("websocket", [False, True], ids=["derp", "websocket"])
@pytest.mark.parametrize("header, expect", [
    (V1, ("192.0.2.9", 4711)),
    (v2_tcp6("2001:db8::9", 80), ("2001:db8::9", 80)),
    (v2(0, 0x11, bytes(12)), ("127.0.0.1", None)),  # LOCAL: the forwarder itself
], ids=["v1", "v2", "v2-local"])
async def test_the_header_names_the_client(start_server, ca, nursery, caplog, tls, websocket,
                                           header, expect):
    caplog.set_level(logging.INFO, logger="derper")
    backend = await allow_all_backend(nursery)
    server = await start_server(tls=tls, proxy_protocol=True,
                                verify_client_url=f"http://127.0.0.1:{backend.port}/v")
    port = await forwarder(nursery, server.main_port, header)
    async with dc.connect(url(server), **through(server, ca, port, websocket=websocket)) as c:
        await assert_relays(c, c)
        assert await addresses_seen(server, backend, caplog, c.public_key) == {expect[0]}
        if expect[1] is not None:
            assert server.relay.router.active[c.public_key].remote_port == expect[1]


async def test_trusted_proxy_headers_after_the_proxy_header(start_server, ca, nursery):
    """A CDN in front of an L4 proxy: the PROXY header names the CDN's edge, whose
    X-Forwarded-For names the client."""
    server = await start_server(proxy_protocol=True, trusted_proxies="198.51.100.0/24")
    port = await forwarder(nursery, server.main_port,
                           b"PROXY TCP4 198.51.100.7 127.0.0.1 1 443\r\n")
    opts = through(server, ca, port, extra_headers=[("X-Forwarded-For", "192.0.2.44")])
    async with dc.connect(url(server), **opts) as c:
        assert server.relay.router.active[c.public_key].remote_ip == "192.0.2.44"


@pytest.mark.parametrize("tls", [False, True], ids=["http", "tls"])
@pytest.mark.parametrize("header", [b"", b"PROXY TCP4 192.0.2.9 127.0.0.1 99999 443\r\n",
                                    b"PROXY TCP4 192.0.2.9", v2(1, 0x12, bytes(12))],
                         ids=["missing", "malformed-v1", "unfinished", "v2-udp"])
async def test_connections_without_a_valid_header_are_closed(start_server, ca, nursery, caplog,
                                                             tls, header):
    caplog.set_level(logging.INFO, logger="derper.server")
    server = await start_server(tls=tls, proxy_protocol=True, handshake_timeout=0.5)
    port = await forwarder(nursery, server.main_port, header)
    with pytest.raises(dc.DerpClientError):
        async with dc.connect(url(server), **through(server, ca, port, timeout=5)):
            pass
    await wait_until(lambda: any("PROXY protocol header" in r.getMessage()
                                 for r in caplog.records))
    # The listener goes on serving the connections that do send a header.
    good = await forwarder(nursery, server.main_port, V1)
    async with dc.connect(url(server), **through(server, ca, good)) as c:
        await assert_relays(c, c)


async def test_header_then_garbage_closes_only_that_connection(start_server, ca, nursery):
    server = await start_server(proxy_protocol=True)
    port = await forwarder(nursery, server.main_port, V1)
    async with dc.connect(url(server), **through(server, ca, port)) as c:
        await c.send_raw(b"\xff" * 64)
        await expect_closed(c)


async def test_a_header_that_never_ends_times_out(start_server, caplog):
    caplog.set_level(logging.INFO, logger="derper.server")
    server = await start_server(proxy_protocol=True, handshake_timeout=0.3)
    stream = await trio.open_tcp_stream("127.0.0.1", server.main_port)
    async with stream:
        await stream.send_all(b"PROXY TCP4 ")
        with trio.fail_after(5):
            assert await stream.receive_some(100) == b""  # closed by the server
    assert any(r.getMessage() == "closing connection: no PROXY protocol header in time"
               for r in caplog.records)
