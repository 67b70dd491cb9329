"""Fuzzing the HTTP front door: whatever a peer sends as a request head, the connection ends
with a proper HTTP answer or a close, never an exception out of the connection task."""

from __future__ import annotations

import trio
import trio.testing
from hypothesis import example, given, strategies as st

from derper.admission.pacer import Pacer
from derper.http.endpoints import Endpoints
from derper.http.server import serve_http
from derper.logs import Throttle
from tests.fuzzing import fuzz

ENDPOINTS = Endpoints(home="", derp_enabled=True, bootstrap_body=lambda: b"{}")
THROTTLE = Throttle()  # as a server's: a flood of bad requests logs one line per interval
QUIET = Pacer(lambda: 0)  # nothing relayed: every step goes at once
METHODS = st.sampled_from(["GET", "HEAD", "POST", "PUT", "CONNECT", "OPTIONS", "TRACE", "PRI",
                           "DELETE", "G\x00T", "get", ""])
TARGETS = st.sampled_from(["/", "/derp", "/derp/probe", "/generate_204", "/debug/varz",
                           "/bootstrap-dns", "*", "x:22", "http://a/", "//", "/%00", ""])
HEADER_NAMES = st.sampled_from(["Host", "Upgrade", "Connection", "Content-Length",
                                "Transfer-Encoding", "Expect", "X-Tailscale-Challenge",
                                "X-Forwarded-For", "Sec-WebSocket-Protocol", "Derp-Fast-Start",
                                "Bad Name", ""])
HEADER_VALUES = st.one_of(st.sampled_from(["DERP", "websocket", "Upgrade", "chunked", "0",
                                           "-1", "99999999999", "100-continue", "1", "derp"]),
                          st.text(max_size=20))


@st.composite
def request_heads(draw) -> bytes:
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2", "X"]))
    line = f"{draw(METHODS)} {draw(TARGETS)} {version}"
    headers = draw(st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=6))
    head = "\r\n".join([line] + [f"{k}: {v}" for k, v in headers]) + "\r\n\r\n"
    body = draw(st.binary(max_size=40))
    return head.encode("utf-8", "surrogateescape") + body


async def serve_one(data: bytes) -> bytes:
    """Feed ``data`` then end the stream; return what the server wrote before it closed."""
    client, server = trio.testing.memory_stream_pair()
    received = bytearray()
    async with trio.open_nursery() as nursery:
        async def run_server():
            try:
                await serve_http(server, "192.0.2.1", 1234, head_timeout=1.0,
                                 handle=ENDPOINTS.handle, log_throttle=THROTTLE,
                                 on_established=lambda: None, pacer=QUIET)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the peer went away mid-answer: the caller closes, nothing to report
            finally:
                await server.aclose()
        nursery.start_soon(run_server)
        await client.send_all(data)
        await client.send_eof()
        with trio.fail_after(5):
            while chunk := await client.receive_some(65536):
                received += chunk
    return bytes(received)


def check(data: bytes) -> None:
    out = trio.run(serve_one, data)
    assert out == b"" or out.startswith(b"HTTP/1.1 "), out[:80]


@fuzz(300)
@given(data=request_heads())
@example(data=b"CONNECT x:22 HTTP/1.1\r\nHost: x\r\n\r\n")  # the attack run: no reply, a traceback
@example(data=b"CONNECT x:22 HTTP/1.1\r\nHost: x\r\n\r\nSSH-2.0-x\r\n")
def test_structured_request_heads(data):
    check(data)


@fuzz(200)
@given(data=st.binary(max_size=300))
def test_raw_bytes(data):
    check(data)


def test_connect_gets_an_answer_and_the_connection_closes():
    out = trio.run(serve_one, b"CONNECT x:22 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 405 ")
