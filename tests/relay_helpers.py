"""Client-side helpers shared by the relay tests."""

from __future__ import annotations

import trio

from derper import client as dc
from derper.proto.messages import KeepAliveMessage, ReceivedPacket
from derper.server import Server
from tests.conftest import client_context

TIMEOUT = 10


def connect_opts(server: Server, ca, **kw) -> dict:
    """Keyword arguments for ``derper.client.connect`` to reach ``server`` on loopback."""
    opts = {"dial": ("127.0.0.1", server.main_port)}
    if server.tls:
        opts["ssl_context"] = client_context(ca)
    opts.update(kw)
    return opts


async def recv_kind(client: dc.DerpClient, kind: type, skip=(KeepAliveMessage,)):
    """The next message of type ``kind``; other kinds in ``skip`` are ignored, any other fails."""
    with trio.fail_after(TIMEOUT):
        while True:
            m = await client.recv()
            if isinstance(m, kind):
                return m
            assert isinstance(m, skip), f"unexpected {m!r} while waiting for {kind.__name__}"


async def messages_until_self_packet(client: dc.DerpClient, marker: bytes) -> list:
    """Send ``marker`` to ourselves and return every message received before it arrives.

    The server writes control frames and queued packets in order, so this is a barrier: what
    the server meant to send us before it routed the marker has arrived by then.
    """
    await client.send(client.public_key, marker)
    seen = []
    with trio.fail_after(TIMEOUT):
        while True:
            m = await client.recv()
            if isinstance(m, ReceivedPacket) and m.data == marker:
                return seen
            if not isinstance(m, KeepAliveMessage):
                seen.append(m)


async def wait_until(predicate, timeout: float = TIMEOUT) -> None:
    """Poll server-side state (in-process) until ``predicate()`` holds."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


async def assert_relays(a: dc.DerpClient, b: dc.DerpClient, payload: bytes = b"ping") -> None:
    await a.send(b.public_key, payload)
    m = await recv_kind(b, ReceivedPacket)
    assert (m.source, m.data) == (a.public_key, payload)


async def expect_closed(client: dc.DerpClient) -> None:
    """The server closes ``client`` (whatever it sends first is read and ignored)."""
    with trio.fail_after(TIMEOUT):
        try:
            while True:
                await client.recv()
        except dc.DerpClientError:
            return
