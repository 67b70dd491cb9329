"""``derper status``: the real command against a running relay, a missing one, and in -watch."""

from __future__ import annotations

import json
import re
import signal
import subprocess
from pathlib import Path

import trio

from derper import client as dc
from derper.cli.status import render, spark, status_url
from derper.proto.keys import KeyPair
from derper.proto.messages import ReceivedPacket
from tests.conftest import url
from tests.process import DERPER, free_port, run_derper
from tests.relay_helpers import connect_opts, recv_kind, wait_until
from tests.test_status import get_json


async def status(*args: str) -> subprocess.CompletedProcess:
    """The command as a child process, so the in-process relay keeps answering meanwhile."""
    with trio.fail_after(30):
        return await trio.run_process([DERPER, "status", *args], capture_stdout=True,
                                      capture_stderr=True, check=False)


def test_status_url_forms():
    assert status_url("127.0.0.1:9437") == "http://127.0.0.1:9437/status.json"
    assert status_url("http://10.0.0.5:9437/status") == "http://10.0.0.5:9437/status.json"
    assert status_url("0.0.0.0:9437") == "http://127.0.0.1:9437/status.json"
    assert status_url("[::]:9437") == "http://[::1]:9437/status.json"
    assert status_url("[fd00::5]:9437") == "http://[fd00::5]:9437/status.json"


def test_spark_scales_to_the_largest_and_averages_into_the_width():
    assert spark([]) == ""
    assert spark([0, 0]) == "▁▁"
    assert spark([1, 2, 4, 8]) == "▂▃▅█"
    assert len(spark(list(range(600)))) == 30


async def test_against_a_running_relay(start_server, ca):
    server = await start_server(tls=True, metrics_addr="127.0.0.1:0")
    opts = connect_opts(server, ca)
    where = f"127.0.0.1:{server.metrics_port}"
    async with dc.connect(url(server), **opts) as a, dc.connect(url(server), **opts) as b:
        for _ in range(12):
            await a.send(b.public_key, bytes(500))
        for _ in range(12):
            await recv_kind(b, ReceivedPacket)
        await a.send(KeyPair.generate().public, b"lost")
        await wait_until(lambda: server.relay.stats.packets_received == 13)
        shown = await status("-url", where)
        as_json = await status("-json", "-url", f"http://{where}/status")
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout.decode()
    assert out.startswith("derper ") and " · healthy · " in out
    assert "clients     2 now (2 connections)" in out
    assert "since start 13 packets in (6 kB), 12 out (6 kB)" in out
    assert "drops       unknown dest 1 (last " in out
    assert "limits      none hit" in out
    assert "mesh        no mesh configured" in out
    assert "years left\n" in out  # trustme's certificates last until 3000; no ACME schedule
    assert as_json.returncode == 0
    data = json.loads(as_json.stdout)
    assert data["traffic"]["packets_in_total"] == 13 and data["clients"]["local"] == 2


def test_against_a_missing_relay():
    port = free_port()
    result = run_derper(["status", "-url", f"127.0.0.1:{port}"])
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith(
        f"derper status: cannot reach the relay at http://127.0.0.1:{port}/status.json: ")
    assert "Is derper running, with -metrics-addr" in result.stderr
    assert "ssh -L 9437:127.0.0.1:9437 you@relay" in result.stderr


def test_something_else_on_the_port_is_not_taken_for_a_relay():
    import http.server
    import threading

    httpd = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        result = run_derper(["status", "-url", f"127.0.0.1:{httpd.server_port}"])
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert result.returncode == 1
    assert "answered HTTP 404: not a derper status listener" in result.stderr


def test_bad_flags_are_usage_errors():
    result = run_derper(["status", "extra"])
    assert result.returncode == 2 and "unexpected argument 'extra'" in result.stderr
    result = run_derper(["status", "-url", "127.0.0.1:notaport"])
    assert result.returncode == 2 and "derper status:" in result.stderr
    result = run_derper(["status", "-h"])
    assert result.returncode == 0 and "ssh -L 9437:127.0.0.1:9437 you@relay" in result.stdout


async def test_watch_redraws_until_interrupted(start_server):
    server = await start_server(metrics_addr="127.0.0.1:0")
    proc = await trio.lowlevel.open_process(
        [DERPER, "status", "-watch", "-url", f"127.0.0.1:{server.metrics_port}"],
        stdout=subprocess.PIPE)
    out = b""
    try:
        with trio.fail_after(20):
            while out.count(b"\x1b[H\x1b[2J") < 2:  # two frames, each drawn over the last
                out += await proc.stdout.receive_some(65536)
    finally:
        proc.send_signal(signal.SIGINT)
        with trio.fail_after(10):
            code = await proc.wait()
        await proc.stdout.aclose()
    assert code == 0
    assert b"clients     0 now" in out


def test_render_puts_problems_first():
    data = {
        "generated_at": 1000.0, "schema": 1,
        "server": {"version": "9", "uptime_seconds": 90000, "derp": True},
        "health": {"state": "error", "notes": ["the TLS certificate has expired"]},
        "clients": {"local": 5, "remote": 3, "connections": 6, "connects_per_minute": 1,
                    "disconnects_per_minute": 0},
        "traffic": {"bytes_in_per_second": 125000, "bytes_out_per_second": 0,
                    "packets_in_per_second": 1200, "packets_out_per_second": 0,
                    "packets_in_total": 1, "packets_out_total": 0, "bytes_in_total": 2,
                    "bytes_out_total": 0},
        "history": {"fine": {"clients": [], "bytes_in_per_second": [1, 2],
                             "bytes_out_per_second": []}},
        "stun": {"enabled": False},
        "drops": [], "limits": [{"limit": "max_clients", "hits": 4, "last_at": 990.0}],
        "admission": {"enabled": True, "by": ["allow-keys"], "allowed": 2, "rejected": 1,
                      "last_rejected_at": None, "fail_open": 0},
        "certificate": {"installed": True, "self_signed": False, "issuer": "CN=R11",
                        "subject": "CN=derp.example.com", "days_left": -2, "renewal": "acme",
                        "next_renewal_at": 1600.0, "last_error": "429 rate limited",
                        "last_error_at": 940.0},
        "heaviest_senders": [{"key": "nodekey:0123abcd…", "bytes_per_second": 50000,
                              "addr": "192.0.2.9:41641"}],
        "mesh": {"configured": True, "links": [{"peer": "derp2.example.com",
                                                "state": "connecting"}]},
    }
    out = render(data, "http://127.0.0.1:9437/status.json")
    lines = out.splitlines()
    assert lines[0] == "derper 9 · ERROR · up 1 d 1 h · http://127.0.0.1:9437"
    assert lines[1] == "  ! the TLS certificate has expired"
    assert "5 now (6 connections, 3 via mesh)" in out
    assert "1 Mbit/s     1,200 pkt/s" in out
    assert "stun        off" in out
    assert "limits      -max-clients 4 (last 10 s ago)" in out
    assert "admission   -allow-keys: 2 allowed, 1 rejected (last never)" in out
    assert ("certificate CN=derp.example.com by CN=R11, -2 days left; next order in 10 min 0 s; "
            "last error (1 min 0 s ago): 429 rate limited") in out
    assert "heaviest      400 kbit/s  nodekey:0123abcd…  192.0.2.9:41641" in out
    assert "mesh        derp2.example.com connecting" in out


async def test_json_keys_are_the_ones_the_readme_documents(start_server):
    server = await start_server(metrics_addr="127.0.0.1:0")
    data = await get_json(server)
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = readme[readme.index("### `/status.json`"):readme.index("## Metrics")]
    assert list(data) == re.findall(r"^\| `(\w+)` \|", table, re.M)
