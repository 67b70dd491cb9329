"""``-a`` decides where everything listens: no host → dual-stack; an IP → only that IP."""

from __future__ import annotations

import os
import re
import socket
import subprocess

import pytest
import trio

from derper import client as dc
from stun.message import tailscale_request
from tests.system import require_binary


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


async def test_accepted_connections_get_keepalive_and_user_timeout(start_server):
    """Set once on the listener; the kernel's view of the accepted socket shows they stuck."""
    ss = require_binary("ss", "iproute2")
    server = await start_server(tcp_keepalive_time=77, tcp_user_timeout=9)
    async with dc.connect(f"http://127.0.0.1:{server.main_port}/derp"):
        for _ in range(50):  # until the handshake's last segment is acked (delayed ACK)
            out = subprocess.run([ss, "-tnoi", "state", "established", "sport", "=",
                                  f":{server.main_port}"], capture_output=True, text=True,
                                 check=True).stdout
            if "timer:(on," not in out:
                break
            await trio.sleep(0.02)
    # SO_KEEPALIVE and TCP_KEEPIDLE: the first probe is due in at most 77 s.
    assert re.search(r"timer:\(keepalive,(1min1[0-7]|[0-9.]+(ms|sec))", out), out
