"""A DERP map as the control server reads it, and the rules ``derper check -derp-map`` applies.

Pure. Tailscale JSON (a bare DERPMap or a policy file's ``{"derpMap": …}``) is read the way Go's
encoding/json reads it: keys case-insensitive. Headscale YAML is read the way yaml.v3 reads it
without tags: only the lower-cased Go field names count, so ``HostName:`` there is ignored, and
the check says so instead of pretending it was read. Field meanings: spec §8.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field

from ..derpmap import NO_ADDRESS, SELF_HOSTED_REGIONS
from ..proto.pin import PREFIX as PIN_PREFIX, well_formed
from . import yaml_subset
from .results import FAIL, OK, WARN, Check, is_ip, worst

DEFAULT_DERP_PORT = 443
DEFAULT_STUN_PORT = 3478

_MAP_FIELDS = {"regions": "Regions", "omitdefaultregions": "omitDefaultRegions",
               "homeparams": "HomeParams"}
_REGION_FIELDS = {"regionid": int, "regioncode": str, "regionname": str, "latitude": float,
                  "longitude": float, "avoid": bool, "nomeasurenohome": bool, "nodes": list}
_NODE_FIELDS = {"name": str, "regionid": int, "hostname": str, "certname": str, "ipv4": str,
                "ipv6": str, "stunport": int, "stunonly": bool, "derpport": int,
                "insecurefortests": bool, "stuntestip": str, "canport80": bool}
_SPELLING = {k.lower(): k for k in (
    "RegionID", "RegionCode", "RegionName", "Latitude", "Longitude", "Avoid", "NoMeasureNoHome",
    "Nodes", "Name", "HostName", "CertName", "IPv4", "IPv6", "STUNPort", "STUNOnly", "DERPPort",
    "InsecureForTests", "STUNTestIP", "CanPort80")}
_DNS_NAME = re.compile(r"(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)*"
                       r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.?")


class MapError(ValueError):
    """The text is not a DERP map at all; the message says what it is instead."""


@dataclass(frozen=True)
class Problem:
    status: str  # WARN or FAIL
    detail: str
    fix: str


@dataclass
class MapNode:
    """One node with its region's fields (lower-cased Go names → values) and the problems
    found while reading them."""

    region_key: str
    region: dict
    node: dict
    index: int
    problems: list[Problem] = field(default_factory=list)

    @property
    def name(self) -> str:
        return str(self.node.get("name") or f"#{self.index + 1}")

    @property
    def region_id(self) -> int:
        return self.region.get("regionid", 0)

    @property
    def hostname(self) -> str:
        return self.node.get("hostname", "")

    @property
    def derp_port(self) -> int:
        return self.node.get("derpport") or DEFAULT_DERP_PORT

    @property
    def stun_port(self) -> int:
        """-1 when the node has no STUN; 0 means the default port."""
        port = self.node.get("stunport", 0)
        return DEFAULT_STUN_PORT if port == 0 else port

    def address(self, family: int) -> str:
        """What clients dial for ``family``: the map's address, "" (DNS) or ``none`` (off)."""
        value = self.node.get("ipv4" if family == 4 else "ipv6", "")
        if value and not _is_family(value, family):
            return NO_ADDRESS
        return value

    @property
    def label(self) -> str:
        return f"{self.hostname or '?'}:{self.derp_port} (region {self.region_id}, node " \
               f"{self.name})"


def load_map(text: str) -> tuple[str, list[MapNode], list[Problem]]:
    """(format, nodes, problems of the map as a whole). ``MapError`` if it is no DERP map."""
    stripped = text.lstrip()
    if stripped.startswith("{"):
        fmt = "json"
        try:
            data = json.loads(stripped)
        except ValueError as e:
            raise MapError(f"not valid JSON ({e}); a Tailscale policy file is HuJSON: give the "
                           "\"derpMap\" object alone, without comments") from None
        if isinstance(data, dict):
            data = next((v for k, v in data.items() if k.lower() == "derpmap"), data)
    else:
        fmt = "yaml"
        try:
            data = yaml_subset.load(text)
        except yaml_subset.YAMLError as e:
            raise MapError(f"not a DERP map in JSON or YAML: {e}") from None
    if not isinstance(data, dict):
        raise MapError("not a DERP map: expected an object with \"Regions\" (JSON) or "
                       "regions: (Headscale YAML)")
    problems: list[Problem] = []
    top = _fields(data, {k: object for k in _MAP_FIELDS}, fmt, "the map", problems)
    regions = top.get("regions")
    if not isinstance(regions, dict) or not regions:
        raise MapError("the map has no regions (expected \"Regions\" in JSON, regions: in "
                       "Headscale YAML)")
    nodes = []
    for key, raw in regions.items():
        where = f"region {key}"
        if raw is None:
            continue  # Headscale's way of writing "no such region" (spec §8.2)
        if not isinstance(raw, dict):
            problems.append(Problem(FAIL, f"{where} is not a mapping", "give each region its "
                                    "fields (RegionID, RegionCode, Nodes, …)"))
            continue
        region_problems: list[Problem] = []
        region = _fields(raw, _REGION_FIELDS, fmt, where, region_problems)
        region_problems += _region_rules(str(key), region)
        raw_nodes = region.get("nodes") or []
        if not raw_nodes:
            problems += region_problems + [Problem(FAIL, f"{where} has no nodes",
                                                   "add the relay as a node of the region")]
        for index, raw_node in enumerate(raw_nodes):
            node_problems = list(region_problems)
            if not isinstance(raw_node, dict):
                node_problems.append(Problem(FAIL, f"{where} node #{index + 1} is not a mapping",
                                             "write each node as Name, HostName, … fields"))
                raw_node = {}
            node = _fields(raw_node, _NODE_FIELDS, fmt, f"{where} node #{index + 1}",
                           node_problems)
            nodes.append(MapNode(str(key), region, node, index, node_problems))
    _duplicate_names(nodes)
    return fmt, nodes, problems


def _fields(raw: dict, kinds: dict, fmt: str, where: str, problems: list[Problem]) -> dict:
    """The keys as the control server reads them (lower-cased), with wrong ones reported."""
    out: dict = {}
    for key, value in raw.items():
        key = str(key)
        lower = key.lower()
        if lower not in kinds:
            problems.append(Problem(WARN, f"unknown key {key!r} in {where} is ignored",
                                    "remove it or fix its spelling (spec: tailcfg.DERPMap)"))
            continue
        if fmt == "yaml" and key != lower:
            problems.append(Problem(FAIL, f"Headscale ignores {key!r} in {where}: its YAML "
                                          "keys are lower-case",
                                    f"write {lower!r} instead of {key!r}"))
            continue
        kind = kinds[lower]
        if value is None:
            continue
        if kind is int and isinstance(value, str) and fmt == "yaml" and re.fullmatch(
                r"-?[0-9]+", value):
            value = int(value)
        if kind is str and isinstance(value, int) and not isinstance(value, bool) \
                and fmt == "yaml":
            value = str(value)  # yaml.v3 reads a plain 900 into a string field as "900"
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is not object and (not isinstance(value, kind) or (kind is int and isinstance(
                value, bool))):
            name = _SPELLING.get(lower, key)
            problems.append(Problem(FAIL, f"{name} in {where} must be {_KIND_NAMES[kind]}, not "
                                          f"{value!r}",
                                    f"write {name} as {_KIND_NAMES[kind]}"))
            continue
        out[lower] = value
    return out


_KIND_NAMES = {int: "a number", str: "a string", bool: "true or false", float: "a number",
               list: "a list"}


def _region_rules(key: str, region: dict) -> list[Problem]:
    problems = []
    rid = region.get("regionid")
    if rid is None:
        return [Problem(FAIL, f"region {key} has no RegionID",
                        f"set RegionID to {key}, the number it is listed under")]
    if str(rid) != key:
        problems.append(Problem(FAIL, f"region {key} has RegionID {rid}",
                                "list each region under its own RegionID"))
    if rid not in SELF_HOSTED_REGIONS:
        problems.append(Problem(WARN, f"RegionID {rid} is outside 900-999, the range Tailscale "
                                      "reserves for self-hosted relays",
                                "use a RegionID from 900 to 999: other IDs are Tailscale's "
                                "own regions and replace or collide with them"))
    if not region.get("regioncode"):
        problems.append(Problem(WARN, f"region {key} has no RegionCode",
                                "give it a short code (tailscale netcheck and `tailscale debug "
                                "derp CODE` show it)"))
    return problems


def _duplicate_names(nodes: list[MapNode]) -> None:
    seen: dict[str, int] = {}
    for node in nodes:
        seen[node.name] = seen.get(node.name, 0) + 1
    for node in nodes:
        if seen[node.name] > 1:
            node.problems.append(Problem(FAIL, f"node name {node.name!r} is used twice",
                                         "give every node a name unique in the whole map "
                                         "(e.g. 900a, 900b)"))


def _is_family(value: str, family: int) -> bool:
    try:
        return ipaddress.ip_address(value).version == family
    except ValueError:
        return False


@dataclass(frozen=True)
class Answers:
    """What answered when the node was checked; None: not tried."""

    resolved: tuple[str, ...] = ()
    stun_answered: bool | None = None
    captive_ok: bool | None = None


def node_check(node: MapNode, answers: Answers) -> Check:
    """The ``derp_map`` check of one node: its region's and its own rules, and whether the
    map agrees with what answered."""
    problems = node.problems + _node_rules(node, answers)
    if not problems:
        return Check("derp_map", OK, f"region {node.region_id} "
                                     f"({node.region.get('regioncode', '')}), node {node.name}: "
                                     "RegionID, HostName, ports and CertName consistent")
    return Check("derp_map", worst(p.status for p in problems),
                 "; ".join(p.detail for p in problems),
                 " ".join(f"{p.fix[0].upper()}{p.fix[1:]}." for p in problems))


def _node_rules(node: MapNode, answers: Answers) -> list[Problem]:
    n, out = node.node, []
    rid = n.get("regionid")
    if rid is None:
        out.append(Problem(FAIL, f"node {node.name} has no RegionID",
                           f"set the node's RegionID to its region's, {node.region_id}"))
    elif rid != node.region_id:
        out.append(Problem(FAIL, f"node {node.name} has RegionID {rid} in region "
                                 f"{node.region_id}",
                           f"set the node's RegionID to {node.region_id}"))
    host = node.hostname
    if not host:
        out.append(Problem(FAIL, f"node {node.name} has no HostName",
                           "set HostName to the relay's DNS name or IP address"))
    elif not (is_ip(host) or _DNS_NAME.fullmatch(host)):
        out.append(Problem(FAIL, f"HostName {host!r} is not a bare DNS name or IP address",
                           "write only the name (no https://, port or path: the port goes "
                           "into DERPPort)"))
    derp_port = n.get("derpport", 0)
    if not 0 <= derp_port <= 65535:
        out.append(Problem(FAIL, f"DERPPort {derp_port} is not a port",
                           "set DERPPort to the relay's TLS port (0 means 443)"))
    stun_port = n.get("stunport", 0)
    if not -1 <= stun_port <= 65535:
        out.append(Problem(FAIL, f"STUNPort {stun_port} is not a port",
                           "set STUNPort to the STUN port, 0 for 3478, or -1 for no STUN"))
    elif stun_port == 0 and answers.stun_answered is False:
        out.append(Problem(WARN, "STUNPort 0 means the default port 3478, not \"off\", and "
                                 "nothing answered STUN there",
                           "set STUNPort to -1 if the relay runs no STUN (derper -stun=false), "
                           "or open UDP 3478"))
    if stun_port == -1 and n.get("stunonly"):
        out.append(Problem(FAIL, "STUNOnly node with STUNPort -1 serves nothing",
                           "give the STUN-only node its STUNPort, or drop STUNOnly"))
    cert_name = n.get("certname", "")
    if cert_name.lower().startswith(PIN_PREFIX):
        if not well_formed(cert_name):
            out.append(Problem(FAIL, f"CertName {cert_name!r} is not sha256-raw: and 64 hex "
                                     "digits",
                               "copy the pin exactly as `derper derpmap` (or derper's start-up "
                               "line) prints it"))
    elif cert_name and not _DNS_NAME.fullmatch(cert_name):
        out.append(Problem(FAIL, f"CertName {cert_name!r} is neither a sha256-raw: pin nor a "
                                 "DNS name",
                           "use \"sha256-raw:<hex>\" for a self-signed certificate, a DNS name "
                           "the certificate is for, or nothing"))
    out += _address_rules(node, answers)
    if n.get("insecurefortests"):
        out.append(Problem(WARN, "InsecureForTests is set: clients accept any certificate",
                           "remove InsecureForTests outside tests, and pin the certificate "
                           "with CertName instead"))
    if n.get("canport80") and answers.captive_ok is False:
        out.append(Problem(WARN, "CanPort80 is true, but port 80 does not answer "
                                 "/generate_204 as a DERP node does",
                           "open TCP 80 to derper's HTTP helper, or set CanPort80 false"))
    return out


def _address_rules(node: MapNode, answers: Answers) -> list[Problem]:
    out = []
    host, resolved = node.hostname, set(answers.resolved)
    for family, key, name in ((4, "ipv4", "IPv4"), (6, "ipv6", "IPv6")):
        value = node.node.get(key, "")
        if not value or value == NO_ADDRESS:
            continue
        if not _is_family(value, family):
            out.append(Problem(FAIL, f"{name} {value!r} is not an {name} address",
                               f"write the relay's {name} address, or \"none\" to turn {name} "
                               "off for this node"))
        elif is_ip(host) and value != host and ipaddress.ip_address(host).version == family:
            out.append(Problem(WARN, f"{name} {value} differs from HostName {host}",
                               "clients dial the IPv4/IPv6 field and verify HostName: make them "
                               "the same relay"))
        elif resolved and not is_ip(host) and value not in resolved:
            out.append(Problem(WARN, f"{name} {value} is not among {host}'s addresses "
                                     f"({', '.join(sorted(resolved))})",
                               f"clients dial {value}, not the DNS records: update the map's "
                               f"{name} or the DNS record, whichever is stale"))
    if node.address(4) == NO_ADDRESS and node.address(6) == NO_ADDRESS:
        out.append(Problem(FAIL, "both IPv4 and IPv6 are off (\"none\"): clients cannot dial "
                                 "the node", "give the node at least one address, or leave "
                                 "IPv4/IPv6 empty to use DNS"))
    return out
