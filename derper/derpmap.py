"""This relay's DERP map, as Headscale (derp.paths YAML) and Tailscale (derpMap JSON) read it.

Pure: built from the server's own Config and certificate pin, so the map says exactly what the
server serves (TLS port, STUN port, port-80 helper, pinned self-signed certificate) and cannot
drift from a hand-written copy. Field names and meanings: spec §8.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass

from .certs.bundle import parse_ip
from .config import Config
from .errors import ConfigError
from .net.addr import parse_addr
from .proto.pin import well_formed

SELF_HOSTED_REGIONS = range(900, 1000)  # reserved by Tailscale for user-run relays
FORMATS = ("headscale", "tailscale", "json")
NO_ADDRESS = "none"  # DERPNode.IPv4/IPv6 convention: this address family is off

HEADSCALE_ADVICE = """\
# Headscale DERP map for this derper: save it as e.g. /etc/headscale/derp.yaml and in
# headscale's config.yaml set
#   derp:
#     paths:
#       - /etc/headscale/derp.yaml
#     urls: []   # when replacing Tailscale's relays with your own; keep the default URL to add
#                # this region beside them
"""


class DerpMapError(ConfigError):
    """The configuration cannot be described as a DERP map; the message says what to change."""


@dataclass
class MapOptions:
    """What the server's flags cannot know: the region's naming and the public addresses."""

    region_id: int = 900
    region_code: str = "derper"
    region_name: str = ""  # "" → "derper <hostname>"
    ipv4: str = ""  # "" → -hostname if it is an IPv4 address, else DNS of -hostname
    ipv6: str = ""
    omit_default_regions: bool = False
    nodes: str = ""  # the region's other relays: comma list of host[@sha256-raw:pin]


def build(config: Config, pin: str | None, options: MapOptions) -> dict:
    """The DERPMap (Go JSON field names and order) with this relay as its one region and node."""
    behind_proxy = config.certmode == "none"
    if not config.tls and not behind_proxy:
        raise DerpMapError("-dev serves plain HTTP, which Tailscale clients only use in debug "
                           "mode; describe a TLS server (-hostname, -certmode)")
    if options.region_id not in SELF_HOSTED_REGIONS:
        raise DerpMapError(f"-region-id must be within 900-999 (reserved for self-hosted "
                           f"relays), not {options.region_id}")
    if not options.region_code or any(c.isspace() for c in options.region_code):
        raise DerpMapError(f"-region-code must be one word, like myderp, not "
                           f"{options.region_code!r}")
    try:
        _, port = parse_addr(config.addr)
    except ValueError as e:
        raise DerpMapError(str(e)) from e
    if behind_proxy:  # clients dial the proxy's TLS port, not -a (edit it if not 443)
        port = 443
    if port == 0:
        raise DerpMapError("-a must name a fixed port for clients to dial, not port 0")
    hostname = config.hostname.strip("[]")
    ipv4, ipv6 = _addresses(hostname, options)
    node: dict = {"Name": f"{options.region_id}a", "RegionID": options.region_id,
                  "HostName": hostname}
    if pin:
        node["CertName"] = pin
    if ipv4:
        node["IPv4"] = ipv4
    if ipv6:
        node["IPv6"] = ipv6
    node["STUNPort"] = config.stun_port if config.stun and config.stun_port >= 0 else -1
    if node["STUNPort"] == 0:
        raise DerpMapError("-stun-port must be a fixed port for clients, not 0 (or -1 for none)")
    node["DERPPort"] = port
    if config.http_port == 80 and not behind_proxy:  # the helper answers /generate_204
        node["CanPort80"] = True
    nodes = [node] + [_other_node(node, i, entry) for i, entry in
                      enumerate(e.strip() for e in options.nodes.split(",") if e.strip())]
    region = {"RegionID": options.region_id, "RegionCode": options.region_code,
              "RegionName": options.region_name or f"derper {hostname}", "Nodes": nodes}
    derp_map: dict = {"Regions": {str(options.region_id): region}}
    if options.omit_default_regions:
        derp_map["omitDefaultRegions"] = True
    return derp_map


def _other_node(first: dict, index: int, entry: str) -> dict:
    """Another relay of the region (``-nodes`` entry ``host[@pin]``), with this one's ports:
    the nodes of a region run the same flags, each under its own name."""
    host, _, pin = entry.partition("@")
    host = host.strip("[]")
    if not host or (pin and not well_formed(pin)):
        raise DerpMapError(f"-nodes entry {entry!r}: write host or host@sha256-raw:<64 hex> "
                           "(that node's CertName)")
    node: dict = {"Name": f"{first['RegionID']}{chr(ord('b') + index)}",
                  "RegionID": first["RegionID"], "HostName": host}
    if pin:
        node["CertName"] = pin.lower()
    ip = parse_ip(host)
    if ip is not None:
        node["IPv4"], node["IPv6"] = (host, NO_ADDRESS) if ip.version == 4 else (NO_ADDRESS, host)
    for key in ("STUNPort", "DERPPort", "CanPort80"):
        if key in first:
            node[key] = first[key]
    return node


def _addresses(hostname: str, options: MapOptions) -> tuple[str, str]:
    """IPv4/IPv6 for the node: given ones, else the IP -hostname (the other family off)."""
    for flag, value, version in (("-ipv4", options.ipv4, 4), ("-ipv6", options.ipv6, 6)):
        if value and value != NO_ADDRESS:
            try:
                ok = ipaddress.ip_address(value).version == version
            except ValueError:
                ok = False
            if not ok:
                raise DerpMapError(f"{flag} must be an IPv{version} address or "
                                   f"{NO_ADDRESS!r}, not {value!r}")
    ip = parse_ip(hostname)
    if ip is None:
        return options.ipv4, options.ipv6
    if ip.version == 4:
        return options.ipv4 or hostname, options.ipv6 or NO_ADDRESS
    return options.ipv4 or NO_ADDRESS, options.ipv6 or hostname


def render(derp_map: dict, fmt: str) -> str:
    if fmt == "headscale":
        return HEADSCALE_ADVICE + headscale_yaml(derp_map)
    if fmt == "tailscale":
        return json.dumps({"derpMap": derp_map}, indent=2) + "\n"
    if fmt == "json":
        return json.dumps(derp_map, indent=2) + "\n"
    raise DerpMapError(f"-format must be one of {', '.join(FORMATS)}, not {fmt!r}")


def headscale_yaml(derp_map: dict) -> str:
    """Headscale decodes DERP map files with yaml.v3 and no tags: keys are the Go field names
    lower-cased, region keys integers. Tailscale-only fields are left out."""
    regions = {int(rid): region for rid, region in derp_map["Regions"].items()}
    lines: list[str] = []
    _yaml({"regions": regions}, 0, lines)
    return "\n".join(lines) + "\n"


def _yaml(mapping: dict, indent: int, lines: list[str], first_prefix: str = "") -> None:
    """Block-style YAML for dicts of scalars, dicts and lists of dicts; strings double-quoted
    (JSON escapes are valid YAML), so addresses and ``sha256-raw:`` pins stay strings."""
    pad = " " * indent
    for i, (key, value) in enumerate(mapping.items()):
        lead = first_prefix if i == 0 and first_prefix else pad
        name = key.lower() if isinstance(key, str) else str(key)
        if isinstance(value, dict):
            lines.append(f"{lead}{name}:")
            _yaml(value, indent + 2, lines)
        elif isinstance(value, list):
            lines.append(f"{lead}{name}:")
            for item in value:
                _yaml(item, indent + 4, lines, first_prefix=" " * (indent + 2) + "- ")
        else:
            lines.append(f"{lead}{name}: {_scalar(value)}")


def _scalar(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return json.dumps(str(value))
