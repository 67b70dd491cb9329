"""How much one TLSStream read takes: RECV_SIZE for a client, MESH_RECV_SIZE for a mesh peer
(whose one connection carries a whole node's clients). Real TLS over loopback."""

from __future__ import annotations

import socket
import ssl

import trio

from derper.net.reading import MESH_RECV_SIZE, RECV_SIZE
from derper.net.tls_stream import TLSStream

SENT = 600 << 10  # more than one ordinary read, less than one mesh read


async def tls_pair(ca) -> tuple[TLSStream, TLSStream]:
    """Client and server over loopback, with socket buffers that hold all of SENT."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    async with listener:
        listener.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * SENT)
        port = listener.socket.getsockname()[1]
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * SENT)
        await sock.connect(("127.0.0.1", port))
        near = trio.SocketStream(sock)
        far = await listener.accept()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    client = TLSStream(near, client_ctx, server_side=False, server_hostname="127.0.0.1")
    server = TLSStream(far, server_ctx, server_side=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)
        nursery.start_soon(server.do_handshake)
    return client, server


async def chunks(server: TLSStream, max_bytes: int) -> list[int]:
    """The sizes ``receive_some`` returned until all of SENT had come out of ``server``."""
    sizes: list[int] = []
    with trio.fail_after(10):
        while sum(sizes) < SENT:
            sizes.append(len(await server.receive_some(max_bytes)))
    return sizes


async def test_a_mesh_read_takes_many_records_at_once(ca):
    """A call returns what one socket read brought (up to 240 kB decrypted at a time): at most
    a 64 kB read's worth for a client, four times that and more for a mesh peer."""
    sizes = {}
    for max_bytes in (RECV_SIZE, MESH_RECV_SIZE):
        client, server = await tls_pair(ca)
        with trio.fail_after(10):
            await client.send_all(bytes(SENT))  # all in the kernel's buffers before any read
        sizes[max_bytes] = await chunks(server, max_bytes)
        await client.aclose()
        await server.aclose()
    assert max(sizes[RECV_SIZE]) <= RECV_SIZE, sizes
    assert max(sizes[MESH_RECV_SIZE]) > 3 * RECV_SIZE, sizes
    assert len(sizes[MESH_RECV_SIZE]) <= 4, sizes  # 600 kB: one read, three calls
