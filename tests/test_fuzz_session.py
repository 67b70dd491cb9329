"""Fuzzing a live DERP session: after a valid handshake a peer sends any frames at all. Its
connection may close, the server logs no internal error, and other clients keep relaying."""

from __future__ import annotations

import logging
from dataclasses import replace

import trio
from hypothesis import example, given, strategies as st

from derper import client as dc
from derper.proto import wire
from derper.proto.keys import KeyPair
from derper.server import Server
from tests.conftest import BASE
from tests.fuzzing import fuzz
from tests.relay_helpers import assert_relays
from tests.test_bad_input import good_handshake

FRAME_TYPES = st.one_of(st.sampled_from(list(wire.FrameType)), st.integers(0, 255))


@st.composite
def frames(draw) -> bytes:
    """Frames with honest or lying lengths, known and unknown types, real keys or not."""
    out = b""
    for ftype, payload, lie in draw(st.lists(st.tuples(
            FRAME_TYPES, st.binary(max_size=120), st.sampled_from([0, 0, 0, 1, -1, 1 << 20])),
            max_size=8)):
        length = max(0, len(payload) + lie)
        out += wire.header(ftype, length) + payload
    return out


class Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def one_session(data: bytes) -> None:
    server = Server(replace(BASE, handshake_timeout=2.0), KeyPair.generate())
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        u = f"http://127.0.0.1:{server.main_port}/derp"
        async with dc.connect(u) as a, dc.connect(u) as b:
            bad = await trio.open_tcp_stream("127.0.0.1", server.main_port)
            await bad.send_all(good_handshake(server.relay.public_key) + data)
            await bad.send_eof()  # then the server must close it, whatever came before
            with trio.fail_after(5):
                while await bad.receive_some():
                    pass
            await bad.aclose()
            await assert_relays(a, b)
            await assert_relays(b, a)
        nursery.cancel_scope.cancel()


@fuzz(60)
@given(data=frames())
@example(data=wire.header(wire.FrameType.SEND_PACKET, 31) + bytes(31))  # shorter than a key
@example(data=wire.header(wire.FrameType.FORWARD_PACKET, 64) + bytes(64))  # no mesh key
@example(data=wire.header(0x7F, (1 << 20) + 1))  # an unknown type over the frame limit
def test_any_frames_after_the_handshake(data):
    errors = Errors()
    logger = logging.getLogger("derper")
    logger.addHandler(errors)
    try:
        trio.run(one_session, data)
    finally:
        logger.removeHandler(errors)
    assert [r.getMessage() for r in errors.records] == []
