"""The HTTP side over real sockets: endpoints, keep-alive, the port-80 helper, TLS policy."""

from __future__ import annotations

import json
import ssl

import h11
import pytest
import trio
import trio_websocket

from derper import client as dc
from derper.net.tls_stream import TLSStream
from tests.conftest import client_context, url
from tests.relay_helpers import connect_opts, wait_until


async def open_conn(port: int, ctx: ssl.SSLContext | None = None,
                    server_hostname: str = "localhost") -> trio.abc.Stream:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    if ctx is None:
        return stream
    tls = TLSStream(stream, ctx, server_side=False, server_hostname=server_hostname)
    await tls.do_handshake()
    return tls


async def request(stream: trio.abc.Stream, conn: h11.Connection, method: str, target: str,
                  headers=()) -> tuple[int, dict[str, str], bytes]:
    """One request on a (possibly kept-alive) connection: (status, headers, body)."""
    if conn.our_state is h11.DONE:
        conn.start_next_cycle()
    await stream.send_all(conn.send(h11.Request(method=method, target=target,
                                                headers=[("Host", "localhost"), *headers]))
                          + conn.send(h11.EndOfMessage()))
    status, hdrs, body = 0, {}, b""
    with trio.fail_after(10):
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some())
            elif isinstance(event, h11.Response):
                status = event.status_code
                hdrs = {k.decode().lower(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return status, hdrs, body


async def get(port: int, target: str, method: str = "GET", headers=(), ctx=None):
    stream = await open_conn(port, ctx)
    try:
        return await request(stream, h11.Connection(h11.CLIENT), method, target, headers)
    finally:
        await stream.aclose()


async def test_endpoints_on_one_kept_alive_connection(start_server):
    server = await start_server()
    stream = await open_conn(server.main_port)
    conn = h11.Connection(h11.CLIENT)
    status, headers, body = await request(stream, conn, "GET", "/derp/probe")
    assert (status, headers["access-control-allow-origin"], body) == (200, "*", b"")
    status, headers, _ = await request(stream, conn, "GET", "/generate_204?t=1",
                                       [("X-Tailscale-Challenge", "ts_127.0.0.1")])
    assert (status, headers["x-tailscale-response"]) == (204, "response ts_127.0.0.1")
    assert (await request(stream, conn, "HEAD", "/derp/latency-check"))[0] == 200
    assert (await request(stream, conn, "POST", "/derp/probe"))[:3:2] == (405,
                                                                          b"bogus probe method\n")
    status, _, body = await request(stream, conn, "GET", "/derp")
    assert (status, body) == (426, b"DERP requires connection upgrade\n")
    status, _, body = await request(stream, conn, "GET", "/derp", [("Connection", "Upgrade"),
                                                                  ("Upgrade", "h2c")])
    assert status == 426
    status, headers, body = await request(stream, conn, "GET", "/robots.txt")
    assert (status, body) == (200, b"User-agent: *\nDisallow: /\n")
    assert headers["x-frame-options"] == "DENY"
    status, _, body = await request(stream, conn, "GET", "/")
    assert status == 200 and b"DERP" in body and b"disabled" not in body
    await stream.aclose()


async def test_websocket_upgrade_without_derp_subprotocol_is_raw_derp(start_server):
    """Very old clients send ``Upgrade: websocket`` meaning plain DERP (spec §1.3)."""
    server = await start_server()
    s = await open_conn(server.main_port)
    await s.send_all(b"GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                     b"Upgrade: websocket\r\n\r\n")
    with trio.fail_after(10):
        got = await s.receive_some()
    assert got.startswith(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\n")
    await s.aclose()


@pytest.mark.parametrize("home,status,check", [
    ("blank", 200, lambda h, b: b == b""),
    ("https://example.com/about", 302, lambda h, b: h["location"] == "https://example.com/about"),
])
async def test_home_modes(start_server, home, status, check):
    server = await start_server(home=home)
    got_status, headers, body = await get(server.main_port, "/")
    assert got_status == status and check(headers, body)


async def test_derp_disabled(start_server, ca):
    server = await start_server(derp=False)
    status, _, body = await get(server.main_port, "/derp", headers=[("Connection", "Upgrade"),
                                                                    ("Upgrade", "DERP")])
    assert (status, body) == (404, b"derp server disabled\n")
    assert b"Status: disabled" in (await get(server.main_port, "/"))[2]
    with pytest.raises(dc.DerpClientError, match="HTTP 404: derp server disabled"):
        async with dc.connect(url(server), **connect_opts(server, ca)):
            pass


async def test_bootstrap_dns(start_server):
    server = await start_server(bootstrap_dns_names="localhost")
    await wait_until(lambda: server.bootstrap.body != b"")
    status, headers, body = await get(server.main_port, "/bootstrap-dns?q=localhost")
    assert status == 200 and headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    assert "127.0.0.1" in json.loads(body)["localhost"]
    assert b'\n\t"localhost"' in body  # tab-indented like Go's


async def test_bootstrap_dns_unconfigured_is_empty(start_server):
    server = await start_server()
    assert (await get(server.main_port, "/bootstrap-dns"))[::2] == (200, b"")


async def test_http_helper_redirects_to_https_on_the_real_tls_port(start_server):
    server = await start_server(tls=True, http_port=0)
    status, headers, _ = await get(server.http_port, "/some/path?x=1")
    assert status == 302
    assert headers["location"] == f"https://localhost:{server.main_port}/some/path?x=1"
    status, headers, _ = await get(server.http_port, "/generate_204",
                                   headers=[("X-Tailscale-Challenge", "ts_1.2.3.4")])
    assert (status, headers["x-tailscale-response"]) == (204, "response ts_1.2.3.4")
    assert (await get(server.http_port, "/", method="POST"))[::2] == (400, b"Use HTTPS\n")


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
async def test_tls_policy(start_server, ca):
    server = await start_server(tls=True)
    port = server.main_port
    ctx = client_context(ca)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    tls = await open_conn(port, ctx)
    assert tls.ssl_object.selected_alpn_protocol() == "http/1.1"
    await tls.aclose()
    ctx = client_context(ca)
    ctx.set_alpn_protocols(["h2"])
    tls = await open_conn(port, ctx)  # no common protocol: no ALPN, still served
    assert tls.ssl_object.selected_alpn_protocol() is None
    assert (await request(tls, h11.Connection(h11.CLIENT), "GET", "/derp/probe"))[0] == 200
    await tls.aclose()
    old = client_context(ca, max_version=ssl.TLSVersion.TLSv1_1)
    old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    with pytest.raises(trio.BrokenResourceError):
        await open_conn(port, old)
    tls12 = client_context(ca, max_version=ssl.TLSVersion.TLSv1_2)
    tls12.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
                      "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384")
    tls = await open_conn(port, tls12)  # the client's order wins, as with Go's server
    assert "AES128" in tls.ssl_object.cipher()[0]
    await tls.aclose()
    wrong_name = client_context(ca)
    wrong_name.check_hostname = False
    with pytest.raises(trio.BrokenResourceError, match="UNRECOGNIZED_NAME|unrecognized name"):
        await open_conn(port, wrong_name, server_hostname="not-this-server.example")


async def test_accept_limiter_closes_excess_and_keeps_accepting(start_server, ca):
    server = await start_server(accept_connection_limit=20, accept_connection_burst=3)
    streams = [await open_conn(server.main_port) for _ in range(10)]
    await wait_until(lambda: server.relay.stats.accepted_connections
                     + server.relay.stats.rejected_connections == 10)
    assert server.relay.stats.accepted_connections == 3
    for s in streams:
        await s.aclose()
    await trio.sleep(0.1)  # let the bucket refill (20/s)
    async with dc.connect(url(server), **connect_opts(server, ca)) as c:
        assert c.server_key == server.relay.public_key


async def test_websocket_needs_exact_subprotocol_and_binary_messages(start_server):
    server = await start_server()
    port = server.main_port
    async with trio_websocket.open_websocket("127.0.0.1", port, "/derp", use_ssl=False,
                                            subprotocols=["derpx"]) as ws:
        with pytest.raises(trio_websocket.ConnectionClosed) as info:
            await ws.get_message()
        assert info.value.reason.code == 1008
    async with trio_websocket.open_websocket("127.0.0.1", port, "/derp", use_ssl=False,
                                            subprotocols=["derp"]) as ws:
        assert (await ws.get_message())[:1] == b"\x01"  # ServerKey
        await ws.send_message("text is not DERP")
        with pytest.raises(trio_websocket.ConnectionClosed) as info:
            while True:
                await ws.get_message()
        assert info.value.reason.code == 1003
