"""STUN Binding responses per second on one server core: our responder, and coturn for comparison.

Load: ``--clients`` processes pinned to the cores the server does not use, each keeping a window
of Tailscale-format requests (spec §7.2) in flight on one connected UDP socket and counting the
valid replies (Binding success, its own transaction id) during the measured seconds. The window
keeps every server busy without overflowing its socket buffer, so the figure is the server's
throughput, not its loss. The server's CPU use over the same seconds is read from /proc: near
100 % means the server, not the load generator, was the limit.

    python benchmarks/stun_bench.py                      # ours and coturn, 5 s each
    python benchmarks/stun_bench.py --target 10.0.0.1:3478  # any running server
    python benchmarks/stun_bench.py --smoke --json out.json  # ~1 s correctness run, ours only
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runs from a bare checkout too

from derper.metrics.procstat import cpu_seconds  # noqa: E402
from stun.message import tailscale_request  # noqa: E402


def _load(target: tuple[str, int], cpus: set[int], start: float, warmup: float, seconds: float,
          window: int, sockets: int = 1) -> dict[str, int]:
    """One load process: ``window`` requests in flight on each of ``sockets`` client sockets
    (one per source port: with ``-workers`` the kernel spreads them by address and port),
    valid replies counted while measuring."""
    os.sched_setaffinity(0, cpus)
    family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
    socks = []
    for _ in range(sockets):
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.connect(target)
        sock.setblocking(False)
        socks.append(sock)
    txid = os.urandom(12)
    request = tailscale_request(txid)
    buf = bytearray(2048)
    view = memoryview(buf)
    counted = invalid = refills = 0
    measure_from, stop = start + warmup, start + warmup + seconds
    time.sleep(max(0.0, start - time.monotonic()))
    for sock in socks:
        for _ in range(window):
            sock.send(request)
    now = last_reply = time.monotonic()
    while now < stop:  # busy-polls: a halted load core adds wake-up latency that caps the server
        got = 0
        for sock in socks:
            send, recv_into = sock.send, sock.recv_into
            while True:
                try:
                    n = recv_into(buf)
                except BlockingIOError:
                    break
                if n >= 32 and view[:2] == b"\x01\x01" and view[8:20] == txid:
                    got += 1
                else:
                    invalid += 1
                send(request)
        now = time.monotonic()
        if got:
            last_reply = now
            if now >= measure_from:
                counted += got
        elif now - last_reply > 0.05:  # everything in flight was lost: refill the windows
            refills += 1
            last_reply = now
            for sock in socks:
                for _ in range(window):
                    sock.send(request)
    for sock in socks:
        sock.close()
    return {"responses": counted, "invalid": invalid, "refills": refills}


def _wait_ready(target: tuple[str, int], proc: subprocess.Popen | None) -> None:
    """Probe with real requests until one is answered (bounded)."""
    family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.1)
        for _ in range(100):
            if proc is not None and proc.poll() is not None:
                raise SystemExit(f"server exited with {proc.returncode}")
            sock.sendto(tailscale_request(b"ready?ready?"), target)
            try:
                if sock.recv(2048)[8:20] == b"ready?ready?":
                    return
            except (TimeoutError, ConnectionRefusedError):
                pass
    raise SystemExit(f"no STUN answer from {target[0]}:{target[1]}")


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _server_command(kind: str, host: str, port: int, workdir: str) -> list[str]:
    if kind == "ours":
        return [sys.executable, __file__, "--serve", f"{host}:{port}"]
    turnserver = shutil.which("turnserver")
    if not turnserver:
        raise SystemExit("turnserver not found: apt-get install coturn")
    return [turnserver, "-n", "--stun-only", "--no-cli", "--no-tls", "--no-dtls", "--no-tcp",
            "--listening-ip", host, "--listening-port", str(port), "--relay-threads", "1",
            "--no-software-attribute", "--no-stdout-log", "--log-file", f"{workdir}/turn.log",
            "--simple-log", "--pidfile", f"{workdir}/turn.pid", "--userdb", f"{workdir}/turndb"]


def measure(target: tuple[str, int], *, clients: int, window: int, seconds: float,
            warmup: float, load_cpus: set[int], server: subprocess.Popen | None = None) -> dict:
    _wait_ready(target, server)
    start = time.monotonic() + 0.3
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(clients) as pool:
        job = (target, load_cpus, start, warmup, seconds, window)
        pending = pool.starmap_async(_load, [job] * clients)
        cpu = None
        if server is not None:
            time.sleep(max(0.0, start + warmup - time.monotonic()))
            before = cpu_seconds(server.pid)
            time.sleep(seconds)
            cpu = (cpu_seconds(server.pid) - before) / seconds
        results = pending.get()
    responses = sum(r["responses"] for r in results)
    return {
        "target": f"{target[0]}:{target[1]}", "clients": clients, "window": window,
        "seconds": seconds, "responses": responses,
        "responses_per_second": round(responses / seconds),
        "invalid": sum(r["invalid"] for r in results),
        "window_refills": sum(r["refills"] for r in results),
        "server_cpu": None if cpu is None else round(cpu, 3),
    }


def run_server(kind: str, host: str, server_cpu: int, **load) -> dict:
    port = _free_port(host)
    with tempfile.TemporaryDirectory() as workdir:
        proc = subprocess.Popen(_server_command(kind, host, port, workdir),
                                stdout=subprocess.DEVNULL,
                                preexec_fn=lambda: os.sched_setaffinity(0, {server_cpu}))
        try:
            result = measure((host, port), server=proc, **load)
            return {"server": kind, "server_cpu_core": server_cpu, **result}
        finally:
            proc.terminate()
            proc.wait(10)


def _serve(hostport: str) -> None:
    """The benchmark's own server process: our responder alone, no relay."""
    import trio

    from stun.server import serve_stun

    host, _, port = hostport.rpartition(":")
    trio.run(serve_stun, host, int(port))


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=_hostport,
                        help="host:port of a running server to measure instead of starting one")
    parser.add_argument("--servers", default="ours,coturn", help="servers to start: ours, coturn")
    parser.add_argument("--host", default="127.0.0.1", help="address the started servers listen on")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--clients", type=int, default=2, help="load processes")
    parser.add_argument("--window", type=int, default=32,
                        help="requests in flight per load process")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per server, alternating between servers; the median is reported")
    parser.add_argument("--server-cpu", type=int, default=0,
                        help="core the started server is pinned to")
    parser.add_argument("--json", type=Path, default=Path("stun_bench.json"))
    parser.add_argument("--smoke", action="store_true", help="~1 s correctness run of our server")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return _serve(args.serve)
    if args.smoke:
        args.servers, args.seconds, args.warmup = "ours", 0.5, 0.2
        args.clients, args.repeat = 1, 1
    all_cpus = os.sched_getaffinity(0)
    load_cpus = (all_cpus - {args.server_cpu}) or all_cpus
    load = dict(clients=args.clients, window=args.window, seconds=args.seconds, warmup=args.warmup,
                load_cpus=load_cpus)
    kinds = ["external"] if args.target else args.servers.split(",")
    runs = [{"server": "external", **measure(args.target, **load)} if args.target
            else run_server(kind, args.host, args.server_cpu, **load)
            for _ in range(args.repeat) for kind in kinds]
    summary = {kind: _summary([r for r in runs if r["server"] == kind]) for kind in kinds}
    report = {"cpus": len(all_cpus), "load_cpus": sorted(load_cpus),
              "python": sys.version.split()[0], "summary": summary, "runs": runs}
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'server':<10} {'responses/s (median)':>21} {'min-max':>17} {'server CPU':>11}"
          f" {'invalid':>8}")
    for kind, row in summary.items():
        cpu = "-" if row["server_cpu"] is None else f"{row['server_cpu']:.0%}"
        spread = f"{row['min']:,}-{row['max']:,}"
        print(f"{kind:<10} {row['responses_per_second']:>21,} {spread:>17} {cpu:>11}"
              f" {row['invalid']:>8}")
    print(f"({args.repeat} x {args.seconds:g} s per server; {args.clients} load processes x "
          f"{args.window} in flight on cores {sorted(load_cpus)}; JSON in {args.json})")


def _summary(runs: list[dict]) -> dict:
    rates = [r["responses_per_second"] for r in runs]
    cpus = [r["server_cpu"] for r in runs if r["server_cpu"] is not None]
    return {"responses_per_second": round(statistics.median(rates)),
            "min": min(rates), "max": max(rates),
            "server_cpu": round(statistics.median(cpus), 3) if cpus else None,
            "invalid": sum(r["invalid"] for r in runs)}


if __name__ == "__main__":
    main()
