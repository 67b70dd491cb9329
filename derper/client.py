"""The DERP client: one implementation for tests, benchmarks, mesh links and diagnostics.

Speaks to any DERP server the way Tailscale's own client does (spec §1.2–§1.6, §3): plain HTTP
or TLS with the ``Upgrade: DERP`` request, fast start when TLS 1.3 shows the meta certificate,
or a WebSocket with subprotocol ``derp``. Certificates are checked normally, against a
``sha256-raw:`` pin, or not at all (tests only).
"""

from __future__ import annotations

import ssl
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator, Literal
from urllib.parse import SplitResult, urlsplit

import trio

from .errors import IOFailure, ProtocolError
from .http import client as http_client
from .net import dial
from .net.reading import ReplayStream, next_frame, read_more
from .net.sending import send_alone
from .net.tls_stream import TLSStream
from .net.websocket import WebSocketStream
from .proto import handshake, messages, wire
from .proto.handshake import ServerInfo
from .proto.keys import KeyPair
from .proto.messages import Message
from .proto.wire import FrameReader, FrameType

Step = Literal["dial", "tls", "upgrade", "handshake", "protocol"]


class DerpClientError(IOFailure):
    """Connecting or talking to the server failed at ``step``; the message starts with it.

    The steps, in order: ``dial`` (TCP connect), ``tls`` (handshake, certificate, pin),
    ``upgrade`` (the HTTP or WebSocket upgrade), ``handshake`` (ServerKey, ClientInfo,
    ServerInfo), ``protocol`` (frames after the handshake, and the server closing).
    """

    def __init__(self, step: Step, detail: str) -> None:
        super().__init__(f"{step}: {detail}")
        self.step = step
        self.detail = detail

    def __reduce__(self):  # the load generator's processes send it back pickled
        return type(self), (self.step, self.detail)


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
        await send_alone(self._send_lock, send, data)

    async def send(self, dst: bytes, packet: bytes) -> None:
        await self._send(wire.send_packet(dst, packet))

    async def send_many(self, packets: list[tuple[bytes, bytes]]) -> None:
        """Several packets in one write (what a busy tunnel does)."""
        await self._send(b"".join(wire.send_packet(d, p) for d, p in packets))

    async def send_frames(self, frames) -> None:
        """Encoded frames in one socket write; over TLS one record per item, as a Tailscale
        client writes one per packet (pass one joined item to pack them into fewer records)."""
        if isinstance(self.stream, (TLSStream, WebSocketStream)):
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
        try:
            while True:
                ftype, start, end = await next_frame(self.stream, reader)
                if (m := messages.decode(ftype, reader.data[start:end])) is not None:
                    return m
        except (ProtocolError, EOFError, trio.BrokenResourceError) as e:
            raise _protocol_error(e) from e

    async def recv_frames(self) -> tuple[bytes, list[tuple[int, int, int]]]:
        """Every complete frame one read brought: ``(buffer, [(type, start, end), ...])``.

        The fast path for bulk receivers (the benchmark): no per-message objects.
        """
        reader = self._reader
        frames = []
        try:
            while True:
                while (f := reader.next()) is not None:
                    frames.append(f)
                if frames:
                    return reader.data, frames
                await read_more(self.stream, reader)
        except (ProtocolError, EOFError, trio.BrokenResourceError) as e:
            raise _protocol_error(e) from e

    async def aclose(self) -> None:
        await self.stream.aclose()


def _protocol_error(e: Exception) -> DerpClientError:
    if isinstance(e, EOFError):
        return DerpClientError("protocol", "server closed the connection")
    if isinstance(e, trio.BrokenResourceError):
        return DerpClientError("protocol", f"connection lost: {str(e) or 'reset'}")
    return DerpClientError("protocol", str(e))


# ---- connecting -------------------------------------------------------------------------------

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
    source_ip: str | None
    extra_headers: tuple[tuple[str, str], ...]


class _Progress:
    """The step ``_connect`` is in, for naming the step a failure or a timeout hit."""
    step = "dial"


@asynccontextmanager
async def connect(url: str, keypair: KeyPair | None = None, *,
                  ssl_context: ssl.SSLContext | None = None, cert_pin: str | None = None,
                  server_hostname: str | None = None, dial: tuple[str, int] | None = None,
                  fast_start: bool = True, websocket: bool = False,
                  mesh_key: bytes | None = None, is_prober: bool = False,
                  can_ack_pings: bool = False, ideal_node: str | None = None,
                  timeout: float = 10.0, source_ip: str | None = None,
                  extra_headers=()) -> AsyncIterator[DerpClient]:
    """Connect to ``http(s)://host[:port]/derp`` and complete the DERP handshake.

    ``dial`` overrides where the TCP connection goes (a DERP map's IPv4/IPv6); ``cert_pin`` is
    a ``sha256-raw:`` CertName; ``ideal_node`` sends the ``Ideal-Node`` header;
    ``source_ip`` binds the local end; ``extra_headers`` go into the upgrade request (tests:
    a forged ``X-Forwarded-For``). Every failure to connect is a ``DerpClientError`` whose
    ``step`` says where it happened.
    """
    parsed = urlsplit(url)
    if parsed.scheme not in ("http", "https"):
        raise ValueError(f"DERP URL must be http:// or https://, not {url!r}")
    host = parsed.hostname or ""
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    dial_host, dial_port = dial or (host, port)
    opts = _Options(parsed, keypair or KeyPair.generate(), ssl_context, cert_pin,
                    server_hostname or host, dial_host, dial_port, fast_start, websocket,
                    mesh_key, is_prober, can_ack_pings, ideal_node, timeout, source_ip,
                    tuple(extra_headers))
    async with _closing(await _establish(opts)) as client:
        yield client


@asynccontextmanager
async def _closing(client: DerpClient) -> AsyncIterator[DerpClient]:
    try:
        yield client
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
            await client.aclose()


# Failures that mean "this step did not work"; a DerpClientError already names its step.
_FAILURES = (OSError, trio.BrokenResourceError, EOFError, IOFailure, ProtocolError)
_DOING = {"dial": "cannot connect to", "tls": "TLS failed with",
          "upgrade": "HTTP upgrade failed with", "handshake": "DERP handshake failed with"}


async def _establish(opts: _Options) -> DerpClient:
    where = opts.url.geturl()
    progress = _Progress()
    try:
        with trio.fail_after(opts.timeout):
            return await _connect(opts, progress)
    except trio.TooSlowError as e:
        raise DerpClientError(progress.step, f"timed out after {opts.timeout:g}s "
                                             f"connecting to {where}") from e
    except DerpClientError:
        raise
    except _FAILURES as e:
        why = "server closed the connection" if isinstance(e, EOFError) else \
            (str(e) or type(e).__name__)
        raise DerpClientError(progress.step, f"{_DOING[progress.step]} {where}: {why}") from e


async def _connect(opts: _Options, progress: _Progress) -> DerpClient:
    """Dial, TLS, upgrade, handshake, in that order, each announced in ``progress``."""
    keypair = opts.keypair
    stream: trio.abc.Stream = await dial.open_tcp(opts.dial_host, opts.dial_port,
                                                  opts.source_ip)
    tls = dial.TLSFacts(None, [], None)
    try:
        if opts.url.scheme == "https":
            progress.step = "tls"
            stream = dial.tls_client(stream, ssl_context=opts.ssl_context,
                                     cert_pin=opts.cert_pin,
                                     server_hostname=opts.server_hostname)
            tls = await dial.tls_handshake(stream, opts.cert_pin)
        progress.step = "upgrade"
        info_json = handshake.client_info_json(mesh_key=opts.mesh_key,
                                               can_ack_pings=opts.can_ack_pings,
                                               is_prober=opts.is_prober)
        reader = FrameReader(messages.LIMITS, wanted=wire.ALL_TYPES)
        host = http_client.host_header(opts.url)
        fast_key = tls.fast_start_key if opts.fast_start and not opts.websocket else None
        if opts.websocket:
            stream = await http_client.open_websocket(stream, host,
                                                      extra_headers=opts.extra_headers)
        else:
            upgrade = http_client.derp_upgrade(host, fast_start=fast_key is not None,
                                               ideal_node=opts.ideal_node,
                                               extra_headers=opts.extra_headers)
            if fast_key is not None:  # request and ClientInfo in one write; no HTTP answer
                await stream.send_all(upgrade.request + handshake.client_info_frame(
                    keypair.private, keypair.public, fast_key, info_json))
            else:
                await stream.send_all(upgrade.request)
                reader.feed(await upgrade.read_101(stream))
        progress.step = "handshake"
        server_key = fast_key
        if server_key is None:
            server_key = await _read_server_key(stream, reader)
            await stream.send_all(handshake.client_info_frame(keypair.private, keypair.public,
                                                              server_key, info_json))
        try:
            info = await _read_server_info(stream, reader, keypair, server_key)
        except ProtocolError:
            if fast_key is not None and reader.data.startswith(b"HTTP/", reader.pos):
                progress.step = "upgrade"  # an HTTP answer where frames should be (spec §1.4)
                await upgrade.read_101(ReplayStream(reader.data[reader.pos:], stream))
                raise ProtocolError("server answered a fast-start request with HTTP 101")
            raise
    except BaseException:
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
            await stream.aclose()
        raise
    return DerpClient(stream, keypair, server_key, info, reader, tls_version=tls.version,
                      fast_start=fast_key is not None, peer_chain=tls.chain)


async def _read_server_key(stream: trio.abc.Stream, reader: FrameReader) -> bytes:
    ftype, start, end = await next_frame(stream, reader)
    if ftype != FrameType.SERVER_KEY:
        raise ProtocolError(f"expected ServerKey, got frame type {ftype:#04x}")
    return wire.parse_server_key(reader.data[start:end])


async def _read_server_info(stream: trio.abc.Stream, reader: FrameReader, keypair: KeyPair,
                            server_key: bytes) -> ServerInfo:
    while True:
        ftype, start, end = await next_frame(stream, reader)
        if ftype == FrameType.SERVER_KEY:
            continue  # a fast-start client already knows it
        if ftype != FrameType.SERVER_INFO:
            raise ProtocolError(f"expected ServerInfo first, got frame type {ftype:#04x}")
        return handshake.open_server_info(reader.data[start:end], keypair.private, server_key)
