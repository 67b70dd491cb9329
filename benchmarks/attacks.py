"""Attack a fresh local derper the way an attacker would, with a canary pair watching.

Each attack runs against its own derper (TLS, a self-signed pinned certificate, on loopback)
while two legitimate clients relay a stamped packet every 10 ms and a fresh client connects
every half second. Reported per attack: canary delivery and latency, the slowest new connect,
the server's log lines during the attack, and its RSS and open files before and after (once it
has settled). Targets (exit status 1 when one is missed): no canary loss, canary p99 < 50 ms,
new clients in < 1 s, at most a few log lines per second whatever the attacker does, RSS
within 10 % and open files back to baseline afterwards.

    python benchmarks/attacks.py                   # every attack, 5 s each
    python benchmarks/attacks.py --only slowloris,sighup --seconds 10
    python benchmarks/attacks.py --smoke           # 1 s each: the harness works (no targets)

Only loopback is attacked (127.0.0.0/8: the "50 addresses" are 127.0.0.2-51).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import signal
import socket
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runs from a bare checkout too

from derper import client as dc  # noqa: E402
from derper.cli.bench import StartedServer, free_port  # noqa: E402
from derper.metrics.procstat import rss_bytes  # noqa: E402
from derper.net.dial import pinned_context  # noqa: E402
from derper.proto import wire  # noqa: E402
from derper.proto.keys import KeyPair, public_text  # noqa: E402
from derper.proto.messages import ReceivedPacket  # noqa: E402
from stun.message import tailscale_request  # noqa: E402

CANARY_PERIOD = 0.01
CONNECT_PERIOD = 0.5
SETTLE = 2.0
SETTLE_MEMORY = 11.0  # derper returns freed memory every 10 s (derper/memory.py)
MAX_HANDSHAKES = 100  # the cap attacked (the default is 1024; the ratio is what matters)
TARGET_P99_MS, TARGET_CONNECT_S, TARGET_LOG_PER_S = 50.0, 1.0, 5.0
# What the log throttle lets through at once before its per-kind rate applies: the connect and
# disconnect lines' burst (derper/relay/session.py CONNECT_LOG_BURST) and a few other kinds.
LOG_BURSTS = 2 * 200 + 20
UPGRADE = b"GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n\r\n"


@dataclass
class Target:
    """The derper under attack: where it listens and what the attacks noted about it."""

    server: Target
    port: int
    stun_port: int | None
    extra: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def pin(self) -> str:
        return self.server.pin

    @property
    def pid(self) -> int:
        return self.server.proc.pid


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# ---- the canary -------------------------------------------------------------------------------

class Canary:
    """A relaying pair and a connecting newcomer, in a process of their own (so the attacker's
    own scheduling does not show up as relay latency), measured while an attack runs."""

    def __init__(self, url: str, pin: str, keys: list[bytes]) -> None:
        self.url, self.pin = url, pin
        self.keys = [KeyPair(k) for k in keys]
        self.sent = 0
        self.latencies: list[float] = []
        self.connects: list[float] = []
        self.connect_failures = 0

    def connect(self, key: KeyPair, timeout: float = 5.0):
        return dc.connect(self.url, key, cert_pin=self.pin, timeout=timeout)

    async def run(self, stop) -> None:
        a_key, b_key, newcomer = self.keys
        async with self.connect(a_key) as a, self.connect(b_key) as b:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._receive, b)
                nursery.start_soon(self._newcomers, stop, newcomer)
                next_at = trio.current_time()
                while not stop.is_set():
                    await a.send(b.public_key, struct.pack("!d", trio.current_time()))
                    self.sent += 1
                    next_at += CANARY_PERIOD
                    await trio.sleep_until(next_at)
                await trio.sleep(0.5)  # the last ones in flight
                nursery.cancel_scope.cancel()

    async def _receive(self, b: dc.DerpClient) -> None:
        while True:
            m = await b.recv()
            if isinstance(m, ReceivedPacket) and len(m.data) == 8:
                self.latencies.append(trio.current_time() - struct.unpack("!d", m.data)[0])

    async def _newcomers(self, stop, key: KeyPair) -> None:
        while not stop.is_set():
            start = trio.current_time()
            try:
                async with self.connect(key, timeout=3.0):
                    self.connects.append(trio.current_time() - start)
            except dc.DerpClientError:
                self.connect_failures += 1
            await trio.sleep(CONNECT_PERIOD)

    def summary(self) -> dict:
        ms = sorted(x * 1000 for x in self.latencies)
        return {"sent": self.sent, "delivered": len(ms),
                "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 2) if ms else None,
                "max_ms": round(ms[-1], 2) if ms else None,
                "connect_max_s": round(max(self.connects), 3) if self.connects else None,
                "connect_failures": self.connect_failures}


def canary_process(url: str, pin: str, keys: list[bytes], ready, stop, results) -> None:
    canary = Canary(url, pin, keys)

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(canary.run, stop)
            await trio.sleep(0.3)
            ready.set()
    trio.run(main)
    results.put(canary.summary())


# ---- the attacks ------------------------------------------------------------------------------

async def _tcp(server: Target, source: str = "127.0.0.2") -> trio.SocketStream:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    await sock.bind((source, 0))
    await sock.connect(("127.0.0.1", server.port))
    return trio.SocketStream(sock)


async def _slowloris(server: Target, seconds: float, sources: list[str]) -> None:
    """10x the handshake cap in sockets that send one byte every 5 s, reopened when closed."""
    per_source = 10 * MAX_HANDSHAKES // len(sources)
    deadline = trio.current_time() + seconds

    async def one(source: str) -> None:
        while trio.current_time() < deadline:
            try:
                s = await _tcp(server, source)
            except OSError:
                await trio.sleep(0.05)
                continue
            try:
                while trio.current_time() < deadline:
                    await s.send_all(b"\x16")
                    with trio.move_on_after(5):
                        if not await s.receive_some(1):
                            break  # closed by the server: reopen
            except (trio.BrokenResourceError, OSError):
                pass
            finally:
                s.socket.close()

    async with trio.open_nursery() as nursery:
        for source in sources:
            for _ in range(per_source):
                nursery.start_soon(one, source)


async def slowloris(server, seconds):
    await _slowloris(server, seconds, ["127.0.0.2"])  # the canary connects from 127.0.0.1


async def slowloris_50(server, seconds):
    await _slowloris(server, seconds, [f"127.0.0.{i}" for i in range(2, 52)])


async def tcp_flood(server, seconds):
    """Raw connects that never speak, as fast as they go, closed when the server closes them."""
    deadline = trio.current_time() + seconds
    held: list[trio.SocketStream] = []
    while trio.current_time() < deadline and len(held) < 5000:
        try:
            held.append(await _tcp(server))
        except OSError:
            await trio.sleep(0.01)
    await trio.sleep_until(deadline)
    for s in held:
        s.socket.close()


async def sighup_storm(server, seconds):
    deadline = time.monotonic() + seconds

    def storm():
        for _ in range(2000):
            if time.monotonic() > deadline:
                return
            os.kill(server.pid, signal.SIGHUP)

    async with trio.open_nursery() as nursery:
        for _ in range(2):
            nursery.start_soon(trio.to_thread.run_sync, storm)


async def _over_tls(server, payload: bytes) -> None:
    """One connection that sends ``payload`` over TLS and reads until the server closes it."""
    try:
        s = await _tcp(server)
        tls = trio.SSLStream(s, pinned_context(), server_hostname="127.0.0.1")
        await tls.send_all(payload)
        with trio.move_on_after(2):
            while await tls.receive_some():
                pass
        await tls.aclose()
    except (OSError, trio.BrokenResourceError):
        pass


async def _waves(seconds: float, attempt, *args, width: int = 50) -> None:
    """``attempt(*args)`` ``width`` at a time, wave after wave, for ``seconds``."""
    deadline = trio.current_time() + seconds
    while trio.current_time() < deadline:
        async with trio.open_nursery() as nursery:
            for _ in range(width):
                nursery.start_soon(attempt, *args)


async def connect_flood(server, seconds):
    await _waves(seconds, _over_tls, server, b"CONNECT x:22 HTTP/1.1\r\nHost: x\r\n\r\n")


async def protocol_errors(server, seconds):
    """A valid handshake, then a frame that breaks the protocol, over and over."""
    await _waves(seconds, _bad_session, server)


async def _bad_session(server):
    try:
        async with dc.connect(server.url, cert_pin=server.pin, timeout=3) as c:
            await c.send_raw(wire.frame(wire.FrameType.NOTE_PREFERRED))  # must carry one byte
            with trio.move_on_after(2):
                while True:
                    await c.recv()
    except dc.DerpClientError:
        pass


async def rejected_keys(server, seconds):
    """Fresh random keys against an allowlist: every one rejected."""
    async def one():
        try:
            async with dc.connect(server.url, cert_pin=server.pin, timeout=3):
                pass
        except dc.DerpClientError:
            pass

    await _waves(seconds, one)


async def many_sessions(server, seconds):
    """Thousands of idle DERP sessions, then all closed at once."""
    count = 3000
    async with trio.open_nursery() as nursery:
        stop = trio.Event()
        ready = trio.Semaphore(0)

        async def hold():
            try:
                async with dc.connect(server.url, cert_pin=server.pin, timeout=10):
                    ready.release()
                    await stop.wait()
            except dc.DerpClientError:
                ready.release()

        limiter = trio.CapacityLimiter(64)

        async def start_one():
            async with limiter:
                nursery.start_soon(hold)
                await ready.acquire()

        with trio.move_on_after(seconds):
            async with trio.open_nursery() as starters:
                for _ in range(count):
                    starters.start_soon(start_one)
        stop.set()  # every session closes at once


async def stun_unknown_attribute(server, seconds):
    """24-byte requests with one unknown comprehension-required attribute (a 420 each)."""
    request = (b"\x00\x01\x00\x04" + b"\x21\x12\xa4\x42" + os.urandom(12)
               + b"\x00\x33\x00\x00")
    await _stun_flood(server, seconds, request)


async def stun_tailscale(server, seconds):
    await _stun_flood(server, seconds, tailscale_request(os.urandom(12)))


async def _stun_flood(server, seconds, request: bytes) -> None:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    sent = received = got = 0
    deadline = trio.current_time() + seconds
    async with trio.open_nursery() as nursery:
        async def receive():
            nonlocal received, got
            while True:
                data = await sock.recv(2048)
                received += 1
                got += len(data)
        nursery.start_soon(receive)
        while trio.current_time() < deadline and sent < 200_000:
            await sock.sendto(request, ("127.0.0.1", server.stun_port))
            sent += 1
            if sent % 100 == 0:
                await trio.sleep(0.001)
        await trio.sleep(0.2)
        nursery.cancel_scope.cancel()
    sock.close()
    server.extra["stun_amplification"] = round(got / max(1, received) / len(request), 3)


async def malformed_frames(server, seconds):
    """An upgrade, then a ClientInfo too short to open."""
    await _waves(seconds, _over_tls, server, UPGRADE + wire.header(0x02, 8) + os.urandom(8))


async def tls_garbage(server, seconds):
    await _waves(seconds, _garbage_once, server)


async def _garbage_once(server):
    try:
        s = await _tcp(server)
        await s.send_all(os.urandom(512))
        with trio.move_on_after(1):
            while await s.receive_some():
                pass
        s.socket.close()
    except (OSError, trio.BrokenResourceError):
        pass


async def duplicate_keys(server, seconds):
    """One key connected and reconnected from many sockets at once."""
    key = KeyPair.generate()

    async def one():
        try:
            async with dc.connect(server.url, key, cert_pin=server.pin, timeout=3) as c:
                await c.send(key.public, b"x")
        except dc.DerpClientError:
            pass

    await _waves(seconds, one, width=30)


async def slow_receivers(server, seconds):
    """Receivers that never read, flooded by a sender: only their own packets are lost."""
    async with dc.connect(server.url, cert_pin=server.pin) as tx:
        receivers = []
        async with trio.open_nursery() as nursery:
            stop = trio.Event()

            async def lazy():
                async with dc.connect(server.url, cert_pin=server.pin) as rx:
                    receivers.append(rx)
                    await stop.wait()
            for _ in range(5):
                nursery.start_soon(lazy)
            while len(receivers) < 5:
                await trio.sleep(0.01)
            deadline = trio.current_time() + seconds
            packet = bytes(1200)
            while trio.current_time() < deadline:
                await tx.send_many([(rx.public_key, packet) for rx in receivers] * 10)
                await trio.sleep(0)
            stop.set()


ATTACKS = {
    "slowloris": (slowloris, []),
    "slowloris_50_addresses": (slowloris_50, []),
    "tcp_flood": (tcp_flood, []),
    "sighup_storm": (sighup_storm, []),
    "connect_flood": (connect_flood, []),
    "protocol_errors": (protocol_errors, []),
    "rejected_random_keys": (rejected_keys, ["allowlist"]),
    "many_sessions": (many_sessions, []),
    "stun_unknown_attribute": (stun_unknown_attribute, ["stun"]),
    "stun_tailscale": (stun_tailscale, ["stun"]),
    "malformed_frames": (malformed_frames, []),
    "tls_garbage": (tls_garbage, []),
    "duplicate_keys": (duplicate_keys, []),
    "slow_receivers": (slow_receivers, []),
}


# ---- running ----------------------------------------------------------------------------------

def start(needs: list[str], canary_keys, workdir: Path) -> Target:
    extra = ["-max-handshakes", str(MAX_HANDSHAKES)]
    if "allowlist" in needs:
        path = workdir / "allowed-keys"
        path.write_text("".join(public_text(k.public) + "\n" for k in canary_keys))
        extra += ["-allow-keys", str(path)]
    stun_port = None
    if "stun" in needs:
        stun_port = free_port(socket.SOCK_DGRAM)
        extra += ["-stun=true", "-stun-port", str(stun_port)]
    server = StartedServer(extra)
    return Target(server, int(server.url.rsplit(":", 1)[1].split("/")[0]), stun_port)


async def run_one(name: str, seconds: float, workdir: Path, settle_memory: float) -> dict:
    attack, needs = ATTACKS[name]
    keys = [KeyPair.generate() for _ in range(3)]  # the relaying pair and the newcomer
    target = start(needs, keys, workdir)
    server = target.server
    spawn = multiprocessing.get_context("spawn")
    ready, stop, results = spawn.Event(), spawn.Event(), spawn.Queue()
    try:
        pid = target.pid
        await trio.sleep(0.5)
        rss0, fds0, lines0 = rss_bytes(pid), open_files(pid), server.log().count("\n")
        canary = spawn.Process(target=canary_process, args=(
            target.url, target.pin, [k.private for k in keys], ready, stop, results))
        canary.start()
        await trio.to_thread.run_sync(ready.wait, 30)
        t0 = trio.current_time()
        await attack(target, seconds)
        took = trio.current_time() - t0
        lines = server.log().count("\n") - lines0
        await trio.sleep(SETTLE)
        stop.set()
        summary = await trio.to_thread.run_sync(results.get, True, 30)
        await trio.to_thread.run_sync(canary.join, 10)
        await trio.sleep(settle_memory)  # closed connections gone, freed memory returned
        alive = server.proc.poll() is None
        rss1 = rss_bytes(pid) if alive else None
        fds1 = open_files(pid) if alive else None
    finally:
        server.close()
    return {"attack": name, "alive": alive, **summary, "seconds": round(took, 1),
            "log_lines": lines, "rss_mb": [round(rss0 / 1e6, 1), rss1 and round(rss1 / 1e6, 1)],
            "fds": [fds0, fds1], **target.extra}


def missed(row: dict) -> list[str]:
    out = []
    if not row["alive"]:
        return ["the server died"]
    if row["delivered"] < row["sent"]:
        out.append(f"canary lost {row['sent'] - row['delivered']} of {row['sent']}")
    if row["p99_ms"] is None or row["p99_ms"] >= TARGET_P99_MS:
        out.append(f"canary p99 {row['p99_ms']} ms")
    if row["connect_failures"] or (row["connect_max_s"] or 0) >= TARGET_CONNECT_S:
        out.append(f"new clients: {row['connect_failures']} failed, slowest "
                   f"{row['connect_max_s']} s")
    if row["log_lines"] > LOG_BURSTS + TARGET_LOG_PER_S * row["seconds"]:
        out.append(f"{row['log_lines']} log lines in {row['seconds']} s")
    (rss0, rss1), (fds0, fds1) = row["rss_mb"], row["fds"]
    if rss1 > rss0 * 1.10:
        out.append(f"RSS {rss0} -> {rss1} MB")
    if fds1 > fds0:
        out.append(f"open files {fds0} -> {fds1}")
    if row.get("stun_amplification", 0) > 1.0:
        out.append(f"STUN reply/request {row['stun_amplification']}")
    return out


def show(rows: list[dict]) -> None:
    print(f"{'attack':<24}{'canary':>11}{'p99 ms':>8}{'max ms':>8}{'connect s':>10}"
          f"{'log lines':>10}{'RSS MB':>13}{'fds':>11}  verdict")
    for r in rows:
        verdict = "; ".join(r["missed"]) or "held"
        rss = f"{r['rss_mb'][0]}->{r['rss_mb'][1]}"
        fds = f"{r['fds'][0]}->{r['fds'][1]}"
        print(f"{r['attack']:<24}{r['delivered']:>5}/{r['sent']:<5}{str(r['p99_ms']):>8}"
              f"{str(r['max_ms']):>8}{str(r['connect_max_s']):>10}{r['log_lines']:>10}"
              f"{rss:>13}{fds:>11}  {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated attacks: "
                        + ", ".join(ATTACKS))
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each attack")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--smoke", action="store_true", help="1 s each; targets not enforced")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(ATTACKS)
    unknown = [n for n in names if n not in ATTACKS]
    if unknown:
        parser.error(f"unknown attack(s): {', '.join(unknown)}")
    if args.smoke:
        args.seconds = 1.0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the attacker needs many sockets
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            row = trio.run(run_one, name, args.seconds, Path(tmp),
                           SETTLE if args.smoke else SETTLE_MEMORY)
            row["missed"] = missed(row)
            rows.append(row)
    show(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    sys.exit(1 if any(r["missed"] for r in rows) and not args.smoke else 0)


if __name__ == "__main__":
    main()
