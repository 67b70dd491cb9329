"""DERP's WebSocket framing (``proto.websocket``, pure, fuzzed) and the server's handling of
pings, closes, fragments and broken upgrades over a real socket. The independent peer is
trio-websocket (test_http.py, test_relay.py)."""

from __future__ import annotations

import base64
import os

import pytest
import trio
import trio.testing
from hypothesis import example, given, strategies as st
from websockets.speedups import apply_mask

from derper.net.websocket import WebSocketStream
from derper.proto import websocket as ws, wire
from derper.proto.websocket import Decoder, FrameError
from tests.fuzzing import fuzz

KEY = b"\x37\xfa\x21\x3d"


def masked(opcode: int, payload: bytes, fin: bool = True, key: bytes = KEY) -> bytes:
    out = bytearray(ws.frame(opcode, payload, key))
    if not fin:
        out[0] &= 0x7F
    return bytes(out)


def test_accept_token_and_response():
    assert ws.accept_token(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC
    head = ws.accept_response(b"dGhlIHNhbXBsZSBub25jZQ==", "derp")
    assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n") and head.endswith(b"\r\n\r\n")
    assert b"Sec-WebSocket-Protocol: derp\r\n" in head
    assert b"Sec-WebSocket-Protocol" not in ws.accept_response(b"k", None)
    assert ws.offered(b"derpx, derp ,") == [b"derpx", b"derp"] and ws.offered(None) == []


def test_mask():
    assert bytes(ws.mask(b"Hello", KEY)) == bytes(a ^ b for a, b in zip(b"Hello", KEY * 2))
    data = os.urandom(1317)
    assert bytes(ws.mask(ws.mask(data, KEY), KEY)) == data
    assert ws.frame(ws.OP_BINARY, b"x" * 200)[:4] == b"\x82\x7e\x00\xc8"  # 16-bit length


def test_mask_is_the_c_extension():
    """The C unmask is what runs (the pure one is ~25x the server's cost per packet)."""
    assert ws.mask is apply_mask


@fuzz(300)
@given(st.binary(max_size=3000), st.binary(min_size=4, max_size=4), st.integers(0, 7),
       st.sampled_from([bytes, bytearray, memoryview]))
def test_c_and_python_masks_give_the_same_bytes(data, key, skip, kind):
    payload = kind(data)[skip:]
    expected = bytes(a ^ key[i % 4] for i, a in enumerate(data[skip:]))
    assert bytes(ws.mask_python(payload, key)) == expected
    assert bytes(apply_mask(payload, key)) == expected


def test_decoder_any_split_gives_the_same_bytes():
    stream = (masked(ws.OP_BINARY, b"one") + masked(ws.OP_PING, b"p")
              + masked(ws.OP_BINARY, b"two-", fin=False) + masked(ws.OP_CONTINUATION, b"three")
              + masked(ws.OP_BINARY, b"z" * 70000))
    for cut in range(0, len(stream), 997):
        d = Decoder(from_client=True)
        a, ca = d.feed(stream[:cut])
        b, cb = d.feed(stream[cut:])
        assert bytes(a) + bytes(b) == b"onetwo-three" + b"z" * 70000
        assert ca + cb == [(ws.OP_PING, b"p")]


def test_server_frames_split_for_go_peers_and_decode():
    data = os.urandom(3 * ws.MAX_OUT + 5)
    out = ws.server_frames(data)
    d = Decoder(from_client=False)
    payload, controls = d.feed(out)
    assert bytes(payload) == data and controls == []
    assert out.count(b"\x82\x7e\x80\x00") >= 3  # frames of 32 KiB


_SIZES = st.one_of(st.integers(0, 125), st.integers(126, 3000), st.just(65535),
                   st.just(65536))


@fuzz(100)
@given(st.lists(st.tuples(st.sampled_from(["binary", "fragmented", "ping"]), _SIZES),
                max_size=6), st.integers(50, 20000))
def test_decoder_fast_and_general_paths_agree(frames, step):
    """Runs of a client's usual frames (the fast path) mixed with every other shape, cut into
    reads anywhere: the same bytes and pings come out, in order."""
    stream, want, pings = b"", b"", []
    for n, (kind, size) in enumerate(frames):
        payload, key = os.urandom(size), os.urandom(4)
        if kind == "ping":
            payload = payload[:125]
            stream += masked(ws.OP_PING, payload, key=key)
            pings.append((ws.OP_PING, payload))
            continue
        if kind == "fragmented":
            half = size // 2
            stream += (masked(ws.OP_BINARY, payload[:half], fin=False, key=key)
                       + masked(ws.OP_CONTINUATION, payload[half:], key=key[::-1]))
        else:
            stream += masked(ws.OP_BINARY, payload, key=key)
        want += payload
    d = Decoder(from_client=True)
    got, controls = b"", []
    for pos in range(0, len(stream), step):
        payload, more = d.feed(stream[pos:pos + step])
        got += bytes(payload)
        controls += more
    assert got == want and controls == pings


async def test_client_masks_every_frame_with_its_own_random_key():
    """RFC 6455 §5.3: a fresh 32-bit key per frame from our client (the load generator too)."""
    ours, theirs = trio.testing.memory_stream_pair()
    client = WebSocketStream(ours, client=True)
    chunks = [os.urandom(1317) for _ in range(64)]
    await client.send_records(chunks)
    data = await theirs.receive_some()
    keys = set()
    pos = 0
    while pos < len(data):
        assert data[pos:pos + 2] == b"\x82\xfe"  # FIN + binary, masked, 16-bit length
        keys.add(bytes(data[pos + 4:pos + 8]))
        pos += 8 + 1317
    assert len(keys) == 64 and any(len(set(k)) > 1 for k in keys)
    payload, _ = Decoder(from_client=True).feed(data)
    assert bytes(payload) == b"".join(chunks)


@pytest.mark.parametrize("frames, code", [
    (masked(ws.OP_TEXT, b"hi"), ws.CLOSE_UNSUPPORTED),
    (ws.frame(ws.OP_BINARY, b"hi"), ws.CLOSE_PROTOCOL),  # a client's frame must be masked
    (bytes([0xC2]) + masked(ws.OP_BINARY, b"hi")[1:], ws.CLOSE_PROTOCOL),  # RSV1
    (masked(ws.OP_CONTINUATION, b"hi"), ws.CLOSE_PROTOCOL),  # nothing to continue
    (masked(ws.OP_PING, b"x" * 126), ws.CLOSE_PROTOCOL),
    (masked(ws.OP_PING, b"x", fin=False), ws.CLOSE_PROTOCOL),
    (masked(0x3, b""), ws.CLOSE_PROTOCOL),
    (b"\x82\xff" + (ws.MAX_PAYLOAD + 1).to_bytes(8, "big"), ws.CLOSE_TOO_BIG),
])
def test_decoder_refusals(frames, code):
    with pytest.raises(FrameError) as raised:
        Decoder(from_client=True).feed(frames)
    assert raised.value.code == code


@fuzz(400)
@given(st.binary(max_size=200), st.integers(1, 64))
@example(b"\x82\xfe\x00", 1)
def test_fuzz_decoder_raises_only_frame_errors(data, step):
    d = Decoder(from_client=True)
    try:
        for pos in range(0, len(data), step):
            d.feed(data[pos:pos + step])
    except FrameError:
        pass


# ---- the server, over a socket ---------------------------------------------------------------

async def upgrade(port: int, extra: bytes = b"") -> tuple[trio.SocketStream, bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16))
    await stream.send_all(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                          b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                          b"Sec-WebSocket-Protocol: derp\r\nSec-WebSocket-Key: " + key
                          + b"\r\n" + extra + b"\r\n")
    data = b""
    with trio.fail_after(5):
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < 2:
            data += await stream.receive_some(65536)
    return stream, data


async def read_all(stream: trio.SocketStream) -> bytes:
    data = b""
    with trio.fail_after(5):
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data


async def test_ping_is_answered_and_close_is_echoed(start_server):
    server = await start_server()
    stream, data = await upgrade(server.main_port)
    head, rest = data.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 101") and b"Sec-WebSocket-Protocol: derp" in head
    d = Decoder(from_client=False)
    payload, _ = d.feed(rest)  # ServerKey came in the same write as the 101
    assert bytes(payload)[:1] == bytes([wire.FrameType.SERVER_KEY])
    await stream.send_all(masked(ws.OP_PING, b"hello")
                          + masked(ws.OP_CLOSE, ws.close_payload(1000, "bye")))
    _, controls = d.feed(await read_all(stream))
    assert controls == [(ws.OP_PONG, b"hello"), (ws.OP_CLOSE, b"\x03\xe8")]


async def test_unmasked_frames_get_close_1002(start_server):
    server = await start_server()
    stream, data = await upgrade(server.main_port)
    await stream.send_all(ws.frame(ws.OP_BINARY, b"\x02\x00\x00\x00\x00"))
    _, controls = Decoder(from_client=False).feed(data.split(b"\r\n\r\n", 1)[1]
                                                   + await read_all(stream))
    assert controls[-1][0] == ws.OP_CLOSE and controls[-1][1][:2] == b"\x03\xea"


async def test_upgrade_without_a_key_is_400(start_server):
    server = await start_server()
    stream = await trio.open_tcp_stream("127.0.0.1", server.main_port)
    await stream.send_all(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                          b"Connection: Upgrade\r\nSec-WebSocket-Protocol: derp\r\n\r\n")
    assert (await read_all(stream)).startswith(b"HTTP/1.1 400 ")
