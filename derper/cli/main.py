"""``derper``: serve (no command), or run one of COMMANDS; each is imported only when used.

Nothing here loads the server: ``derper derpmap`` and ``derper bench`` start without it.
"""

from __future__ import annotations

import importlib
import os
import sys

from .. import __version__
from ..config import DEV_ADDR
from .allocator import exec_with_malloc

SERVE = "derper.cli.serve"  # run(argv, environ, usage_head) -> exit code

# Subcommands: name → (module with ``run(argv, environ) -> exit code``, summary). Imported on
# use, so serving never loads them and they never load the server.
COMMANDS = {
    "derpmap": ("derper.cli.derpmap", "print this relay's DERP map for Headscale or Tailscale"),
    "bench": ("derper.cli.bench", "load a DERP relay: throughput, latency, connections/s"),
    "nat": ("derper.cli.nat", "why are my devices relayed? measure this network's NAT"),
    "check": ("derper.cli.check", "is my relay working? every check, with the fix for each"),
    "status": ("derper.cli.status", "is my relay healthy? its status page, in the terminal"),
}

_COMMAND_LINES = "\n".join(f"       derper {name} [flags]".ljust(35) + summary
                           for name, (_, summary) in COMMANDS.items())

USAGE_HEAD = f"""\
derper {__version__}: a self-hosted Tailscale DERP relay and STUN server.

Usage: derper [flags]              run the relay
{_COMMAND_LINES}

Examples:
  derper -dev
      plain HTTP on {DEV_ADDR}, throwaway key: try it out, or run behind your own TLS
  derper -hostname 203.0.113.7 -certmode manual -certdir /var/lib/derper/certs
      TLS on :443 with a self-signed certificate for that IP; prints the DERP map node to pin it
  derper -hostname derp.example.com -acme-email you@example.com
      TLS on :443 with a Let's Encrypt certificate, obtained and renewed in-process
      (HTTP-01 on the :80 helper; cached in -certdir)
  derper -a :8443 -hostname 203.0.113.7 -acme-ip-certs
      TLS on 8443 with a Let's Encrypt IP-address certificate: no domain, no pin
  derper -a :8443 -hostname derp.example.com -certmode manual -certdir /etc/derper/certs
      TLS on 8443 with derp.example.com.crt/.key from certdir (reloaded on SIGHUP and when
      the files change)
  derper -hostname derp.example.com -home blank -verify-clients -bandwidth-limit 4mbit
      a public relay only your tailnet's nodes may use, fair to interactive traffic
  derper -certmode none -a 127.0.0.1:8080 -trusted-proxies 127.0.0.1/32
      behind nginx/Caddy/HAProxy terminating TLS (configs in deploy/); STUN stays direct
  derper -hostname derp1.example.com -mesh-psk-file mesh.key -mesh-with derp2.example.com
      one node of a region of relays: clients on either node reach each other
  derper -hostname derp.example.com -workers auto
      one worker process per CPU on the same ports (connection storms and STUN use every
      core); the process started is their supervisor: send it SIGHUP and SIGTERM

Flags (Go syntax: -x v, -x=v, --x, -flag=false; each may also come from the variable shown):
"""


def main(argv: list[str] | None = None) -> None:
    """``derper [flags]`` serves; ``derper COMMAND [flags]`` runs one of COMMANDS. Serving
    from the command line first re-runs the process on glibc's malloc (``allocator``)."""
    command_line = argv is None
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        command = importlib.import_module(COMMANDS[argv[0]][0])
        sys.exit(command.run(argv[1:], os.environ))
    if command_line:
        exec_with_malloc(os.environ)
    sys.exit(importlib.import_module(SERVE).run(argv, os.environ, USAGE_HEAD))
