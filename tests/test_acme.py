"""Built-in ACME (-certmode letsencrypt) against a real ACME server: Debian's Pebble."""

from __future__ import annotations

import datetime
import logging
import os
import re
import signal
import ssl
import stat
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import trio
from cryptography import x509

from derper import client as dc
from derper.certs.bundle import manual_paths
from derper.config import Config
from derper.errors import ConfigError
from derper.proto.keys import KeyPair
from derper.server import Server
from tests.conftest import BASE, client_context, write_cert
from tests.pebble import DOMAIN, Pebble, served_leaf
from tests.process import derper, free_port
from tests.relay_helpers import assert_relays, wait_until

ISSUE_TIMEOUT = 60
DEPLOY = Path(__file__).parent.parent / "deploy"


@pytest.fixture(scope="module")
def pebble(tmp_path_factory, ca):
    server = Pebble(tmp_path_factory.mktemp("pebble"), ca)
    yield server
    server.close()


def acme_fields(pebble: Pebble, certdir, **fields) -> dict:
    return {"dev": False, "certmode": "letsencrypt", "hostname": DOMAIN,
            "certdir": str(certdir), "http_port": pebble.http_port,
            "acme_directory": pebble.directory, "acme_ca_bundle": str(pebble.ca_file), **fields}


async def leaf_of(server: Server, context: ssl.SSLContext,
                  hostname: str | None = DOMAIN) -> x509.Certificate:
    return await trio.to_thread.run_sync(served_leaf, server.main_port, hostname, context)


def relay_client(server: Server, context: ssl.SSLContext, host: str = DOMAIN):
    return dc.connect(f"https://{host}:{server.main_port}/derp", KeyPair.generate(),
                      ssl_context=context, dial=("127.0.0.1", server.main_port))


async def test_issues_renews_live_and_caches(start_server, pebble, tmp_path):
    certdir = tmp_path / "certs"
    server = await start_server(**acme_fields(pebble, certdir))
    assert server.main_port != 443
    await wait_until(lambda: server.tls.bundle is not None, ISSUE_TIMEOUT)
    trust_pebble = pebble.client_context()  # trusts Pebble's root and nothing else
    first = await leaf_of(server, trust_pebble)
    san = first.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [DOMAIN]

    # The cache: a 0700 directory, private keys 0600, the served pair on disk.
    crt, key = manual_paths(certdir, DOMAIN)
    assert stat.S_IMODE(certdir.stat().st_mode) == 0o700
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE((certdir / "acme-account.key").stat().st_mode) == 0o600
    assert x509.load_pem_x509_certificate(crt.read_bytes()) == first

    async with relay_client(server, trust_pebble) as a, relay_client(server, trust_pebble) as b:
        await assert_relays(a, b)
        server.acme.renew_now()  # the test knob: renew long before the certificate is due
        await wait_until(lambda: server.tls.bundle.leaf.serial_number != first.serial_number,
                         ISSUE_TIMEOUT)
        # The connections made before the swap keep relaying, both ways.
        await assert_relays(a, b, b"after the swap")
        await assert_relays(b, a, b"still here")
    second = await leaf_of(server, trust_pebble)
    assert second.serial_number == server.tls.bundle.leaf.serial_number != first.serial_number
    assert x509.load_pem_x509_certificate(crt.read_bytes()) == second

    # A restart serves the cached certificate at once and orders nothing.
    restarted = Server(Config(**{**vars(BASE), **acme_fields(pebble, certdir)}),
                       KeyPair.generate())
    restarted.prepare()
    assert restarted.tls.bundle.leaf == second
    assert restarted.acme._next_attempt_in() > 0


async def test_ip_address_certificate(start_server, pebble, tmp_path):
    server = await start_server(**acme_fields(pebble, tmp_path / "certs", hostname="127.0.0.1",
                                              acme_ip_certs=True))
    await wait_until(lambda: server.tls.bundle is not None, ISSUE_TIMEOUT)
    context = pebble.client_context()
    leaf = await leaf_of(server, context, hostname="127.0.0.1")
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    async with relay_client(server, context, "127.0.0.1") as a, \
            relay_client(server, context, "127.0.0.1") as b:
        await assert_relays(a, b)


def failures(caplog, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == "could not obtain a certificate"
            and text in r.fields["error"]]


async def test_unreachable_ca_retries_with_backoff_and_keeps_helper_up(start_server, pebble,
                                                                       tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="derper")
    closed = free_port()
    server = await start_server(**acme_fields(
        pebble, tmp_path / "certs", acme_directory=f"https://127.0.0.1:{closed}/dir",
        http_port=0, acme_retry_min=0.05, acme_retry_max=0.2))
    await wait_until(lambda: server.acme.failures >= 3)
    lines = failures(caplog, "cannot reach the ACME server")
    assert len(lines) >= 3
    assert [r.fields["retry_in"] for r in lines[:3]] == ["0s", "0s", "0s"]  # 0.05, 0.1, 0.2
    assert "TLS connections are refused" in lines[0].fields["serving"]
    # No certificate: TLS is refused, but the process and its HTTP helper are alive.
    with pytest.raises((ssl.SSLError, OSError)):
        await leaf_of(server, pebble.client_context())
    stream = await trio.open_tcp_stream("127.0.0.1", server.http_port)
    await stream.send_all(b"GET /generate_204 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 204 ")
    await stream.aclose()


async def test_failed_renewal_keeps_serving_the_current_certificate(start_server, pebble, ca,
                                                                    tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="derper")
    certdir = tmp_path / "certs"
    write_cert(ca, certdir, DOMAIN)  # a valid cached certificate from some CA
    server = await start_server(**acme_fields(
        pebble, certdir, http_port=0, acme_retry_min=0.05, acme_retry_max=0.1))
    cached = server.tls.bundle.leaf
    assert server.acme._next_attempt_in() > 0  # not due: nothing is ordered
    server.acme.renew_now()  # the CA cannot reach our helper (http_port is not Pebble's)
    await wait_until(lambda: server.acme.failures >= 2, ISSUE_TIMEOUT)
    line = failures(caplog, "could not validate the HTTP-01 challenge")[0]
    assert DOMAIN in line.fields["error"] and "current certificate" in line.fields["serving"]
    assert server.tls.bundle.leaf == cached
    assert await leaf_of(server, client_context(ca)) == cached


@pytest.mark.parametrize("problem", ["expired", "mismatched key"])
async def test_unusable_cached_certificate_is_replaced(start_server, pebble, ca, tmp_path,
                                                       caplog, problem):
    caplog.set_level(logging.INFO, logger="derper")
    certdir = tmp_path / "certs"
    crt, key = manual_paths(certdir, DOMAIN)
    if problem == "expired":
        cert = ca.issue_cert(DOMAIN, not_before=datetime.datetime(2020, 1, 1),
                             not_after=datetime.datetime(2021, 1, 1))
        certdir.mkdir()
        crt.write_bytes(cert.cert_chain_pems[0].bytes())
        key.write_bytes(cert.private_key_pem.bytes())
    else:
        write_cert(ca, certdir, DOMAIN)
        key.write_bytes(ca.issue_cert(DOMAIN).private_key_pem.bytes())
    server = await start_server(**acme_fields(pebble, certdir))
    warning = [r for r in caplog.records
               if r.getMessage() == "cached certificate unusable; ordering a new one"]
    assert warning and ("expired" if problem == "expired" else "does not belong") \
        in warning[0].fields["error"]
    await wait_until(lambda: server.tls.bundle is not None, ISSUE_TIMEOUT)
    await leaf_of(server, pebble.client_context())  # verifies against Pebble's root


def test_unwritable_certdir_is_a_clear_startup_error(pebble, tmp_path):
    (tmp_path / "file").write_text("")
    config = Config(**{**vars(BASE), **acme_fields(pebble, tmp_path / "file" / "certs")})
    with pytest.raises(ConfigError, match="cannot write to -certdir .*file/certs"):
        Server(config, KeyPair.generate())


async def test_certbot_webroot_through_the_http_helper_and_deploy_hook(pebble, tmp_path):
    """certbot (PyPI) in --webroot mode while derper holds the HTTP port; the deploy hook
    installs the certificate and SIGHUPs derper, which then serves it."""
    certbot = Path(sys.executable).with_name("certbot")
    certdir, webroot = tmp_path / "certs", tmp_path / "webroot"
    webroot.mkdir()
    port = free_port()
    args = ["-a", f"127.0.0.1:{port}", "-hostname", DOMAIN, "-certmode", "manual",
            "-certdir", str(certdir), "-acme-webroot", str(webroot),
            "-http-port", str(pebble.http_port), "-stun=false", "-cert-watch-interval", "0",
            "-c", str(tmp_path / "derper.key")]
    async with derper(args, tmp_path, ready="no certificate yet") as proc:
        env = dict(os.environ, REQUESTS_CA_BUNDLE=str(pebble.ca_file),
                   DERPER_CERTDIR=str(certdir), DERPER_RELOAD=f"kill -HUP {proc.proc.pid}")
        common = ["--non-interactive", "--server", pebble.directory,
                  "--config-dir", str(tmp_path / "le"), "--work-dir", str(tmp_path / "le"),
                  "--logs-dir", str(tmp_path / "le")]
        hook = str(DEPLOY / "certbot-deploy-hook.sh")
        result = await trio.to_thread.run_sync(partial(
            subprocess.run, [str(certbot), "certonly", *common, "--agree-tos",
                             "--register-unsafely-without-email", "--webroot", "-w",
                             str(webroot), "-d", DOMAIN, "--deploy-hook", hook],
            env=env, capture_output=True, text=True, timeout=120))
        assert result.returncode == 0, result.stderr[-3000:]
        await proc.wait_for_log("certificate reloaded")
        context = pebble.client_context()
        first = await trio.to_thread.run_sync(served_leaf, port, DOMAIN, context)
        assert stat.S_IMODE(manual_paths(certdir, DOMAIN)[1].stat().st_mode) == 0o600

        result = await trio.to_thread.run_sync(partial(
            subprocess.run, [str(certbot), "renew", *common, "--force-renewal",
                             "--no-random-sleep-on-renew"],
            env=env, capture_output=True, text=True, timeout=120))
        assert result.returncode == 0, result.stderr[-3000:]
        await wait_until(lambda: proc.log.count("certificate reloaded") >= 2)
        second = await trio.to_thread.run_sync(served_leaf, port, DOMAIN, context)
        assert second.serial_number != first.serial_number


async def test_sigterm_while_the_ca_hangs_exits_promptly(tmp_path):
    """An order stuck on a CA that accepts and never answers must not hold up a shutdown."""
    silent = trio.socket.socket()
    await silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the kernel completes the handshakes; nobody ever reads or answers
    args = ["-a", f"127.0.0.1:{free_port()}", "-hostname", DOMAIN, "-http-port", "0",
            "-acme-directory", f"https://127.0.0.1:{silent.getsockname()[1]}/dir",
            "-certdir", str(tmp_path / "certs"), "-stun=false",
            "-c", str(tmp_path / "derper.key")]
    async with derper(args, tmp_path, ready="ordering a certificate") as proc:
        await trio.sleep(0.2)
        proc.signal(signal.SIGTERM)
        assert await proc.wait(timeout=5) == 0
    silent.close()


async def test_two_workers_order_once_and_both_serve_the_certificate(pebble, tmp_path):
    """-workers 2: worker 0 orders (the CA's HTTP-01 request reaches either worker's helper),
    the other serves what it wrote; one order for the host."""
    port = free_port()
    args = ["-a", f"127.0.0.1:{port}", "-hostname", DOMAIN, "-certmode", "letsencrypt",
            "-certdir", str(tmp_path / "certs"), "-http-port", str(pebble.http_port),
            "-acme-directory", pebble.directory, "-acme-ca-bundle", str(pebble.ca_file),
            "-stun-port", "-1", "-metrics-addr", "off", "-workers", "2",
            "-c", str(tmp_path / "derper.key")]
    async with derper(args, tmp_path, ready='msg="derper listening" workers=2') as proc:
        await proc.wait_for_log("certificate installed", timeout=ISSUE_TIMEOUT)
        with trio.fail_after(20):
            while not re.search(r"certificate (re)?loaded.* worker=1", proc.log):
                await trio.sleep(0.1)
        context = pebble.client_context()
        serials = set()
        for _ in range(16):  # new connections spread over both workers by the kernel
            leaf = await trio.to_thread.run_sync(served_leaf, port, DOMAIN, context)
            serials.add(leaf.serial_number)
        assert len(serials) == 1
        assert proc.log.count("ordering a certificate") == 1
        assert proc.log.count("certificate installed") == 1
