"""``derper nat``: why are this network's devices relayed? NAT behaviour against STUN servers.

Run it on the network in question (on a device behind the NAT, not on the relay). Against an
RFC 5780 server (derper with -stun-alt-port, coturn, …) it measures mapping and filtering;
against plain STUN servers it compares the mapped addresses, as ``tailscale netcheck`` does.
It does not probe the gateway for UPnP, NAT-PMP or PCP.
"""

from __future__ import annotations

import json
import socket
import sys
import textwrap
from dataclasses import asdict
from typing import Mapping

import trio

from stun.nat import Report, classify
from stun.prober import observe

from ..net.addr import AddressError, parse_addr
from .goflags import Flag, HelpRequested, UsageError, parse, usage

DEFAULT_PORT = 3478
DEFAULTS = {"timeout": 2.0, "json": False, "ipv6": True}

NAT_FLAGS = [
    Flag("timeout", "timeout", "duration",
         "how long each of the (at most three) rounds of probes waits for answers",
         ("DERP_NAT_TIMEOUT",)),
    Flag("json", "json", "bool",
         "print one JSON object: udp, public, mapping, filtering, port_preserving, hairpin, "
         "ipv6, verdict (direct | easy-peers-only | relayed | unknown), summary, helps, notes",
         ("DERP_NAT_JSON",)),
    Flag("ipv6", "ipv6", "bool", "also try the servers' IPv6 addresses", ("DERP_NAT_IPV6",)),
]

USAGE_HEAD = f"""\
Usage: derper nat [flags] SERVER[:port] [SERVER[:port]...]

Tells why Tailscale on this network is relayed: how the NAT maps and filters UDP (RFC 5780),
and what would help. Run it on a device behind the NAT in question. SERVER is a STUN server
(port {DEFAULT_PORT} unless given); servers may also come from $DERP_NAT_SERVERS (space-separated).
A derper started with -stun-alt-port and -stun-alt-ip measures everything; with only
-stun-alt-port, add a STUN server at another IP. Plain STUN servers are compared with each
other: does the public port change between them?

Examples:
  derper nat derp.example.com
      against your relay, started with: derper ... -stun-alt-port 3479
  derper nat -json 203.0.113.7:3478 | jq -r .verdict
      direct, easy-peers-only, relayed or unknown, for a script
  derper nat stun.l.google.com:19302 stun.cloudflare.com
      two plain STUN servers: does the public port change with the destination?

Flags (Go syntax: -x v, -x=v, --x; each may also come from the variable shown):
"""

_LABELS = {True: "yes", False: "no", None: "unknown"}


def run(argv: list[str], environ: Mapping[str, str]) -> int:
    try:
        values, _, rest = parse(NAT_FLAGS, argv, environ)
        options = dict(DEFAULTS, **values)
        targets = [_target(t) for t in (rest or environ.get("DERP_NAT_SERVERS", "").split())]
        if not targets:
            raise UsageError("name at least one STUN server, e.g. derper nat derp.example.com")
        if options["timeout"] <= 0:
            raise UsageError("-timeout must be positive")
    except HelpRequested:
        print(USAGE_HEAD + usage(NAT_FLAGS, DEFAULTS))
        return 0
    except UsageError as e:
        print(f"derper nat: {e}\nRun 'derper nat -h' for help.", file=sys.stderr)
        return 2
    try:
        report = trio.run(_measure, targets, options)
    except KeyboardInterrupt:
        return 130
    except (OSError, LookupError) as e:
        print(f"derper nat: {e}", file=sys.stderr)
        return 1
    if options["json"]:
        print(json.dumps(asdict(report), indent=2))
    else:
        sys.stdout.write(render(report))
    return 0


def _target(text: str) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 literal."""
    if text.count(":") > 1 and not text.startswith("["):
        return text, DEFAULT_PORT
    try:
        host, port = parse_addr(text if ":" in text else f"{text}:{DEFAULT_PORT}")
    except AddressError as e:
        raise UsageError(str(e).replace("listen address", "server")) from None
    if host is None:
        raise UsageError(f"server {text!r} has no host")
    return host, port


async def _measure(targets: list[tuple[str, int]], options: dict) -> Report:
    wait = options["timeout"]
    servers, servers6 = [], []
    for host, port in targets:
        found = {}
        with trio.move_on_after(wait):
            try:
                for family, _, _, _, sockaddr in await trio.socket.getaddrinfo(
                        host, port, type=socket.SOCK_DGRAM):
                    found.setdefault(family, sockaddr[:2])
            except socket.gaierror as e:
                print(f"derper nat: cannot resolve {host}: {e.strerror}", file=sys.stderr)
        if socket.AF_INET in found:
            servers.append(found[socket.AF_INET])
        if socket.AF_INET6 in found and options["ipv6"]:
            servers6.append(found[socket.AF_INET6])
    if not servers and not servers6:
        raise LookupError("none of the servers has an address (see above)")
    return classify(await observe(servers, servers6, wait))


def render(report: Report) -> str:
    """The report as a person reads it."""
    public = f" (public address {report.public})" if report.public else ""
    ipv6 = {True: "works", False: "no answer", None: "not tried (no IPv6 address)"}
    lines = [
        ("UDP", f"{'works' if report.udp else 'blocked'}{public}"),
        ("NAT mapping", report.mapping),
        ("NAT filtering", report.filtering),
        ("Port preserving", _LABELS[report.port_preserving]),
        ("Hairpinning", _LABELS[report.hairpin]),
        ("IPv6", ipv6[report.ipv6]),
    ]
    text = "".join(f"{label + ':':<17}{value}\n" for label, value in lines)
    text += "".join(_wrap(note, "  note: ", "        ") for note in report.notes)
    text += "\n" + _wrap(report.summary, "Verdict: ", "  ")
    if report.helps:
        text += "What helps:\n" + "".join(_wrap(line, "  - ", "    ") for line in report.helps)
    return text


def _wrap(text: str, first: str, rest: str) -> str:
    return textwrap.fill(text, 79, initial_indent=first, subsequent_indent=rest) + "\n"
