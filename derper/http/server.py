"""HTTP/1.1 on one connection: parse request heads with h11, answer endpoints, hand ``/derp``
over to the DERP session together with any bytes read past the head (spec §1.3, §1.4).
"""

from __future__ import annotations

from dataclasses import replace
from http import HTTPStatus
from typing import Callable

import h11
import trio

from .. import logs
from ..admission.pacer import Pacer
from ..errors import ProtocolError
from ..logs import Throttle
from ..net.reading import RECV_SIZE
from ..relay.hub import Relay
from ..relay.session import serve_derp
from .endpoints import Request, Response, error
from .forwarded import TrustedProxies
from .websocket import handshake_problem, serve_websocket

log = logs.get("derper.http")

MAX_HEAD = 16 << 10
MAX_BODY = 64 << 10  # our endpoints take no body; a larger one is refused, not read
MAX_REQUESTS = 100  # per keep-alive connection


class HttpConnection:
    """h11 server state over one stream (plain or TLS).

    ``proxies``: when the peer is one of them, each request's client address is the one its
    headers name (``http.forwarded``); everyone else's headers mean nothing. ``pacer`` is
    charged the parsing.
    """

    def __init__(self, stream: trio.abc.Stream, pacer: Pacer, remote_ip: str | None = None,
                 remote_port: int = 0, proxies: TrustedProxies | None = None,
                 initial: bytes = b"") -> None:
        self.stream = stream
        self.pacer = pacer
        self.peer = (remote_ip, remote_port)
        self.proxies = proxies if proxies is not None and proxies.trusts(remote_ip) else None
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        if initial:  # read past a PROXY protocol header
            self.conn.receive_data(initial)

    async def _next_event(self):
        while True:
            with self.pacer.measured():
                event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await self.stream.receive_some(RECV_SIZE)
            self.conn.receive_data(data)

    async def next_request(self) -> Request | None:
        """The next request, its body (if any) read and discarded; None when the peer is done."""
        try:
            event = await self._next_event()
            if isinstance(event, h11.ConnectionClosed):
                return None
            if not isinstance(event, h11.Request):
                raise ProtocolError(f"unexpected {type(event).__name__}")
            headers = list(event.headers)
            (ip, port), proxied = self.peer, False
            if self.proxies is not None:
                client = self.proxies.client(headers, self.peer)
                if client is not None:
                    (ip, port), proxied = client, True
            req = Request(event.method.decode("ascii", "replace"),
                          event.target.decode("ascii", "replace"), headers, ip, port, proxied)
            seen = 0
            while True:
                ev = await self._next_event()
                if isinstance(ev, h11.Data):
                    seen += len(ev.data)
                    if seen > MAX_BODY:
                        raise ProtocolError("request body too large")
                elif isinstance(ev, h11.EndOfMessage) or ev is h11.PAUSED:
                    return req
                else:
                    raise ProtocolError(f"unexpected {type(ev).__name__}")
        except h11.RemoteProtocolError as e:
            raise ProtocolError(str(e)) from None

    def response(self, req: Request, resp: Response) -> bytes:
        """The bytes that answer ``req`` with ``resp``."""
        headers = list(resp.headers)
        if resp.close:
            headers.append(("Connection", "close"))
        if req.method != "HEAD" or resp.body:
            headers.append(("Content-Length", str(len(resp.body))))
        data = self.conn.send(h11.Response(status_code=resp.status, headers=headers,
                                           reason=HTTPStatus(resp.status).phrase))
        if resp.body and req.method != "HEAD":
            data += self.conn.send(h11.Data(data=resp.body))
        return data + self.conn.send(h11.EndOfMessage())

    async def respond_error(self, status: int, text: str) -> None:
        """Best-effort error reply to a request h11 could not parse, then the caller closes."""
        try:
            resp = error(status, text)
            data = self.conn.send(h11.Response(
                status_code=status, reason=HTTPStatus(status).phrase,
                headers=resp.headers + [("Connection", "close"),
                                        ("Content-Length", str(len(resp.body)))]))
            data += self.conn.send(h11.Data(data=resp.body)) + self.conn.send(h11.EndOfMessage())
            await self.stream.send_all(data)
        except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def reusable(self) -> bool:
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
            return True
        return False

    def trailing(self) -> bytes:
        """Bytes received past the request head: the start of the DERP stream."""
        return bytes(self.conn.trailing_data[0])


def derp_upgrade_response(server_public: bytes) -> bytes:
    return (b"HTTP/1.1 101 Switching Protocols\r\n"
            b"Upgrade: DERP\r\n"
            b"Connection: Upgrade\r\n"
            b"Derp-Version: 2\r\n"
            b"Derp-Public-Key: " + server_public.hex().encode() + b"\r\n\r\n")


async def serve_http(stream: trio.abc.Stream, remote_ip: str | None, remote_port: int, *,
                     head_timeout: float, handle: Callable[[Request], Response],
                     log_throttle: Throttle, on_established: Callable[[], None], pacer: Pacer,
                     relay: Relay | None = None, proxies: TrustedProxies | None = None,
                     initial: bytes = b"", capped: bool = True) -> None:
    """Serve requests on one connection until it closes or turns into a DERP session.

    ``relay`` enables ``/derp`` upgrades (the main listener with ``-derp`` on); ``handle``
    answers every other request. ``on_established`` goes to the DERP session, which calls it
    once its client is registered (the connection's handshake slot is then free again).
    ``proxies`` are the ``-trusted-proxies`` whose headers name the client; ``initial`` holds
    bytes already read (past a PROXY protocol header). Each request is answered in its turn on
    the loop (``pacer``). ``capped=False``: -max-clients does not apply (the links between
    -workers of one host).
    """
    http = HttpConnection(stream, pacer, remote_ip, remote_port, proxies, initial)
    remote = f"{remote_ip}:{remote_port}"
    for _ in range(MAX_REQUESTS):
        try:
            with trio.fail_after(head_timeout):
                req = await http.next_request()
        except trio.TooSlowError:
            return
        except ProtocolError as e:
            log_throttle.log(log, "info", "closing connection: bad HTTP request",
                             remote=remote, error=str(e))
            await http.respond_error(400, "bad request")
            return
        if req is None:
            return
        if relay is not None and req.path == "/derp" and req.method != "CONNECT":
            resp = await _upgrade(http, req, relay, head_timeout, on_established, capped)
            if resp is None:
                return  # the connection was a DERP session and is over now
        else:
            await pacer.turn()
            with pacer.measured():
                # No proxy here. Any 2xx to CONNECT would switch h11 to a tunnel (nothing more
                # could be written), so the answer must be an error, and the connection ends.
                resp = (replace(error(405, "CONNECT is not supported"), close=True)
                        if req.method == "CONNECT" else handle(req))
        with pacer.measured():
            data = http.response(req, resp)
        await stream.send_all(data)
        if resp.close or not http.reusable():
            return


async def _upgrade(http: HttpConnection, req: Request, relay: Relay, head_timeout: float,
                   on_established: Callable[[], None], capped: bool) -> Response | None:
    """Serve the DERP session ``req`` asks for; or the response if it asks for none."""
    upgrade = (req.header(b"upgrade") or b"").strip().lower()
    if upgrade not in (b"derp", b"websocket"):
        return error(426, "DERP requires connection upgrade")
    if capped and relay.max_clients and relay.derp_conns >= relay.max_clients:
        # Refused before the upgrade: the client gets a plain HTTP error and retries later,
        # and the server spends no key exchange on a connection it cannot keep.
        relay.stats.rejected_max_clients += 1
        relay.log_throttle.log(log, "warning", "DERP connection cap reached: new clients get 503",
                               every=60.0, max_clients=relay.max_clients,
                               fix="raise -max-clients, or the open-file limit (systemd: "
                                   "LimitNOFILE=) with -max-clients 0")
        return error(503, "DERP server is full (-max-clients)")
    relay.derp_conns += capped
    try:
        return await _serve_upgraded(http, req, upgrade, relay, head_timeout, on_established)
    finally:
        relay.derp_conns -= capped


async def _serve_upgraded(http: HttpConnection, req: Request, upgrade: bytes, relay: Relay,
                          head_timeout: float,
                          on_established: Callable[[], None]) -> Response | None:
    """The session; or the response to a WebSocket upgrade that cannot be accepted."""
    remote_ip, remote_port = req.remote_ip, req.remote_port
    protocols = req.header(b"sec-websocket-protocol") or b""
    not_ideal = req.header(b"ideal-node") is not None
    if upgrade == b"websocket" and b"derp" in protocols:
        problem = handshake_problem(req)
        if problem is not None:
            return problem
        await serve_websocket(relay, http.stream, req, http.trailing(),
                              head_timeout=head_timeout, not_ideal=not_ideal,
                              on_established=on_established)
    else:
        fast_start = req.header(b"derp-fast-start") == b"1"
        await serve_derp(relay, http.stream, remote_ip=remote_ip, remote_port=remote_port,
                         on_established=on_established, initial=http.trailing(),
                         preamble=b"" if fast_start else derp_upgrade_response(relay.public_key),
                         not_ideal=not_ideal,
                         transport="derp-fast-start" if fast_start else "derp")
