"""-workers 2: real processes on loopback, sharing the ports, relaying to each other's clients."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import urllib.request
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest
import trio

from derper import client as dc
from derper.proto.keys import KeyPair, public_text
from derper.proto.messages import ReceivedPacket, RestartingMessage
from tests.process import DerperProcess, derper, free_port, notified_derper
from tests.relay_helpers import recv_kind

READY = 'msg="derper listening" workers='
CLIENTS = 16  # both workers get some: all on one has a chance of 2 in 65,536


class Host:
    """A ``derper -dev -workers 2`` process tree and the ports it listens on."""

    def __init__(self, proc: DerperProcess, port: int, metrics_port: int) -> None:
        self.proc, self.port, self.metrics_port = proc, port, metrics_port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/derp"

    @property
    def worker_pids(self) -> list[int]:
        m = re.search(r"workers=2 .*pids=(\d+),(\d+)", self.proc.log)
        return [int(m.group(1)), int(m.group(2))]

    async def worker_of(self, key: bytes) -> int:
        """Which worker took the client with ``key`` (its connect line says so)."""
        pattern = re.compile(rf'client connected" key={public_text(key)} .*worker=(\d)')
        with trio.fail_after(10):
            while not (m := pattern.search(self.proc.log)):
                await trio.sleep(0.02)
        return int(m.group(1))

    async def settled(self, *names: str) -> dict[str, float]:
        """These metrics once two scrapes a snapshot period apart agree (traffic has stopped
        and every worker's snapshot shows it)."""
        with trio.fail_after(15):
            while True:
                first = {name: await self.metric(name) for name in names}
                await trio.sleep(1.2)
                if first == {name: await self.metric(name) for name in names}:
                    return first

    def scrape(self, path: str = "/metrics", port: int | None = None) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port or self.metrics_port}{path}",
                                    timeout=5) as r:
            return r.read().decode()

    async def metric(self, line_start: str) -> float:
        text = await trio.to_thread.run_sync(self.scrape)
        for line in text.splitlines():
            if line.startswith(line_start + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


@asynccontextmanager
async def host(tmp_path: Path, *flags: str):
    port, metrics_port = free_port(), free_port()
    args = ["-dev", "-a", f"127.0.0.1:{port}", "-workers", "2", "-stun-port", "-1",
            "-metrics-addr", f"127.0.0.1:{metrics_port}", *flags]
    async with derper(args, tmp_path, ready=READY) as proc:
        yield Host(proc, port, metrics_port)


async def clients_on_both(stack: AsyncExitStack, h: Host, n: int = CLIENTS):
    """At least ``n`` clients and the worker each landed on: more until both workers have
    some (the kernel's hash decides; 64 all on one would be a broken spread). Returns once
    each worker knows the other's clients (two packets relayed, or more if one missed)."""
    clients, workers = [], []
    while len(clients) < n or set(workers) != {0, 1}:
        assert len(clients) < 64, f"every client on one worker: {workers}"
        c = await stack.enter_async_context(dc.connect(h.url, KeyPair.generate()))
        clients.append(c)
        workers.append(await h.worker_of(c.public_key))
    for w in (0, 1):  # the other worker knows w's newest, so all of w's
        newest = clients[len(workers) - 1 - workers[::-1].index(w)]
        await delivered(clients[workers.index(1 - w)], newest, b"barrier")
    return clients, workers


async def delivered(src: dc.DerpClient, dst: dc.DerpClient, payload: bytes) -> None:
    """Send until ``dst`` gets it: a packet sent the moment ``dst`` connects may reach the
    other worker before the link has told it of ``dst`` (an unknown key drops, as in Go's
    mesh)."""
    with trio.fail_after(10):
        while True:
            await src.send(dst.public_key, payload)
            with trio.move_on_after(2):
                if (await recv_kind(dst, ReceivedPacket)).data == payload:
                    return


async def test_clients_on_different_workers_relay_to_each_other_and_metrics_add_up(tmp_path):
    async with host(tmp_path) as h, AsyncExitStack() as stack:
        clients, workers = await clients_on_both(stack, h)
        counted = ("derp_packets_received_total", "derp_packets_sent_total",
                   'derper_worker_packets_total{direction="out"}',
                   'derper_worker_packets_total{direction="in"}')
        base = await h.settled(*counted)  # the barrier's packets
        n = len(clients)
        crossing = 0
        for i, c in enumerate(clients):  # a ring: each sends to the next
            dst = clients[(i + 1) % n]
            await c.send(dst.public_key, b"ring %d" % i)
            crossing += workers[i] != workers[(i + 1) % n]
        for i, c in enumerate(clients):
            m = await recv_kind(c, ReceivedPacket)
            assert m.data == b"ring %d" % ((i - 1) % n)
            assert m.source == clients[(i - 1) % n].public_key
        assert crossing > 0
        # One /metrics for the host: every worker's counts, summed exactly.
        expected = dict(zip(counted, (n, n, crossing, crossing)))
        with trio.fail_after(10):
            while [await h.metric(name) for name in counted] != \
                    [base[name] + expected[name] for name in counted]:
                await trio.sleep(0.2)
        assert await h.metric("derp_clients_local") >= n  # (+ each worker's sibling link)
        assert await h.metric("derp_clients_remote") == 0  # the other worker is this host
        assert await h.metric("derper_workers_reporting") == 2
        for w in (0, 1):
            assert await h.metric(f'derper_worker_connections{{worker="{w}"}}') >= \
                workers.count(w)
        # So does the status page (worker 0 serves it).
        packets_in = base["derp_packets_received_total"] + n
        with trio.fail_after(10):
            while True:
                status = json.loads(await trio.to_thread.run_sync(h.scrape, "/status.json"))
                if status["traffic"]["packets_in_total"] == packets_in:
                    break
                await trio.sleep(0.2)
        assert status["traffic"]["packets_out_total"] == base["derp_packets_sent_total"] + n
        assert status["clients"]["local"] >= n
        # /debug/varz on the DERP port, whichever worker answers, sums the host too.
        with trio.fail_after(10):
            while (f"derp_packets_received {packets_in:.0f}\n"
                   not in await trio.to_thread.run_sync(h.scrape, "/debug/varz", h.port)):
                await trio.sleep(0.2)


async def test_duplicate_key_across_workers_last_writer_wins(tmp_path):
    async with host(tmp_path) as h, AsyncExitStack() as stack:
        sender = await stack.enter_async_context(dc.connect(h.url, KeyPair.generate()))
        me = KeyPair.generate()
        first = await stack.enter_async_context(dc.connect(h.url, me))
        first_worker = await h.worker_of(me.public)
        for _ in range(40):  # the same key again until it lands on the other worker
            second = await stack.enter_async_context(dc.connect(h.url, me))
            with trio.fail_after(10):
                while h.proc.log.count(f"key={public_text(me.public)}") < 2 + _:
                    await trio.sleep(0.02)
            line = [ln for ln in h.proc.log.splitlines()
                    if "client connected" in ln and public_text(me.public) in ln][-1]
            if f"worker={1 - first_worker}" in line:
                break
        else:
            pytest.fail("the second connection never reached the other worker")
        await trio.sleep(0.3)  # the other worker hears of it over the link
        await sender.send(me.public, b"to the newest")
        assert (await recv_kind(second, ReceivedPacket)).data == b"to the newest"
        await first.send(sender.public_key, b"I write")  # the first one writes: it wins again
        assert (await recv_kind(sender, ReceivedPacket)).data == b"I write"
        await trio.sleep(0.3)
        await sender.send(me.public, b"to the last writer")
        assert (await recv_kind(first, ReceivedPacket)).data == b"to the last writer"


async def test_kill_9_one_worker_others_keep_relaying_and_it_comes_back(tmp_path):
    async with host(tmp_path) as h, AsyncExitStack() as stack:
        clients, workers = await clients_on_both(stack, h)
        victim = 0
        survivors = [c for c, w in zip(clients, workers) if w != victim]
        assert len(survivors) >= 2
        a, b = survivors[0], survivors[1]
        received: list[int] = []

        async def receive():
            while True:
                m = await b.recv()
                if isinstance(m, ReceivedPacket):
                    received.append(int(m.data))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            for seq in range(400):  # 2 s of packets, the kill in the middle
                if seq == 100:
                    os.kill(h.worker_pids[victim], signal.SIGKILL)
                await a.send(b.public_key, b"%d" % seq)
                await trio.sleep(0.005)
            with trio.move_on_after(5):
                while len(received) < 400:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        assert received == list(range(400))  # the other worker's clients lost nothing
        await h.proc.wait_for_log("worker died; restarting it")
        await h.proc.wait_for_log('msg="derper listening"', timeout=15)
        # Its clients come back with their keys, whichever worker takes them, and relay again.
        with trio.fail_after(20):
            while h.proc.log.count('msg="derper listening"') < 4:  # 2 workers, host, restart
                await trio.sleep(0.05)
        for c in [c for c, w in zip(clients, workers) if w == victim]:
            back = await stack.enter_async_context(dc.connect(h.url, c.keypair))
            await back.send(b.public_key, b"back")
            with trio.fail_after(10):
                while True:
                    m = await b.recv()
                    if isinstance(m, ReceivedPacket) and m.data == b"back":
                        break
            assert m.source == c.public_key


async def test_sigterm_tells_every_client_and_stops_every_process(tmp_path):
    async with host(tmp_path) as h, AsyncExitStack() as stack:
        clients, _ = await clients_on_both(stack, h, 8)
        pids = h.worker_pids
        h.proc.signal(signal.SIGTERM)
        for c in clients:
            with trio.fail_after(10):
                while not isinstance(await c.recv(), RestartingMessage):
                    pass
        assert await h.proc.wait(15) == 0
        for pid in pids:
            assert not Path(f"/proc/{pid}").exists() or _zombie(pid)


async def test_the_supervisor_dying_takes_the_workers_with_it(tmp_path):
    async with host(tmp_path) as h:
        pids = h.worker_pids
        h.proc.signal(signal.SIGKILL)
        with trio.fail_after(15):
            while any(Path(f"/proc/{pid}").exists() and not _zombie(pid) for pid in pids):
                await trio.sleep(0.05)


async def test_stun_is_answered_by_both_workers(tmp_path):
    port, metrics_port, stun_port = free_port(), free_port(), free_port(socket.SOCK_DGRAM)
    args = ["-dev", "-a", f"127.0.0.1:{port}", "-workers", "2", "-stun-port", str(stun_port),
            "-metrics-addr", f"127.0.0.1:{metrics_port}"]
    from stun.message import respond, tailscale_request
    async with derper(args, tmp_path, ready=READY) as proc:
        h = Host(proc, port, metrics_port)
        for _ in range(32):  # one socket each: the kernel spreads them by address
            with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                await sock.bind(("127.0.0.1", 0))
                request = tailscale_request(os.urandom(12))
                await sock.sendto(request, ("127.0.0.1", stun_port))
                with trio.fail_after(5):
                    reply, _ = await sock.recvfrom(1500)
                assert reply == respond(request, "127.0.0.1", sock.getsockname()[1])[0]
        with trio.fail_after(10):
            while sum([await h.metric(f'derper_worker_stun_requests_total{{worker="{w}"}}')
                       for w in (0, 1)]) < 32:
                await trio.sleep(0.2)
        for w in (0, 1):
            assert await h.metric(f'derper_worker_stun_requests_total{{worker="{w}"}}') > 0


def test_one_worker_is_one_process(tmp_path):
    """-workers 1 (the default) runs as before: no supervisor, no children."""
    async def main():
        port = free_port()
        async with derper(["-dev", "-a", f"127.0.0.1:{port}", "-workers", "1", "-stun-port",
                           "-1", "-metrics-addr", "off"], tmp_path) as proc:
            from derper.metrics.procstat import process_tree
            workers = []
            for pid in process_tree(proc.proc.pid)[1:]:
                try:
                    workers.append(Path(f"/proc/{pid}/cmdline").read_bytes())
                except OSError:
                    pass  # gone already
            assert not [c for c in workers if b"derper" in c]
            assert "workers=" not in proc.log
    trio.run(main)


def test_bad_workers_value_is_a_clear_error():
    from tests.process import run_derper
    result = run_derper(["-dev", "-workers", "two"])
    assert result.returncode == 1
    assert "-workers must be auto or a number from 1 to 64, not 'two'" in result.stderr


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    except OSError:
        return False


async def test_workers_host_meshes_with_another_node_as_one_node(nursery, tmp_path, ca,
                                                                 monkeypatch):
    """A region of a 2-worker host and a single node: every client reaches every other,
    whichever worker it is on; the node sees the host's clients through whichever worker its
    link reached, and each worker links to the node itself."""
    from tests.conftest import client_context, write_cert
    from tests.mesh_nodes import Node
    mesh_key = os.urandom(32)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))  # the in-process node's link
    port = free_port()
    other = Node(nursery, tmp_path, ca, mesh_key)
    await other.start(mesh_with=f"localhost:{port}/127.0.0.1")
    certdir = tmp_path / "host-certs"
    write_cert(ca, certdir, "localhost", "127.0.0.1")
    psk = tmp_path / "mesh.key"
    psk.write_text(mesh_key.hex())
    args = ["-a", f"127.0.0.1:{port}", "-hostname", "localhost", "-certmode", "manual",
            "-certdir", str(certdir), "-http-port", "-1", "-stun-port", "-1",
            "-metrics-addr", "off", "-workers", "2", "-c", str(tmp_path / "host.key"),
            "-mesh-psk-file", str(psk), "-mesh-with", other.entry]
    async with derper(args, tmp_path, ready=READY, env={"SSL_CERT_FILE": str(ca_file)}) as proc:
        h = Host(proc, port, 0)
        url = f"https://localhost:{port}/derp"
        opts = {"dial": ("127.0.0.1", port), "ssl_context": client_context(ca)}
        async with AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(dc.connect(url, KeyPair.generate(),
                                                                  **opts))
                       for _ in range(CLIENTS)]
            workers = {await h.worker_of(c.public_key) for c in clients}
            assert workers == {0, 1}
            there = await stack.enter_async_context(other.connect())
            with trio.fail_after(20):  # until the node and both workers know everyone
                while not (all(c.public_key in other.router.forwarders for c in clients)
                           and proc.log.count("mesh link up") >= 4):
                    await trio.sleep(0.05)
            await trio.sleep(0.5)
            for i, c in enumerate(clients):
                await there.send(c.public_key, b"from the node %d" % i)
                await c.send(there.public_key, b"to the node %d" % i)
            got = set()
            for i, c in enumerate(clients):
                assert (await recv_kind(c, ReceivedPacket)).data == b"from the node %d" % i
            with trio.fail_after(10):
                while len(got) < len(clients):
                    m = await recv_kind(there, ReceivedPacket)
                    got.add(m.data)
            assert got == {b"to the node %d" % i for i in range(len(clients))}


async def test_ready_once_after_both_workers_listen_and_sighup_reaches_both(tmp_path):
    args = ["-dev", "-a", f"127.0.0.1:{free_port()}", "-workers", "2", "-stun-port", "-1",
            "-metrics-addr", "off"]
    async with notified_derper(args, tmp_path) as (proc, sock):
        with trio.fail_after(20):
            assert await sock.recv(100) == b"READY=1"
        for w in (0, 1):  # ready only once every worker listens
            assert re.search(rf'msg="derper listening" .* worker={w}', proc.log)
        proc.signal(signal.SIGHUP)
        with trio.fail_after(10):
            while not all(re.search(rf"SIGHUP: reloading .* worker={w}", proc.log)
                          for w in (0, 1)):
                await trio.sleep(0.05)
        with trio.move_on_after(1):
            await sock.recv(100)
            pytest.fail("a second notification")


async def test_host_wide_limits_and_process_figures_are_the_hosts(tmp_path):
    async with host(tmp_path, "-max-clients", "4") as h, AsyncExitStack() as stack:
        admitted = refused = 0
        for _ in range(12):
            try:
                await stack.enter_async_context(dc.connect(h.url, KeyPair.generate()))
                admitted += 1
            except dc.DerpClientError as e:
                assert "503" in str(e)
                refused += 1
        assert 2 <= admitted <= 4 and refused == 12 - admitted  # 2 per worker at most
        rss = [int(line.split()[1]) * 1024 for pid in h.worker_pids
               for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmRSS:")]
        assert await h.metric("process_resident_memory_bytes") >= 0.8 * sum(rss)


async def test_the_pin_is_printed_once_for_the_host(tmp_path):
    port = free_port()
    args = ["-a", f"127.0.0.1:{port}", "-hostname", "127.0.0.1", "-certmode", "manual",
            "-certdir", str(tmp_path / "certs"), "-http-port", "-1", "-stun-port", "-1",
            "-metrics-addr", "off", "-workers", "2", "-c", str(tmp_path / "derper.key")]
    async with derper(args, tmp_path, ready=READY) as proc:
        lines = [ln for ln in proc.stdout.splitlines() if "sha256-raw:" in ln]
        assert len(lines) == 1 and '"HostName":"127.0.0.1"' in lines[0]
        import ssl

        from tests.pebble import served_leaf
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        leaves = {(await trio.to_thread.run_sync(served_leaf, port, None, ctx)).serial_number
                  for _ in range(12)}
        assert len(leaves) == 1  # both workers serve the one certificate the host made


async def test_workers_outlive_the_thread_that_started_them(tmp_path):
    """trio starts processes from a thread it retires after 10 s idle; the workers' tie to
    the supervisor must not be that thread (PR_SET_PDEATHSIG would kill them then)."""
    async with host(tmp_path) as h, AsyncExitStack() as stack:
        await trio.sleep(11)
        assert "shutting down" not in h.proc.log and "died" not in h.proc.log
        clients, _ = await clients_on_both(stack, h, 8)
        await clients[0].send(clients[-1].public_key, b"still here")
        assert (await recv_kind(clients[-1], ReceivedPacket)).data == b"still here"


START_FAILURE = """
import sys
from derper.cli.flags import build_config
from derper.proto.keys import KeyPair
from derper.server import Server
from derper.workers.supervisor import Supervisor, WorkerStartError
import trio
config = build_config(["-dev", "-a", "127.0.0.1:0", "-stun-port", "-1", "-metrics-addr",
                       "off"], {})[0]
supervisor = Supervisor(Server(config, KeyPair.generate()), 2, ["-no-such-flag"], {}, None)
try:
    trio.run(supervisor.run)
except WorkerStartError as e:
    print("start failure:", e)
"""


def test_a_worker_that_cannot_start_stops_the_host_with_a_clear_error():
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-c", START_FAILURE], capture_output=True,
                            text=True, timeout=60)
    assert "start failure: worker" in result.stdout, result.stderr[-2000:]
    assert "exited during start-up (2)" in result.stdout
    assert "flag provided but not defined: -no-such-flag" in result.stderr
