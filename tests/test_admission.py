"""Admission (spec §4.9): verify URL, tailscaled LocalAPI whois, -allow-keys, mesh-key bypass.

Every case runs a real derper on loopback, a real back end (HTTP on TCP, LocalAPI on a unix
socket) and the real DERP client; a rejected client sees the connection close after ClientInfo.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import ssl
from dataclasses import replace

import pytest
import trio

from derper import client as dc
from derper.admission import gate as admission
from derper.admission.gate import parse_allow_keys
from derper.disk.filewatch import signature
from derper.errors import ConfigError
from derper.http import client as http_client
from derper.proto.keys import KeyPair, public_text
from derper.server import Server
from tests.admission_servers import (FakeBackend, headscale_answer, localapi_answer, serve_tcp,
                                     serve_unix)
from tests.conftest import BASE, client_context, url
from tests.relay_helpers import assert_relays, connect_opts, wait_until

MESH_KEY = os.urandom(32)


@pytest.fixture(autouse=True)
def short_timeouts(monkeypatch):
    """The Go 5 s timeouts, shortened so "slow" and "never answers" cost half a second."""
    monkeypatch.setattr(admission, "URL_TIMEOUT", 0.5)
    monkeypatch.setattr(admission, "LOCALAPI_TIMEOUT", 0.5)


async def admitted(server, ca, keypair: KeyPair, **kw) -> bool:
    try:
        async with dc.connect(url(server), keypair, **connect_opts(server, ca, **kw)) as c:
            await assert_relays(c, c)
            return True
    except dc.DerpClientError:
        return False


# ---- verify URL ------------------------------------------------------------------------------

def fixed(status: int, body: bytes):
    return lambda seen: (status, body)


@pytest.mark.parametrize("answer,delay,fail_open,expect", [
    (fixed(200, b'{"Allow":true}\n'), 0, False, True),
    (fixed(200, b'{"allow": true}'), 0, False, True),  # Go matches keys case-insensitively
    (fixed(200, b'{"Allow":false}\n'), 0, True, False),
    (fixed(200, b'{}'), 0, True, False),
    (fixed(200, b'{"Allow":tru'), 0, True, False),  # malformed JSON
    (fixed(500, b'{"Allow":true}'), 0, True, False),
    (fixed(200, b'{"Allow":true}'), 2.0, True, True),  # slower than the timeout: fail-open
    (fixed(200, b'{"Allow":true}'), 2.0, False, False),
    (lambda seen: None, 0, True, True),  # accepts, never answers
    (lambda seen: None, 0, False, False),
], ids=["allow", "allow-lowercase", "deny", "no-allow-field", "malformed", "500",
        "slow-open", "slow-closed", "silent-open", "silent-closed"])
async def test_verify_url_answers(start_server, ca, nursery, answer, delay, fail_open, expect):
    backend = await serve_tcp(FakeBackend(answer, delay=delay), nursery)
    server = await start_server(
        verify_client_url=f"http://127.0.0.1:{backend.port}/verify",
        verify_client_url_fail_open=fail_open)
    me = KeyPair.generate()
    assert await admitted(server, ca, me) is expect
    seen = backend.requests[0]
    assert (seen.method, seen.target) == ("POST", "/verify")
    assert json.loads(seen.body) == {"NodePublic": public_text(me.public), "Source": "127.0.0.1"}
    stats = server.relay.stats
    assert (stats.admission_allowed, stats.admission_rejected) == (expect, not expect)


async def test_unreachable_url_follows_fail_open(start_server, ca):
    from tests.process import free_port
    dead = f"http://127.0.0.1:{free_port()}/verify"
    open_server = await start_server(verify_client_url=dead)
    assert await admitted(open_server, ca, KeyPair.generate())
    assert open_server.relay.stats.admission_fail_open == 1
    closed = await start_server(verify_client_url=dead, verify_client_url_fail_open=False)
    assert not await admitted(closed, ca, KeyPair.generate())


async def test_headscale_verify_with_tls_and_cache(start_server, ca, nursery, caplog):
    me, stranger = KeyPair.generate(), KeyPair.generate()
    backend = await serve_tcp(FakeBackend(headscale_answer({public_text(me.public)})), nursery)
    server = await start_server(tls=True, verify_client_url=f"http://127.0.0.1:{backend.port}/v",
                                verify_client_url_fail_open=False)
    caplog.set_level(logging.INFO, logger="derper.admission.gate")
    for _ in range(3):
        assert await admitted(server, ca, me)
        assert not await admitted(server, ca, stranger)
    stats = server.relay.stats
    assert len(backend.requests) == 2  # one lookup per key, then the cache answers
    assert stats.admission_cache_hits == 4
    assert (stats.admission_allowed, stats.admission_rejected) == (3, 3)
    rejected = [r for r in caplog.records if "client rejected" in r.getMessage()]
    assert len(rejected) == 3  # within the burst every rejection is logged


async def test_rejections_of_fresh_random_keys_cannot_flood_the_log(start_server, ca, tmp_path,
                                                                     caplog):
    """Throttled per kind, not per key: 40 new keys buy 5 lines and a count, not 40 lines."""
    path = tmp_path / "allowed"
    path.write_text(key_file())
    server = await start_server(tls=True, allow_keys=str(path))
    caplog.set_level(logging.INFO, logger="derper.admission.gate")
    for _ in range(40):
        assert not await admitted(server, ca, KeyPair.generate())
    assert server.relay.stats.admission_rejected == 40
    rejected = [r for r in caplog.records if "client rejected" in r.getMessage()]
    assert len(rejected) == 5
    assert server.relay.log_throttle.total >= 35


async def test_mesh_key_bypasses_admission(start_server, ca, nursery):
    backend = await serve_tcp(FakeBackend(fixed(200, b'{"Allow":false}')), nursery)
    server = await start_server(mesh_key=MESH_KEY,
                                verify_client_url=f"http://127.0.0.1:{backend.port}/verify")
    assert await admitted(server, ca, KeyPair.generate(), mesh_key=MESH_KEY)
    assert not await admitted(server, ca, KeyPair.generate(), mesh_key=os.urandom(32))
    assert server.relay.stats.admission_mesh_bypass == 1
    assert len(backend.requests) == 1  # only the wrong-key client was looked up


# ---- tailscaled LocalAPI ---------------------------------------------------------------------

async def test_verify_clients_asks_localapi_whois(start_server, ca, nursery, tmp_path):
    me, stranger = KeyPair.generate(), KeyPair.generate()
    sock = str(tmp_path / "tailscaled.sock")
    backend = await serve_unix(FakeBackend(localapi_answer({public_text(me.public)})), sock,
                               nursery)
    server = await start_server(verify_clients=True, socket=sock)
    assert await admitted(server, ca, me)
    assert not await admitted(server, ca, stranger)
    seen = backend.requests[0]
    assert seen.target == f"/localapi/v0/whois?addr=nodekey%3A{me.public.hex()}"
    assert seen.headers["host"] == "local-tailscaled.sock"
    assert seen.headers["tailscale-cap"].isdigit()


async def test_localapi_errors_reject(start_server, ca, nursery, tmp_path):
    missing = await start_server(verify_clients=True, socket=str(tmp_path / "nothing.sock"))
    assert not await admitted(missing, ca, KeyPair.generate())
    sock = str(tmp_path / "broken.sock")
    await serve_unix(FakeBackend(fixed(500, b"oops")), sock, nursery)
    broken = await start_server(verify_clients=True, socket=sock)
    assert not await admitted(broken, ca, KeyPair.generate())
    hanging = str(tmp_path / "hanging.sock")
    await serve_unix(FakeBackend(lambda seen: None), hanging, nursery)
    silent = await start_server(verify_clients=True, socket=hanging,
                                verify_client_url_fail_open=True)  # applies to the URL only
    assert not await admitted(silent, ca, KeyPair.generate())


async def test_both_checks_must_admit(start_server, ca, nursery, tmp_path):
    a, b = KeyPair.generate(), KeyPair.generate()
    sock = str(tmp_path / "tailscaled.sock")
    await serve_unix(FakeBackend(localapi_answer({public_text(a.public), public_text(b.public)})),
                     sock, nursery)
    backend = await serve_tcp(FakeBackend(headscale_answer({public_text(a.public)})), nursery)
    server = await start_server(verify_clients=True, socket=sock,
                                verify_client_url=f"http://127.0.0.1:{backend.port}/verify")
    assert await admitted(server, ca, a)
    assert not await admitted(server, ca, b)


# ---- -allow-keys -----------------------------------------------------------------------------

def key_file(*pairs: KeyPair, extra: str = "") -> str:
    lines = ["# relay users", ""] + [f"{public_text(p.public)}  # someone" for p in pairs]
    return "\n".join(lines) + "\n" + extra


def test_parse_allow_keys():
    a = KeyPair.generate()
    text = key_file(a).replace("nodekey:", "NODEKEY:", 1) + "\n   \n"
    assert parse_allow_keys(text) == {a.public}
    with pytest.raises(ConfigError, match="line 4"):
        parse_allow_keys(key_file(a, extra="nodekey:1234\n"))


async def test_allow_keys_reload_on_change_and_sighup(start_server, ca, tmp_path, caplog):
    a, b = KeyPair.generate(), KeyPair.generate()
    path = tmp_path / "allowed"
    path.write_text(key_file(a))
    server = await start_server(allow_keys=str(path), allow_keys_poll=0.05)
    assert await admitted(server, ca, a)
    assert not await admitted(server, ca, b)
    path.write_text(key_file(a, b))  # picked up by the poll
    await wait_until(lambda: b.public in server.allow_list.keys)
    assert await admitted(server, ca, b)
    caplog.set_level(logging.ERROR, logger="derper.admission.gate")
    path.write_text("garbage\n")
    server.reload()  # what SIGHUP does; a broken file keeps the previous keys
    assert server.allow_list.keys == {a.public, b.public}
    assert any("keeping the previous" in r.getMessage() for r in caplog.records)
    tmp = tmp_path / "new"
    tmp.write_text(key_file(b))
    tmp.replace(path)  # how editors save: a new inode
    server.reload()
    assert not await admitted(server, ca, a)
    assert await admitted(server, ca, b)


def test_broken_allow_keys_is_a_startup_error(tmp_path):
    path = tmp_path / "allowed"
    path.write_text("nodekey:zz\n")
    with pytest.raises(ConfigError, match="line 1"):
        Server(replace(BASE, allow_keys=str(path)), KeyPair.generate())
    with pytest.raises(ConfigError, match="cannot read -allow-keys"):
        Server(replace(BASE, allow_keys=str(tmp_path / "nope")), KeyPair.generate())


async def test_sighup_reloads_allow_keys_in_the_real_process(tmp_path):
    """Refused before, admitted after a real SIGHUP, and only the SIGHUP can explain it: the
    file is rewritten in place with the same size and mtime, which the file poll cannot see."""
    from tests.process import DerperProcess, free_port
    a, b = KeyPair.generate(), KeyPair.generate()
    path = tmp_path / "allowed"
    path.write_text(key_file(b))
    before = os.stat(path)
    port = free_port()
    proc = DerperProcess(["-dev", "-a", f"127.0.0.1:{port}", "-stun=false"], tmp_path,
                         env={"DERP_ALLOW_KEYS": str(path)})
    u = f"http://127.0.0.1:{port}/derp"
    try:
        await proc.wait_for_log("derper listening")
        with pytest.raises(dc.DerpClientError):  # the negative control: a is not allowed yet
            async with dc.connect(u, a) as c:
                await assert_relays(c, c)
        path.write_text(key_file(a))
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert signature(path) == signature_of(before)
        proc.signal(signal.SIGHUP)
        await proc.wait_for_log("why=SIGHUP")
        async with dc.connect(u, a) as c:
            await assert_relays(c, c)
        assert "why=file changed" not in proc.log
    finally:
        proc.close()


def signature_of(st: os.stat_result):
    return ((st.st_ino, st.st_size, st.st_mtime_ns),)


async def test_admission_does_not_block_other_clients(start_server, ca, nursery, monkeypatch):
    """A verify URL that never answers for one key holds only that key's connection."""
    slow = KeyPair.generate()

    def answer(seen):
        return None if public_text(slow.public).encode() in seen.body else (200, b'{"Allow":1}')

    monkeypatch.setattr(admission, "URL_TIMEOUT", 5.0)
    backend = await serve_tcp(FakeBackend(answer), nursery)
    server = await start_server(verify_client_url=f"http://127.0.0.1:{backend.port}/verify")
    nursery.start_soon(admitted, server, ca, slow)
    await wait_until(lambda: backend.requests)
    assert not await admitted(server, ca, KeyPair.generate())  # {"Allow":1} is not true
    assert server.relay.stats.admission_rejected == 1


async def test_concurrent_connections_of_one_key_share_one_lookup(start_server, ca, nursery):
    backend = await serve_tcp(FakeBackend(fixed(200, b'{"Allow":true}'), delay=0.3), nursery)
    server = await start_server(verify_client_url=f"http://127.0.0.1:{backend.port}/verify")
    me = KeyPair.generate()
    results = []

    async def one():
        results.append(await admitted(server, ca, me))

    async with trio.open_nursery() as inner:
        for _ in range(5):
            inner.start_soon(one)
    assert results == [True] * 5
    assert len(backend.requests) == 1


async def test_https_verify_url_checks_the_certificate(start_server, ca, nursery, monkeypatch):
    """Headscale is usually behind HTTPS: the URL's certificate is verified (system roots,
    here the test CA), and a certificate the client cannot verify counts as unreachable."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    backend = await serve_tcp(FakeBackend(fixed(200, b'{"Allow":true}')), nursery, server_ctx)
    verify = f"https://localhost:{backend.port}/verify"
    server = await start_server(verify_client_url=verify, verify_client_url_fail_open=False)
    assert not await admitted(server, ca, KeyPair.generate())  # the test CA is not trusted yet
    assert backend.requests == []
    monkeypatch.setattr(http_client, "_default_ssl", client_context(ca))
    assert await admitted(server, ca, KeyPair.generate())
