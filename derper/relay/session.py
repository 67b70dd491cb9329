"""One server-side DERP connection: handshake, then a reader task and a writer task (spec §4).

The reader parses every complete frame a socket read brought, routes packets straight into the
destinations' send queues and never blocks on another client. The writer drains the queues,
pongs, PeerGone/PeerPresent notes and keepalives into one buffer and sends it with one
``send_all`` under the write deadline. A slow or hostile client can therefore only lose its own
packets. One shortcut: when a read queued packets for a destination whose writer is idle with
nothing else to send, the reader encrypts them and offers them to that socket itself, without
waiting (``_write_now``); what the socket does not take is left to the writer.
"""

from __future__ import annotations

import math
import random
from typing import Callable

import trio

from .. import logs
from ..admission.limits import TokenBucket
from ..errors import IOFailure, ProtocolError
from ..metrics.counters import DropReason
from ..net.reading import RECV_SIZE, read_more
from ..proto import handshake, wire
from ..proto.handshake import ClientInfo
from ..proto.keys import public_text
from ..proto.wire import FrameReader, FrameType, PeerGoneReason, PeerPresentFlags
from .hub import Relay
from .sendqueue import RECV_OVERHEAD, SendQueue

log = logs.get("derper.relay.session")

# Under a rate limit, bytes are handed to the frame parser in steps this big, each paid for
# first: a backlog of one big read never reaches a destination's 32-packet queue at once.
PACE_STEP = 4 << 10
# A read can bring more packets for one destination than its queue holds (a sender that wrote
# while we were descheduled). Before the queue head-drops, the reader yields until the
# destination's writer has taken the queue; bounded per read, so a stuck writer costs little.
YIELDS_PER_READ = 16
HOME_MOVE_GRACE = 5.0  # NotePreferred changes sooner than this after connecting aren't moves
NOT_HERE_RATE, NOT_HERE_BURST = 1.0, 3.0  # PeerGone(NotHere) per sender
KEEPALIVE_JITTER = 5 / 60  # Go: 60 s + [0, 5) s, chosen once per connection
# Connect and disconnect lines: every one while clients come and go at a human pace (a restart
# brings this many back at once), then one a second, so a connect flood cannot flood the log.
CONNECT_LOG_BURST = 200

STEADY_LIMITS = {
    FrameType.CLIENT_INFO: wire.CLIENT_INFO_MAX,
    FrameType.SEND_PACKET: wire.KEY_LEN + wire.MAX_PACKET_SIZE,
    FrameType.FORWARD_PACKET: 2 * wire.KEY_LEN + wire.MAX_PACKET_SIZE,
    FrameType.NOTE_PREFERRED: 1,
    FrameType.PING: wire.PING_MAX,
    FrameType.WATCH_CONNS: 0,
    FrameType.CLOSE_PEER: wire.KEY_LEN,
}
STEADY_WANTED = frozenset(STEADY_LIMITS) - {FrameType.CLIENT_INFO}

_SEND = int(FrameType.SEND_PACKET)
_RECV = int(FrameType.RECV_PACKET)
_is_disco = wire.is_disco
_KL = wire.KEY_LEN


def _write_ready(ready: list) -> None:
    """Write (or wake) every idle writer the current read queued packets for."""
    for dst in ready:
        dst._write_now()
    ready.clear()


class WriteTimeout(IOFailure):
    """A client took longer than the write deadline to take a batch."""


def _lost(e: Exception) -> str:
    return f"connection lost: {e}" if str(e) else "connection lost"


async def serve_derp(relay: Relay, stream: trio.abc.Stream, *, remote_ip: str | None,
                     remote_port: int, on_established: Callable[[], None],
                     initial: bytes = b"", preamble: bytes = b"", not_ideal: bool = False,
                     transport: str = "derp") -> None:
    """Run one DERP connection to the end. Peer misbehaviour is logged, never raised.

    ``preamble`` (the HTTP 101 response, if any) goes out in the same write as ServerKey;
    ``initial`` holds bytes already read past the HTTP request (a fast-start ClientInfo).
    ``on_established`` is called once the client is registered: from then on the connection
    no longer counts as half-open against -max-handshakes.
    """
    remote = f"{remote_ip}:{remote_port}" if remote_ip else "unknown"
    reader = FrameReader(STEADY_LIMITS, wanted=wire.ALL_TYPES)
    reader.feed(initial)
    stats = relay.stats
    stats.accepts += 1
    # ServerKey comes first (spec §3.1). A fast-start ClientInfo is already here, and its client
    # skips ServerKey: then it goes out with ServerInfo, one write instead of two.
    key_frame = preamble + wire.server_key(relay.public_key)
    try:
        with trio.fail_after(relay.handshake_timeout):
            info = _buffered_client_info(relay, reader)
            if info is None:
                await stream.send_all(key_frame)
                key_frame = b""
                info = await _read_client_info(relay, stream, reader)
    except ProtocolError as e:
        stats.handshake_failures += 1
        relay.log_throttle.log(log, "warning", "closing connection: bad DERP handshake",
                               remote=remote, error=str(e))
        return
    except trio.TooSlowError:
        stats.handshake_failures += 1
        relay.log_throttle.log(log, "info", "closing connection: DERP handshake timed out",
                               remote=remote)
        return
    except (trio.BrokenResourceError, trio.ClosedResourceError, EOFError) as e:
        stats.handshake_failures += 1
        relay.log_throttle.log(log, "info", "connection lost during DERP handshake",
                               remote=remote, error=str(e) or None)
        return
    if relay.admission is not None:
        if info.has_mesh_key(relay.mesh_key):
            stats.admission_mesh_bypass += 1
        elif not await relay.admission.admit(info.key, remote_ip):
            return  # silently, as Go: the client sees EOF where ServerInfo should be
    reader.want(STEADY_WANTED)
    session = Session(relay, stream, info, remote_ip, remote_port, not_ideal)
    relay.router.register(session)
    on_established()
    throttle = relay.log_throttle
    throttle.log(log, "info", "client connected", burst=CONNECT_LOG_BURST, every=1.0,
                 key=public_text(info.key), remote=remote, via=transport,
                 dup=session.dup or None, mesh=session.can_mesh or None)
    try:
        with session.cancel_scope:
            with trio.fail_after(relay.handshake_timeout):
                await stream.send_all(key_frame + handshake.server_info_frame(
                    info.key, relay.keypair.private, box_key=info.box_key))
            await session.run(reader)
    except trio.TooSlowError:
        session.close_reason = "timed out writing ServerInfo"
    except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
        session.close_reason = _lost(e)
    finally:
        session.finish()
    if session.close_is_error:  # a protocol error: a peer can cause these at will
        throttle.log(log, "warning", "client disconnected", kind="disconnected: protocol error",
                     key=public_text(info.key), remote=remote, reason=session.close_reason)
    else:
        throttle.log(log, "info", "client disconnected", burst=CONNECT_LOG_BURST, every=1.0,
                     key=public_text(info.key), remote=remote, reason=session.close_reason)


def _buffered_client_info(relay: Relay, reader: FrameReader) -> ClientInfo | None:
    """The ClientInfo if all of it has arrived, else None."""
    ftype = reader.peek_type()
    if ftype is not None and ftype != FrameType.CLIENT_INFO:
        raise ProtocolError(f"first frame has type {ftype:#04x}, not ClientInfo; "
                            "not a DERP client?")
    f = reader.next()
    if f is None:
        return None
    _, start, end = f
    return handshake.open_client_info(reader.data[start:end], relay.keypair.private)


async def _read_client_info(relay: Relay, stream: trio.abc.Stream,
                            reader: FrameReader) -> ClientInfo:
    """Read until the ClientInfo is whole; called once the buffer is known not to hold it."""
    while True:
        await read_more(stream, reader)
        if (info := _buffered_client_info(relay, reader)) is not None:
            return info


class Session:
    """A registered DERP client connection; the router's ``Peer``."""

    def __init__(self, relay: Relay, stream: trio.abc.Stream, info: ClientInfo,
                 remote_ip: str | None, remote_port: int, not_ideal: bool) -> None:
        self.relay = relay
        self.stream = stream
        self.key = info.key
        self.conn_id = relay.next_conn_id()
        self.dup = False
        self.remote_ip = remote_ip
        self.remote_port = remote_port
        self.rx_bytes = 0  # one add per read (not per packet): the status page's top senders
        self.can_mesh = info.has_mesh_key(relay.mesh_key)
        self.not_ideal = not_ideal
        flags = ((PeerPresentFlags.MESH if self.can_mesh else 0)
                 | (PeerPresentFlags.PROBER if info.is_prober else 0)
                 | (PeerPresentFlags.NOT_IDEAL if not_ideal else 0))
        self.present_flags = flags or PeerPresentFlags.REGULAR
        self.queue = SendQueue(relay.stats, relay.queue_depth)
        self.cancel_scope = trio.CancelScope()
        self.close_reason = "client closed the connection"
        self.close_is_error = False
        self.connected_at = trio.current_time()
        self.preferred = False
        self._lot = trio.lowlevel.ParkingLot()
        self._parked = False  # the writer waits in _lot and nobody has claimed it yet
        # The stream's non-blocking write (TLS only), for _write_now; and what that left to the
        # writer: counts of packets handed over but not yet all in the kernel.
        self._send_nowait = getattr(stream, "send_nowait", None)
        self._carried: tuple[int, int, int, int] | None = None
        self._closing = False
        self._pong: bytes | None = None
        self._peer_gone: dict[bytes, bytes] = {}  # coalesced by key
        self._presence: dict[bytes, bytes] = {}  # mesh watchers only, coalesced by key
        self._restarting: bytes | None = None
        self._keepalive_due = False
        self._not_here: TokenBucket | None = None
        self._last_dst: object = None
        self._recv_bucket: TokenBucket | None = None
        self._recv_limit: object = None  # the ReceiveLimit _recv_bucket was made for
        self._unpaced = b""  # read from the client, not yet paid for (see _paced_receive)
        if not_ideal:
            relay.stats.current_notideal_connections += 1

    # ---- the router's Peer interface (synchronous; called from other sessions' readers) -------

    def deliver(self, frame: bytearray, disco: bool) -> bool:
        if self._closing:
            self.relay.stats.drop(DropReason.GONE_DISCONNECTED, disco, len(frame) - RECV_OVERHEAD)
            return False
        full = self.queue.put(frame, disco)
        if self._parked:  # the reader calling us writes or wakes us before it awaits
            self._parked = False
            self.relay.ready.append(self)
        return full

    def send_peer_gone(self, key: bytes, reason: int) -> None:
        self._peer_gone[key] = wire.peer_gone(key, reason)
        self._wake()

    def send_peer_present(self, peer) -> None:
        self._presence[peer.key] = wire.peer_present(peer.key, peer.remote_ip, peer.remote_port,
                                                     peer.present_flags)
        self._wake()

    def notify_presence_gone(self, key: bytes) -> None:
        self._presence[key] = wire.peer_gone(key, PeerGoneReason.DISCONNECTED)
        self._wake()

    def close_by_peer_request(self) -> None:
        self.close_reason = "closed by a mesh peer (ClosePeer)"
        self.cancel_scope.cancel()

    def send_restarting(self, frame: bytes) -> None:
        self._restarting = frame
        self._wake()

    @property
    def restart_pending(self) -> bool:
        return self._restarting is not None and not self._closing

    def _wake(self) -> None:
        if self._parked:
            self._parked = False
            self._lot.unpark()

    def _write_now(self) -> None:
        """Write the packets a reader just queued for this idle writer, if that cannot block.

        Saves the trip through the scheduler to the writer per batch. Only when nothing but
        packets is pending (so frame order is the writer's) and the stream is free; else, or
        if the socket does not take everything at once, the writer is woken as usual and sends
        the rest under its write deadline. Never raises into the calling reader.
        """
        if (self._send_nowait is None or self._closing or not self.stream.can_send_now()
                or self._control_pending()):
            self._lot.unpark()
            return
        stats = self.relay.stats
        batch: list = []
        nd, bd, no, bo = self.queue.take(batch)
        stats.buffered_write_frames.observe(len(batch))
        try:
            done = self._send_nowait(batch[0] if len(batch) == 1 else b"".join(batch))
        except trio.BrokenResourceError as e:
            self._count_write_error(nd, bd, no, bo)
            self.close_reason = _lost(e)
            self.cancel_scope.cancel()
            self._lot.unpark()
            return
        if done:
            stats.packets_sent += nd + no
            stats.bytes_sent += bd + bo
            self._parked = True
        else:
            self._carried = (nd, bd, no, bo)
            self._lot.unpark()

    # ---- lifecycle ----------------------------------------------------------------------------

    async def run(self, reader: FrameReader) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._guard, self._write_loop, nursery.cancel_scope)
            nursery.start_soon(self._tick_keepalives)
            await self._guard(self._read_loop, nursery.cancel_scope, reader)

    async def _guard(self, loop, scope: trio.CancelScope, *args) -> None:
        """Run one of the two loops; whatever ends it ends the other and becomes the reason."""
        try:
            await loop(*args)
        except ProtocolError as e:
            self.close_reason, self.close_is_error = f"protocol error: {e}", True
        except WriteTimeout as e:
            self.close_reason = str(e)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            self.close_reason = _lost(e)
        finally:
            ready = self.relay.ready
            for dst in ready:  # an error ended a read midway: those writers take over
                dst._lot.unpark()
            ready.clear()
            scope.cancel()

    def finish(self) -> None:
        self._closing = True
        relay = self.relay
        relay.router.unregister(self)
        self.queue.discard()
        if self.preferred:
            relay.stats.current_home_connections -= 1
        if self.not_ideal:
            relay.stats.current_notideal_connections -= 1

    # ---- reading ------------------------------------------------------------------------------

    async def _read_loop(self, reader: FrameReader) -> None:
        stream = self.stream
        relay = self.relay
        stats = relay.stats
        router = relay.router
        active_get = router.active.get
        my_key = self.key
        ready = relay.ready
        leftover = reader.buffered > 0  # frames that came with the handshake read
        while True:
            if leftover:
                leftover = False
            else:
                if relay.pacing or self._unpaced:  # (a reload may lift the limit mid-chunk)
                    chunk = await self._paced_receive()
                else:
                    chunk = await stream.receive_some(RECV_SIZE)
                if not chunk:
                    return
                self.rx_bytes += len(chunk)
                reader.feed(chunk)
            if self.dup:
                router.note_activity(self)
            yields = YIELDS_PER_READ
            buf = reader.data
            view = None
            while (f := reader.next()) is not None:
                ftype, s, e = f
                if ftype == _SEND:
                    ps = s + _KL
                    n = e - ps
                    if n < 0:
                        raise ProtocolError("SendPacket shorter than a key")
                    disco = _is_disco(buf, ps, e)
                    stats.packets_received += 1
                    stats.bytes_received += n
                    if disco:
                        stats.packets_received_disco += 1
                    dst = active_get(buf[s:ps])
                    if dst is None:
                        self._unknown_dest(buf[s:ps], disco, n, DropReason.UNKNOWN_DEST)
                        continue
                    if view is None:
                        view = memoryview(buf)
                    out = bytearray(view[s - 5:e])  # SendPacket → RecvPacket: same length
                    out[0] = _RECV
                    out[5:37] = my_key
                    full = dst.deliver(out, disco)
                    if dst is not self._last_dst:
                        router.note_sent(my_key, dst)
                        self._last_dst = dst
                    while full and yields:  # let its writer take the queue first
                        if ready:  # (none may wait in ready while we await)
                            _write_ready(ready)
                        else:  # the writer may run after us in a batch
                            yields -= 1
                            await trio.lowlevel.checkpoint()
                        full = dst.queue.full(disco)
                else:
                    if view is None:
                        view = memoryview(buf)
                    self._handle_control(ftype, buf, view, s, e)
            if ready:
                _write_ready(ready)

    async def _paced_receive(self) -> bytes:
        """The next at most PACE_STEP bytes from the client, once the limits allow them.

        Meanwhile nothing more is read from this client, so TCP slows it down (spec §4.10:
        back-pressure, never drops). Mesh peers are exempt, as in Go: they carry a region.
        """
        if not self._unpaced:
            self._unpaced = await self.stream.receive_some(RECV_SIZE)
        else:
            await trio.lowlevel.checkpoint()  # let the writers drain what the last step routed
        step, self._unpaced = self._unpaced[:PACE_STEP], self._unpaced[PACE_STEP:]
        if step and not self.can_mesh:
            await self._pace(len(step))
        return step

    async def _pace(self, n: int) -> None:
        relay = self.relay
        limit = relay.recv_limit
        if limit is not None:
            now = trio.current_time()
            if self._recv_limit is not limit:  # first use, or -rate-config was reloaded
                self._recv_bucket = TokenBucket(limit.rate, limit.burst, now)
                self._recv_limit = limit
            wait = self._recv_bucket.take(now, n)
            if wait > 0:
                relay.stats.rate_limit_per_client_waited += 1
                await trio.sleep(wait)
        if relay.bandwidth is not None:
            await relay.bandwidth.acquire(self, n)

    def _unknown_dest(self, dst_key: bytes, disco: bool, n: int, reason: DropReason) -> None:
        self.relay.stats.drop(reason, disco, n)
        if disco:
            now = trio.current_time()
            if self._not_here is None:
                self._not_here = TokenBucket(NOT_HERE_RATE, NOT_HERE_BURST, now)
            if self._not_here.allow(now):
                self.send_peer_gone(dst_key, PeerGoneReason.NOT_HERE)

    def _handle_control(self, ftype: int, buf: bytes, view: memoryview, s: int, e: int) -> None:
        stats = self.relay.stats
        if ftype == FrameType.PING:
            if e - s < 8:
                raise ProtocolError(f"Ping of {e - s} bytes is shorter than 8")
            stats.got_ping += 1
            if self._pong is None:  # one pending pong at most, as in Go
                self._pong = buf[s:s + 8]
                self._wake()
        elif ftype == FrameType.NOTE_PREFERRED:
            if e - s != 1:
                raise ProtocolError("NotePreferred must carry exactly one byte")
            self._note_preferred(buf[s] != 0)
        elif ftype == FrameType.FORWARD_PACKET:
            self._require_mesh("ForwardPacket")
            if e - s < 2 * _KL:
                raise ProtocolError("ForwardPacket shorter than two keys")
            self._forwarded_in(buf, view, s, e)
        elif ftype == FrameType.WATCH_CONNS:
            self._require_mesh("WatchConns")
            if self.key != self.relay.public_key:  # a node watching itself is not enrolled
                self.relay.router.add_watcher(self)
        elif ftype == FrameType.CLOSE_PEER:
            self._require_mesh("ClosePeer")
            if e - s != _KL:
                raise ProtocolError("ClosePeer must carry exactly one key")
            self.relay.router.close_key(buf[s:e])

    def _require_mesh(self, what: str) -> None:
        if not self.can_mesh:
            raise ProtocolError(f"{what} requires the mesh key")

    def _note_preferred(self, preferred: bool) -> None:
        if preferred == self.preferred:
            return
        stats = self.relay.stats
        self.preferred = preferred
        stats.current_home_connections += 1 if preferred else -1
        if trio.current_time() - self.connected_at > HOME_MOVE_GRACE:
            if preferred:
                stats.home_moves_in += 1
            else:
                stats.home_moves_out += 1

    def _forwarded_in(self, buf: bytes, view: memoryview, s: int, e: int) -> None:
        """A mesh peer relays a packet from one of its clients to one of ours (never re-sent)."""
        stats = self.relay.stats
        src, dst_key = buf[s:s + _KL], buf[s + _KL:s + 2 * _KL]
        ps = s + 2 * _KL
        n = e - ps
        disco = _is_disco(buf, ps, e)
        stats.packets_forwarded_in += 1
        dst = self.relay.router.active.get(dst_key)
        if dst is None:
            self._unknown_dest(dst_key, disco, n, DropReason.UNKNOWN_DEST_ON_FWD)
            return
        out = bytearray(view[ps - _KL - 5:e])
        out[0:5] = wire.header(FrameType.RECV_PACKET, _KL + n)
        out[5:5 + _KL] = src
        dst.deliver(out, disco)
        self.relay.router.note_sent(src, dst)

    # ---- writing ------------------------------------------------------------------------------

    def _pending(self) -> bool:
        return bool(self.queue.disco or self.queue.other or self._carried is not None
                    or self._control_pending())

    def _control_pending(self) -> bool:
        return bool(self._pong is not None or self._peer_gone or self._presence
                    or self._restarting is not None or self._keepalive_due)

    async def _tick_keepalives(self) -> None:
        """Go's ticker: 60 s + jitter, a KeepAlive on every tick whatever else was sent.

        A task of its own so the writer parks without a timeout: a cancel scope per wake-up
        would cost more than the batch it writes. Ticks missed while the writer is blocked
        coalesce into one KeepAlive.
        """
        relay = self.relay
        period = relay.keepalive_interval * (1 + random.uniform(0, KEEPALIVE_JITTER))
        while True:
            await trio.sleep(period)
            self._keepalive_due = True
            self._wake()

    async def _write_loop(self) -> None:
        relay = self.relay
        stats = relay.stats
        stream = self.stream
        queue = self.queue
        timeout = relay.mesh_write_timeout if self.can_mesh else relay.write_timeout
        batch: list = []
        nd = bd = no = bo = 0
        frames_per_write = stats.buffered_write_frames
        fpw, fpw_cap = frames_per_write.by_value, frames_per_write.cap
        last_take = None  # when this writer last took packets; None until it first did
        # One scope for every write, its deadline armed per write: cheaper than a new scope.
        with trio.CancelScope() as deadline:
            while True:
                idle = not self._pending()
                if idle:
                    self._parked = True
                    await self._lot.park()
                if self._keepalive_due:
                    batch.append(wire.KEEP_ALIVE)
                    self._keepalive_due = False
                pong = self._pong
                if pong is not None:
                    batch.append(wire.pong(pong))
                    self._pong = None
                gone_not_here = gone_disconnected = 0
                if self._peer_gone:
                    for frame in self._peer_gone.values():
                        batch.append(frame)
                        if frame[-1] == PeerGoneReason.NOT_HERE:
                            gone_not_here += 1
                        else:
                            gone_disconnected += 1
                    self._peer_gone.clear()
                nd, bd, no, bo = queue.take(batch)
                if nd or no:
                    now = trio.current_time()
                    if not idle and last_take is not None:
                        # Packets that found the writer busy waited at most since the last
                        # take; those that woke an idle (or not yet started) writer are not
                        # timed: that would be a clock read per packet.
                        stats.average_queue_duration_ms = (
                            0.9 * stats.average_queue_duration_ms
                            + 100.0 * (now - last_take))  # α=0.1, in ms
                    last_take = now
                carried = self._carried
                if carried is not None:  # a reader's write the socket did not take whole
                    self._carried = None
                    nd, bd = nd + carried[0], bd + carried[1]
                    no, bo = no + carried[2], bo + carried[3]
                if self._presence:
                    stats.mesh_update_batch_size.observe(len(self._presence))
                    stats.mesh_update_loop_count.observe(1)
                    batch.extend(self._presence.values())
                    self._presence.clear()
                restarting = self._restarting
                if restarting is not None:
                    batch.append(restarting)
                n = len(batch)
                if not n:
                    if carried is None:
                        continue
                elif n < fpw_cap:
                    fpw[n] += 1
                else:
                    frames_per_write.observe(n)
                data = batch[0] if n == 1 else b"".join(batch)  # b"": send what was carried
                batch.clear()
                if timeout > 0:
                    deadline.deadline = trio.current_time() + timeout
                try:
                    await stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._count_write_error(nd, bd, no, bo)
                    raise
                deadline.deadline = math.inf
                stats.packets_sent += nd + no
                stats.bytes_sent += bd + bo
                if pong is not None:
                    stats.sent_pong += 1
                stats.peer_gone_not_here_frames += gone_not_here
                stats.peer_gone_disconnected_frames += gone_disconnected
                if restarting is not None and self._restarting is restarting:
                    self._restarting = None
        # Only the write deadline can end the loop without an exception.
        stats.sclient_write_timeouts += 1
        self._count_write_error(nd, bd, no, bo)
        raise WriteTimeout(f"write timed out after {timeout:g}s (client too slow)")

    def _count_write_error(self, nd: int, bd: int, no: int, bo: int) -> None:
        stats = self.relay.stats
        stats.drop(DropReason.WRITE_ERROR, True, bd, packets=nd)
        stats.drop(DropReason.WRITE_ERROR, False, bo, packets=no)
