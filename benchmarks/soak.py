"""Soak a fresh local derper with mixed load and fail if anything grows.

For ``--seconds`` (default 600): a relaying pair (200 packets/s each way), a client connecting
and leaving 20 times a second, 50 STUN requests a second, a /metrics scrape every second and a
SIGHUP reload every 5 s. Every second it samples the server's RSS and open files (/proc), and
its trio tasks and event-loop lag (/metrics). After the first quarter (warm-up) it checks:
RSS does not drift (the medians of ten windows stay within +-10 % of the first; judged on runs
of 5 minutes or more), open files and tasks do not grow, nothing was lost.

    python benchmarks/soak.py --seconds 3600 --json soak.json   # the README's one-hour figures
    python benchmarks/soak.py --smoke                            # 12 s: the harness works
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runs from a bare checkout too

from derper import client as dc  # noqa: E402
from derper.cli.bench import StartedServer, free_port  # noqa: E402
from derper.http.client import request  # noqa: E402
from derper.metrics.procstat import rss_bytes  # noqa: E402
from derper.proto.messages import ReceivedPacket  # noqa: E402
from stun.message import tailscale_request  # noqa: E402

RSS_BAND = 0.10
MIN_SECONDS_FOR_DRIFT = 300  # shorter runs are still warming up: only the other checks apply
FD_SLACK = 2  # a connection being torn down as the sample is taken
TASK_SLACK = 6  # the churning client's two tasks, and a scrape in flight


class Soak:
    def __init__(self, server: StartedServer, stun_port: int, metrics_port: int) -> None:
        self.server, self.stun_port, self.metrics_port = server, stun_port, metrics_port
        self.sent = self.received = self.churned = self.churn_failures = 0
        self.stun_sent = self.stun_answered = 0
        self.samples: list[dict] = []

    def connect(self, timeout: float = 5.0):
        return dc.connect(self.server.url, cert_pin=self.server.pin, timeout=timeout)

    async def relay(self, stop: trio.Event) -> None:
        async with self.connect() as a, self.connect() as b:
            async with trio.open_nursery() as nursery:
                for rx in (a, b):
                    nursery.start_soon(self._receive, rx)
                packet = bytes(1000)
                while not stop.is_set():
                    await a.send(b.public_key, packet)
                    await b.send(a.public_key, packet)
                    self.sent += 2
                    await trio.sleep(1 / 200)
                await trio.sleep(1.0)
                nursery.cancel_scope.cancel()

    async def _receive(self, client: dc.DerpClient) -> None:
        while True:
            if isinstance(await client.recv(), ReceivedPacket):
                self.received += 1

    async def churn(self, stop: trio.Event) -> None:
        while not stop.is_set():
            try:
                async with self.connect(timeout=3) as c:
                    await c.send(c.public_key, b"hello")
                self.churned += 1
            except dc.DerpClientError:
                self.churn_failures += 1
            await trio.sleep(0.05)

    async def stun(self, stop: trio.Event) -> None:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await sock.bind(("127.0.0.1", 0))
        async with trio.open_nursery() as nursery:
            async def answers():
                while True:
                    await sock.recv(2048)
                    self.stun_answered += 1
            nursery.start_soon(answers)
            while not stop.is_set():
                await sock.sendto(tailscale_request(os.urandom(12)), ("127.0.0.1", self.stun_port))
                self.stun_sent += 1
                await trio.sleep(1 / 50)
            await trio.sleep(0.5)
            nursery.cancel_scope.cancel()
        sock.close()

    async def reloads(self, stop: trio.Event) -> None:
        while not stop.is_set():
            await trio.sleep(5)
            os.kill(self.server.proc.pid, signal.SIGHUP)

    async def scrape(self) -> dict:
        reply = await request("GET", f"http://127.0.0.1:{self.metrics_port}/metrics",
                              max_body=1 << 20)
        text = reply.body.decode()

        def value(name: str) -> float:
            m = re.search(rf"^{name} (\S+)$", text, re.M)
            return float(m.group(1)) if m else float("nan")
        return {"tasks": value("derper_tasks"),
                "loop_lag_ms": round(1000 * value("derper_event_loop_lag_seconds"), 2)}

    async def sample(self, stop: trio.Event) -> None:
        pid = self.server.proc.pid
        start = trio.current_time()
        while not stop.is_set():
            with trio.move_on_after(2):
                scraped = await self.scrape()
                self.samples.append({"t": round(trio.current_time() - start, 1),
                                     "rss_mb": round(rss_bytes(pid) / 1e6, 2),
                                     "fds": len(os.listdir(f"/proc/{pid}/fd")), **scraped})
            await trio.sleep(1)


async def run(seconds: float) -> dict:
    stun_port, metrics_port = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_STREAM)
    server = StartedServer(["-stun=true", "-stun-port", str(stun_port),
                            "-metrics-addr", f"127.0.0.1:{metrics_port}"])
    try:
        soak = Soak(server, stun_port, metrics_port)
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            for job in (soak.relay, soak.churn, soak.stun, soak.reloads, soak.sample):
                nursery.start_soon(job, stop)
            await trio.sleep(seconds)
            stop.set()
        alive = server.proc.poll() is None
        log = server.log()
    finally:
        server.close()
    return report(soak, seconds, alive, log)


def window_medians(rss: list[float]) -> list[float]:
    """RSS medians over ten windows: the collector and ``malloc_trim`` make RSS a sawtooth
    of +-15 % within seconds, so growth shows in the medians, not in single samples."""
    size = max(1, len(rss) // 10)
    return [statistics.median(rss[i:i + size]) for i in range(0, len(rss) - size + 1, size)]


def rss_drift(rss: list[float]) -> list[float]:
    """The window medians if any leaves +-10 % of the first (after warm-up); else []."""
    medians = window_medians(rss)
    first = medians[0]
    if all(abs(m - first) <= RSS_BAND * first for m in medians):
        return []
    return [round(m, 1) for m in medians]


def report(soak: Soak, seconds: float, alive: bool, log: str) -> dict:
    after = soak.samples[len(soak.samples) // 4:] or soak.samples
    rss = [s["rss_mb"] for s in after]
    lags = sorted(s["loop_lag_ms"] for s in soak.samples)
    problems = []
    if not alive:
        problems.append("the server died")
    median = statistics.median(rss)
    drift = rss_drift(rss) if seconds >= MIN_SECONDS_FOR_DRIFT else []
    if drift:
        problems.append(f"RSS drifted out of +-10 %: window medians {drift} MB")
    if after[-1]["fds"] > after[0]["fds"] + FD_SLACK:
        problems.append(f"open files grew {after[0]['fds']} -> {after[-1]['fds']}")
    if after[-1]["tasks"] > after[0]["tasks"] + TASK_SLACK:
        problems.append(f"tasks grew {after[0]['tasks']} -> {after[-1]['tasks']}")
    if soak.received < soak.sent:
        problems.append(f"relay lost {soak.sent - soak.received} of {soak.sent}")
    if soak.churn_failures:
        problems.append(f"{soak.churn_failures} churning connects failed")
    if "Traceback" in log or "level=error" in log:
        problems.append("errors in the server log")
    return {"seconds": seconds, "relayed": [soak.sent, soak.received],
            "churned": soak.churned, "stun": [soak.stun_sent, soak.stun_answered],
            "rss_mb": {"first": soak.samples[0]["rss_mb"], "median_after_warmup": median,
                       "min": min(rss), "max": max(rss), "last": rss[-1],
                       "window_medians": [round(m, 1) for m in window_medians(rss)]},
            "fds": [after[0]["fds"], after[-1]["fds"]],
            "tasks": [after[0]["tasks"], after[-1]["tasks"]],
            "loop_lag_ms": {"median": lags[len(lags) // 2], "max": lags[-1]},
            "samples": soak.samples, "problems": problems}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="12 s")
    args = parser.parse_args()
    if args.smoke:
        args.seconds = 12.0
    result = trio.run(run, args.seconds)
    shown = {k: v for k, v in result.items() if k != "samples"}
    print(json.dumps(shown, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    sys.exit(1 if result["problems"] else 0)


if __name__ == "__main__":
    main()
