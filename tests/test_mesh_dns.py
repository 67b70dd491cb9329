"""Region membership from DNS: a name with several addresses links to each, and links follow
the records (a real DNS server on loopback: pebble-challtestsrv's, changed through its API)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request

import pytest
import trio

from derper.mesh.dns import Resolver
from tests.mesh_nodes import Node, knows
from tests.process import free_port
from tests.relay_helpers import wait_until
from tests.system import require_binary

NAME = "derp.region.test"
MESH_KEY = os.urandom(32)


class ChallDNS:
    """pebble-challtestsrv's DNS server; A records set through its management API."""

    def __init__(self, workdir) -> None:
        binary = require_binary("pebble-challtestsrv", "pebble")
        self.dns_port, self._mgmt = free_port(socket.SOCK_DGRAM), free_port()
        self.proc = subprocess.Popen(
            [binary, "-dns01", f"127.0.0.1:{self.dns_port}", "-http01", "", "-https01", "",
             "-tlsalpn01", "", "-management", f"127.0.0.1:{self._mgmt}", "-defaultIPv4", "",
             "-defaultIPv6", ""], stdout=open(workdir / "challtestsrv.log", "wb"),
            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            try:
                self._post("clear-a", {"host": NAME + "."})
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.close()
                    raise RuntimeError("pebble-challtestsrv did not come up")
                time.sleep(0.05)

    def _post(self, path: str, body: dict) -> None:
        req = urllib.request.Request(f"http://127.0.0.1:{self._mgmt}/{path}",
                                     data=json.dumps(body).encode(), method="POST")
        urllib.request.urlopen(req, timeout=2).read()

    def set_a(self, *addresses: str) -> None:
        self._post("clear-a", {"host": NAME + "."})
        if addresses:
            self._post("add-a", {"host": NAME + ".", "addresses": list(addresses)})

    @property
    def server(self) -> str:
        return f"127.0.0.1:{self.dns_port}"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)


@pytest.fixture
def dns(tmp_path):
    server = ChallDNS(tmp_path)
    yield server
    server.close()


async def test_resolver_asks_the_configured_server(dns):
    dns.set_a("127.0.0.2", "127.0.0.3")
    resolver = Resolver(dns.server)
    assert await resolver.resolve(NAME) == ["127.0.0.2", "127.0.0.3"]
    dns.set_a()
    assert await resolver.resolve(NAME) == []
    assert await resolver.resolve("192.0.2.7") == ["192.0.2.7"]  # a literal is its own


async def test_links_follow_the_records(nursery, tmp_path, ca, dns, monkeypatch):
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    monkeypatch.setenv("SSL_CERT_FILE", str(path))
    port = free_port()
    b, c = (Node(nursery, tmp_path, ca, MESH_KEY, port=port, ip=ip, hostname=NAME)
            for ip in ("127.0.0.2", "127.0.0.3"))
    for node in (b, c):
        await node.start()
    dns.set_a("127.0.0.2")
    a = Node(nursery, tmp_path, ca, MESH_KEY)
    await a.start(mesh_with=f"{NAME}:{port}", mesh_dns_server=dns.server,
                  mesh_resolve_interval=0.2)
    links = a.server.relay.mesh_links

    def up() -> list[str]:
        return sorted(addr for (_, addr), h in links.items() if h.up)

    async with b.connect() as on_b, c.connect() as on_c:
        await wait_until(lambda: up() == ["127.0.0.2"])
        await knows(a, on_b.public_key)
        assert on_c.public_key not in a.router.forwarders
        dns.set_a("127.0.0.2", "127.0.0.3")  # the region grows
        await wait_until(lambda: up() == ["127.0.0.2", "127.0.0.3"])
        await knows(a, on_c.public_key)
        dns.set_a("127.0.0.3")  # and shrinks: B's link and what it taught go
        await wait_until(lambda: up() == ["127.0.0.3"] and len(links) == 1)
        await knows(a, on_b.public_key, present=False)
        dns.set_a()  # a name with no records for now: links kept, not torn down
        await trio.sleep(0.5)
        assert up() == ["127.0.0.3"]
