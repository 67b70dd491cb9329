"""``/bootstrap-dns``: refreshed periodically, and a failed lookup keeps the last answer."""

from __future__ import annotations

import json
import socket

import trio

from derper.http import bootstrap_dns
from derper.http.bootstrap_dns import BootstrapDNS


class Resolver:
    """getaddrinfo over a table the test edits; a missing name fails as DNS does."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.lookups = 0
        self.hang = False

    async def __call__(self, name, port, *, type):
        self.lookups += 1
        await trio.lowlevel.checkpoint()
        if self.hang:
            await trio.sleep_forever()
        if name not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, type, 6, "", (ip, 0)) for ip in self.table[name]]


def answers(dns: BootstrapDNS) -> dict:
    return json.loads(dns.body)


async def test_failed_lookup_keeps_the_last_answer():
    resolver = Resolver({"a.example": ["192.0.2.1"], "b.example": ["192.0.2.2", "192.0.2.3"]})
    dns = BootstrapDNS(["a.example", "b.example"], resolve=resolver)
    assert dns.body == b""
    await dns.resolve_once()
    assert answers(dns)["a.example"] == ["192.0.2.1"]
    assert sorted(answers(dns)["b.example"]) == ["192.0.2.2", "192.0.2.3"]  # (shuffled)
    del resolver.table["a.example"]  # the resolver fails for one name
    resolver.table["b.example"] = ["198.51.100.9"]
    await dns.resolve_once()
    assert answers(dns) == {"a.example": ["192.0.2.1"], "b.example": ["198.51.100.9"]}


async def test_refreshes_every_interval(autojump_clock):
    resolver = Resolver({"a.example": ["192.0.2.1"]})
    dns = BootstrapDNS(["a.example"], resolve=resolver)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(dns.refresh_forever)
        await trio.sleep(1)
        assert answers(dns) == {"a.example": ["192.0.2.1"]} and resolver.lookups == 1
        resolver.table["a.example"] = ["203.0.113.5"]
        await trio.sleep(bootstrap_dns.REFRESH_INTERVAL - 2)
        assert answers(dns) == {"a.example": ["192.0.2.1"]}  # not yet
        await trio.sleep(2)
        assert answers(dns) == {"a.example": ["203.0.113.5"]} and resolver.lookups == 2
        nursery.cancel_scope.cancel()


async def test_a_hanging_resolver_is_cut_off_and_the_answer_kept(autojump_clock):
    resolver = Resolver({"a.example": ["192.0.2.1"]})
    dns = BootstrapDNS(["a.example"], resolve=resolver)
    await dns.resolve_once()
    resolver.hang = True
    start = trio.current_time()
    await dns.resolve_once()
    assert trio.current_time() - start == bootstrap_dns.RESOLVE_TIMEOUT
    assert answers(dns) == {"a.example": ["192.0.2.1"]}
