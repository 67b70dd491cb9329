"""The outbox's writer over a real loopback socket: what a mesh link's deferred writes batch."""

from __future__ import annotations

import os

import pytest
import trio
import trio.testing

from derper.metrics.counters import DropReason, Stats
from derper.proto import wire
from derper.relay.outbox import Outbox, WriteTimeout
from derper.relay.sendqueue import FORWARD_OVERHEAD

SRC, DST = bytes(range(32)), bytes(range(32, 64))


class CountingStream(trio.abc.Stream):
    """A real socket stream that counts the writes made to it, with the non-blocking write
    that lets an outbox's readers write for its writer (as ``TLSStream`` has)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.writes = 0
        self._unsent = b""  # what send_nowait could not hand the kernel; sent first

    async def send_all(self, data) -> None:
        self.writes += 1
        data, self._unsent = self._unsent + bytes(data), b""
        await self.stream.send_all(data)

    def can_send_now(self) -> bool:
        return not self._unsent

    def send_nowait(self, data) -> bool:
        self.writes += 1
        try:
            n = os.write(self.stream.socket.fileno(), data)
        except BlockingIOError:
            n = 0
        self._unsent = bytes(data[n:])
        return not self._unsent

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes=None) -> bytes:
        return await self.stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.stream.aclose()


async def socket_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    async with listener:
        port = listener.socket.getsockname()[1]
        client = await trio.open_tcp_stream("127.0.0.1", port)
        server = await listener.accept()
    return client, server


async def receive_exactly(stream: trio.SocketStream, n: int) -> bytes:
    got = b""
    with trio.fail_after(5):
        while len(got) < n:
            got += await stream.receive_some()
    return got


@pytest.mark.parametrize("direct", [True, False])
async def test_readers_write_directly_or_leave_one_write_to_the_writer(direct):
    """Three readers of one scheduler pass each queue a ForwardPacket and hand the outbox to
    ``flush``: a client session's (``direct``) writes each at once; a mesh link's writes
    nothing then, and its writer sends all three in one write, in order."""
    near, far = await socket_pair()
    stream = CountingStream(near)
    ready: list = []
    outbox = Outbox(stream, Stats(), ready, depth=1024, write_timeout=5.0,
                    overhead=FORWARD_OVERHEAD, counts_sent=False, back_pressure=True,
                    direct=direct)
    frames = [bytearray(wire.forward_packet(SRC, DST, b"packet %d" % i)) for i in range(3)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(outbox.write_loop)
        await trio.testing.wait_all_tasks_blocked()  # the writer is parked, idle
        for frame in frames:  # each reader: deliver, then flush what it made ready
            outbox.deliver(frame, False)
            for o in ready:
                o.flush()
            ready.clear()
        if direct:
            assert len(outbox.queue) == 0 and stream.writes == 3
        else:
            assert len(outbox.queue) == 3 and stream.writes == 0  # the readers wrote nothing
        assert await receive_exactly(far, sum(map(len, frames))) == b"".join(frames)
        assert stream.writes == (3 if direct else 1)
        nursery.cancel_scope.cancel()
    await near.aclose()
    await far.aclose()


async def test_a_link_write_the_peer_does_not_take_times_out():
    """Go's 5 s forwarding deadline, shortened: a peer that stops reading gets the link closed
    (WriteTimeout) once a write has waited that long, and what it held counts as lost."""
    near, far = await socket_pair()  # far never reads
    stats = Stats()
    outbox = Outbox(CountingStream(near), stats, [], depth=1024, write_timeout=0.3,
                    overhead=FORWARD_OVERHEAD, counts_sent=False, back_pressure=True,
                    direct=False)
    frame = wire.forward_packet(SRC, DST, bytes(1200))

    async def reader() -> None:  # a stream of packets for the link, faster than it drains
        while True:
            for _ in range(100):
                outbox.deliver(bytearray(frame), False)
            outbox.wake()
            await trio.sleep(0.01)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            with pytest.raises(WriteTimeout, match="0.3s"):
                await outbox.write_loop()
            nursery.cancel_scope.cancel()
    assert stats.dropped(DropReason.WRITE_ERROR) > 0
    await near.aclose()
    await far.aclose()
