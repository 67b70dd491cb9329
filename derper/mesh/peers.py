"""The ``-mesh-with`` list: which relays of the region to link to, and how (pure).

Go's syntax, comma separated: ``host`` or ``host:port`` (TLS to ``host``, checked against the
system roots, at ``https://host[:port]/derp``), optionally ``/dialhost`` (open the TCP connection
to ``dialhost`` instead, same port). derper adds ``@sha256-raw:<hex>`` at the end of an entry:
the peer's self-signed certificate pin (its CertName), for IP-only nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..certs.bundle import parse_ip
from ..errors import ConfigError
from ..net.addr import host_literal
from ..proto.pin import well_formed

DEFAULT_PORT = 443


@dataclass(frozen=True)
class MeshPeer:
    entry: str  # as written, for logs and the link gauge
    host: str  # TLS server name and the URL's host
    port: int
    dial_host: str  # what is resolved and dialled; each of its addresses gets a link
    pin: str | None
    sibling: bool = False  # another worker of this host: plain DERP on a Unix socket

    @property
    def url(self) -> str:
        if self.sibling:
            return f"http://{self.host}/derp"
        port = "" if self.port == DEFAULT_PORT else f":{self.port}"
        return f"https://{host_literal(self.host)}{port}/derp"


def parse_mesh_with(text: str) -> list[MeshPeer]:
    """Every entry of ``text``; ConfigError names the first bad one and says why."""
    return [_entry(e.strip()) for e in text.split(",") if e.strip()]


def _entry(entry: str) -> MeshPeer:
    rest, _, pin = entry.partition("@")
    if pin:
        if not well_formed(pin):
            raise ConfigError(f"-mesh-with entry {entry!r}: the pin must be sha256-raw: and "
                              "64 hex digits (the peer's CertName from its DERP map node)")
    hostport, _, dial_host = rest.partition("/")
    host, port = _split_host_port(hostport, entry)
    if not host:
        raise ConfigError(f"-mesh-with entry {entry!r}: no host name; write host[:port]"
                          "[/dialhost][@sha256-raw:...]")
    dial_host = dial_host.strip("[]")
    if "/" in dial_host or (":" in dial_host and not _is_ip(dial_host)):
        raise ConfigError(f"-mesh-with entry {entry!r}: the dial host takes no port "
                          "(the connection uses the entry's port)")
    return MeshPeer(entry, host, port, dial_host or host, pin.lower() or None)


def _split_host_port(text: str, entry: str) -> tuple[str, int]:
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigError(f"-mesh-with entry {entry!r}: unclosed [ in an IPv6 address")
        host, after = text[1:end], text[end + 1:]
        port_text = after[1:] if after.startswith(":") else None
        if after and port_text is None:
            raise ConfigError(f"-mesh-with entry {entry!r}: expected [ipv6]:port")
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif _is_ip(text):  # a bare IPv6 address
        host, port_text = text, None
    elif ":" in text:
        raise ConfigError(f"-mesh-with entry {entry!r}: write an IPv6 address as [ip]:port")
    else:
        host, port_text = text, None
    if port_text is None:
        return host, DEFAULT_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"-mesh-with entry {entry!r}: bad port {port_text!r}")
    return host, int(port_text)


def _is_ip(text: str) -> bool:
    return parse_ip(text) is not None
