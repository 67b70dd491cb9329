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


LINK_WAIT = 5.0  # at start, how long a worker waits for its links before it says ready


async def keep_links(relay: Relay, role: WorkerRole,
                     task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Keep a link to every other worker up for as long as this worker runs; ``started``
    once all are up (or after LINK_WAIT: a worker that is down must not hold the others'
    start up), so that a ready host relays between all its workers."""
    healths = []
    async with trio.open_nursery() as nursery:
        for index in role.siblings:
            peer = sibling_peer(role, index)
            health = LinkHealth(peer.entry, peer.dial_host)
            healths.append(health)
            nursery.start_soon(run_link, relay, peer, peer.dial_host, health)
        with trio.move_on_after(LINK_WAIT):
            while not all(h.up for h in healths):
                await trio.sleep(0.01)
        task_status.started()
