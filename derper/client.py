"""The DERP client: one implementation for tests, benchmarks, mesh links and diagnostics.

Speaks to any DERP server the way Tailscale's own client does (spec §1.2–§1.6, §3): plain HTTP
or TLS with the ``Upgrade: DERP`` request, fast start when TLS 1.3 shows the meta certificate,
or a WebSocket with subprotocol ``derp``. Certificates are checked normally, against a
``sha256-raw:`` pin, or not at all (tests only).
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator
from urllib.parse import SplitResult, urlsplit

import h11
import trio
import trio_websocket

from . import __version__
from .errors import IOFailure, ProtocolError
from .http.websocket import SUBPROTOCOL, WebSocketStream
from .net.addr import host_literal
from .net.tls_stream import TLSStream
from .proto import handshake, metacert, wire
from .proto.handshake import ServerInfo
from .proto.keys import KeyPair
from .proto.pin import pin_problem
from .proto.wire import FrameReader, FrameType

RECV_SIZE = 64 << 10
MAX_ERROR_BODY = 4096


class DerpClientError(IOFailure):
    """Connecting or talking to the server failed; the message says at which step."""


# ---- what recv() returns ----------------------------------------------------------------------

@dataclass(frozen=True)
class ReceivedPacket:
    source: bytes
    data: bytes


@dataclass(frozen=True)
class PeerGoneMessage:
    peer: bytes
    reason: int


@dataclass(frozen=True)
class KeepAliveMessage:
    pass


@dataclass(frozen=True)
class PingMessage:
    data: bytes


@dataclass(frozen=True)
class PongMessage:
    data: bytes


@dataclass(frozen=True)
class HealthMessage:
    problem: str


@dataclass(frozen=True)
class RestartingMessage:
    reconnect_in_ms: int
    try_for_ms: int


PeerPresentMessage = wire.PeerPresent
Message = (ReceivedPacket | PeerGoneMessage | PeerPresentMessage | KeepAliveMessage
           | PingMessage | PongMessage | HealthMessage | RestartingMessage)

_CLIENT_LIMITS = {FrameType.RECV_PACKET: wire.KEY_LEN + wire.MAX_PACKET_SIZE}


class DerpClient:
    """A connected, handshaken DERP client. Create it with ``connect``."""

    def __init__(self, stream: trio.abc.Stream, keypair: KeyPair, server_key: bytes,
                 server_info: ServerInfo, reader: FrameReader, *, tls_version: str | None,
                 fast_start: bool, peer_chain: list[bytes]) -> None:
        self.stream = stream
        self.keypair = keypair
        self.server_key = server_key
        self.server_info = server_info
        self.tls_version = tls_version
        self.fast_start = fast_start
        self.peer_chain = peer_chain
        self._reader = reader
        self._send_lock = trio.Lock()

    @property
    def public_key(self) -> bytes:
        return self.keypair.public

    async def _send(self, data: bytes) -> None:
        await self._locked(self.stream.send_all, data)

    async def _locked(self, send, data) -> None:
        """``send(data)`` alone on the stream; no scheduler trip when nobody else is sending."""
        lock = self._send_lock
        if lock.locked():
            await lock.acquire()
        else:
            lock.acquire_nowait()
        try:
            await send(data)
        finally:
            lock.release()

    async def send(self, dst: bytes, packet: bytes) -> None:
        await self._send(wire.send_packet(dst, packet))

    async def send_many(self, packets: list[tuple[bytes, bytes]]) -> None:
        """Several packets in one write (what a busy tunnel does)."""
        await self._send(b"".join(wire.send_packet(d, p) for d, p in packets))

    async def send_frames(self, frames) -> None:
        """Encoded frames in one socket write; over TLS one record per item, as a Tailscale
        client writes one per packet (pass one joined item to pack them into fewer records)."""
        if isinstance(self.stream, TLSStream):
            await self._locked(self.stream.send_records, frames)
        else:
            await self._locked(self.stream.send_all, b"".join(frames))

    async def forward(self, src: bytes, dst: bytes, packet: bytes) -> None:
        await self._send(wire.forward_packet(src, dst, packet))

    async def note_preferred(self, preferred: bool) -> None:
        await self._send(wire.note_preferred(preferred))

    async def ping(self, data: bytes) -> None:
        await self._send(wire.ping(data))

    async def pong(self, data: bytes) -> None:
        await self._send(wire.pong(data))

    async def watch_conns(self) -> None:
        await self._send(wire.WATCH_CONNS)

    async def close_peer(self, key: bytes) -> None:
        await self._send(wire.close_peer(key))

    async def send_raw(self, data: bytes) -> None:
        """Arbitrary bytes, for tests of how a server copes with malformed input."""
        await self._send(data)

    async def recv(self) -> Message:
        """The next message; ServerKey frames and unknown frame types are skipped."""
        reader = self._reader
        while True:
            f = reader.next()
            if f is None:
                data = await self.stream.receive_some(RECV_SIZE)
                if not data:
                    raise DerpClientError("server closed the connection")
                reader.feed(data)
                continue
            ftype, s, e = f
            payload = reader.data[s:e]
            if ftype == FrameType.RECV_PACKET:
                if len(payload) < wire.KEY_LEN:
                    raise DerpClientError("short RecvPacket frame")
                return ReceivedPacket(payload[:wire.KEY_LEN], payload[wire.KEY_LEN:])
            if ftype == FrameType.KEEP_ALIVE:
                return KeepAliveMessage()
            if ftype == FrameType.PING:
                return PingMessage(payload)
            if ftype == FrameType.PONG:
                return PongMessage(payload)
            if ftype == FrameType.PEER_GONE:
                return PeerGoneMessage(*wire.parse_peer_gone(payload))
            if ftype == FrameType.PEER_PRESENT:
                return wire.parse_peer_present(payload)
            if ftype == FrameType.HEALTH:
                return HealthMessage(payload.decode("utf-8", "replace"))
            if ftype == FrameType.RESTARTING:
                return RestartingMessage(*wire.parse_restarting(payload))

    async def recv_frames(self) -> tuple[bytes, list[tuple[int, int, int]]]:
        """Every complete frame one read brought: ``(buffer, [(type, start, end), ...])``.

        The fast path for bulk receivers (the benchmark): no per-message objects.
        """
        reader = self._reader
        frames = []
        while True:
            while (f := reader.next()) is not None:
                frames.append(f)
            if frames:
                return reader.data, frames
            data = await self.stream.receive_some(RECV_SIZE)
            if not data:
                raise DerpClientError("server closed the connection")
            reader.feed(data)

    async def aclose(self) -> None:
        await self.stream.aclose()


# ---- connecting -------------------------------------------------------------------------------

def _host_header(url) -> str:
    host = host_literal(url.hostname)
    default = 443 if url.scheme == "https" else 80
    return host if url.port in (None, default) else f"{host}:{url.port}"


def pinned_context() -> ssl.SSLContext:
    """A client context for ``sha256-raw:`` pins: the pin replaces chain verification."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


CLOSE_TIMEOUT = 1.0


@dataclass(frozen=True)
class _Options:
    url: SplitResult
    keypair: KeyPair
    ssl_context: ssl.SSLContext | None
    cert_pin: str | None
    server_hostname: str
    dial_host: str
    dial_port: int
    fast_start: bool
    websocket: bool
    mesh_key: bytes | None
    is_prober: bool
    can_ack_pings: bool
    ideal_node: str | None
    timeout: float


@asynccontextmanager
async def connect(url: str, keypair: KeyPair | None = None, *,
                  ssl_context: ssl.SSLContext | None = None, cert_pin: str | None = None,
                  server_hostname: str | None = None, dial: tuple[str, int] | None = None,
                  fast_start: bool = True, websocket: bool = False,
                  mesh_key: bytes | None = None, is_prober: bool = False,
                  can_ack_pings: bool = False, ideal_node: str | None = None,
                  timeout: float = 10.0) -> AsyncIterator[DerpClient]:
    """Connect to ``http(s)://host[:port]/derp`` and complete the DERP handshake.

    ``dial`` overrides where the TCP connection goes (a DERP map's IPv4/IPv6); ``cert_pin`` is
    a ``sha256-raw:`` CertName; ``ideal_node`` sends the ``Ideal-Node`` header.
    """
    parsed = urlsplit(url)
    if parsed.scheme not in ("http", "https"):
        raise ValueError(f"DERP URL must be http:// or https://, not {url!r}")
    host = parsed.hostname or ""
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    dial_host, dial_port = dial or (host, port)
    opts = _Options(parsed, keypair or KeyPair.generate(), ssl_context, cert_pin,
                    server_hostname or host, dial_host, dial_port, fast_start, websocket,
                    mesh_key, is_prober, can_ack_pings, ideal_node, timeout)
    if not websocket:
        async with _closing(await _establish(opts, None)) as client:
            yield client
        return
    # trio-websocket needs a nursery for its reader task. Errors leaving a nursery come
    # wrapped in an ExceptionGroup; callers get the one exception, as with the other transports.
    try:
        async with trio.open_nursery() as nursery:
            try:
                async with _closing(await _establish(opts, nursery)) as client:
                    yield client
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


@asynccontextmanager
async def _closing(client: DerpClient) -> AsyncIterator[DerpClient]:
    try:
        yield client
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
            await client.aclose()


async def _establish(opts: _Options, nursery: trio.Nursery | None) -> DerpClient:
    where = opts.url.geturl()
    try:
        with trio.fail_after(opts.timeout):
            return await _connect(opts, nursery)
    except trio.TooSlowError:
        raise DerpClientError(f"timed out connecting to {where} after {opts.timeout:g}s") \
            from None
    except (OSError, trio.BrokenResourceError) as e:
        raise DerpClientError(f"cannot connect to {where}: {e}") from None


async def _connect(opts: _Options, nursery: trio.Nursery | None) -> DerpClient:
    url, keypair = opts.url, opts.keypair
    stream: trio.abc.Stream = await _open_tcp(opts.dial_host, opts.dial_port)
    tls_version, chain, meta = None, [], None
    try:
        if url.scheme == "https":
            ctx = opts.ssl_context or (pinned_context() if opts.cert_pin
                                       else ssl.create_default_context())
            tls = TLSStream(stream, ctx, server_side=False, server_hostname=opts.server_hostname)
            stream = tls
            await tls.do_handshake()
            tls_version = tls.version()
            chain = tls.peer_chain_der()
            if opts.cert_pin and (problem := pin_problem(chain, opts.cert_pin)):
                raise DerpClientError(problem)
            meta = next(filter(None, map(metacert.parse, chain)), None)
        info_json = handshake.client_info_json(mesh_key=opts.mesh_key,
                                               can_ack_pings=opts.can_ack_pings,
                                               is_prober=opts.is_prober)
        reader = FrameReader(_CLIENT_LIMITS, wanted=wire.ALL_TYPES)
        use_fast = (not opts.websocket and opts.fast_start and tls_version == "TLSv1.3"
                    and meta is not None and meta[0] != bytes(32) and meta[1] != 0)
        if opts.websocket:
            ws = await trio_websocket.wrap_client_stream(
                nursery, stream, _host_header(url), "/derp", subprotocols=[SUBPROTOCOL],
                max_message_size=1 << 20)
            stream = WebSocketStream(ws)
            server_key = await _read_server_key(stream, reader)
        else:
            http = h11.Connection(h11.CLIENT)
            request = _upgrade_request(http, url, use_fast, opts.ideal_node)
            if use_fast:  # request and ClientInfo in one write; no HTTP response will come
                server_key = meta[0]
                await stream.send_all(request + handshake.client_info_frame(
                    keypair.private, keypair.public, server_key, info_json))
            else:
                await stream.send_all(request)
                reader.feed(await _read_101(stream, http))
                server_key = await _read_server_key(stream, reader)
        if not use_fast:
            await stream.send_all(handshake.client_info_frame(keypair.private, keypair.public,
                                                              server_key, info_json))
        info = await _read_server_info(stream, reader, keypair, server_key)
    except BaseException:
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
            await stream.aclose()
        raise
    return DerpClient(stream, keypair, server_key, info, reader, tls_version=tls_version,
                      fast_start=use_fast, peer_chain=chain)


async def _open_tcp(host: str, port: int) -> trio.SocketStream:
    """``trio.open_tcp_stream``, less its happy-eyeballs tasks when there is one address."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return await trio.open_tcp_stream(host, port)
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


def _upgrade_request(http: h11.Connection, url, fast: bool, ideal_node: str | None) -> bytes:
    headers = [("Host", _host_header(url)), ("User-Agent", f"derper-client/{__version__}"),
               ("Connection", "Upgrade")]
    if fast:
        headers.append(("Derp-Fast-Start", "1"))
    if ideal_node:
        headers.append(("Ideal-Node", ideal_node))
    headers.append(("Upgrade", "DERP"))
    return (http.send(h11.Request(method="GET", target="/derp", headers=headers))
            + http.send(h11.EndOfMessage()))


async def _read_101(stream: trio.abc.Stream, http: h11.Connection) -> bytes:
    """Read the HTTP response; return the bytes after it if it is 101, else raise with the body."""
    status, body = None, b""
    while True:
        try:
            event = http.next_event()
        except h11.RemoteProtocolError as e:
            raise DerpClientError(f"bad HTTP response to the DERP upgrade: {e}") from None
        if event is h11.NEED_DATA:
            data = await stream.receive_some(RECV_SIZE)
            if not data and status is None:
                raise DerpClientError("server closed the connection before answering the upgrade")
            http.receive_data(data)
            continue
        if isinstance(event, h11.InformationalResponse) and event.status_code == 101:
            return bytes(http.trailing_data[0])
        if isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data) and len(body) < MAX_ERROR_BODY:
            body += event.data
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            raise DerpClientError(f"server answered the DERP upgrade with HTTP {status}: "
                                  f"{body[:MAX_ERROR_BODY].decode('utf-8', 'replace').strip()}")


async def _next_frame(stream: trio.abc.Stream, reader: FrameReader) -> tuple[int, bytes]:
    while (f := reader.next()) is None:
        data = await stream.receive_some(RECV_SIZE)
        if not data:
            raise DerpClientError("server closed the connection during the DERP handshake")
        reader.feed(data)
    ftype, s, e = f
    return ftype, reader.data[s:e]


async def _read_server_key(stream: trio.abc.Stream, reader: FrameReader) -> bytes:
    ftype, payload = await _next_frame(stream, reader)
    if ftype != FrameType.SERVER_KEY:
        raise DerpClientError(f"expected ServerKey, got frame type {ftype:#04x}")
    try:
        return wire.parse_server_key(payload)
    except ProtocolError as e:
        raise DerpClientError(str(e)) from None


async def _read_server_info(stream: trio.abc.Stream, reader: FrameReader, keypair: KeyPair,
                            server_key: bytes) -> ServerInfo:
    while True:
        ftype, payload = await _next_frame(stream, reader)
        if ftype == FrameType.SERVER_KEY:
            continue  # a fast-start client already knows it
        if ftype != FrameType.SERVER_INFO:
            raise DerpClientError(f"expected ServerInfo first, got frame type {ftype:#04x}")
        try:
            return handshake.open_server_info(payload, keypair.private, server_key)
        except handshake.HandshakeError as e:
            raise DerpClientError(str(e)) from None
