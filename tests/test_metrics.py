"""/metrics (Prometheus conventions, checked by promtool and scraped by a real Prometheus) and
/debug/varz (the Go derper's names, behind the debug access rule)."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import ssl
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import trio

from derper import client as dc, logs
from derper.config import Config
from derper.errors import ConfigError
from derper.metrics.counters import DropReason, Histogram
from derper.metrics.varz import debug_allowed, go_number, parse_cidrs, render
from derper.proto import wire
from derper.proto.keys import KeyPair, public_text
from derper.proto.messages import PeerGoneMessage, ReceivedPacket
from derper.server import Server
from tests.conftest import client_context, url
from tests.process import free_port
from tests.relay_helpers import assert_relays, connect_opts, recv_kind, wait_until
from tests.system import has_ipv6_loopback, require_binary

DASHBOARD = Path(__file__).parent.parent / "deploy" / "grafana" / "derper.json"

# Spec §6.1-6.3: every name the Go derper's /debug/varz shows for a server (Go-runtime,
# process and bootstrap-DNS names aside).
GO_VARZ_NAMES = {
    "derp_memstats_sys0", "derp_watchers", "derp_current_file_descriptors",
    "derp_current_connections", "derp_current_home_connections",
    "derp_current_notideal_connections", "derp_clients_total", "derp_clients_local",
    "derp_clients_remote", "derp_current_dup_client_keys", "derp_current_dup_client_conns",
    "derp_total_dup_client_conns", "derp_accepts", "derp_bytes_received",
    "derp_packets_received", "derp_packets_received_kind", "derp_bytes_sent", "derp_packets_sent",
    "derp_unknown_frames", "derp_home_moves_in", "derp_home_moves_out", "derp_got_ping",
    "derp_sent_pong", "derp_peer_gone_disconnected_frames", "derp_peer_gone_not_here_frames",
    "derp_packets_forwarded_out", "derp_packets_forwarded_in", "derp_multiforwarder_created",
    "derp_multiforwarder_deleted", "derp_packet_forwarder_delete_other_value",
    "derp_sclient_write_timeouts", "derp_average_queue_duration_ms", "derp_tcp_rtt",
    "derp_mesh_update_batch_size", "derp_mesh_update_loop_count", "derp_buffered_write_frames",
    "derp_packets_dropped", "derp_bytes_dropped", "derp_websocket_accepts", "stun_requests",
    "stun_addrfamily", "tls_listener_accepted_connections", "tls_listener_rejected_connections",
    "derper_tls_request_version", "derper_tls_active_version",
}
# What we do not measure, rather than show made-up numbers.

# Go shows derp_rate_limit_per_client_* only with -rate-config (test_admission_and_limit_metrics).

DISCO = wire.DISCO_MAGIC + bytes(56)


async def fetch(address: str, path: str, *, headers: dict | None = None,
                context: ssl.SSLContext | None = None) -> tuple[int, str]:
    """GET ``address`` + ``path`` in a thread (urllib), returning (status, body)."""
    def get():
        req = urllib.request.Request(address + path, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=10, context=context) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
    return await trio.to_thread.run_sync(get)


def _prom_text(server: Server) -> str:
    from prometheus_client import generate_latest

    from derper.metrics.prometheus import registry
    return generate_latest(registry(server.exposition.metrics)).decode()


def metrics_url(server: Server) -> str:
    return f"http://127.0.0.1:{server.metrics_port}"


def families(text: str) -> dict[str, str]:
    """Family name → type, from ``# TYPE`` lines."""
    return {m[0]: m[1] for m in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M)}


def sample_names(text: str) -> set[str]:
    return {re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group()
            for line in text.splitlines() if line and not line.startswith("#")}


async def traffic(server: Server, ca) -> list[bytes]:
    """Relayed packets, an unknown destination (other and disco), a home move: varied counters.

    Returns every private key involved, for checks that none leaks."""
    opts = connect_opts(server, ca)
    async with dc.connect(url(server), **opts) as a, dc.connect(url(server), **opts) as b:
        await assert_relays(a, b, b"hello")
        await a.send(KeyPair.generate().public, b"lost")
        await a.send(KeyPair.generate().public, DISCO)
        await recv_kind(a, PeerGoneMessage)
        await a.note_preferred(True)
    await wait_until(lambda: server.relay.router.current_connections == 0)
    return [server.relay.keypair.private, a.keypair.private, b.keypair.private]


def assert_no_secret(secrets: list[bytes], *texts: str) -> None:
    for secret in secrets:
        for form in (secret.hex(), "privkey:" + secret.hex()):
            assert not any(form in t for t in texts)


async def test_metrics_pass_promtool_and_show_every_drop_reason(start_server, ca, caplog):
    caplog.set_level(logging.DEBUG, logger="derper")
    promtool = require_binary("promtool", "prometheus")
    server = await start_server(tls=True, metrics_addr="127.0.0.1:0")
    secrets = await traffic(server, ca)
    status, text = await fetch(metrics_url(server), "/metrics")
    assert status == 200
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                           text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    for reason in DropReason:
        for kind in ("disco", "other"):
            for what in ("packets", "bytes"):
                assert (f'derp_{what}_dropped_total{{kind="{kind}",'
                        f'reason="{reason.name.lower()}"}}') in text
    assert 'derp_packets_dropped_total{kind="disco",reason="unknown_dest"} 1.0' in text
    assert "derp_packets_received_total 3.0" in text
    assert f"derp_bytes_received_total {5 + 4 + len(DISCO)}.0" in text  # hello, lost, disco
    assert 'derper_tls_request_version_total{version="1.3"} 2.0' in text
    assert 'derper_tls_active_version{version="1.3"} 0.0' in text
    assert "derp_peer_gone_not_here_frames_total 1.0" in text
    assert "process_resident_memory_bytes" in text and "process_open_fds" in text
    assert 'derper_build_info{version="' in text
    assert_no_secret(secrets, text, *(f"{r.getMessage()} {getattr(r, 'fields', '')}"
                                      for r in caplog.records))
    status, _ = await fetch(metrics_url(server), "/other")
    assert status == 404


async def test_varz_has_the_go_names_and_layout(start_server, ca):
    server = await start_server(tls=True, stun=True, stun_port=0)
    secrets = await traffic(server, ca)
    status, text = await fetch(f"https://localhost:{server.main_port}", "/debug/varz",
                               context=client_context(ca))
    assert status == 200
    names = set(families(text)) | {n for n in sample_names(text)
                                   if n in GO_VARZ_NAMES}  # untyped: no TYPE line
    assert names == GO_VARZ_NAMES
    assert "derp_packets_received 3\n" in text  # no _total: Go's name, Go's integer format
    assert '# TYPE derp_packets_dropped counter\n# HELP derp_packets_dropped ' in text
    assert 'derp_packets_dropped{reason="unknown_dest",kind="disco"} 1\n' in text
    assert "# TYPE derp_average_queue_duration_ms" not in text  # untyped in Go
    # Two clients, and this request (whose connection is still open).
    assert 'derper_tls_request_version{version="1.3"} 3\n' in text
    assert 'derper_tls_active_version{version="1.3"} 1\n' in text
    assert 'stun_requests{disposition="not_stun"} 0\n' in text
    assert 'derp_buffered_write_frames_bucket{le="+Inf"} ' in text
    # Go's order: top-level names sorted, members of the derp set by raw expvar key.
    order = [n for n in (re.match(r"# TYPE (\S+)", line) for line in text.splitlines()) if n]
    tops = [n.group(1) for n in order]
    assert tops.index("derp_accepts") < tops.index("derp_clients_local") \
        < tops.index("derp_got_ping") < tops.index("derp_bytes_dropped") \
        < tops.index("derp_websocket_accepts") < tops.index("stun_addrfamily")
    assert_no_secret(secrets, text)


def _varz_fds(text: str) -> int:
    return int(re.search(r"^derp_current_file_descriptors (\d+)$", text, re.M).group(1))


async def test_varz_file_descriptors_follow_what_the_process_opens(start_server):
    """The count comes from /proc/self/fd's size where the kernel gives it (Linux 6.2+), else
    from its listing: either way, 200 sockets more are 200 descriptors more."""
    server = await start_server()
    address = f"http://127.0.0.1:{server.main_port}"
    before = _varz_fds((await fetch(address, "/debug/varz"))[1])
    socks = [socket.socket() for _ in range(200)]
    try:
        during = _varz_fds((await fetch(address, "/debug/varz"))[1])
        listed = len(os.listdir("/proc/self/fd"))
    finally:
        for s in socks:
            s.close()
    assert during - before == 200
    # The listing's own descriptor and the scrape's connection, still closing, aside.
    assert abs(during - listed) <= 3


async def test_varz_access_rule_on_a_real_socket(start_server):
    server = await start_server()
    main = f"http://127.0.0.1:{server.main_port}"
    assert (await fetch(main, "/debug/varz"))[0] == 200
    status, body = await fetch(main, "/debug/varz", headers={"X-Forwarded-For": "127.0.0.1"})
    assert (status, body) == (403, "debug access denied\n")


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback on this machine")
async def test_varz_allows_ipv6_loopback(start_server):
    v6 = await start_server(addr="[::1]:0")
    assert (await fetch(f"http://[::1]:{v6.main_port}", "/debug/varz"))[0] == 200


def test_debug_access_rule():
    allow = parse_cidrs("10.0.0.0/8, fd00::/8")
    assert debug_allowed("127.0.0.1", False, [])
    assert debug_allowed("127.0.0.2", False, [])
    assert debug_allowed("::1", False, [])
    assert debug_allowed("::ffff:127.0.0.1", False, [])
    assert not debug_allowed("127.0.0.1", True, allow)  # behind a proxy, loopback means nothing
    assert debug_allowed("10.1.2.3", False, allow)
    assert debug_allowed("fd00::1", False, allow)
    assert not debug_allowed("10.1.2.3", True, allow)
    assert not debug_allowed("10.1.2.3", False, [])
    assert not debug_allowed("192.0.2.1", False, allow)
    assert not debug_allowed("100.64.0.1", False, allow)  # Tailscale/CGNAT range: opt in only
    assert not debug_allowed(None, False, allow)
    assert not debug_allowed("not-an-ip", False, allow)


def test_bad_debug_allow_cidrs_is_a_config_error():
    with pytest.raises(ConfigError, match="debug-allow-cidrs: 'ten' is not an IP prefix"):
        Server(Config(dev=True, debug_allow_cidrs="10.0.0.0/8,ten"), KeyPair.generate())


def test_metrics_addr_off():
    assert Config(metrics_addr="off").metrics_listen is None
    assert Config(metrics_addr="").metrics_listen is None
    assert Config(metrics_addr="127.0.0.1:0").metrics_listen == "127.0.0.1:0"


def test_bad_metrics_addr_is_a_config_error():
    with pytest.raises(ConfigError, match="-metrics-addr: bad listen address 'nope'"):
        Server(Config(dev=True, metrics_addr="nope"), KeyPair.generate())


def test_go_number_format():
    assert [go_number(v) for v in (0, 3, 0.0, 2.5, 1e-05, 1e20, 1.5e-7, 12.25)] == \
        ["0", "3", "0", "2.5", "1e-05", "100000000000000000000", "1.5e-07", "12.25"]


async def test_unbindable_metrics_port_leaves_the_relay_running(start_server, ca, caplog):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = await start_server(metrics_addr=f"127.0.0.1:{taken.getsockname()[1]}")
        assert server.metrics_port is None
        assert any(r.getMessage().startswith("cannot serve metrics") for r in caplog.records)
        opts = connect_opts(server, ca)
        async with dc.connect(url(server), **opts) as a, dc.connect(url(server), **opts) as b:
            await assert_relays(a, b)


def test_log_throttle_keeps_one_line_per_interval_and_counts_the_rest():
    t = logs.Throttle()
    assert t.check("bad", 0.0) == 0
    assert t.check("bad", 1.0) is None
    assert t.check("bad", 2.0) is None
    assert t.check("other", 2.0) == 0  # kinds are independent
    assert t.check("bad", 10.5) == 2
    assert t.check("bad", 11.0) is None
    assert t.total == 3


def test_log_throttle_burst_then_a_steady_trickle():
    t = logs.Throttle()
    got = [t.check("connect", 0.0, burst=3, every=1.0) for _ in range(5)]
    assert got == [0, 0, 0, None, None]
    assert t.check("connect", 1.0, burst=3, every=1.0) == 2  # one more per second
    assert t.check("connect", 1.5, burst=3, every=1.0) is None


async def test_scanner_garbage_is_logged_once_per_interval(start_server, caplog):
    caplog.set_level(logging.INFO, logger="derper")
    server = await start_server()
    for _ in range(5):
        with trio.socket.socket() as s:
            await s.connect(("127.0.0.1", server.main_port))
            await s.send(b"\x16\x03\x01garbage\r\n\r\n")
            with trio.fail_after(10):
                while await s.recv(4096):
                    pass
    lines = [r for r in caplog.records
             if r.getMessage() == "closing connection: bad HTTP request"]
    assert len(lines) == 1
    assert server.relay.log_throttle.total == 4
    assert "derper_log_lines_suppressed_total 4.0" in _prom_text(server)


async def test_dashboard_uses_only_exported_metrics(start_server, ca):
    # A mesh peer that is down, so the per-link families have a sample too.
    server = await start_server(tls=True, metrics_addr="127.0.0.1:0", stun=True, stun_port=0,
                                mesh_key=os.urandom(32),
                                mesh_with=f"localhost:{free_port()}/127.0.0.1")
    await traffic(server, ca)
    await wait_until(lambda: any(h.reconnects for h in server.relay.mesh_links.values()))
    _, text = await fetch(metrics_url(server), "/metrics")
    exported = sample_names(text)
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", ())]
    assert len(exprs) >= 8
    functions = {"rate", "sum", "increase", "histogram_quantile", "irate", "max", "min", "avg"}
    used = set()
    for expr in exprs:
        expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"|\b(by|without) *\([^)]*\)", "", expr)
        used |= {w for w in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr) if w not in functions}
    missing = used - exported
    assert not missing, f"dashboard queries metrics the server does not export: {missing}"
    for needle in ("derp_current_connections", "derp_bytes_received_total",
                   "derp_packets_dropped_total", "stun_requests_total",
                   "derper_admission_results_total"):
        assert needle in used


@pytest.mark.slow
async def test_real_prometheus_scrapes_matching_packet_counts(start_server, ca, tmp_path):
    prometheus = require_binary("prometheus", "prometheus")
    server = await start_server(metrics_addr="127.0.0.1:0")
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n  - job_name: derper\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{server.metrics_port}']\n")
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--web.listen-address=127.0.0.1:{port}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        n, size = 50, 1000
        opts = connect_opts(server, ca)
        async with dc.connect(url(server), **opts) as a, dc.connect(url(server), **opts) as b:
            for i in range(n):
                await assert_relays(a, b, i.to_bytes(2, "big") * (size // 2))
        api = f"http://127.0.0.1:{port}"

        async def query(q: str) -> float | None:
            try:
                status, body = await fetch(api, "/api/v1/query?query=" + urllib.parse.quote(q))
            except OSError:
                return None  # not listening yet
            result = json.loads(body)["data"]["result"] if status == 200 else []
            return float(result[0]["value"][1]) if result else None

        with trio.fail_after(60):
            while await query("derp_bytes_sent_total") != n * size:
                await trio.sleep(0.5)
        assert await query("derp_packets_received_total") == n
        assert await query("derp_packets_sent_total") == n
        assert await query("derp_bytes_received_total") == n * size
        assert await query('up{job="derper"}') == 1
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


def test_histogram_buckets_and_sum():
    h = Histogram((0, 1, 2, 5))
    for n in (0, 1, 3, 5, 6, 100):
        h.observe(n)
    assert h.cumulative() == [(0, 1), (1, 2), (2, 2), (5, 4), (float("inf"), 6)]
    assert h.sum == 115


async def test_queue_wait_grows_when_a_receiver_stalls(start_server, ca):
    """The writer blocks on a receiver that does not read: queued packets wait, and it shows."""
    server = await start_server(tcp_write_timeout=0)
    stats = server.relay.stats
    opts = connect_opts(server, ca)
    async with dc.connect(url(server), **opts) as sender, \
            dc.connect(url(server), **opts) as receiver:
        await assert_relays(sender, receiver)
        assert stats.average_queue_duration_ms == 0  # an idle writer's packets are not timed
        with trio.fail_after(30):
            while stats.dropped(DropReason.QUEUE_HEAD) < 10:  # the writer is stuck: queue full
                await sender.send_many([(receiver.public_key, bytes(16 << 10))] * 64)
                await trio.sleep(0)
        with trio.fail_after(30):
            while stats.average_queue_duration_ms == 0:
                await recv_kind(receiver, ReceivedPacket)
    assert f"derp_average_queue_duration_ms {go_number(stats.average_queue_duration_ms)}\n" \
        in render(server.exposition.metrics())


async def test_admission_and_limit_metrics(start_server, ca, tmp_path):
    promtool = require_binary("promtool", "prometheus")
    allowed, stranger = KeyPair.generate(), KeyPair.generate()
    (tmp_path / "keys").write_text(public_text(allowed.public) + "\n")
    (tmp_path / "rate.json").write_text('{"PerClientRateLimitBytesPerSec": 250000}')
    server = await start_server(allow_keys=str(tmp_path / "keys"),
                                rate_config=str(tmp_path / "rate.json"),
                                metrics_addr="127.0.0.1:0")
    async with dc.connect(url(server), allowed, **connect_opts(server, ca)) as a:
        await assert_relays(a, a)
    with pytest.raises(dc.DerpClientError):
        async with dc.connect(url(server), stranger, **connect_opts(server, ca)) as s:
            await assert_relays(s, s)
    _, text = await fetch(metrics_url(server), "/metrics")
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                           text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    assert 'derper_admission_results_total{result="allowed"} 1.0' in text
    assert 'derper_admission_results_total{result="rejected"} 1.0' in text
    assert 'derper_limit_rejections_total{limit="max_clients"} 0.0' in text
    assert "derp_rate_limit_per_client_bytes_per_second 250000.0" in text
    # varz: Go's rate-limit names appear with -rate-config, as in Go.
    _, varz_text = await fetch(f"http://127.0.0.1:{server.main_port}", "/debug/varz")
    assert "derp_rate_limit_per_client_bytes_per_second 250000\n" in varz_text
    assert "derp_rate_limit_per_client_burst_bytes 65568\n" in varz_text
    assert "# TYPE derp_rate_limit_per_client_waited counter\n" in varz_text
    assert "admission" not in varz_text  # not one of Go's names
