"""Meshed derper nodes on loopback for the mesh tests: each a real Server over TLS."""

from __future__ import annotations

import trio

from derper import client as dc
from derper.certs.bundle import load_manual
from derper.proto.keys import KeyPair
from derper.server import Server
from tests.conftest import BASE, client_context, write_cert
from tests.process import free_port
from tests.relay_helpers import wait_until


class Node:
    """One relay of the region, which a test can stop and start again (same key, same port)."""

    def __init__(self, nursery: trio.Nursery, workdir, ca, mesh_key: bytes | None,
                 port: int | None = None, ip: str = "127.0.0.1", hostname: str = "localhost",
                 **fields) -> None:
        self.nursery, self.ca, self.mesh_key = nursery, ca, mesh_key
        self.port = port or free_port()
        self.ip, self.hostname = ip, hostname
        self.keypair = KeyPair.generate()
        certdir = self.certdir = workdir / f"certs-{ip}-{self.port}"
        write_cert(ca, certdir, hostname, ip)
        self.fields = {"dev": False, "certmode": "manual", "hostname": hostname,
                       "certdir": str(certdir), "addr": f"{ip}:{self.port}", **fields}
        self.server: Server | None = None
        self._scope: trio.CancelScope | None = None
        self._stopped = trio.Event()

    @property
    def entry(self) -> str:
        """This node in -mesh-with syntax."""
        return f"{self.hostname}:{self.port}/{self.ip}"

    @property
    def pin(self) -> str:
        """The sha256-raw: pin of this node's certificate."""
        return load_manual(self.certdir, self.hostname).pin

    @property
    def url(self) -> str:
        return f"https://{self.hostname}:{self.port}/derp"

    @property
    def router(self):
        return self.server.relay.router

    async def start(self, **fields) -> "Node":
        self.fields.update(fields)
        self.server = Server(BASE.__class__(**{**BASE.__dict__, **self.fields}), self.keypair,
                             mesh_key=self.mesh_key)
        self._stopped = trio.Event()
        await self.nursery.start(self._run)
        return self

    async def _run(self, task_status) -> None:
        with trio.CancelScope() as self._scope:
            await self.server.run(task_status=task_status)
        self._stopped.set()

    async def stop(self) -> None:
        self._scope.cancel()
        await self._stopped.wait()

    def connect(self, keypair: KeyPair | None = None, **kw):
        return dc.connect(self.url, keypair, dial=(self.ip, self.port),
                          ssl_context=client_context(self.ca), **kw)


async def meshed(nodes: list[Node]) -> None:
    """Until every node has a link up to every other one."""
    def all_up() -> bool:
        return all(sum(h.up for h in n.server.relay.mesh_links.values()) == len(nodes) - 1
                   for n in nodes)
    await wait_until(all_up, timeout=20)


async def knows(node: Node, key: bytes, present: bool = True) -> None:
    """Until ``node`` has (or no longer has) a forwarder for ``key``."""
    await wait_until(lambda: (key in node.router.forwarders) == present, timeout=20)
