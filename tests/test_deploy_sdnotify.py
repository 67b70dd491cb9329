"""sd_notify readiness (Type=notify): the real derper tells $NOTIFY_SOCKET once it listens."""

from __future__ import annotations

import socket

import trio

from derper.cli import sdnotify
from tests.process import free_port, notified_derper


def test_notify_sends_to_the_socket_and_is_a_no_op_without_one(tmp_path, monkeypatch):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert sdnotify.notify("READY=1")
        assert sock.recv(100) == b"READY=1"
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert not sdnotify.notify("READY=1")  # a vanished manager never breaks the server
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not sdnotify.notify("READY=1")


async def test_derper_reports_ready_after_binding(tmp_path):
    port = free_port()
    async with notified_derper(["-dev", "-a", f"127.0.0.1:{port}", "-stun=false"],
                               tmp_path) as (proc, sock):
        with trio.fail_after(15):
            assert await sock.recv(100) == b"READY=1"
        assert "derper listening" in proc.log  # ready only once the port is bound
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
