"""One server-side DERP connection: handshake, then a reader task and a writer task (spec §4).

A thin trio shell: the protocol rules and the control frames owed live in ``conn.ClientConn``
(pure), the queues and the writer in ``outbox.Outbox`` (shared with mesh links). The reader
parses every complete frame a socket read brought and routes packets straight into the
destinations' outboxes (a local client's, else a mesh link's) and never blocks on another
connection, so a slow or hostile client can only lose its own packets.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import trio

from .. import logs
from ..admission.limits import TokenBucket
from ..errors import ProtocolError
from ..metrics.counters import DropReason
from ..net.reading import RECV_SIZE, read_more
from ..proto import handshake, wire
from ..proto.handshake import ClientInfo
from ..proto.keys import public_text
from ..proto.wire import FrameReader, FrameType
from .conn import ClientConn, Event
from .hub import Relay
from .outbox import Outbox, WriteTimeout, lost

log = logs.get("derper.relay.session")

# Under a rate limit, bytes are handed to the frame parser in steps this big, each paid for
# first: a backlog of one big read never reaches a destination's 32-packet queue at once.
PACE_STEP = 4 << 10
# A read can bring more packets for one destination than its queue holds (a sender that wrote
# while we were descheduled). Before the queue head-drops, the reader yields until the
# destination's writer has taken the queue; bounded per read, so a stuck writer costs little.
YIELDS_PER_READ = 16
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
_FWD = int(FrameType.FORWARD_PACKET)
_FWD_HEAD = 5 + wire.KEY_LEN  # ForwardPacket = header, source key, then SendPacket's payload
_pack_header = wire.pack_header_into
_is_disco = wire.is_disco
_KL = wire.KEY_LEN


def _flush_ready(ready: list) -> None:
    """Write (or wake) every idle writer the current read queued packets for."""
    for dst in ready:
        dst.flush()
    ready.clear()


async def serve_derp(relay: Relay, stream: trio.abc.Stream, *, remote_ip: str | None,
                     remote_port: int, on_established: Callable[[], None],
                     initial: bytes = b"", preamble: bytes = b"", not_ideal: bool = False,
                     transport: str = "derp") -> None:
    """Run one DERP connection to the end. Peer misbehaviour is logged, never raised.

    ``preamble`` (the HTTP 101 response, if any) goes out in the same write as ServerKey;
    ``initial`` holds bytes already read past the HTTP request (a fast-start ClientInfo).
    ``on_established`` is called once the client is registered: from then on the connection
    no longer counts as half-open against -max-handshakes. The handshake's steps and the
    teardown take their turns on the loop (``relay.pacer``).
    """
    remote = f"{remote_ip}:{remote_port}" if remote_ip else "unknown"
    reader = FrameReader(STEADY_LIMITS, wanted=wire.ALL_TYPES)
    reader.feed(initial)
    stats = relay.stats
    pacer = relay.pacer
    stats.accepts += 1
    # ServerKey comes first (spec §3.1). A fast-start ClientInfo is already here, and its client
    # skips ServerKey: then it goes out with ServerInfo, one write instead of two.
    key_frame = preamble + wire.server_key(relay.public_key)
    try:
        with trio.fail_after(relay.handshake_timeout):
            info = await pacer.call(partial(_buffered_client_info, relay, reader))
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
    sibling = info.has_mesh_key(relay.sibling_key)
    if info.mesh_key and not sibling and not info.has_mesh_key(relay.mesh_key):
        relay.log_throttle.log(log, "warning", "a client presented a mesh key that is not this "
                               "region's; a mesh peer needs the same -mesh-psk-file on every "
                               "node", kind="wrong mesh key", key=public_text(info.key),
                               remote=remote, have_mesh_key=relay.mesh_key is not None)
    if relay.admission is not None:
        if sibling or info.has_mesh_key(relay.mesh_key):
            stats.admission_mesh_bypass += 1
        elif not await relay.admission.admit(info.key, remote_ip):
            return  # silently, as Go: the client sees EOF where ServerInfo should be
    throttle = relay.log_throttle
    await pacer.turn()
    with pacer.measured():
        reader.want(STEADY_WANTED)
        session = Session(relay, stream, info, remote_ip, remote_port, not_ideal, sibling)
        relay.router.register(session)
        relay.keepalives.add(session)
        on_established()
        throttle.log(log, "info", "client connected", burst=CONNECT_LOG_BURST, every=1.0,
                     key=public_text(info.key), remote=remote, via=transport,
                     dup=session.dup or None, mesh=session.can_mesh or None)
        hello = key_frame + handshake.server_info_frame(info.key, relay.keypair.private,
                                                        box_key=info.box_key)
    try:
        with session.cancel_scope:
            with trio.fail_after(relay.handshake_timeout):
                await stream.send_all(hello)
            await session.run(reader)
    except trio.TooSlowError:
        session.close_reason = "timed out writing ServerInfo"
    except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
        session.close_reason = lost(e)
    finally:
        with pacer.measured():
            session.finish()
    with pacer.measured():
        if session.close_is_error:  # a protocol error: a peer can cause these at will
            throttle.log(log, "warning", "client disconnected",
                         kind="disconnected: protocol error", key=public_text(info.key),
                         remote=remote, reason=session.close_reason)
        else:
            throttle.log(log, "info", "client disconnected", burst=CONNECT_LOG_BURST,
                         every=1.0, key=public_text(info.key), remote=remote,
                         reason=session.close_reason)


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
    step = partial(_buffered_client_info, relay, reader)
    while True:
        await read_more(stream, reader)
        if (info := await relay.pacer.call(step)) is not None:
            return info


class Session(Outbox):
    """A registered DERP client connection: the router's ``Client``, an ``Outbox`` for packets
    to it, and the reader that routes what it sends."""

    def __init__(self, relay: Relay, stream: trio.abc.Stream, info: ClientInfo,
                 remote_ip: str | None, remote_port: int, not_ideal: bool,
                 sibling: bool = False) -> None:
        can_mesh = sibling or info.has_mesh_key(relay.mesh_key)
        self.conn = ClientConn(info.key, relay.stats, server_key=relay.public_key,
                               can_mesh=can_mesh, is_prober=info.is_prober, not_ideal=not_ideal,
                               connected_at=trio.current_time())
        super().__init__(stream, relay.stats, relay.ready, depth=relay.queue_depth,
                         write_timeout=(relay.mesh_write_timeout if can_mesh
                                        else relay.write_timeout),
                         control=self.conn)
        self.relay = relay
        self.key = info.key
        self.conn_id = relay.next_conn_id()
        self.dup = False
        self.remote_ip = remote_ip
        self.remote_port = remote_port
        self.rx_bytes = 0  # one add per read (not per packet): the status page's top senders
        self.can_mesh = can_mesh
        self.sibling = sibling  # a link from another worker process of this host
        self.not_ideal = not_ideal
        self.present_flags = self.conn.present_flags
        self.close_reason = "client closed the connection"
        self.close_is_error = False
        self._last_dst: object = None  # note_sent's cache for our packets: the last destination
        # ... and for a mesh peer's: the last (source, destination), and the router's departure
        # count when they were noted (a source that left the region and came back is new).
        self._fwd_noted: tuple = (b"", None, -1)
        self._recv_bucket: TokenBucket | None = None
        self._recv_limit: object = None  # the ReceiveLimit _recv_bucket was made for
        self._unpaced = b""  # read from the client, not yet paid for (see _paced_receive)
        if not_ideal:
            relay.stats.current_notideal_connections += 1

    # ---- the router's Client interface (synchronous; called from other sessions' readers) -----

    def send_peer_gone(self, key: bytes, reason: int) -> None:
        self.conn.peer_gone(key, reason)
        self.wake()

    def send_peer_present(self, peer) -> None:
        self.conn.peer_present(peer.key, peer.remote_ip, peer.remote_port, peer.present_flags)
        self.wake()

    def notify_presence_gone(self, key: bytes) -> None:
        self.conn.presence_gone(key)
        self.wake()

    def close_by_peer_request(self) -> None:
        self.close("closed by a mesh peer (ClosePeer)")

    def send_restarting(self, frame: bytes) -> None:
        self.conn.restarting(frame)
        self.wake()

    @property
    def restart_pending(self) -> bool:
        return self.conn.restart_pending and not self.closing

    # ---- lifecycle ----------------------------------------------------------------------------

    def keepalive(self) -> None:
        """The server's keepalive timer says one is due (``relay.keepalive``)."""
        self.conn.keepalive()
        self.wake()

    async def run(self, reader: FrameReader) -> None:
        """Read (this task) and write (another) until either ends the session.

        A client that leaves or breaks the protocol ends it at its reader; the session then
        takes its turn on the loop (thousands leaving at once must not stall the sessions
        still relaying) and lets its idle writer return, with nothing to cancel. A failed write
        cancels the reader.
        """
        async with trio.open_nursery() as nursery:
            scope = nursery.cancel_scope
            nursery.start_soon(self._write, scope)
            try:
                await self._read_loop(reader)
            except ProtocolError as e:
                self.close_reason, self.close_is_error = f"protocol error: {e}", True
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                self.close_reason = lost(e)
            finally:
                ready = self.relay.ready
                for dst in ready:  # an error ended a read midway: those writers take over
                    dst.wake()
                ready.clear()
            self.closing = True  # packets for it are dropped from now on
            await self.relay.pacer.close_turn()
            if not self.stop_writer():
                scope.cancel()

    async def _write(self, scope: trio.CancelScope) -> None:
        try:
            await self.write_loop()
            return  # stopped by the reader
        except WriteTimeout as e:
            self.relay.stats.sclient_write_timeouts += 1
            reason = f"{e} (client too slow)"
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            reason = lost(e)
        if not self.closing:  # else the reader's reason stands
            self.close_reason = reason
        scope.cancel()

    def finish(self) -> None:
        relay = self.relay
        self.closing = True
        relay.router.unregister(self)
        relay.keepalives.remove(self)
        self.discard()
        if self.conn.preferred:
            relay.stats.current_home_connections -= 1
        if self.not_ideal:
            relay.stats.current_notideal_connections -= 1

    # ---- reading ------------------------------------------------------------------------------

    async def _read_loop(self, reader: FrameReader) -> None:
        """Route every frame of every read: SendPacket (and a mesh peer's ForwardPacket)
        straight into the destination's outbox, the rest through ``ClientConn``."""
        stream = self.stream
        relay = self.relay
        stats = relay.stats
        router = relay.router
        active_get = router.active.get
        forwarders_get = router.forwarders.get
        my_key = self.key
        can_mesh = self.can_mesh
        sibling = self.sibling
        ready = relay.ready
        leftover = reader.buffered > 0  # frames that came with the handshake read
        while True:
            if leftover:
                leftover = False
            else:
                # (A reload may lift the limit mid-chunk; mesh peers are never paced.)
                if (relay.pacing and not can_mesh) or self._unpaced:
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
                    if view is None:
                        view = memoryview(buf)
                    dst_key = buf[s:ps]
                    dst = active_get(dst_key)
                    if dst is not None:
                        out = bytearray(view[s - 5:e])  # SendPacket → RecvPacket: same length
                        out[0] = _RECV
                        out[5:37] = my_key
                        if dst is not self._last_dst:
                            router.note_sent(my_key, dst)
                            self._last_dst = dst
                    else:
                        # No local connection: one hop to the mesh peer whose node has dst
                        # (spec §4.2 step 2), as ForwardPacket(this client, dst, packet).
                        fwds = forwarders_get(dst_key)
                        if fwds is None:
                            self._unknown_dest(dst_key, disco, n, DropReason.UNKNOWN_DEST)
                            continue
                        dst = fwds[0]
                        if dst.sibling:
                            stats.packets_to_siblings += 1
                        else:
                            stats.packets_forwarded_out += 1
                        out = bytearray(_FWD_HEAD)  # header and source key go here
                        out += view[s:e]
                        _pack_header(out, 0, _FWD, _KL + e - s)
                        out[5:37] = my_key
                elif ftype == _FWD and can_mesh:  # from another node, or another worker
                    ps = s + 2 * _KL
                    n = e - ps
                    if n < 0:
                        raise ProtocolError("ForwardPacket shorter than two keys")
                    disco = _is_disco(buf, ps, e)
                    dst_key = buf[s + _KL:ps]
                    if view is None:
                        view = memoryview(buf)
                    if sibling:  # a worker of this host forwards: to our own client, never on
                        stats.packets_from_siblings += 1
                        dst = router.local(dst_key)
                    else:
                        stats.packets_forwarded_in += 1
                        dst = active_get(dst_key)
                    if dst is None:
                        # From another node, for a client of another worker of this host (the
                        # region sees the host as one node): one hop more, the frame as it came.
                        dst = None if sibling else router.sibling_forwarder(dst_key)
                        if dst is None:
                            self._unknown_dest(dst_key, disco, n, DropReason.UNKNOWN_DEST_ON_FWD)
                            continue
                        stats.packets_to_siblings += 1
                        out = bytearray(view[s - 5:e])
                    else:
                        out = bytearray(view[ps - _KL - 5:e])  # header and source key go here
                        _pack_header(out, 0, _RECV, _KL + n)
                        out[5:37] = view[s:s + _KL]
                        src, noted_dst, departures = self._fwd_noted
                        if (dst is not noted_dst or departures != router.departures
                                or not buf.startswith(src, s)):
                            src = buf[s:s + _KL]
                            router.note_sent(src, dst)
                            self._fwd_noted = (src, dst, router.departures)
                else:
                    self._control(ftype, buf, s, e)
                    continue
                if dst.deliver(out, disco):  # that filled its queue
                    while yields:  # let its writer take the queue first
                        if ready:  # (none may wait in ready while we await)
                            _flush_ready(ready)
                        elif dst.back_pressure:  # a mesh link: wait, rather than drop
                            await dst.wait_room()
                        else:  # the writer may run after us in a batch
                            yields -= 1
                            await trio.lowlevel.checkpoint()
                        if not dst.full(disco):
                            break
            if ready:
                _flush_ready(ready)

    async def _paced_receive(self) -> bytes:
        """The next at most PACE_STEP bytes from the client, once the limits allow them.

        Meanwhile nothing more is read from this client, so TCP slows it down (spec §4.10:
        back-pressure, never drops). Never for mesh peers, as in Go: they carry a region.
        """
        if not self._unpaced:
            self._unpaced = await self.stream.receive_some(RECV_SIZE)
        else:
            await trio.lowlevel.checkpoint()  # let the writers drain what the last step routed
        step, self._unpaced = self._unpaced[:PACE_STEP], self._unpaced[PACE_STEP:]
        if step:
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
        if disco and self.conn.not_here(dst_key, trio.current_time()):
            self.wake()

    def _control(self, ftype: int, buf: bytearray, s: int, e: int) -> None:
        """Act on a control frame (``ClientConn`` says what it means)."""
        event = self.conn.receive(ftype, buf, s, e, trio.current_time())
        if event is None:
            return
        if event is Event.WAKE:
            self.wake()
        elif event is Event.WATCH:
            self.relay.router.add_watcher(self)
        elif event is Event.CLOSE_PEER:
            self.relay.router.close_key(bytes(buf[s:e]))
