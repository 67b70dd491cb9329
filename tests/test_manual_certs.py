"""-certmode manual follows its files: changed pairs are reloaded live, broken ones ignored."""

from __future__ import annotations

import logging

import trio

from derper import client as dc
from derper.certs.bundle import manual_paths
from tests.conftest import client_context, url, write_cert
from tests.pebble import served_leaf
from tests.relay_helpers import assert_relays, connect_opts, wait_until


def reload_failures(caplog) -> int:
    return sum(r.getMessage().startswith("certificate reload failed") for r in caplog.records)


async def test_changed_files_are_reloaded_without_dropping_connections(start_server, ca,
                                                                      tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="derper")
    server = await start_server(tls=True, cert_watch_interval=0.05)
    crt, key = manual_paths(tmp_path / "certs", "localhost")
    first = server.tls.bundle.leaf
    async with dc.connect(url(server), **connect_opts(server, ca)) as a, \
            dc.connect(url(server), **connect_opts(server, ca)) as b:
        write_cert(ca, tmp_path / "certs", "localhost", "127.0.0.1")  # what certbot does
        await wait_until(lambda: server.tls.bundle.leaf != first)
        renewed = server.tls.bundle.leaf
        await assert_relays(a, b)
        await assert_relays(b, a)
        served = await trio.to_thread.run_sync(served_leaf, server.main_port, "localhost",
                                               client_context(ca))
        assert served == renewed

        crt.write_text("-----BEGIN CERTIFICATE-----\ntruncated")  # a broken rewrite
        await wait_until(lambda: reload_failures(caplog) == 1)
        await trio.sleep(0.3)  # unchanged files are not retried: one error line, not a flood
        assert reload_failures(caplog) == 1
        assert server.tls.bundle.leaf == renewed
        await assert_relays(a, b)

        write_cert(ca, tmp_path / "certs", "localhost", "127.0.0.1")
        await wait_until(lambda: server.tls.bundle.leaf not in (first, renewed))
        await assert_relays(a, b)


async def test_starts_without_files_when_certbot_will_write_them(start_server, ca, tmp_path):
    webroot = tmp_path / "webroot"
    webroot.mkdir()
    certdir = tmp_path / "certs"
    waiting = await start_server(dev=False, certmode="manual", hostname="localhost",
                                 certdir=str(certdir), acme_webroot=str(webroot), http_port=0,
                                 cert_watch_interval=0.05)
    assert waiting.tls.context is None
    write_cert(ca, certdir, "localhost", "127.0.0.1")
    await wait_until(lambda: waiting.tls.context is not None)
    async with dc.connect(url(waiting), **connect_opts(waiting, ca)) as a, \
            dc.connect(url(waiting), **connect_opts(waiting, ca)) as b:
        await assert_relays(a, b)
