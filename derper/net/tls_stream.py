"""A thin TLS stream: stdlib ``ssl.SSLObject`` over memory BIOs, driven by a trio socket stream.

Why not ``trio.SSLStream``: OpenSSL returns at most one TLS record per read, Tailscale clients
write one record per packet, and ``trio.SSLStream`` hands back one record per trip through the
scheduler. Here one socket read is decrypted completely (every record it brought) and one
``send_all`` encrypts a whole batch of frames, which is what lets a relay keep up (measured in
the reference notes: about 1.5-2x the packet rate of ``trio.SSLStream``).
"""

from __future__ import annotations

import os
import ssl
from typing import TYPE_CHECKING

import trio

from .reading import RECV_SIZE

if TYPE_CHECKING:  # the client side has no pacer: keep the server's modules out of it
    from ..admission.pacer import Pacer

_READ_CHUNK = 16 << 10  # the largest TLS record plaintext
# One scratch buffer for every connection of the process: decryption never awaits between
# filling it and copying out, and trio runs one task at a time.
_SCRATCH = bytearray(256 << 10)
_SCRATCH_VIEW = memoryview(_SCRATCH)
# Socket reads of every connection land here and are copied into that connection's BIO at once.
_RECV_VIEW = memoryview(bytearray(RECV_SIZE))
_RECV_BUFS = (_RECV_VIEW,)
CLOSE_NOTIFY_TIMEOUT = 0.25


class TLSStream(trio.abc.Stream):
    """TLS over ``transport``. Call ``do_handshake`` first (under the caller's deadline)."""

    def __init__(self, transport: trio.SocketStream, context: ssl.SSLContext, *,
                 server_side: bool, server_hostname: str | None = None,
                 initial: bytes = b"") -> None:
        """``initial``: ciphertext already read from ``transport`` (past a PROXY header)."""
        self.transport = transport
        self._incoming = ssl.MemoryBIO()
        if initial:
            self._incoming.write(initial)
        self._outgoing = ssl.MemoryBIO()
        self.ssl_object = context.wrap_bio(self._incoming, self._outgoing,
                                           server_side=server_side,
                                           server_hostname=server_hostname)
        # The reader may have to send too (a TLS 1.3 KeyUpdate reply); the lock keeps whole
        # flushes of the outgoing BIO in order.
        self._send_lock = trio.Lock()
        self._unsent = b""  # ciphertext send_nowait could not hand the kernel; flushed first
        self._closed = False

    async def do_handshake(self, pacer: Pacer | None = None) -> None:
        """``pacer``: a server's; each step of the handshake then waits for its turn."""
        step = self.ssl_object.do_handshake
        while True:
            try:
                if pacer is None:
                    step()
                else:
                    await pacer.call(step)
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._receive():
                    raise trio.BrokenResourceError("peer closed the connection during the TLS "
                                                   "handshake")
                continue
            except ssl.SSLError as e:
                await self._flush_quietly()  # let the peer see our alert
                raise trio.BrokenResourceError(f"TLS handshake failed: {_reason(e)}") from e
            await self._flush()
            return

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Every byte the last socket read decrypted to; ``b""`` at EOF."""
        read = self.ssl_object._sslobj.read  # the C method: one call per TLS record
        while True:
            pos = 0
            eof = False
            try:
                while pos <= len(_SCRATCH) - _READ_CHUNK:
                    n = read(_READ_CHUNK, _SCRATCH_VIEW[pos:])
                    if not n:
                        eof = True
                        break
                    pos += n
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                eof = True
            except ssl.SSLError as e:
                raise trio.BrokenResourceError(f"TLS error: {_reason(e)}") from e
            data = bytes(_SCRATCH_VIEW[:pos]) if pos else b""
            if self._outgoing.pending:
                await self._flush()
            if data or eof:
                return data
            if not await self._receive():
                return b""  # TCP EOF without close_notify: treat as an ordinary close

    async def _receive(self) -> bool:
        """One socket read into the incoming BIO; False at EOF.

        What trio's ``receive_some`` does, less one scheduler trip: it yields again after a
        read that had to wait for the socket. We yield exactly once per read either way, so a
        peer that keeps the socket full still cannot hold the loop.
        """
        sock = self.transport.socket
        waited = False
        while True:
            fd = sock.fileno()
            if fd < 0:
                break  # closed: trio raises the right error below
            try:
                n = os.readv(fd, _RECV_BUFS)
            except BlockingIOError:
                n = -1  # wait outside the handler: an idle connection keeps no traceback alive
            except OSError:
                break  # a reset: trio raises the right error below
            if n < 0:
                await trio.lowlevel.wait_readable(sock)
                waited = True
                continue
            self._incoming.write(_RECV_VIEW[:n])  # before yielding: the buffer is shared
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return n > 0
        chunk = await self.transport.receive_some(RECV_SIZE)
        self._incoming.write(chunk)
        return bool(chunk)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        try:
            while view:
                n = self.ssl_object.write(view)
                view = view[n:]
        except ssl.SSLError as e:
            raise trio.BrokenResourceError(f"TLS error: {_reason(e)}") from e
        await self._flush()

    async def send_records(self, chunks) -> None:
        """One TLS record per chunk (as Tailscale clients write one per packet), one socket write."""
        write = self.ssl_object._sslobj.write
        try:
            for chunk in chunks:
                write(chunk)
        except ssl.SSLError as e:
            raise trio.BrokenResourceError(f"TLS error: {_reason(e)}") from e
        await self._flush()

    def can_send_now(self) -> bool:
        """Whether ``send_nowait`` may run: no flush in progress, nothing left from the last."""
        return not self._unsent and not self._send_lock.locked()

    def send_nowait(self, data: bytes | bytearray) -> bool:
        """Encrypt ``data`` and hand the kernel what it takes at once, without awaiting.

        For a task other than this connection's writer (a relay's reader) when ``can_send_now``:
        what the socket does not take (or all of it, on a socket error) stays here and goes out
        first with the next ``send_all``, which then waits or raises. True if all went out.
        """
        try:
            self.ssl_object._sslobj.write(data)
        except ssl.SSLError as e:
            raise trio.BrokenResourceError(f"TLS error: {_reason(e)}") from e
        out = self._outgoing.read()
        fd = self.transport.socket.fileno()
        n = 0
        if fd >= 0:
            try:
                n = os.write(fd, out)
            except OSError:
                pass
        if n == len(out):
            return True
        self._unsent = out[n:]
        return False

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def _flush(self) -> None:
        if self._send_lock.locked():
            await self._send_lock.acquire()
        else:
            self._send_lock.acquire_nowait()
        try:
            if self._unsent:
                data, self._unsent = self._unsent + self._outgoing.read(), b""
                await self._send(data)
            elif self._outgoing.pending:
                await self._send(self._outgoing.read())
        finally:
            self._send_lock.release()

    async def _send(self, data: bytes) -> None:
        """Hand the kernel what it takes at once without a trip through the scheduler (a
        relay's writer does one per batch); await the rest. A closed socket has fileno -1, so
        a reused descriptor is never written to; errors are left for trio to raise."""
        fd = self.transport.socket.fileno()
        if fd >= 0:
            try:
                n = os.write(fd, data)
            except OSError:
                n = 0
            if n == len(data):
                return
            data = memoryview(data)[n:]
        await self.transport.send_all(data)

    async def _flush_quietly(self) -> None:
        with trio.move_on_after(CLOSE_NOTIFY_TIMEOUT):
            try:
                await self._flush()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if not self._send_lock.locked() and self.ssl_object.version() is not None:
                try:
                    self.ssl_object.unwrap()
                except ssl.SSLError:
                    pass
                with trio.CancelScope(shield=True):
                    await self._flush_quietly()
        finally:
            await self.transport.aclose()

    # ---- facts about the session --------------------------------------------------------------

    def version(self) -> str | None:
        return self.ssl_object.version()

    def peer_chain_der(self) -> list[bytes]:
        """Every certificate the peer sent, leaf first, unverified (for the DERP meta cert)."""
        obj = self.ssl_object
        get = getattr(obj, "get_unverified_chain", None)  # public from Python 3.13
        if get is None:
            get = obj._sslobj.get_unverified_chain  # same C method, private before 3.13
        chain = get() or []
        return [c if isinstance(c, bytes) else c.public_bytes(ssl._ssl.ENCODING_DER)
                for c in chain]


def _reason(e: ssl.SSLError) -> str:
    return e.reason or e.strerror or str(e)
