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
from tests.system import has_ipv6_loopback, require_binary


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


def listening(ss: str, proto: str, port: int) -> list[str]:
    """The local addresses the kernel shows listening on ``port`` (TCP or UDP)."""
    out = subprocess.run([ss, f"-{proto}ln", "sport", "=", f":{port}"], capture_output=True,
                         text=True, check=True).stdout
    return [line.split()[3] for line in out.splitlines()[1:] if line.strip()]


async def test_an_ip_binds_only_there(start_server):
    ss = require_binary("ss", "iproute2")
    server = await start_server(addr="127.0.0.1:0", stun=True, stun_port=0)
    reply, _ = await stun_reply("127.0.0.1", server.stun_port)
    assert len(reply) == 32  # plain IPv4 socket: family 01
    assert listening(ss, "t", server.main_port) == [f"127.0.0.1:{server.main_port}"]
    assert listening(ss, "u", server.stun_port) == [f"127.0.0.1:{server.stun_port}"]
    if not has_ipv6_loopback():
        pytest.skip("no IPv6 loopback here: the bound addresses above are what was checked")
    with pytest.raises(OSError):
        await trio.open_tcp_stream("::1", server.main_port)
    with pytest.raises(ConnectionRefusedError):
        await stun_reply("::1", server.stun_port)


async def test_accepted_connections_get_keepalive_and_user_timeout(start_server):
    """Set once on the listener; the accepted socket shows both stuck."""
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
        # ss does not show TCP_USER_TIMEOUT: ask the accepted socket itself.
        accepted = next(iter(server.relay.router.active.values())).stream.socket
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 9000
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 77
    # SO_KEEPALIVE and TCP_KEEPIDLE as the kernel runs them: the first probe due within 77 s.
    assert re.search(r"timer:\(keepalive,(1min1[0-7]|[0-9.]+(ms|sec))", out), out
