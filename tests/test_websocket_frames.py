"""DERP's WebSocket framing (``proto.websocket``, pure, fuzzed) and the server's handling of
pings, closes, fragments and broken upgrades over a real socket. The independent peer is
trio-websocket (test_http.py, test_relay.py)."""

from __future__ import annotations

import base64
import os

import pytest
import trio
from hypothesis import example, given, strategies as st

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
    assert ws.mask_fast(data, 0x5A) == bytes(ws.mask(data, b"\x5a" * 4))
    assert ws.frame(ws.OP_BINARY, b"x" * 200)[:4] == b"\x82\x7e\x00\xc8"  # 16-bit length


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
