"""``-a`` decides where everything listens: no host → dual-stack; an IP → only that IP."""

from __future__ import annotations

import os
import socket

import pytest
import trio

from derper import client as dc
from stun.message import tailscale_request


async def stun_reply(ip: str, port: int) -> tuple[bytes, bytes]:
    """(reply, request) for a Tailscale STUN request sent from a connected UDP socket."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with trio.socket.socket(family, socket.SOCK_DGRAM) as sock:
        await sock.connect((ip, port))
        request = tailscale_request(os.urandom(12))
        await sock.send(request)
        with trio.fail_after(5):
            return await sock.recv(1500), request


async def test_no_host_means_dual_stack_for_derp_and_stun(start_server):
    server = await start_server(addr=":0", stun=True, stun_port=0)
    for ip in ("127.0.0.1", "::1"):
        async with dc.connect(f"http://[{ip}]:{server.main_port}/derp" if ":" in ip
                              else f"http://{ip}:{server.main_port}/derp") as c:
            assert c.server_key == server.relay.public_key
        reply, _ = await stun_reply(ip, server.stun_port)
        assert len(reply) == 44  # the Go form: an IPv4 client on a dual-stack socket is ::ffff:
    assert server.stun_counters.by_family() == {"ipv4": 1, "ipv6": 1}
    assert server.stun_counters.by_disposition()["success"] == 2


async def test_an_ip_binds_only_there(start_server):
    server = await start_server(addr="127.0.0.1:0", stun=True, stun_port=0)
    reply, _ = await stun_reply("127.0.0.1", server.stun_port)
    assert len(reply) == 32  # plain IPv4 socket: family 01
    with pytest.raises(OSError):
        await trio.open_tcp_stream("::1", server.main_port)
    with pytest.raises(ConnectionRefusedError):
        await stun_reply("::1", server.stun_port)
