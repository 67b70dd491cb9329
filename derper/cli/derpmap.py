"""``derper derpmap``: print the DERP map for the server the same flags and ``DERP_*`` run.

Reads the certificate the server serves (to pin a self-signed one) and nothing else; run it with
the server's command line or environment file and paste the output into Headscale or Tailscale.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Mapping

from ..certs.bundle import CertError, load_manual, manual_paths, parse_ip
from ..config import Config
from ..derpmap import DerpMapError, MapOptions, build, render
from .flags import SERVE_FLAGS, config_from_values, flag_defaults
from .goflags import Flag, HelpRequested, UsageError, parse, usage

MAP_FLAGS = [
    Flag("format", "format", "string",
         'output: "headscale" (a derp.paths YAML file), "tailscale" (the tailnet policy file\'s '
         '"derpMap") or "json" (a bare DERP map, e.g. for derpprobe -derp-map)',
         ("DERP_MAP_FORMAT",)),
    Flag("region-id", "region_id", "int", "region ID, 900-999 (reserved for self-hosted relays)",
         ("DERP_REGION_ID",)),
    Flag("region-code", "region_code", "string",
         "short region code, shown by `tailscale netcheck` and `tailscale debug derp CODE`",
         ("DERP_REGION_CODE",)),
    Flag("region-name", "region_name", "string",
         'long region name (default "derper <hostname>")', ("DERP_REGION_NAME",)),
    Flag("ipv4", "ipv4", "string",
         'public IPv4 address clients dial; "none" turns IPv4 off (default: -hostname if it is '
         "an IPv4 address, else its DNS A record)", ("DERP_IPV4",)),
    Flag("ipv6", "ipv6", "string",
         'public IPv6 address clients dial; "none" turns IPv6 off (default: -hostname if it is '
         'an IPv6 address, "none" for an IPv4 -hostname, else its DNS AAAA record)',
         ("DERP_IPV6",)),
    Flag("nodes", "nodes", "string",
         "the region's other relays, comma separated: host or host@sha256-raw:<pin> (an IP "
         "node's CertName); each gets this relay's ports, nodes named 900b, 900c, ...",
         ("DERP_MAP_NODES",)),
    Flag("omit-default-regions", "omit_default_regions", "bool",
         "tailscale/json formats: use only this map's regions, dropping Tailscale's relays "
         "(Headscale: set derp.urls: [] instead)", ("DERP_OMIT_DEFAULT_REGIONS",)),
]
_FLAGS = MAP_FLAGS + [f for f in SERVE_FLAGS if f.name != "version"]
_OWN_FIELDS = [f.field for f in MAP_FLAGS]
DEFAULT_FORMAT = "headscale"

USAGE_HEAD = """\
Usage: derper derpmap [flags]

Prints this relay's DERP map. Give it the server's own flags or DERP_* variables (for example
`set -a; . /etc/derper/derper.env; set +a`), so the map says exactly what the server serves.

Examples:
  derper derpmap -hostname 203.0.113.7 -certmode manual -certdir /var/lib/derper/certs
      Headscale derp.paths YAML pinning the self-signed certificate derper made for that IP
  derper derpmap -format tailscale -hostname derp.example.com -omit-default-regions
      the "derpMap" for the Tailscale admin console's policy file, only this relay

Flags of derpmap, then the server's flags it reads (each may also come from the variable shown):
"""


def run(argv: list[str], environ: Mapping[str, str]) -> int:
    try:
        text, warning = _derpmap(argv, environ)
    except HelpRequested:
        defaults = dict(flag_defaults(), format=DEFAULT_FORMAT,
                        **dataclasses.asdict(MapOptions()))
        print(USAGE_HEAD + usage(MAP_FLAGS, defaults) + "\n\n" + usage(_FLAGS[len(MAP_FLAGS):],
                                                                        defaults))
        return 0
    except UsageError as e:
        print(f"derper derpmap: {e}\nRun 'derper derpmap -h' for the list of flags.",
              file=sys.stderr)
        return 2
    except (DerpMapError, CertError) as e:
        print(f"derper derpmap: {e}", file=sys.stderr)
        return 1
    if warning:
        print(f"derper derpmap: {warning}", file=sys.stderr)
    sys.stdout.write(text)
    return 0


def _derpmap(argv: list[str], environ: Mapping[str, str]) -> tuple[str, str]:
    values, explicit, rest = parse(_FLAGS, argv, environ)
    if rest:
        raise UsageError(f"unexpected argument {rest[0]!r}")
    fmt = values.pop("format", DEFAULT_FORMAT)
    options = MapOptions(**{k: values.pop(k) for k in _OWN_FIELDS if k in values})
    config = config_from_values(values, explicit, environ)
    if "hostname" not in explicit:
        raise DerpMapError("set -hostname (or DERP_DOMAIN) to the name or IP address clients "
                           "reach this relay by, as for the server")
    pin, warning = served_pin(config)
    return render(build(config, pin, options), fmt), warning


def served_pin(config: Config) -> tuple[str | None, str]:
    """The CertName pin when the served certificate is self-signed (only -certmode manual)."""
    if config.certmode != "manual":
        return None, ""
    crt, _ = manual_paths(config.certdir_path, config.hostname)
    if not crt.exists():
        if parse_ip(config.hostname) is not None:
            raise DerpMapError(f"no certificate at {crt} yet: start derper once with these "
                               "flags (it creates the self-signed certificate to pin), then "
                               "run derpmap again")
        return None, f"no certificate at {crt} yet; the map assumes a CA-issued one (no pin)"
    bundle = load_manual(config.certdir_path, config.hostname)
    return (bundle.pin if bundle.self_signed else None), ""
