"""Container HEALTHCHECK: GET /derp/probe on derper's own port must answer 200.

Stdlib only (no curl in the image). Reads the same DERP_* variables as the server; the
certificate is not verified (a self-signed IP certificate is normal), but SNI names -hostname,
as derper requires for a domain certificate.
"""

import ipaddress
import os
import socket
import ssl
import sys


def main() -> int:
    addr = os.environ.get("DERP_ADDR") or ":443"
    host, _, port = addr.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1" if host != "::" else "::1"
    hostname = (os.environ.get("DERP_DOMAIN") or os.environ.get("DERP_HOSTNAME") or "").strip("[]")
    try:
        ipaddress.ip_address(hostname)
        sni = None  # clients send no SNI to an IP
    except ValueError:
        sni = hostname or None
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        context = ssl._create_unverified_context()
        with context.wrap_socket(raw, server_hostname=sni) as tls:
            tls.sendall(b"GET /derp/probe HTTP/1.1\r\nHost: derper\r\nConnection: close\r\n\r\n")
            status = tls.recv(64).split(b" ", 2)
    return 0 if status[1:2] == [b"200"] else 1


if __name__ == "__main__":
    sys.exit(main())
