"""Fair bandwidth: a bulk transfer and an interactive flow through one ``-bandwidth-limit`` relay.

A real derper process (``-dev``, plain HTTP on loopback) relays two flows: ``bulk`` sends
1200-byte packets as fast as TCP lets it, ``interactive`` sends a 100-byte packet every 20 ms
(an SSH session's keystrokes) stamped with the send time. Reported: the interactive one-way
latency through the relay (alone, then beside the bulk flow) and the bulk throughput against
the limit. Fair queueing should keep the interactive latency near its idle value while bulk
gets the rest of the budget. A second relay with only ``-rate-config`` (per-client) carries the
bulk flow alone. Targets, checked (exit status 1 when missed): each limit holds, and a sender
gets at least 85 % of it (the unit tests keep only the ceiling; a floor is a speed).

    python benchmarks/fairness.py                        # 4mbit, 5 s per phase
    python benchmarks/fairness.py --limit 20mbit --rate-config 1000000 --seconds 10
    python benchmarks/fairness.py --smoke --json out.json  # ~3 s correctness run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runs from a bare checkout too

from derper import client as dc  # noqa: E402
from derper.admission.rate_config import parse_rate  # noqa: E402
from derper.cli.bench import free_port  # noqa: E402
from derper.proto.messages import ReceivedPacket  # noqa: E402

BULK_SIZE, SMALL_SIZE, SMALL_PERIOD = 1200, 100, 0.02
SHARE_FLOOR, SHARE_CEILING = 0.85, 1.10  # of the configured limit
OVERHEAD = 5 + 32  # frame header + key, what the relay's budget counts besides the payload


async def start_relay(*limit_flags: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "derper", "-dev", "-a", f"127.0.0.1:{port}",
                             "-stun=false", *limit_flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={k: v for k, v in os.environ.items() if not k.startswith("DERP_")})
    with trio.fail_after(15):
        while True:
            try:
                await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()
                break
            except OSError:
                if proc.poll() is not None:
                    raise SystemExit(f"derper exited with {proc.returncode}")
                await trio.sleep(0.05)
    return proc, f"http://127.0.0.1:{port}/derp"


async def interactive(url: str, seconds: float) -> dict:
    """Paced small packets; one-way latencies measured on this process's clock."""
    latencies: list[float] = []
    sent = 0
    async with dc.connect(url) as tx, dc.connect(url) as rx:
        async def receive():
            while True:
                m = await rx.recv()
                if isinstance(m, ReceivedPacket):
                    (stamp,) = struct.unpack_from("!d", m.data)
                    latencies.append(trio.current_time() - stamp)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            next_at = trio.current_time()
            end = next_at + seconds
            while next_at < end:
                await trio.sleep_until(next_at)
                await tx.send(rx.public_key, struct.pack("!d", trio.current_time())
                              + bytes(SMALL_SIZE - 8))
                sent += 1
                next_at += SMALL_PERIOD
            await trio.sleep(0.5)  # the last ones in flight
            nursery.cancel_scope.cancel()
    ms = sorted(x * 1000 for x in latencies)
    return {"sent": sent, "received": len(ms),
            "latency_ms_p50": round(statistics.median(ms), 2) if ms else None,
            "latency_ms_p99": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 2) if ms else None,
            "latency_ms_max": round(ms[-1], 2) if ms else None}


async def bulk(url: str, seconds: float, started: trio.Event, stop: trio.Event) -> dict:
    """Packets as fast as the relay takes them; bytes/s counted at the receiver."""
    received = 0
    async with dc.connect(url) as tx, dc.connect(url) as rx:
        async def send():
            batch = [(rx.public_key, bytes(BULK_SIZE))] * 16
            while True:
                await tx.send_many(batch)

        async def receive():
            nonlocal received
            while True:
                m = await rx.recv()
                if isinstance(m, ReceivedPacket):
                    received += len(m.data) + OVERHEAD

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            nursery.start_soon(receive)
            await trio.sleep(0.5)  # past the idle burst and TCP slow start
            started.set()
            base, t0 = received, trio.current_time()
            await stop.wait()
            rate = (received - base) / (trio.current_time() - t0)
            nursery.cancel_scope.cancel()
    return {"bytes_per_second": round(rate)}


async def run(limit: str, rate_config: int, seconds: float) -> dict:
    proc, url = await start_relay("-bandwidth-limit", limit)
    try:
        alone = await interactive(url, seconds)
        started, stop = trio.Event(), trio.Event()
        result: dict = {}

        async def bulk_task():
            result["bulk"] = await bulk(url, seconds, started, stop)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(bulk_task)
            await started.wait()
            beside = await interactive(url, seconds)
            stop.set()
    finally:
        proc.terminate()
        proc.wait(10)
    budget = parse_rate(limit)
    share = result["bulk"]["bytes_per_second"] / budget
    return {"limit": limit, "limit_bytes_per_second": budget, "seconds": seconds,
            "interactive_alone": alone, "interactive_beside_bulk": beside,
            "bulk": {**result["bulk"], "share_of_limit": round(share, 3)},
            "rate_config": await per_client(rate_config, seconds)}


async def per_client(rate: int, seconds: float) -> dict:
    """One bulk sender through a relay with only ``-rate-config``: its share of the rate."""
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        f.write(json.dumps({"PerClientRateLimitBytesPerSec": rate}))
        f.flush()
        proc, url = await start_relay("-rate-config", f.name)
        try:
            started, stop = trio.Event(), trio.Event()
            async with trio.open_nursery() as nursery:
                async def stop_later():
                    await started.wait()
                    await trio.sleep(seconds)
                    stop.set()
                nursery.start_soon(stop_later)
                measured = await bulk(url, seconds, started, stop)
        finally:
            proc.terminate()
            proc.wait(10)
    return {"bytes_per_second_limit": rate, **measured,
            "share_of_limit": round(measured["bytes_per_second"] / rate, 3)}


def missed_targets(report: dict) -> list[str]:
    missed = []
    for name, share in (("-bandwidth-limit", report["bulk"]["share_of_limit"]),
                        ("-rate-config", report["rate_config"]["share_of_limit"])):
        if not SHARE_FLOOR <= share <= SHARE_CEILING:
            missed.append(f"{name}: bulk got {share:.1%} of the limit, target "
                          f"{SHARE_FLOOR:.0%}-{SHARE_CEILING:.0%}")
    return missed


def show(report: dict) -> None:
    print(f"relay -bandwidth-limit {report['limit']} "
          f"({report['limit_bytes_per_second']:.0f} B/s), {report['seconds']:g} s per phase")
    print(f"{'flow':<28}{'packets':>12}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    for name in ("interactive_alone", "interactive_beside_bulk"):
        r = report[name]
        print(f"{name:<28}{r['received']:>6}/{r['sent']:<5}{r['latency_ms_p50']:>10}"
              f"{r['latency_ms_p99']:>10}{r['latency_ms_max']:>10}")
    b = report["bulk"]
    print(f"{'bulk (beside interactive)':<28}{b['bytes_per_second']:>12} B/s = "
          f"{b['share_of_limit']:.1%} of the limit")
    r = report["rate_config"]
    print(f"{'bulk, -rate-config ' + str(r['bytes_per_second_limit']):<28}"
          f"{r['bytes_per_second']:>12} B/s = {r['share_of_limit']:.1%} of the limit")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", default="4mbit", help="the relay's -bandwidth-limit")
    parser.add_argument("--rate-config", type=int, default=1_000_000,
                        help="per-client bytes/s of the second relay's -rate-config")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each phase")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    parser.add_argument("--smoke", action="store_true",
                        help="~3 s correctness run; targets shown, not enforced")
    args = parser.parse_args()
    if args.smoke:
        args.seconds = 0.6
    report = trio.run(run, args.limit, args.rate_config, args.seconds)
    show(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    missed = missed_targets(report)
    for line in missed:
        print(f"target missed: {line}")
    sys.exit(1 if missed and not args.smoke else 0)  # a smoke run checks function only


if __name__ == "__main__":
    main()
