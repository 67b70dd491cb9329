"""One client connection's protocol rules and the control frames it is owed, without sockets.

Like h11's ``Connection``: the trio session feeds it the control frames it reads and asks it
what to write; this object decides what they mean (spec §2.2, §4.2, §4.6, §4.8) and keeps the
pending pong (one slot, as Go), PeerGone notes (coalesced by key), a watcher's PeerPresent and
PeerGone notes, Restarting and the keepalive. It is the session outbox's ``Control``.
"""

from __future__ import annotations

import enum

from ..admission.limits import TokenBucket
from ..errors import ProtocolError
from ..metrics.counters import Stats
from ..proto import wire
from ..proto.wire import FrameType, PeerGoneReason, PeerPresentFlags

HOME_MOVE_GRACE = 5.0  # NotePreferred changes sooner than this after connecting aren't moves
NOT_HERE_RATE, NOT_HERE_BURST = 1.0, 3.0  # PeerGone(NotHere) per sender
_KL = wire.KEY_LEN


class Event(enum.Enum):
    """What a control frame asks of the session beyond this object."""
    WAKE = "wake"  # a frame is now due: wake the writer
    WATCH = "watch"  # enrol as a mesh watcher
    CLOSE_PEER = "close_peer"  # disconnect the key in the frame's payload


class ClientConn:
    def __init__(self, key: bytes, stats: Stats, *, server_key: bytes, can_mesh: bool,
                 is_prober: bool, not_ideal: bool, connected_at: float) -> None:
        self.key = key
        self.stats = stats
        self.server_key = server_key
        self.can_mesh = can_mesh
        flags = ((PeerPresentFlags.MESH if can_mesh else 0)
                 | (PeerPresentFlags.PROBER if is_prober else 0)
                 | (PeerPresentFlags.NOT_IDEAL if not_ideal else 0))
        self.present_flags = flags or PeerPresentFlags.REGULAR
        self.connected_at = connected_at
        self.preferred = False
        self._pong: bytes | None = None
        self._peer_gone: dict[bytes, bytes] = {}
        self._presence: dict[bytes, bytes] = {}
        self._restarting: bytes | None = None
        self._keepalive_due = False
        self._not_here: TokenBucket | None = None
        self._in_batch: tuple = ()  # what head()/tail() put in the batch being written

    # ---- frames from the client -------------------------------------------------------------

    def receive(self, ftype: int, buf, s: int, e: int, now: float) -> Event | None:
        """A control frame's payload ``buf[s:e]``; raises ProtocolError to end the connection.

        Frame types a server ignores (spec §2.2) return None.
        """
        if ftype == FrameType.PING:
            if e - s < 8:
                raise ProtocolError(f"Ping of {e - s} bytes is shorter than 8")
            self.stats.got_ping += 1
            if self._pong is None:  # one pending pong at most, as in Go
                self._pong = bytes(buf[s:s + 8])
                return Event.WAKE
        elif ftype == FrameType.NOTE_PREFERRED:
            if e - s != 1:
                raise ProtocolError("NotePreferred must carry exactly one byte")
            self._note_preferred(buf[s] != 0, now)
        elif ftype == FrameType.FORWARD_PACKET:  # a mesh peer's: the session routes it inline
            self._require_mesh("ForwardPacket")
        elif ftype == FrameType.WATCH_CONNS:
            self._require_mesh("WatchConns")
            if self.key != self.server_key:  # a node watching itself is not enrolled
                return Event.WATCH
        elif ftype == FrameType.CLOSE_PEER:
            self._require_mesh("ClosePeer")
            if e - s != _KL:
                raise ProtocolError("ClosePeer must carry exactly one key")
            return Event.CLOSE_PEER
        return None

    def _require_mesh(self, what: str) -> None:
        if not self.can_mesh:
            raise ProtocolError(f"{what} requires the mesh key")

    def _note_preferred(self, preferred: bool, now: float) -> None:
        if preferred == self.preferred:
            return
        stats = self.stats
        self.preferred = preferred
        stats.current_home_connections += 1 if preferred else -1
        if now - self.connected_at > HOME_MOVE_GRACE:
            if preferred:
                stats.home_moves_in += 1
            else:
                stats.home_moves_out += 1

    # ---- what the client is owed (the session wakes its writer after each) -------------------

    def peer_gone(self, key: bytes, reason: int) -> None:
        self._peer_gone[key] = wire.peer_gone(key, reason)

    def not_here(self, dst_key: bytes, now: float) -> bool:
        """A disco packet for an unknown key: PeerGone(NotHere), 1/s burst 3 per sender."""
        if self._not_here is None:
            self._not_here = TokenBucket(NOT_HERE_RATE, NOT_HERE_BURST, now)
        if not self._not_here.allow(now):
            return False
        self.peer_gone(dst_key, PeerGoneReason.NOT_HERE)
        return True

    def peer_present(self, key: bytes, ip: str | None, port: int, flags: int) -> None:
        self._presence[key] = wire.peer_present(key, ip, port, flags)

    def presence_gone(self, key: bytes) -> None:
        self._presence[key] = wire.peer_gone(key, PeerGoneReason.DISCONNECTED)

    def restarting(self, frame: bytes) -> None:
        self._restarting = frame

    def keepalive(self) -> None:
        self._keepalive_due = True

    @property
    def restart_pending(self) -> bool:
        return self._restarting is not None

    # ---- the outbox's Control ---------------------------------------------------------------

    def pending(self) -> bool:
        return bool(self._pong is not None or self._peer_gone or self._presence
                    or self._restarting is not None or self._keepalive_due)

    def head(self, batch: list) -> None:
        if self._keepalive_due:
            batch.append(wire.KEEP_ALIVE)
            self._keepalive_due = False
        pong = self._pong
        if pong is not None:
            batch.append(wire.pong(pong))
            self._pong = None
        not_here = disconnected = 0
        if self._peer_gone:
            for frame in self._peer_gone.values():
                batch.append(frame)
                if frame[-1] == PeerGoneReason.NOT_HERE:
                    not_here += 1
                else:
                    disconnected += 1
            self._peer_gone.clear()
        self._in_batch = (pong is not None, not_here, disconnected)

    def tail(self, batch: list) -> None:
        if self._presence:
            self.stats.mesh_update_batch_size.observe(len(self._presence))
            self.stats.mesh_update_loop_count.observe(1)
            batch.extend(self._presence.values())
            self._presence.clear()
        restarting = self._restarting
        if restarting is not None:
            batch.append(restarting)
        self._in_batch += (restarting,)

    def written(self) -> None:
        pong, not_here, disconnected, restarting = self._in_batch
        stats = self.stats
        if pong:
            stats.sent_pong += 1
        stats.peer_gone_not_here_frames += not_here
        stats.peer_gone_disconnected_frames += disconnected
        if restarting is not None and self._restarting is restarting:
            self._restarting = None
