"""Let's Encrypt's test CA (Debian ``pebble`` + ``pebble-challtestsrv``) on loopback.

Recipe and pitfalls: ../shared/reference/testing-real-peers.md. The challenge test server is only
the DNS for the test domain (every name resolves to 127.0.0.1); HTTP-01 validation connects to
``http_port``, where the derper under test runs its HTTP helper.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

import trustme
from cryptography import x509

from tests.process import free_port
from tests.system import require_binary

DOMAIN = "derper.test"


class Pebble:
    def __init__(self, workdir: Path, ca: trustme.CA) -> None:
        pebble = require_binary("pebble", "pebble")
        challtestsrv = require_binary("pebble-challtestsrv", "pebble")
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.ca_file = workdir / "pebble-https-ca.pem"  # trusts Pebble's own HTTPS API
        ca.cert_pem.write_to_path(str(self.ca_file))
        cert = ca.issue_cert("localhost", "127.0.0.1")
        cert.cert_chain_pems[0].write_to_path(str(workdir / "cert.pem"))
        cert.private_key_pem.write_to_path(str(workdir / "key.pem"))
        self.http_port = free_port()
        api, mgmt, dns = free_port(), free_port(), free_port(socket.SOCK_DGRAM)
        config = {"pebble": {
            "listenAddress": f"127.0.0.1:{api}", "managementListenAddress": f"127.0.0.1:{mgmt}",
            "certificate": str(workdir / "cert.pem"), "privateKey": str(workdir / "key.pem"),
            "httpPort": self.http_port, "tlsPort": free_port(), "ocspResponderURL": "",
            "externalAccountBindingRequired": False}}
        (workdir / "pebble.json").write_text(json.dumps(config))
        self.directory = f"https://127.0.0.1:{api}/dir"
        self._mgmt = f"https://127.0.0.1:{mgmt}"
        self._procs = [
            subprocess.Popen([challtestsrv, "-dns01", f"127.0.0.1:{dns}", "-http01", "",
                              "-https01", "", "-tlsalpn01", "", "-management",
                              f"127.0.0.1:{free_port()}", "-defaultIPv4", "127.0.0.1",
                              "-defaultIPv6", ""],
                             stdout=open(workdir / "challtestsrv.log", "wb"),
                             stderr=subprocess.STDOUT),
            subprocess.Popen([pebble, "-config", str(workdir / "pebble.json"), "-dnsserver",
                              f"127.0.0.1:{dns}"],
                             env=dict(os.environ, PEBBLE_VA_NOSLEEP="1",
                                      PEBBLE_WFE_NONCEREJECT="0"),
                             stdout=open(workdir / "pebble.log", "wb"), stderr=subprocess.STDOUT),
        ]
        self._api_context = ssl.create_default_context(cafile=str(self.ca_file))
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(self.directory, context=self._api_context, timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or any(p.poll() is not None for p in self._procs):
                    self.close()
                    raise RuntimeError("pebble did not come up: " + self.log())
                time.sleep(0.1)

    def root_pem(self) -> bytes:
        """Pebble's issuing root (a new one at every Pebble start)."""
        with urllib.request.urlopen(f"{self._mgmt}/roots/0", context=self._api_context,
                                    timeout=5) as r:
            return r.read()

    def client_context(self) -> ssl.SSLContext:
        """A TLS client context that trusts only Pebble's root."""
        return ssl.create_default_context(cadata=self.root_pem().decode())

    def log(self) -> str:
        return (self.workdir / "pebble.log").read_text(errors="replace")[-3000:]

    def close(self) -> None:
        for p in self._procs:
            p.terminate()
        for p in self._procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()


def served_leaf(port: int, server_hostname: str | None,
                context: ssl.SSLContext) -> x509.Certificate:
    """The leaf certificate a TLS client verifying with ``context`` gets on ``port``."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        with context.wrap_socket(sock, server_hostname=server_hostname) as tls:
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
