"""Fixtures: a real derper server on loopback (plain HTTP or TLS), and a CA clients trust."""

from __future__ import annotations

import ssl
from dataclasses import replace
from pathlib import Path

import pytest
import trustme

from derper.config import Config
from derper.proto.keys import KeyPair
from derper.server import Server


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


def write_cert(ca: trustme.CA, certdir: Path, hostname: str, *names: str) -> None:
    """``<certdir>/<hostname>.crt|.key`` as -certmode manual expects them."""
    cert = ca.issue_cert(hostname, *names)
    certdir.mkdir(parents=True, exist_ok=True)
    (certdir / f"{hostname}.crt").write_bytes(b"".join(p.bytes() for p in cert.cert_chain_pems))
    (certdir / f"{hostname}.key").write_bytes(cert.private_key_pem.bytes())


def client_context(ca: trustme.CA, *, max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


BASE = Config(addr="127.0.0.1:0", dev=True, stun=False, http_port=-1, metrics_addr="")


@pytest.fixture
def start_server(nursery, tmp_path, ca):
    """``await start_server(tls=..., **config_fields)`` → a running Server on an ephemeral port."""

    async def start(*, tls: bool = False, keypair: KeyPair | None = None,
                    mesh_key: bytes | None = None, **fields) -> Server:
        config = replace(BASE, **fields)
        if tls:
            certdir = tmp_path / "certs"
            write_cert(ca, certdir, "localhost", "127.0.0.1")
            config = replace(config, dev=False, certmode="manual", hostname="localhost",
                             certdir=str(certdir))
        server = Server(config, keypair or KeyPair.generate(), mesh_key=mesh_key)
        await nursery.start(server.run)
        return server

    return start


def url(server: Server) -> str:
    scheme = "https" if server.tls else "http"
    host = "localhost" if server.tls else "127.0.0.1"
    return f"{scheme}://{host}:{server.main_port}/derp"
