"""The server's sockets: the main listener, the port-80 helper, STUN and its RFC 5780 alternates.

Bound here by a single server; under ``-workers`` the supervisor binds one set per worker on
the same ports (SO_REUSEPORT), keeps them across worker restarts (connections that arrive while
a worker restarts wait in its backlog), and each worker adopts its set by descriptor.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import trio

from stun.server import Rfc5780Sockets, adopt_udp_socket, open_alternates, open_stun_socket

from .listener import adopt_listener, bound_port, open_listener


@dataclass
class ServerSockets:
    main: trio.SocketListener
    helper: trio.SocketListener | None = None
    stun: socket.socket | None = None
    alternates: Rfc5780Sockets | None = None

    @classmethod
    async def bind(cls, host: str | None, port: int, *, http_port: int, stun_port: int,
                   alt_port: int, alt_ip: str, reuse_port: bool = False) -> ServerSockets:
        """Bind everything asked for (a port < 0 is not wanted); raises OSError, with whatever
        was bound already closed again."""
        out = cls(await open_listener(host, port, reuse_port=reuse_port))
        try:
            if http_port >= 0:
                out.helper = await open_listener(host, http_port, reuse_port=reuse_port)
            if stun_port >= 0:
                out.stun = await open_stun_socket(host, stun_port, reuse_port=reuse_port)
                out.alternates = await open_alternates(out.stun, host, alt_port, alt_ip,
                                                       reuse_port=reuse_port)
        except BaseException:
            await out.aclose()
            raise
        return out

    @classmethod
    def adopt(cls, fds: dict[str, list[int]]) -> ServerSockets:
        """The set a supervisor made (``fds()`` of it), inherited by a worker."""
        out = cls(adopt_listener(fds["main"][0]))
        if fds.get("helper"):
            out.helper = adopt_listener(fds["helper"][0])
        if fds.get("stun"):
            udp = [adopt_udp_socket(fd) for fd in fds["stun"]]
            out.stun = udp[0]
            if len(udp) > 1:
                out.alternates = Rfc5780Sockets(udp)
        return out

    def fds(self) -> dict[str, list[int]]:
        out = {"main": [self.main.socket.fileno()]}
        if self.helper is not None:
            out["helper"] = [self.helper.socket.fileno()]
        if self.stun is not None:
            udp = self.alternates.sockets if self.alternates else [self.stun]
            out["stun"] = [s.fileno() for s in udp]
        return out

    @property
    def ports(self) -> dict[str, int]:
        """What was bound, for binding the next worker's set to the same ports."""
        out = {"main": bound_port(self.main)}
        if self.helper is not None:
            out["helper"] = bound_port(self.helper)
        if self.stun is not None:
            out["stun"] = self.stun.getsockname()[1]
        if self.alternates is not None:
            out["alt"] = self.alternates.ports[1]
        return out

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            for listener in (self.main, self.helper):
                if listener is not None:
                    await listener.aclose()
        for sock in self.alternates.sockets if self.alternates else [self.stun]:
            if sock is not None:
                sock.close()
