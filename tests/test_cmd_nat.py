"""``derper nat`` as a command: flags, help, and servers that say nothing, garbage or lies.

The servers are plain threads on loopback answering however the test says.
"""

from __future__ import annotations

import json
import socket
import threading

import pytest

from derper.cli import nat
from stun.message import COOKIE, respond

QUIET = {}


class FakeServer:
    """A UDP server on 127.0.0.1 whose reply to each datagram is ``reply(data, addr)``."""

    def __init__(self, reply) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.reply = reply
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(2048)
            except OSError:
                return
            out = self.reply(data, addr)
            if out is not None:
                self.sock.sendto(out, addr)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def fake():
    servers = []

    def make(reply):
        servers.append(FakeServer(reply))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def run_json(capsys, *args: str) -> dict:
    assert nat.run(["-json", "-timeout", "200ms", *args], QUIET) == 0
    return json.loads(capsys.readouterr().out)


def test_help_has_examples(capsys):
    assert nat.run(["--help"], QUIET) == 0
    out = capsys.readouterr().out
    assert "derper nat derp.example.com" in out and "-timeout duration" in out


@pytest.mark.parametrize(("argv", "message"), [
    ([], "name at least one STUN server"),
    (["-timeout", "0s", "x"], "-timeout must be positive"),
    (["-timeout", "soon", "x"], "invalid value"),
    (["-frobnicate"], "not defined"),
    (["[::1"], "bad server"),
])
def test_usage_errors(capsys, argv, message):
    assert nat.run(argv, QUIET) == 2
    assert message in capsys.readouterr().err


def test_unresolvable_server_fails_cleanly(capsys):
    assert nat.run(["-timeout", "200ms", "nonexistent.invalid"], QUIET) == 1
    assert "cannot resolve" in capsys.readouterr().err


def test_silent_server_means_udp_blocked(capsys, fake):
    server = fake(lambda data, addr: None)
    report = run_json(capsys, f"127.0.0.1:{server.port}")
    assert (report["udp"], report["mapping"], report["verdict"]) == (False, "unknown", "relayed")
    assert set(report) >= {"udp", "public", "mapping", "filtering", "port_preserving",
                           "hairpin", "ipv6", "verdict"}


@pytest.mark.parametrize("reply", [
    lambda data, addr: b"\x01\x01\x00\x00" + COOKIE + b"garbage here",
    lambda data, addr: data[:8] + b"\xff" * 200,
    lambda data, addr: respond(data, "198.51.100.7", 1)[0][:-1],  # cut short
])
def test_garbage_gives_unknown(capsys, fake, reply):
    server = fake(reply)
    report = run_json(capsys, f"127.0.0.1:{server.port}")
    assert report["udp"] is True  # something came back
    assert (report["mapping"], report["verdict"]) == ("unknown", "unknown")


def test_lying_server_gives_unknown(capsys, fake):
    """A new random-looking mapped port for every request: two mappings for one destination."""
    count = iter(range(1000, 2000))
    server = fake(lambda data, addr: respond(data, "198.51.100.7", next(count))[0])
    truth = fake(lambda data, addr: respond(data, "198.51.100.7", 999)[0])
    report = run_json(capsys, f"127.0.0.1:{server.port}", f"127.0.0.1:{truth.port}")
    assert (report["mapping"], report["verdict"]) == ("unknown", "unknown")


def test_plain_text_output(capsys, fake):
    server = fake(lambda data, addr: respond(data, *addr)[0])
    assert nat.run(["-timeout", "200ms", "-ipv6=false", f"127.0.0.1:{server.port}"], QUIET) == 0
    out = capsys.readouterr().out
    assert "NAT mapping:     endpoint-independent" in out and "Verdict: " in out
    assert "no NAT" in out
