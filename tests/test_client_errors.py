"""The client's failures name their step (dial, tls, upgrade, handshake, protocol).

Each case is a real server on loopback, a derper or a small fake that fails one step on purpose.
"""

from __future__ import annotations

import ssl
import subprocess
import sys
from functools import partial

import pytest
import trio

from derper import client as dc
from derper.http.server import derp_upgrade_response
from derper.net.reading import next_frame
from derper.proto import handshake, wire
from derper.proto.keys import KeyPair
from derper.proto.wire import FrameReader, FrameType
from tests.conftest import url
from tests.process import free_port
from tests.relay_helpers import connect_opts

SERVER = KeyPair.generate()


async def serve(nursery: trio.Nursery, handler) -> int:
    """Run ``handler`` for every connection to a fresh loopback port; the port."""
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1]


async def read_head(stream: trio.abc.Stream) -> None:
    data = b""
    while b"\r\n\r\n" not in data and (chunk := await stream.receive_some()):
        data += chunk


async def fake_derp(stream: trio.abc.Stream, *, stop_after: str = "", then: bytes = b"") -> None:
    """A DERP server that stops after ``stop_after`` ("101", "ClientInfo") or completes the
    handshake and sends ``then``."""
    await read_head(stream)
    await stream.send_all(derp_upgrade_response(SERVER.public))
    if stop_after == "101":
        return
    await stream.send_all(wire.server_key(SERVER.public))
    reader = FrameReader({FrameType.CLIENT_INFO: wire.CLIENT_INFO_MAX})
    _, start, end = await next_frame(stream, reader)
    if stop_after == "ClientInfo":
        return  # what an admission refusal looks like to a client
    info = handshake.open_client_info(reader.data[start:end], SERVER.private)
    await stream.send_all(handshake.server_info_frame(info.key, SERVER.private,
                                                      box_key=info.box_key) + then)
    if then:
        await trio.sleep_forever()


async def failure(target: str, **opts) -> dc.DerpClientError:
    with pytest.raises(dc.DerpClientError) as info:
        async with dc.connect(target, **opts):
            pass
    return info.value


async def test_closed_port_is_dial():
    e = await failure(f"http://127.0.0.1:{free_port()}/derp")
    assert e.step == "dial" and str(e).startswith("dial: cannot connect to http://127.0.0.1:")


async def test_garbage_instead_of_tls_is_tls(nursery):
    async def garbage(stream):
        await stream.send_all(b"SSH-2.0-OpenSSH_9.6\r\n" * 20)
    port = await serve(nursery, garbage)
    e = await failure(f"https://127.0.0.1:{port}/derp", cert_pin="sha256-raw:" + "0" * 64)
    assert e.step == "tls" and "TLS" in str(e)


async def test_untrusted_certificate_is_tls(start_server):
    server = await start_server(tls=True)
    e = await failure(url(server), dial=("127.0.0.1", server.main_port),
                      ssl_context=ssl.create_default_context())
    assert e.step == "tls" and "CERTIFICATE_VERIFY_FAILED" in str(e)


async def test_pin_mismatch_is_tls(start_server):
    server = await start_server(tls=True)
    e = await failure(url(server), dial=("127.0.0.1", server.main_port),
                      cert_pin="sha256-raw:" + "0" * 64)
    assert e.step == "tls" and "pin" in str(e)


@pytest.mark.parametrize("tls, websocket", [(False, False), (True, False), (False, True)])
async def test_http_404_is_upgrade(start_server, ca, tls, websocket):
    """Also over TLS 1.3, where the client uses fast start and expects no HTTP answer."""
    server = await start_server(derp=False, tls=tls)
    e = await failure(url(server), **connect_opts(server, ca, websocket=websocket))
    assert e.step == "upgrade" and "HTTP 404" in str(e)
    assert websocket or "derp server disabled" in str(e)


async def test_not_http_is_upgrade(nursery):
    async def not_http(stream):
        await read_head(stream)
        await stream.send_all(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
    port = await serve(nursery, not_http)
    e = await failure(f"http://127.0.0.1:{port}/derp")
    assert e.step == "upgrade" and "bad HTTP response" in str(e)


async def test_closed_before_answering_is_upgrade(nursery):
    port = await serve(nursery, read_head)
    e = await failure(f"http://127.0.0.1:{port}/derp")
    assert e.step == "upgrade" and "closed the connection before answering" in str(e)


@pytest.mark.parametrize("stop_after", ["101", "ClientInfo"])
async def test_closed_during_the_derp_handshake_is_handshake(nursery, stop_after):
    port = await serve(nursery, partial(fake_derp, stop_after=stop_after))
    e = await failure(f"http://127.0.0.1:{port}/derp")
    assert e.step == "handshake" and "server closed the connection" in str(e)


async def test_a_complete_fake_handshake_connects(nursery):
    port = await serve(nursery, fake_derp)
    async with dc.connect(f"http://127.0.0.1:{port}/derp") as client:
        assert client.server_key == SERVER.public
        e = await failure_of(client.recv)
    assert e.step == "protocol" and "server closed the connection" in str(e)


async def failure_of(call) -> dc.DerpClientError:
    with pytest.raises(dc.DerpClientError) as info:
        await call()
    return info.value


@pytest.mark.parametrize("frame, why", [
    (wire.frame(FrameType.RECV_PACKET, b"short"), "RecvPacket payload of 5 bytes is too short"),
    (wire.frame(FrameType.PEER_GONE, b""), "PeerGone payload of 0 bytes is too short"),
    (wire.header(FrameType.KEEP_ALIVE, 2 << 20), "exceeds the limit"),
])
async def test_a_malformed_frame_after_the_handshake_is_protocol(nursery, frame, why):
    port = await serve(nursery, partial(fake_derp, then=frame))
    async with dc.connect(f"http://127.0.0.1:{port}/derp") as client:
        e = await failure_of(client.recv)
    assert e.step == "protocol" and why in str(e)
    assert not isinstance(e, wire.ProtocolError)


async def test_recv_frames_reports_protocol_too(nursery):
    port = await serve(nursery, partial(fake_derp, then=wire.header(FrameType.PING, 2 << 20)))
    async with dc.connect(f"http://127.0.0.1:{port}/derp") as client:
        e = await failure_of(client.recv_frames)
    assert e.step == "protocol" and "exceeds the limit" in str(e)


@pytest.mark.parametrize("scheme, step", [("http", "upgrade"), ("https", "tls")])
async def test_timeouts_name_the_step(nursery, scheme, step):
    port = await serve(nursery, lambda stream: trio.sleep_forever())
    e = await failure(f"{scheme}://127.0.0.1:{port}/derp", timeout=0.5)
    assert e.step == step and str(e).startswith(f"{step}: timed out after 0.5s")


SERVER_SIDE = ("derper.relay", "derper.server", "derper.http.server", "derper.http.websocket",
               "derper.http.endpoints", "derper.admission", "derper.certs", "derper.metrics",
               "derper.cli")


def test_the_client_imports_no_server_module():
    out = subprocess.run([sys.executable, "-c",
                          "import derper.client, sys; print(' '.join(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True).stdout.split()
    assert [m for m in out if any(m == p or m.startswith(p + ".") for p in SERVER_SIDE)] == []
    assert "derper.net.websocket" in out  # the stream adapter is still there for the client
