"""Malformed input closes only the offending connection, with a log line; others keep relaying."""

from __future__ import annotations

import json
import logging
import os
from functools import partial

import pytest
import trio
from nacl.bindings import crypto_box

from derper import client as dc
from derper.proto import handshake, wire
from derper.proto.keys import KeyPair
from derper.relay import session as session_module
from tests.conftest import url
from tests.relay_helpers import assert_relays, connect_opts, wait_until

UPGRADE = b"GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n\r\n"


def client_info(server_public: bytes, *, me: KeyPair | None = None, plaintext: bytes | None = None,
                key: bytes | None = None) -> bytes:
    me = me or KeyPair.generate()
    plaintext = plaintext if plaintext is not None else handshake.client_info_json()
    nonce = os.urandom(24)
    sealed = nonce + crypto_box(plaintext, nonce, server_public, me.private)
    return wire.frame(wire.FrameType.CLIENT_INFO, (key or me.public) + sealed)


def good_handshake(server_public: bytes) -> bytes:
    return UPGRADE + client_info(server_public)


CASES = {
    # name: (bytes to send, given the server key; expected log message; expected error substring)
    "garbage HTTP": (lambda k: b"\x16\x03\x01garbage\r\n\r\n", "closing connection: bad HTTP request", None),
    "oversized HTTP head": (lambda k: b"GET / HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n",
                            "closing connection: bad HTTP request", None),
    "first frame not ClientInfo": (lambda k: UPGRADE + wire.send_packet(bytes(32), b"x"),
                                   "closing connection: bad DERP handshake", "not ClientInfo"),
    "undecryptable ClientInfo": (lambda k: UPGRADE + client_info(KeyPair.generate().public),
                                 "closing connection: bad DERP handshake", "does not decrypt"),
    "ClientInfo not JSON": (lambda k: UPGRADE + client_info(k, plaintext=b"{nope"),
                            "closing connection: bad DERP handshake", "not valid JSON"),
    "ClientInfo bad meshKey": (
        lambda k: UPGRADE + client_info(k, plaintext=json.dumps({"meshKey": "ab"}).encode()),
        "closing connection: bad DERP handshake", "meshKey"),
    "ClientInfo zero key": (lambda k: UPGRADE + client_info(k, key=bytes(32)),
                            "closing connection: bad DERP handshake", "all-zero"),
    "ClientInfo too short": (lambda k: UPGRADE + wire.frame(wire.FrameType.CLIENT_INFO, bytes(10)),
                             "closing connection: bad DERP handshake", "outside"),
    "oversize frame length": (lambda k: good_handshake(k) + b"\x04\xff\xff\xff\xff",
                              "client disconnected", "exceeds the limit"),
    "short SendPacket": (lambda k: good_handshake(k) + wire.frame(wire.FrameType.SEND_PACKET, b"x"),
                         "client disconnected", "shorter than a key"),
    "short Ping": (lambda k: good_handshake(k) + wire.frame(wire.FrameType.PING, b"1234"),
                   "client disconnected", "shorter than 8"),
    "NotePreferred empty": (lambda k: good_handshake(k) + wire.frame(wire.FrameType.NOTE_PREFERRED),
                            "client disconnected", "exactly one byte"),
    "WatchConns without mesh key": (lambda k: good_handshake(k) + wire.WATCH_CONNS,
                                    "client disconnected", "requires the mesh key"),
    "ForwardPacket without mesh key": (
        lambda k: good_handshake(k) + wire.forward_packet(bytes(32), bytes(32), b"x"),
        "client disconnected", "requires the mesh key"),
    "unknown frame too large": (lambda k: good_handshake(k) + wire.header(0x7f, (1 << 20) + 1),
                                "client disconnected", "exceeds the limit"),
}


async def read_until_closed(stream: trio.SocketStream) -> bytes:
    got = b""
    with trio.fail_after(10):
        while data := await stream.receive_some():
            got += data
    return got


@pytest.mark.parametrize("case", CASES)
async def test_bad_input_closes_only_that_connection(start_server, ca, caplog, case):
    make, message, detail = CASES[case]
    server = await start_server()
    u = url(server)
    async with dc.connect(u, **connect_opts(server, ca)) as a, \
            dc.connect(u, **connect_opts(server, ca)) as b:
        caplog.set_level(logging.INFO, logger="derper")
        bad = await trio.open_tcp_stream("127.0.0.1", server.main_port)
        port = bad.socket.getsockname()[1]
        await bad.send_all(make(server.relay.public_key))
        await read_until_closed(bad)
        await bad.aclose()
        await assert_relays(a, b)
        await assert_relays(b, a)
    lines = [r for r in caplog.records if r.getMessage() == message
             and str(getattr(r, "fields", {}).get("remote", "")).endswith(f":{port}")]
    assert len(lines) == 1, [(r.getMessage(), getattr(r, "fields", None)) for r in caplog.records]
    if detail:
        fields = lines[0].fields
        assert detail in str(fields.get("error") or fields.get("reason"))


async def test_tls_garbage_closes_only_that_connection(start_server, ca, caplog):
    server = await start_server(tls=True)
    u = url(server)
    async with dc.connect(u, **connect_opts(server, ca)) as a, \
            dc.connect(u, **connect_opts(server, ca)) as b:
        caplog.set_level(logging.INFO, logger="derper")
        bad = await trio.open_tcp_stream("127.0.0.1", server.main_port)
        await bad.send_all(b"GET / HTTP/1.1\r\nHost: plain-http-on-a-tls-port\r\n\r\n")
        await read_until_closed(bad)
        await assert_relays(a, b)
    assert any(r.getMessage() == "closing connection: TLS handshake failed" for r in caplog.records)


async def test_silent_connections_time_out(start_server, ca, caplog):
    """Slowloris: a connection that never completes its request or handshake is closed."""
    server = await start_server(handshake_timeout=0.3)
    caplog.set_level(logging.INFO, logger="derper")
    idle = await trio.open_tcp_stream("127.0.0.1", server.main_port)
    half = await trio.open_tcp_stream("127.0.0.1", server.main_port)
    await half.send_all(UPGRADE)  # upgraded, but never sends ClientInfo
    assert await read_until_closed(idle) == b""
    assert (await read_until_closed(half)).endswith(wire.server_key(server.relay.public_key))
    assert any(r.getMessage() == "closing connection: DERP handshake timed out"
               for r in caplog.records)
    assert server.relay.stats.handshake_failures == 1


async def test_client_vanishing_mid_frame_is_a_quiet_close(start_server, ca, caplog):
    server = await start_server()
    caplog.set_level(logging.INFO, logger="derper")
    s = await trio.open_tcp_stream("127.0.0.1", server.main_port)
    await s.send_all(good_handshake(server.relay.public_key) + b"\x04\x00\x00\x01\x00" + bytes(10))
    await trio.sleep(0.05)
    await s.aclose()
    with trio.fail_after(10):
        while server.relay.router.current_connections or not any(
                r.getMessage() == "client disconnected" for r in caplog.records):
            await trio.sleep(0.01)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_client_rejects_a_server_key_with_bad_magic(nursery):
    """The magic only travels server → client: a client must refuse a bad one, clearly."""
    async def fake_server(stream: trio.SocketStream) -> None:
        await stream.receive_some()
        await stream.send_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\n"
                              b"Connection: Upgrade\r\n\r\n"
                              + wire.frame(wire.FrameType.SERVER_KEY, b"DERP\x00\x00\x00\x00"
                                           + bytes(32)))
        await trio.sleep_forever()

    listeners = await nursery.start(partial(trio.serve_tcp, fake_server, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    with pytest.raises(dc.DerpClientError, match="^handshake: .*lacks the DERP magic"):
        async with dc.connect(f"http://127.0.0.1:{port}/derp"):
            pass


async def test_protocol_error_disconnects_cannot_flood_the_log(start_server, ca, caplog):
    """30 sessions that each break the protocol after the handshake: one warning, then a count."""
    server = await start_server()
    caplog.set_level(logging.INFO, logger="derper")
    for _ in range(30):
        bad = await trio.open_tcp_stream("127.0.0.1", server.main_port)
        await bad.send_all(good_handshake(server.relay.public_key)
                           + wire.frame(wire.FrameType.NOTE_PREFERRED))
        await read_until_closed(bad)
        await bad.aclose()
    warnings = [r for r in caplog.records if r.getMessage() == "client disconnected"
                and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert server.relay.log_throttle.total >= 29


async def test_connect_lines_are_kept_at_a_human_pace_and_throttled_in_a_flood(
        start_server, ca, caplog, monkeypatch):
    monkeypatch.setattr(session_module, "CONNECT_LOG_BURST", 3)
    server = await start_server()
    caplog.set_level(logging.INFO, logger="derper")
    for _ in range(10):
        async with dc.connect(url(server), **connect_opts(server, ca)) as c:
            await assert_relays(c, c)
    await wait_until(lambda: server.relay.router.current_connections == 0)
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("client connected") == 3
    assert messages.count("client disconnected") == 3
