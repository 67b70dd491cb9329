"""``/bootstrap-dns``: addresses of names clients may need before their own DNS works.

Resolved in the background every 10 minutes (1 minute budget per round), never per request,
so a slow resolver cannot stall HTTP. A name that fails to resolve keeps its last answer: a
transient DNS error should not empty the list clients bootstrap from (Go drops the name).
"""

from __future__ import annotations

import json
import random
import socket

import trio

from .. import logs

log = logs.get("derper.http.bootstrap_dns")

REFRESH_INTERVAL = 600.0
RESOLVE_TIMEOUT = 60.0


def parse_names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


class BootstrapDNS:
    """``resolve`` is ``getaddrinfo``'s signature; tests hand in a resolver they control."""

    def __init__(self, names: list[str], resolve=trio.socket.getaddrinfo) -> None:
        self.names = names
        self._resolve = resolve
        self.entries: dict[str, list[str]] = {}
        self.body = b""  # nothing configured: 200 with an empty body, as Go does

    async def resolve_once(self) -> None:
        with trio.move_on_after(RESOLVE_TIMEOUT):
            for name in self.names:
                try:
                    infos = await self._resolve(name, None, type=socket.SOCK_STREAM)
                except OSError as e:
                    log.warning("bootstrap DNS lookup failed; keeping the previous answer",
                                name=name, error=str(e))
                    continue
                ips = list(dict.fromkeys(info[4][0] for info in infos))
                random.shuffle(ips)
                self.entries[name] = ips
        if self.entries:
            self.body = json.dumps(self.entries, indent="\t").encode()

    async def refresh_forever(self) -> None:
        while True:
            await self.resolve_once()
            await trio.sleep(REFRESH_INTERVAL)
