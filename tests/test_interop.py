"""Replay byte-exact recordings of real Tailscale clients (../shared/interop) against our server.

The recordings hold what tailscaled v1.68.2 and Tailscale's DERP client library sent to the Go
derper, and what it answered, with the server's private key. Run with that key, our server must
answer the HTTP upgrade and ServerKey byte for byte like Go, accept the real ClientInfo boxes,
and relay every packet into RecvPacket frames identical to the recorded ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from derper.proto.keys import KeyPair, parse_private
from derper.proto.wire import ALL_TYPES, FrameReader, FrameType, is_disco
from tests.relay_helpers import wait_until

INTEROP = Path(__file__).resolve().parent / "data" / "interop"  # copied from the reference set
RECORDINGS = ["tailscaled-http-session.json", "derp-client-http-session.json"]


def frames(data: bytes) -> list[tuple[int, bytes]]:
    reader = FrameReader({}, default_limit=1 << 20, wanted=ALL_TYPES)
    reader.feed(data)
    out = []
    while (f := reader.next()) is not None:
        out.append((f[0], reader.data[f[1] - 5:f[2]]))
    assert reader.buffered == 0
    return out


class Recorded:
    def __init__(self, conn: dict) -> None:
        self.c2s = [bytes.fromhex(ch["hex"]) for ch in conn["chunks"] if ch["dir"] == "c2s"]
        s2c = b"".join(bytes.fromhex(ch["hex"]) for ch in conn["chunks"] if ch["dir"] == "s2c")
        head_end = s2c.index(b"\r\n\r\n") + 4
        self.http_response = s2c[:head_end]
        self.s2c_frames = frames(s2c[head_end:])
        sent = frames(b"".join(self.c2s)[self.c2s[0].index(b"\r\n\r\n") + 4:])
        self.client_key = next(f[5:37] for t, f in sent if t == FrameType.CLIENT_INFO)
        self.sends = [f for t, f in sent if t == FrameType.SEND_PACKET]

    def recorded(self, ftype: int) -> list[bytes]:
        """Frames of ``ftype`` the Go derper sent this client."""
        return [f for t, f in self.s2c_frames if t == ftype]


def by_queue(recv_frames: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    disco = [f for f in recv_frames if is_disco(f, 37)]
    return disco, [f for f in recv_frames if not is_disco(f, 37)]


class FrameCollector:
    """Frames arriving on a stream, kept across calls so none is lost between them."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.reader = FrameReader({}, default_limit=1 << 20, wanted=ALL_TYPES)

    async def collect(self, count: int, ftype: int) -> list[bytes]:
        """The next ``count`` frames of ``ftype``; frames of other types are passed over."""
        got = []
        with trio.fail_after(10):
            while len(got) < count:
                f = self.reader.next()
                if f is None:
                    self.reader.feed(await self.stream.receive_some())
                elif f[0] == ftype:
                    got.append(self.reader.data[f[1] - 5:f[2]])
        return got


@pytest.mark.parametrize("name", RECORDINGS)
async def test_replay_real_client_session(start_server, name):
    rec = json.loads((INTEROP / name).read_text())
    keypair = KeyPair(parse_private(rec["server_private_key"]))
    assert "nodekey:" + keypair.public.hex() == rec["server_public_key"]
    server = await start_server(keypair=keypair)
    conns = [Recorded(c) for c in rec["connections"]]
    streams = []
    for conn in conns:
        s = await trio.open_tcp_stream("127.0.0.1", server.main_port)
        streams.append(s)
        await s.send_all(conn.c2s[0])  # the HTTP request, exactly as the client sent it
        want = conn.http_response + conn.s2c_frames[0][1]  # 101 + ServerKey, byte for byte
        got = b""
        with trio.fail_after(10):
            while len(got) < len(want):
                got += await s.receive_some()
        assert got == want
        await s.send_all(conn.c2s[1])  # the real ClientInfo (+ NotePreferred for tailscaled)
    await wait_until(lambda: set(server.relay.router.conns) == {c.client_key for c in conns})

    # Replay every remaining chunk; each side must receive what the Go derper wrote it.
    for conn, s in zip(conns, streams):
        for chunk in conn.c2s[2:]:
            await s.send_all(chunk)
    leaver = next(i for i, c in enumerate(conns) if not c.recorded(FrameType.PEER_GONE))
    stayer = 1 - leaver
    collectors = [FrameCollector(s) for s in streams]
    for i, conn in enumerate(conns):
        expected = conn.recorded(FrameType.RECV_PACKET)
        got = await collectors[i].collect(len(expected), FrameType.RECV_PACKET)
        # Disco and other packets travel in separate queues (spec §4.4); the order is defined
        # within each queue, not across them (Go's send loop picks between them at random).
        assert by_queue(got) == by_queue(expected)
        other = conns[1 - i]
        assert by_queue(got) == by_queue([bytes([FrameType.RECV_PACKET]) + f[1:5]
                                          + other.client_key + f[37:] for f in other.sends])

    await streams[leaver].aclose()
    expected = conns[stayer].recorded(FrameType.PEER_GONE)
    assert await collectors[stayer].collect(1, FrameType.PEER_GONE) == expected
    await streams[stayer].aclose()
    assert server.relay.stats.packets_received == sum(len(c.sends) for c in conns)
