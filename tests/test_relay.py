"""Two or more real clients relaying through a real server on loopback."""

from __future__ import annotations

import logging
import socket
import ssl

import pytest
import trio

from derper import client as dc
from derper.metrics.counters import DropReason
from derper.net.tls_stream import TLSStream
from derper.proto import handshake, metacert, wire
from derper.proto.keys import KeyPair
from derper.proto.messages import (KeepAliveMessage, PeerGoneMessage, PongMessage, ReceivedPacket,
                                   RestartingMessage)
from tests.conftest import client_context, url
from tests.relay_helpers import (assert_relays, connect_opts, expect_closed,
                                 messages_until_self_packet, recv_kind, wait_until)

DISCO = wire.DISCO_MAGIC + bytes(56)  # the smallest packet the server treats as disco

TRANSPORTS = {
    "http": dict(tls=False, connect={}),
    "tls1.2": dict(tls=True, connect={"fast_start": True}, max_version=ssl.TLSVersion.TLSv1_2),
    "tls1.3-fast-start": dict(tls=True, connect={"fast_start": True}),
    "tls1.3-no-fast-start": dict(tls=True, connect={"fast_start": False}),
    "websocket": dict(tls=False, connect={"websocket": True}),
    "websocket-tls": dict(tls=True, connect={"websocket": True}),
}


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_two_clients_exchange_packets(start_server, ca, transport):
    t = TRANSPORTS[transport]
    server = await start_server(tls=t["tls"])
    opts = connect_opts(server, ca, **t["connect"])
    if "max_version" in t:
        opts["ssl_context"] = client_context(ca, max_version=t["max_version"])
    async with dc.connect(url(server), **opts) as a, dc.connect(url(server), **opts) as b:
        assert a.server_key == b.server_key == server.relay.public_key
        assert a.server_info.version == 2
        if t["tls"]:
            assert a.tls_version == ("TLSv1.2" if "max_version" in t else "TLSv1.3")
        assert a.fast_start is (transport == "tls1.3-fast-start")
        for size in (0, 1, 1280, wire.MAX_PACKET_SIZE):
            payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
            await assert_relays(a, b, payload)
            await assert_relays(b, a, payload)
    await wait_until(lambda: server.relay.router.current_connections == 0)
    stats = server.relay.stats
    assert stats.packets_received == stats.packets_sent == 8
    if transport.startswith("websocket"):
        assert stats.websocket_accepts == 2


async def test_meta_certificate_is_last_in_the_chain(start_server, ca):
    server = await start_server(tls=True)
    async with dc.connect(url(server), **connect_opts(server, ca)) as a:
        assert len(a.peer_chain) == 2
        assert metacert.parse(a.peer_chain[0]) is None
        assert metacert.parse(a.peer_chain[-1]) == (server.relay.public_key, 2)


async def test_fast_start_gets_no_http_response(start_server, ca):
    """Derp-Fast-Start: 1 → the first bytes on the wire are the ServerKey frame (spec §1.4)."""
    server = await start_server(tls=True)
    me = KeyPair.generate()
    tcp = await trio.open_tcp_stream("127.0.0.1", server.main_port)
    tls = TLSStream(tcp, client_context(ca), server_side=False, server_hostname="localhost")
    await tls.do_handshake()
    request = (b"GET /derp HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n"
               b"Derp-Fast-Start: 1\r\nUpgrade: DERP\r\n\r\n")
    info = handshake.client_info_frame(me.private, me.public, server.relay.public_key,
                                       handshake.client_info_json(can_ack_pings=True))
    await tls.send_all(request + info + wire.note_preferred(True))
    got = b""
    with trio.fail_after(10):
        while len(got) < 45 + 5 + 53:
            got += await tls.receive_some()
    assert got[:45] == wire.server_key(server.relay.public_key)
    assert got[45:50] == bytes.fromhex("0300000035")  # ServerInfo follows immediately
    await wait_until(lambda: server.relay.stats.current_home_connections == 1)
    await tls.aclose()


async def test_fast_start_server_key_and_server_info_share_one_tls_record(start_server, ca):
    """ServerKey waits for ServerInfo when the ClientInfo came with the request: one write."""
    server = await start_server(tls=True)
    sock = trio.socket.socket()
    await sock.connect(("127.0.0.1", server.main_port))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_context(ca).wrap_bio(incoming, outgoing, server_hostname="localhost")
    me = KeyPair.generate()
    with trio.fail_after(10):
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await sock.send(outgoing.read())
                incoming.write(await sock.recv(65536))
        tls.write(b"GET /derp HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n"
                  b"Derp-Fast-Start: 1\r\nUpgrade: DERP\r\n\r\n"
                  + handshake.client_info_frame(me.private, me.public, server.relay.public_key,
                                                handshake.client_info_json()))
        await sock.send(outgoing.read())
        raw, plain = b"", b""
        while len(plain) < 45 + 5 + 53:  # ServerKey, then ServerInfo
            chunk = await sock.recv(65536)
            assert chunk
            raw += chunk
            incoming.write(chunk)
            try:
                while True:
                    plain += tls.read(65536)
            except ssl.SSLWantReadError:
                pass
    records, pos = 0, 0
    while pos < len(raw):
        records += 1
        pos += 5 + int.from_bytes(raw[pos + 3:pos + 5], "big")
    assert records == 1
    sock.close()


async def test_upgrade_response_and_server_key_bytes(start_server):
    """The 101 carries exactly the headers of spec §1.3, followed by ServerKey."""
    server = await start_server()
    s = await trio.open_tcp_stream("127.0.0.1", server.main_port)
    await s.send_all(b"GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n\r\n")
    expected = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n"
                b"Derp-Version: 2\r\nDerp-Public-Key: " + server.relay.public_key.hex().encode()
                + b"\r\n\r\n" + wire.server_key(server.relay.public_key))
    got = b""
    with trio.fail_after(10):
        while len(got) < len(expected):
            got += await s.receive_some()
    assert got == expected
    await s.aclose()


async def test_unknown_destination_not_here_only_for_disco_and_rate_limited(start_server, ca):
    server = await start_server()
    async with dc.connect(url(server), **connect_opts(server, ca)) as a:
        await a.send(KeyPair.generate().public, b"not disco")
        unknown = [KeyPair.generate().public for _ in range(5)]
        for key in unknown:
            await a.send(key, DISCO)
        seen = await messages_until_self_packet(a, b"barrier")
    assert seen == [PeerGoneMessage(k, wire.PeerGoneReason.NOT_HERE) for k in unknown[:3]]
    stats = server.relay.stats
    assert stats.dropped(DropReason.UNKNOWN_DEST, disco=False) == 1
    assert stats.dropped(DropReason.UNKNOWN_DEST, disco=True) == 5
    assert stats.peer_gone_not_here_frames == 3


async def test_full_queue_drops_oldest_and_keeps_disco_separate(start_server, ca):
    server = await start_server(tcp_write_timeout=0)  # the stalled reader must not be cut off
    async with dc.connect(url(server), **connect_opts(server, ca)) as sender, \
            dc.connect(url(server), **connect_opts(server, ca)) as receiver:
        receiver.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stats = server.relay.stats
        seq = 0
        size = 16 << 10
        with trio.fail_after(30):
            while stats.dropped(DropReason.QUEUE_HEAD) < 100:
                batch = []
                for _ in range(64):
                    seq += 1
                    batch.append((receiver.public_key, seq.to_bytes(8, "big") + bytes(size)))
                await sender.send_many(batch)
                await trio.sleep(0)
        await sender.send(receiver.public_key, DISCO)
        await sender.send(receiver.public_key, b"last")
        got, saw_disco = [], False
        with trio.fail_after(30):
            while True:
                m = await recv_kind(receiver, ReceivedPacket)
                if m.data == DISCO:
                    saw_disco = True
                elif m.data == b"last":
                    break
                else:
                    got.append(int.from_bytes(m.data[:8], "big"))
    assert saw_disco
    assert got == sorted(got) and got[-1] == seq  # the newest survive, in order
    assert stats.dropped(DropReason.QUEUE_HEAD, disco=False) == seq - len(got)
    assert stats.dropped(DropReason.QUEUE_TAIL) == 0


async def test_burst_larger_than_the_queue_reaches_a_reading_client(start_server, ca):
    """A sender's burst that arrives in one read is not head-dropped while its receiver keeps
    up: the reader lets the destination's writer drain a full queue before evicting."""
    server = await start_server()
    async with dc.connect(url(server), **connect_opts(server, ca)) as sender, \
            dc.connect(url(server), **connect_opts(server, ca)) as receiver:
        count = 3 * server.relay.queue_depth
        await sender.send_many([(receiver.public_key, i.to_bytes(2, "big") + bytes(98))
                                for i in range(count)])
        got = [int.from_bytes((await recv_kind(receiver, ReceivedPacket)).data[:2], "big")
               for _ in range(count)]
    assert got == list(range(count))
    assert server.relay.stats.dropped(DropReason.QUEUE_HEAD) == 0


async def test_duplicate_keys_last_writer_wins_and_peer_gone(start_server, ca):
    server = await start_server()
    router = server.relay.router
    shared = KeyPair.generate()
    u = url(server)
    async with dc.connect(u, **connect_opts(server, ca)) as c:
        async with dc.connect(u, shared, **connect_opts(server, ca)) as a1:
            await assert_relays(a1, c)  # c has heard from the shared key
            async with dc.connect(u, shared, **connect_opts(server, ca)) as a2:
                assert router.dup_keys == 1 and router.dup_conns == 2
                await assert_relays(c, a2, b"to the newest")
                await a1.note_preferred(True)  # any frame makes a1 the active one
                await wait_until(lambda: router.active[shared.public].remote_port
                                 == a1.stream.socket.getsockname()[1])
                await assert_relays(c, a1, b"to the last writer")
            await wait_until(lambda: router.current_connections == 2)
            assert router.dup_keys == 0 and router.dup_conns == 0
            assert await messages_until_self_packet(c, b"b1") == []  # key still connected
            await assert_relays(c, a1, b"back to single")
        await wait_until(lambda: router.current_connections == 1)
        seen = await messages_until_self_packet(c, b"b2")
        assert seen == [PeerGoneMessage(shared.public, wire.PeerGoneReason.DISCONNECTED)]
    assert server.relay.stats.total_dup_client_conns == 1
    assert server.relay.stats.peer_gone_disconnected_frames == 1


async def test_ping_pong(start_server, ca):
    server = await start_server()
    async with dc.connect(url(server), **connect_opts(server, ca)) as a:
        await a.ping(bytes.fromhex("010203040506072a"))
        assert (await recv_kind(a, PongMessage)).data == bytes.fromhex("010203040506072a")
        await a.ping(b"12345678" + bytes(992))  # 1000 bytes: extra bytes are ignored
        assert (await recv_kind(a, PongMessage)).data == b"12345678"
    assert server.relay.stats.got_ping == 2
    await wait_until(lambda: server.relay.stats.sent_pong == 2)


async def test_keepalive_frames_arrive_on_schedule(start_server, ca):
    server = await start_server(keepalive_interval=0.2)
    async with dc.connect(url(server), **connect_opts(server, ca)) as a:
        with trio.fail_after(10):
            for _ in range(3):
                assert isinstance(await a.recv(), KeepAliveMessage)


async def test_note_preferred_counts_home_connections(start_server, ca):
    server = await start_server()
    stats = server.relay.stats
    async with dc.connect(url(server), **connect_opts(server, ca)) as a:
        await a.note_preferred(True)
        await wait_until(lambda: stats.current_home_connections == 1)
        await a.note_preferred(False)
        await wait_until(lambda: stats.current_home_connections == 0)
        await a.note_preferred(True)
        await wait_until(lambda: stats.current_home_connections == 1)
    await wait_until(lambda: stats.current_home_connections == 0)
    assert stats.home_moves_in == stats.home_moves_out == 0  # within 5 s of connecting


async def test_server_info_is_first_and_restarting_on_shutdown(start_server, ca):
    server = await start_server()
    async with dc.connect(url(server), **connect_opts(server, ca)) as a:
        await server.shutdown()
        m = await recv_kind(a, RestartingMessage)
        assert (m.reconnect_in_ms, m.try_for_ms) == (1000, 30000)
        await expect_closed(a)


async def test_stalled_reader_is_cut_off_by_write_timeout_and_stalls_nobody(start_server, ca,
                                                                            caplog):
    caplog.set_level(logging.INFO, logger="derper")
    server = await start_server(tcp_write_timeout=0.5)
    stats = server.relay.stats
    u = url(server)
    async with dc.connect(u, **connect_opts(server, ca)) as a, \
            dc.connect(u, **connect_opts(server, ca)) as b, \
            dc.connect(u, **connect_opts(server, ca)) as stalled:
        stalled.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        big = bytes(wire.MAX_PACKET_SIZE)
        with trio.fail_after(30):
            while stats.sclient_write_timeouts == 0:
                await a.send_many([(stalled.public_key, big)] * 16)
                await assert_relays(b, a, b"still flowing")  # a is not blocked, b is not
                await trio.sleep(0.01)
        await wait_until(lambda: stalled.public_key not in server.relay.router.conns)
        await assert_relays(a, b)
    assert stats.dropped(DropReason.WRITE_ERROR) > 0
    assert any(r.getMessage() == "client disconnected" and "write timed out" in r.fields["reason"]
               for r in caplog.records)
