"""``derper check``: is my relay working? Every check from outside, and the fix for each problem.

Three ways to name the relay: a TARGET; ``-derp-map`` (every node of a Tailscale JSON or
Headscale YAML map, with the map's own rules); or nothing, on the relay host, where it reads
the server's own flags and ``DERP_*`` variables, runs the server's configuration check, and
checks that relay through its public name, with hints about local listeners and ufw. Read-only:
it creates no key and no certificate. Exit status 0: nothing failed; 1: something did; 2: usage.
"""

from __future__ import annotations

import json
import ssl
import sys
from pathlib import Path
from typing import Mapping

import trio

from .. import config_check
from ..certs.bundle import CertError
from ..check import local, results
from ..check.derpmap_rules import Answers, MapError, MapNode, load_map, node_check
from ..check.probe import Target, check_target, verify_context
from ..check.results import FAIL, Check, Report
from ..config import Config
from ..derpmap import DerpMapError
from ..http import client as http_client
from ..net.addr import AddressError, parse_addr
from .derpmap import served_pin
from .flags import SERVE_FLAGS, config_from_values, flag_defaults
from .goflags import Flag, HelpRequested, UsageError, parse, usage

MAX_MAP_BYTES = 1 << 20
DEFAULTS = {"derp_map": "", "ca_file": "", "timeout": 5.0, "json": False}
CHECK_FLAGS = [
    Flag("derp-map", "derp_map", "string",
         "check every node of this DERP map instead of a TARGET: a file or an http(s):// URL, "
         "Tailscale JSON (a bare map or {\"derpMap\": ...}) or Headscale YAML (derp.paths)",
         ("DERP_CHECK_DERP_MAP",)),
    Flag("ca-file", "ca_file", "string",
         "PEM file of extra roots to trust besides the system's ($SSL_CERT_FILE honoured), for "
         "a relay with a certificate from a private CA", ("DERP_CHECK_CA_FILE",)),
    Flag("timeout", "timeout", "duration", "how long each check may take",
         ("DERP_CHECK_TIMEOUT",)),
    Flag("json", "json", "bool",
         'print one JSON object per target (one line each): {"target": ..., "checks": '
         '[{"name", "status": "ok|warn|fail|skip", "detail", "fix"}]}', ("DERP_CHECK_JSON",)),
]
_SHARED = ("stun_port", "http_port")  # the server's flags that also aim a TARGET's checks
_SERVER_FLAGS = [f for f in SERVE_FLAGS if f.name != "version"]
_FLAGS = CHECK_FLAGS + _SERVER_FLAGS

USAGE_HEAD = """\
Usage: derper check [flags] [TARGET]

Is my relay working? Checks it from outside as a Tailscale client would (DNS, TCP, TLS, the
certificate, fast start, the DERP handshake, relaying between two clients, STUN and the
captive-portal check) and prints one line per check (ok, warn, FAIL, skip) with a fix: line
under each problem. TARGET: host, host:port, https://host[:port] (TLS, default port 443) or
http://host:port (a plain -dev relay). Instead of a TARGET, -derp-map checks every node of a
DERP map. With neither, run on the relay host: it reads the server's flags and DERP_*
variables (read-only), runs the server's configuration check, checks the relay through its
public name, and says whether anything listens on the ports and whether ufw blocks them.
Exit status: 0 when nothing failed (warnings allowed), 1 when a check failed, 2 on bad usage.

Examples:
  derper check derp.example.com
      from your laptop: everything a client needs, on 443/tcp, 3478/udp and 80/tcp
  derper check -http-port -1 -stun-port 3479 203.0.113.7:8443
      a relay on custom ports without the port-80 helper
  derper check -derp-map /etc/headscale/derp.yaml
      every node of a Headscale map, with the map's own rules (RegionID, keys, pins, ports)
  sudo sh -c 'set -a; . /etc/derper/derper.env; derper check'
      on the relay host, with the server's own settings
  derper check -json derp.example.com | jq -r '.checks[] | select(.status=="fail") | .fix'
      only what to fix, for a script

Flags of check, then the server's flags it reads without a TARGET (each may also come from the
variable shown; -stun-port and -http-port also aim a TARGET's checks, -1 skips one):
"""


def run(argv: list[str], environ: Mapping[str, str]) -> int:
    try:
        options, mode = _parse(argv, environ)
    except HelpRequested:
        defaults = dict(flag_defaults(), **DEFAULTS)
        print(USAGE_HEAD + usage(CHECK_FLAGS, defaults) + "\n\n" + usage(_SERVER_FLAGS, defaults))
        return 0
    except UsageError as e:
        print(f"derper check: {e}\nRun 'derper check -h' for help.", file=sys.stderr)
        return 2
    try:
        reports, extra_failure = trio.run(_run, options, mode)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # never a traceback: one line, and the status of a failed check
        print(f"derper check: unexpected error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    for report in reports:
        if options["json"]:
            print(json.dumps(report.as_json()))
        else:
            sys.stdout.write(results.render(report))
    return max(results.exit_status(reports), int(extra_failure))


def parse_target(text: str) -> tuple[str, int, bool]:
    """TARGET → (host, port, tls): ``host``, ``host:port``, ``[v6]:port``, a bare IPv6 literal,
    ``https://host[:port]`` (443) or ``http://host:port``."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "https", text
    if scheme not in ("https", "http"):
        raise UsageError(f"TARGET {text!r}: use host, host:port, https://host[:port] or "
                         "http://host:port")
    rest = rest.split("/", 1)[0]
    if not rest:
        raise UsageError(f"TARGET {text!r} has no host")
    if results.is_ip(rest):  # a bare IPv6 literal
        return rest.strip("[]"), 443, scheme == "https"
    if ":" not in rest.replace("[", "").replace("]", "") or rest.endswith("]"):
        host, port = rest.strip("[]"), None
    else:
        try:
            host, port = parse_addr(rest)
        except AddressError as e:
            raise UsageError(f"TARGET {text!r}: {str(e).replace('listen address', 'address')}") \
                from None
        if not host:
            raise UsageError(f"TARGET {text!r} has no host")
    if port is None:
        if scheme == "http":
            raise UsageError(f"TARGET {text!r}: give the port of the plain-HTTP relay, e.g. "
                             "http://127.0.0.1:3340")
        port = 443
    return host, port, scheme == "https"


def _parse(argv: list[str], environ: Mapping[str, str]) -> tuple[dict, object]:
    values, explicit, rest = parse(_FLAGS, argv, environ)
    _, on_command_line, _ = parse(_FLAGS, argv, {})
    if len(rest) > 1 and rest[1].startswith("-"):  # flags after the TARGET, as people type them
        more, more_explicit, tail = parse(_FLAGS, rest[1:], {})
        values.update(more)
        explicit |= more_explicit
        on_command_line |= more_explicit
        rest = [rest[0], *tail]
    options = dict(DEFAULTS)
    options.update({k: values.pop(k) for k in DEFAULTS if k in values})
    if len(rest) > 1:
        raise UsageError(f"one TARGET at most, not {' '.join(rest)!r} (flags go before it)")
    if rest and options["derp_map"]:
        raise UsageError("give a TARGET or -derp-map, not both")
    if options["timeout"] <= 0:
        raise UsageError("-timeout must be positive, e.g. -timeout 5s")
    try:
        options["trust"] = verify_context(options["ca_file"])
    except (OSError, ssl.SSLError) as e:
        raise UsageError(f"-ca-file {options['ca_file']}: cannot load it as PEM roots "
                         f"({getattr(e, 'strerror', None) or e})") from None
    server_given = sorted(f.name for f in _SERVER_FLAGS
                          if f.field in on_command_line and f.field not in _SHARED)
    if (rest or options["derp_map"]) and server_given:
        raise UsageError(f"-{server_given[0]} is a server flag, read only without a TARGET or "
                         "-derp-map (on the relay host)")
    for name in _SHARED:
        if not -1 <= values.get(name, 0) <= 65535:
            raise UsageError(f"-{name.replace('_', '-')} must be a port, or -1 to skip it")
    if options["derp_map"]:
        return options, ("map", options["derp_map"], values)
    if rest:
        host, port, tls = parse_target(rest[0])
        stun_port = values.get("stun_port", Config.stun_port)
        http_port = values.get("http_port", Config.http_port if tls else port)
        return options, ("target", Target(rest[0], host, port, tls, stun_port=stun_port,
                                          http_port=http_port,
                                          http_required="http_port" in explicit))
    config = config_from_values(values, explicit, environ)
    if not config.dev and "hostname" not in explicit:
        raise UsageError("without a TARGET, check reads the server's flags: set -hostname (or "
                         "DERP_DOMAIN) as for the server, or name the relay: derper check "
                         "derp.example.com")
    return options, ("host", config)


async def _run(options: dict, mode: tuple) -> tuple[list[Report], bool]:
    """The reports, and whether something outside them failed (the server's configuration)."""
    timeout, trust = options["timeout"], options["trust"]
    kind = mode[0]
    if kind == "target":
        target = mode[1]
        checks, _ = await check_target(target, timeout=timeout, trust=trust)
        return [Report(target.label, checks)], False
    if kind == "map":
        return await _check_map(mode[1], mode[2], timeout, trust), False
    config: Config = mode[1]
    problems = config_check.check(config)
    if problems:
        print(f"derper check: the server's configuration has {len(problems)} problem(s); "
              "derper refuses to start until they are fixed:", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
    target = _relay_host_target(config)
    ports = [("tcp", target.port), ("udp", target.stun_port), ("tcp", target.http_port)]
    hints = local.hints([(p, n) for p, n in ports if n >= 0], timeout)
    checks, _ = await check_target(target, timeout=timeout, trust=trust, hints=hints)
    return [Report(target.label, checks)], bool(problems)


def _relay_host_target(config: Config) -> Target:
    """The relay the server's configuration describes, as clients reach it."""
    try:
        listen_host, port = parse_addr(config.addr)
    except AddressError:
        listen_host, port = None, 443
    stun_port = config.stun_port if config.stun else -1
    if not config.tls:
        host = listen_host or "127.0.0.1"
        return Target(f"http://{host}:{port} (this host's derper -dev)", host, port, tls=False,
                      stun_port=stun_port, http_port=port, on_relay_host=True)
    try:
        pin, _ = served_pin(config)
    except (DerpMapError, CertError, OSError):
        pin = None  # no certificate on disk yet; the configuration check says what is wrong
    return Target(f"{config.hostname}:{port} (this host's derper)", config.hostname, port,
                  cert_name=pin or "", stun_port=stun_port, http_port=config.http_port,
                  http_required=config.http_port >= 0, on_relay_host=True)


async def _check_map(source: str, values: dict, timeout: float,
                     trust: ssl.SSLContext) -> list[Report]:
    try:
        text = await _read_map(source, timeout, trust)
        _, nodes, map_problems = load_map(text)
    except MapError as e:
        return [Report(source, [Check("derp_map", FAIL, str(e), _MAP_FIX)])]
    if not nodes:
        detail = "; ".join(p.detail for p in map_problems) or "the map has no nodes"
        return [Report(source, [Check("derp_map", FAIL, detail, "add the relay as a node of a "
                                      "region (derper derpmap prints one)")])]
    reports = []
    for node in nodes:
        node.problems = map_problems + node.problems
        target = _node_target(node, values.get("stun_port"), values.get("http_port"))
        checks, facts = await check_target(target, timeout=timeout, trust=trust)
        checks.append(node_check(node, Answers(facts.resolved, facts.stun_answered,
                                               facts.captive_ok)))
        reports.append(Report(node.label, checks))
    return reports


_MAP_FIX = ("give a Tailscale JSON DERP map or a Headscale derp.paths YAML file (`derper "
            "derpmap` prints both)")


def _node_target(node: MapNode, stun_port: int | None, http_port: int | None) -> Target:
    """A map node as a client dials it; -stun-port/-http-port -1 on the command line skip."""
    can_port80 = bool(node.node.get("canport80"))
    return Target(node.label, node.hostname or "", node.derp_port,
                  ipv4=node.node.get("ipv4", ""), ipv6=node.node.get("ipv6", ""),
                  cert_name=node.node.get("certname", ""),
                  insecure=bool(node.node.get("insecurefortests")),
                  stun_port=-1 if stun_port == -1 else node.stun_port,
                  http_port=80 if can_port80 and http_port != -1 else -1,
                  http_required=can_port80, derp=not node.node.get("stunonly"))


async def _read_map(source: str, timeout: float, trust: ssl.SSLContext) -> str:
    if source.startswith(("http://", "https://")):
        try:
            with trio.fail_after(timeout):
                resp = await http_client.request("GET", source, max_body=MAX_MAP_BYTES + 1,
                                                 ssl_context=trust)
        except trio.TooSlowError:
            raise MapError(f"cannot fetch {source}: no answer within {timeout:g}s") from None
        except http_client.HTTPClientError as e:
            raise MapError(f"cannot fetch {source}: {e}") from None
        if resp.status != 200:
            raise MapError(f"cannot fetch {source}: HTTP {resp.status}")
        data = resp.body
    else:
        try:
            data = Path(source.removeprefix("file://")).read_bytes()
        except OSError as e:
            raise MapError(f"cannot read {source}: {e.strerror}") from None
    if len(data) > MAX_MAP_BYTES:
        raise MapError(f"{source} is larger than {MAX_MAP_BYTES >> 20} MiB: not a DERP map")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise MapError(f"{source} is not UTF-8 text") from None
