"""The client's address behind a reverse proxy: ``X-Forwarded-For``, ``Forwarded`` (RFC 7239)
and ``X-Real-IP``, believed only from ``-trusted-proxies`` peers (pure).

A chain is read from the right, the hop nearest to us first: each address a trusted proxy wrote
is believed, so the rightmost address that is not itself a trusted proxy is the client, however
many proxies stand in between, and whatever a client wrote into the header itself is never
reached. An entry that cannot be parsed (``unknown``, an obfuscated name, garbage) ends the walk
at the last hop we could read. Headers are taken in this order, the first present wins:
``X-Forwarded-For`` (nginx, Caddy, HAProxy and CDNs append to it), ``Forwarded``, ``X-Real-IP``.
"""

from __future__ import annotations

import ipaddress
import re

from ..net.addr import IPNetwork, ip_in, ip_text

Node = tuple[str, int]  # (ip, port); port 0 when the proxy named none

# RFC 7239: element = pair *(";" pair); pair = token "=" (token / quoted-string)
_PAIR = re.compile(r'\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)=("(?:[^"\\]|\\.)*"|[^;,"\s]*)\s*')
_PORTED = re.compile(r"\[([0-9A-Fa-f:.]+)\](?::(\d{1,5}))?|([0-9.]+):(\d{1,5})")


def parse_node(text: str) -> Node | None:
    """``ip``, ``ip:port``, ``[ipv6]`` or ``[ipv6]:port`` → (ip, port); None for anything
    else (``unknown``, obfuscated names, garbage)."""
    text = text.strip()
    port = 0
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        m = _PORTED.fullmatch(text)
        if m is None:
            return None
        host, port_text = (m[1], m[2]) if m[1] is not None else (m[3], m[4])
        port = int(port_text or 0)
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return None
        if port > 65535 or (m[3] is not None and ip.version != 4):
            return None
    return ip_text(ip), port


def forwarded_for(value: str) -> list[Node | None]:
    """The ``for=`` of each element of a ``Forwarded`` value, left to right; None for an
    element that is malformed or names no usable address."""
    nodes: list[Node | None] = []
    for element in _split_elements(value):
        node = None
        pos, pairs = 0, {}
        while pos < len(element):
            m = _PAIR.match(element, pos)
            if m is None:
                pairs = {}
                break
            name, raw = m[1].lower(), m[2]
            pairs.setdefault(name, re.sub(r"\\(.)", r"\1", raw[1:-1]) if raw[:1] == '"'
                             else raw)
            pos = m.end()
            if pos < len(element):
                if element[pos] != ";":
                    pairs = {}
                    break
                pos += 1
        if "for" in pairs:
            node = parse_node(pairs["for"])
        nodes.append(node)
    return nodes


def _split_elements(value: str) -> list[str]:
    """``value`` split at the commas outside quoted strings."""
    out, start, quoted, escaped = [], 0, False, False
    for i, ch in enumerate(value):
        if escaped:
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == "," and not quoted:
            out.append(value[start:i])
            start = i + 1
    out.append(value[start:])
    return [e for e in (part.strip() for part in out) if e]


class TrustedProxies:
    """The ``-trusted-proxies`` prefixes, and the client address their requests name."""

    def __init__(self, nets: list[IPNetwork]) -> None:
        self.nets = nets

    def trusts(self, ip: str | None) -> bool:
        return ip_in(ip, self.nets)

    def client(self, headers: list[tuple[bytes, bytes]], peer: Node) -> Node | None:
        """The client a trusted ``peer``'s request names; None if it names none (no header)."""
        chain = self._chain(headers)
        if chain is None:
            return None
        found = peer
        for node in reversed(chain):
            if node is None:
                break
            found = node
            if not self.trusts(node[0]):
                break
        return found

    @staticmethod
    def _chain(headers: list[tuple[bytes, bytes]]) -> list[Node | None] | None:
        values: dict[bytes, list[str]] = {}
        for name, value in headers:
            if name in (b"x-forwarded-for", b"forwarded", b"x-real-ip"):
                values.setdefault(name, []).append(value.decode("latin-1"))
        if b"x-forwarded-for" in values:
            return [parse_node(part) for part in ",".join(values[b"x-forwarded-for"]).split(",")
                    if part.strip()]
        if b"forwarded" in values:
            return forwarded_for(",".join(values[b"forwarded"]))
        if b"x-real-ip" in values:
            return [parse_node(values[b"x-real-ip"][-1])]
        return None
