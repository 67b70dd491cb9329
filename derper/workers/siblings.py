"""The links between the workers of one host: each worker listens on a Unix socket in the
shared directory and links to every other one through the mesh machinery (``mesh.link``), as
to a node of the region, with the supervisor's secret as the mesh key. A packet for a client of
another worker takes one hop over such a link; the router keeps it from going further.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import trio

from ..mesh.link import LinkHealth, run_link
from ..mesh.peers import MeshPeer
from ..net.listener import BACKLOG
from ..relay.hub import Relay
from .plan import WorkerRole


async def open_listener(path: Path) -> trio.SocketListener:
    """The Unix socket the other workers link to (a stale one from a crashed run is replaced)."""
    path.unlink(missing_ok=True)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(os.fspath(path))
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


def sibling_peer(role: WorkerRole, index: int) -> MeshPeer:
    name = f"worker-{index}"
    return MeshPeer(name, name, 0, os.fspath(role.socket_path(index)), None, sibling=True)


async def keep_link(relay: Relay, role: WorkerRole, index: int) -> None:
    """Keep the link to worker ``index`` up for as long as this worker runs."""
    peer = sibling_peer(role, index)
    await run_link(relay, peer, peer.dial_host, LinkHealth(peer.entry, peer.dial_host))
