"""Real client addresses from a trusted proxy's headers, end to end on loopback: the session
(PeerPresent), the log, the admission URL's Source and ``/debug/varz`` all see the same one;
the same headers from anyone else change nothing. The real proxies: test_deploy_proxies.py."""

from __future__ import annotations

import logging
import os

import h11
import pytest
import trio

from derper import client as dc
from derper.proto.messages import PeerPresentMessage
from tests.client_address import addresses_seen, allow_all_backend
from tests.conftest import url
from tests.relay_helpers import connect_opts, recv_kind
from tests.test_http import request

FORGED = [("X-Forwarded-For", "203.0.113.1, 192.0.2.9")]
MESH_KEY = os.urandom(32)


@pytest.mark.parametrize("websocket", [False, True], ids=["derp", "websocket"])
@pytest.mark.parametrize("source, trusted, expect", [
    ("127.0.0.1", "127.0.0.1/32", "192.0.2.9"),  # a trusted proxy: its rightmost entry
    ("127.0.0.2", "127.0.0.1/32", "127.0.0.2"),  # a client forging the header directly
    ("127.0.0.1", "", "127.0.0.1"),  # no -trusted-proxies: the header means nothing
], ids=["trusted", "untrusted", "off"])
async def test_address_from_headers_only_from_trusted_proxies(start_server, ca, nursery, caplog,
                                                              websocket, source, trusted,
                                                              expect):
    caplog.set_level(logging.INFO, logger="derper")
    backend = await allow_all_backend(nursery)
    server = await start_server(trusted_proxies=trusted,
                                verify_client_url=f"http://127.0.0.1:{backend.port}/verify")
    opts = connect_opts(server, ca, source_ip=source, extra_headers=FORGED, websocket=websocket)
    async with dc.connect(url(server), **opts) as c:
        assert await addresses_seen(server, backend, caplog, c.public_key) == {expect}


async def test_peer_present_carries_the_clients_address(start_server, ca):
    server = await start_server(trusted_proxies="127.0.0.1/32", mesh_key=MESH_KEY)
    header = [("Forwarded", 'for="[2001:db8::7]:4711";proto=https')]
    async with dc.connect(url(server), **connect_opts(server, ca, extra_headers=header)) as c:
        async with dc.connect(url(server), **connect_opts(server, ca, mesh_key=MESH_KEY)) as w:
            await w.watch_conns()
            with trio.fail_after(10):
                while (m := await recv_kind(w, PeerPresentMessage)).key != c.public_key:
                    pass
            assert (m.ip, m.port) == ("2001:db8::7", 4711)


async def varz_status(port: int, source: str, headers) -> int:
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    async with stream:
        status, _, _ = await request(stream, h11.Connection(h11.CLIENT), "GET", "/debug/varz",
                                     headers)
    return status


@pytest.mark.parametrize("source, header, trusted, status", [
    ("127.0.0.1", "127.0.0.9", "127.0.0.1/32", 200),  # a loopback client behind the proxy
    ("127.0.0.1", "192.0.2.9", "127.0.0.1/32", 403),  # a remote client behind the proxy
    ("127.0.0.2", "127.0.0.9", "127.0.0.1/32", 403),  # X-Forwarded-For from someone else
    ("127.0.0.1", "127.0.0.9", "", 403),  # a proxy we were not told to trust
    ("127.0.0.2", None, "127.0.0.1/32", 200),  # no header: loopback as ever
])
async def test_varz_access_behind_a_trusted_proxy(start_server, source, header, trusted,
                                                  status):
    server = await start_server(trusted_proxies=trusted)
    headers = [] if header is None else [("X-Forwarded-For", header)]
    assert await varz_status(server.main_port, source, headers) == status
