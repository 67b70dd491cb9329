"""Where frames for one connection wait, and the one task that writes them (spec §4.5).

Shared by client sessions (RecvPacket frames) and mesh links (ForwardPacket frames): a reader
that routes a packet only calls ``deliver``, which never blocks; the writer drains the queues
and the connection's control frames into one buffer and hands it to the socket at once; only
what the socket does not take is sent with ``send_all`` under the write deadline (arming a
deadline costs more than most writes). One shortcut: when a read queued packets for an outbox whose writer is idle
with nothing else to send, the reader offers them to that socket itself (``flush``), without a
trip through the scheduler; what the socket does not take is left to the writer.
"""

from __future__ import annotations

import math
from typing import Protocol

import trio

from ..errors import IOFailure
from ..metrics.counters import DropReason, Stats
from .sendqueue import RECV_OVERHEAD, SendQueue


class WriteTimeout(IOFailure):
    """The peer took longer than the write deadline to take a batch."""


class Control(Protocol):
    """The connection's own frames (pongs, notes, keepalives), written around the packets."""

    def pending(self) -> bool: ...
    def head(self, batch: list) -> None:
        """Append what goes before the queued packets."""
    def tail(self, batch: list) -> None:
        """Append what goes after them."""
    def written(self) -> None:
        """The batch went out: count it."""


def lost(e: Exception) -> str:
    return f"connection lost: {e}" if str(e) else "connection lost"


class Outbox:
    """Queues, a parked writer, the direct write and the write deadline of one connection.

    ``ready`` is the server-wide list of outboxes whose idle writer a reader just claimed: that
    reader calls ``flush`` on each (or ``wake`` after an error) before it next awaits.
    ``counts_sent``: written packets count as ``packets_sent`` (client sessions; a mesh link's
    count ``packets_forwarded_out`` when they are forwarded). ``direct``: whether ``flush`` may
    write for the idle writer; a mesh link says no: many clients' readers feed it, and its
    writer, woken once and run after them, sends what they all queued in one write (one TLS
    record and one syscall on this node, one read on the peer's, instead of one per reader).
    """

    def __init__(self, stream: trio.abc.Stream, stats: Stats, ready: list, *, depth: int,
                 write_timeout: float, overhead: int = RECV_OVERHEAD,
                 counts_sent: bool = True, control: Control | None = None,
                 back_pressure: bool = False, direct: bool = True) -> None:
        self.stream = stream
        self.stats = stats
        self.queue = SendQueue(stats, depth, overhead)
        self.write_timeout = write_timeout
        self.counts_sent = counts_sent
        self.control = control
        self.cancel_scope = trio.CancelScope()  # the whole connection's
        self.close_reason = "closed"
        self.closing = False
        self._ready = ready
        self._lot = trio.lowlevel.ParkingLot()
        self._parked = False  # the writer waits in _lot and nobody has claimed it yet
        self._writing = False  # the writer is in a send (which may wait for the peer)
        self._stopping = False  # the writer returns at its next look (stop_writer)
        # The stream's non-blocking write (TLS only), for flush (if ``direct``) and the writer;
        # and whether bytes it accepted are still buffered in the stream, for the writer.
        self._send_nowait = getattr(stream, "send_nowait", None)
        self._direct = direct
        self._carried = False
        # Readers that found the queue full and wait for room (back_pressure outboxes only).
        self.back_pressure = back_pressure
        self._room = trio.lowlevel.ParkingLot()

    # ---- what readers call ------------------------------------------------------------------

    def deliver(self, frame: bytearray, disco: bool) -> bool:
        """Queue a frame; True when that filled the queue (the caller may yield once)."""
        if self.closing:
            self.stats.drop(DropReason.GONE_DISCONNECTED, disco,
                            len(frame) - self.queue.overhead)
            return False
        full = self.queue.put(frame, disco)
        if self._parked:  # the reader calling us writes or wakes us before it awaits
            self._parked = False
            self._ready.append(self)
        return full

    def full(self, disco: bool) -> bool:
        return self.queue.full(disco)

    async def wait_room(self) -> None:
        """Until the writer has taken the queue (or the connection ends): a full mesh link
        slows its senders down, through TCP, instead of dropping a region's packets (Go's
        forwarding write blocks the sender too, under the same 5 s deadline)."""
        if not self.closing:
            await self._room.park()

    def wake(self) -> None:
        """Make the writer look again (a control frame is due, or a claim is given up)."""
        self._parked = False
        self._lot.unpark()

    def stop_writer(self) -> bool:
        """Let the writer return the next time it looks for work (the connection ends without
        an error: nothing need be cancelled); False if it is in a send, to be cancelled."""
        self._stopping = True
        if self._writing:
            return False
        self._parked = False
        self._lot.unpark()
        return True

    def close(self, reason: str) -> None:
        self.close_reason = reason
        self.cancel_scope.cancel()

    def flush(self) -> None:
        """Write the packets a reader just queued for this idle writer, if that cannot block.

        Only when nothing but packets is pending (so frame order is the writer's) and the
        stream is free; else, or if the socket does not take everything at once, the writer
        is woken as usual and sends the rest under its write deadline. Never raises into the
        calling reader.
        """
        control = self.control
        if (not self._direct or self._send_nowait is None or self.closing
                or not self.stream.can_send_now()
                or (control is not None and control.pending())):
            self._lot.unpark()
            return
        batch: list = []
        self.queue.take(batch)
        if self.counts_sent:
            self.stats.buffered_write_frames.observe(len(batch))
        try:
            done = self._send_nowait(batch[0] if len(batch) == 1 else b"".join(batch))
        except trio.BrokenResourceError as e:
            self.queue.settle_lost()
            self.close(lost(e))
            self._lot.unpark()
            return
        if done:
            self._settle_sent()
            self._parked = True
        else:
            self._carried = True
            self._lot.unpark()

    # ---- the writer -------------------------------------------------------------------------

    def _settle_sent(self) -> None:
        if self.counts_sent:
            self.queue.settle_sent()
        else:
            self.queue.forget_in_flight()

    def _pending(self) -> bool:
        control = self.control
        return bool(self.queue.disco or self.queue.other or self._carried
                    or (control is not None and control.pending()))

    async def write_loop(self) -> None:
        """Drain until cancelled or stopped (``stop_writer``); raises WriteTimeout, or the
        stream's error, to end the connection (the in-flight packets are counted as write
        errors)."""
        stats, stream, queue, control = self.stats, self.stream, self.queue, self.control
        timeout = self.write_timeout
        counts = self.counts_sent
        send_nowait = self._send_nowait
        batch: list = []
        frames_per_write = stats.buffered_write_frames
        fpw, fpw_cap = frames_per_write.by_value, frames_per_write.cap
        last_take = None  # when this writer last took packets; None until it first did
        # One scope for every write, its deadline armed per write: cheaper than a new scope.
        with trio.CancelScope() as deadline:
            while True:
                idle = not self._pending()
                if idle and not self._stopping:
                    self._parked = True
                    await self._lot.park()
                if self._stopping:
                    return
                if control is not None:
                    control.head(batch)
                if self._room:
                    self._room.unpark_all()
                if queue.take(batch) and counts:
                    now = trio.current_time()
                    if not idle and last_take is not None:
                        # Packets that found the writer busy waited at most since the last
                        # take; those that woke an idle (or not yet started) writer are not
                        # timed: that would be a clock read per packet.
                        stats.average_queue_duration_ms = (
                            0.9 * stats.average_queue_duration_ms
                            + 100.0 * (now - last_take))  # α=0.1, in ms
                    last_take = now
                if control is not None:
                    control.tail(batch)
                carried, self._carried = self._carried, False
                n = len(batch)
                if not n:
                    if not carried:
                        continue
                elif not counts:
                    pass
                elif n < fpw_cap:
                    fpw[n] += 1
                else:
                    frames_per_write.observe(n)
                data = batch[0] if n == 1 else b"".join(batch)  # b"": send what was carried
                batch.clear()
                sent = False
                self._writing = True
                try:
                    # Most writes go out at once; only one that cannot arms the deadline.
                    if n and send_nowait is not None and stream.can_send_now():
                        sent = send_nowait(data)  # what the socket did not take stays in stream
                        data = b""
                    if not sent:
                        if timeout > 0:
                            deadline.deadline = trio.current_time() + timeout
                        await stream.send_all(data)
                        deadline.deadline = math.inf
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    queue.settle_lost()
                    raise
                finally:
                    self._writing = False
                self._settle_sent()
                if control is not None:
                    control.written()
        # Only the write deadline can end the loop without an exception.
        queue.settle_lost()
        raise WriteTimeout(f"write timed out after {timeout:g}s")

    def discard(self) -> None:
        """The connection is over: what is still queued will never be sent."""
        self.closing = True
        self.queue.discard()
        self._room.unpark_all()
