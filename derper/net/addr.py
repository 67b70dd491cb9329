"""Addresses as text: Go-style listen addresses, URL host literals, IPv4 seen through IPv6.

Pure functions, shared by the listeners, the HTTP redirect, the clients and the STUN server.
"""

from __future__ import annotations

import ipaddress
import socket

from ..errors import ConfigError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class AddressError(ConfigError):
    """A listen address that cannot be bound as written."""


def parse_addr(addr: str) -> tuple[str | None, int]:
    """Go-style listen address: ``:port``, ``ip:port``, ``[ipv6]:port``, ``host:port``.

    Returns (host or None for "every interface", port). The port may be a service name.
    """
    if addr.startswith("["):
        end = addr.find("]")
        if end < 0 or addr[end + 1:end + 2] != ":":
            raise AddressError(f"bad listen address {addr!r}: expected [ipv6]:port")
        host, port_text = addr[1:end], addr[end + 2:]
    else:
        host, sep, port_text = addr.rpartition(":")
        if not sep:
            raise AddressError(f"bad listen address {addr!r}: missing port (try ':{addr}')")
        if ":" in host:
            raise AddressError(f"bad listen address {addr!r}: IPv6 must be written [ip]:port")
    try:
        port = int(port_text) if port_text.isdigit() else socket.getservbyname(port_text, "tcp")
    except OSError:
        raise AddressError(f"bad listen address {addr!r}: unknown port {port_text!r}") from None
    if not 0 <= port <= 65535:
        raise AddressError(f"bad listen address {addr!r}: port out of range")
    return (host or None), port


def host_literal(host: str | None) -> str:
    """``host`` as it goes into a URL, a Host header or an ``ip:port`` string (IPv6 bracketed)."""
    if host and ":" in host and not host.startswith("["):
        return f"[{host}]"
    return host or ""


def unmap_ip(ip: str) -> str:
    """``::ffff:a.b.c.d`` (an IPv4 peer on a dual-stack socket) → ``a.b.c.d``; else unchanged.

    A string test, not a parse: the kernel writes mapped addresses in this one form, and this
    runs once per accepted connection and per STUN request.
    """
    if ip[:7].lower() == "::ffff:" and "." in ip:
        return ip[7:]
    return ip


def ip_text(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """``ip`` as text, IPv4 seen through IPv6 (``::ffff:a.b.c.d``) as plain IPv4."""
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped or ip)


def parse_cidrs(text: str, flag: str) -> list[IPNetwork]:
    """Comma-separated prefixes such as ``10.0.0.0/8,fd00::/8`` (a bare address is a /32 or
    /128); ``flag`` names the option in the error."""
    nets = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            nets.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ValueError(f"{flag}: {part!r} is not an IP prefix like 10.0.0.0/8 or "
                             "fd00::/8") from None
    return nets


def ip_in(ip: str | None, nets: list[IPNetwork]) -> bool:
    """Whether ``ip`` (text, IPv4 possibly seen through IPv6) lies in one of ``nets``."""
    if not ip or not nets:
        return False
    try:
        addr = ipaddress.ip_address(unmap_ip(ip).split("%", 1)[0])
    except ValueError:
        return False
    return any(addr in net for net in nets)
