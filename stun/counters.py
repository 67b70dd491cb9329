"""STUN counters as plain list slots, so the responder pays one index-add per datagram.

Label names follow the Go derper's ``stun_requests{disposition}`` and ``stun_addrfamily{family}``;
our extra dispositions split what Go lumps into ``not_stun``.
"""

from __future__ import annotations

from stun.message import Disposition

IPV4 = 0
IPV6 = 1
_FAMILIES = ("ipv4", "ipv6")


class StunCounters:
    """Datagrams by ``Disposition`` and answered requests by client family (v4-mapped is IPv4)."""

    __slots__ = ("requests", "families")

    def __init__(self) -> None:
        self.requests = [0] * len(Disposition)
        self.families = [0] * len(_FAMILIES)

    def by_disposition(self) -> dict[str, int]:
        return {d.name.lower(): self.requests[d] for d in Disposition}

    def by_family(self) -> dict[str, int]:
        return dict(zip(_FAMILIES, self.families, strict=True))
