"""DERP load from several processes: pairs of relaying clients, or many idle connections.

Relay load: clients in pairs, each sending ``size``-byte packets to its partner at ``rate``
packets/s (0 = as fast as the server takes them: a flood) and receiving its partner's. Every
packet carries its send time (CLOCK_MONOTONIC, shared by all processes of the machine) and a
sequence number, so the receiver computes one-way latency through the relay, and loss is what was
sent during the measured seconds but never arrived. Over TLS each packet is its own TLS record,
as a Tailscale client writes it (``coalesce`` packs each batch into one record); paced senders
write what is due about every millisecond. The pairs are spread over processes so the generator
is not the bottleneck.

Connection load: idle DERP clients (TLS + DERP handshake) opened ``concurrency`` at a time per
process: connections per second, and the server's memory and CPU per connection when its pid is
known. ``derper bench`` is the command line.
"""

from __future__ import annotations

import multiprocessing
import os
import ssl
import struct
import time
from collections import Counter

import trio

from .. import client as derp_client
from ..cli import gc_tuning
from ..errors import IOFailure
from ..metrics.procstat import cpu_by_process, cpu_by_processes, tree_rss_bytes
from ..net.dial import pinned_context
from ..proto import wire


class LoadError(IOFailure):
    """The load could not run (the server did not start, a load process died)."""


_STAMP = struct.Struct(">QII")  # send time ns, sender index, sequence number
_RECV = int(wire.FrameType.RECV_PACKET)
_KL = wire.KEY_LEN
HIST_NS = 10_000  # latency histogram resolution: 10 us
MAX_BATCH = 64  # packets per socket write


# ---- the load processes -------------------------------------------------------------------------

_contexts: dict = {}


def connect_target(target: dict):
    """A DERP client for ``target``; one TLS context per process (building one costs ~1 ms)."""
    key = (target["ca_file"], target["cert_pin"])
    if key not in _contexts:
        _contexts[key] = (ssl.create_default_context(cafile=target["ca_file"])
                          if target["ca_file"] else pinned_context()
                          if target["cert_pin"] else ssl.create_default_context())
    ctx = _contexts[key] if target["url"].startswith("https:") else None
    return derp_client.connect(target["url"], cert_pin=target["cert_pin"], ssl_context=ctx,
                               websocket=target.get("websocket", False), timeout=30)


class _Flow:
    """One direction of a pair: what a sender sent and its receiver got in the window."""

    def __init__(self) -> None:
        self.sent = 0
        self.received = 0
        self.late = 0  # received after the drain time (counted as lost)
        self.hist: Counter = Counter()


class _Sender:
    """One client's outgoing packets: a frame template stamped with time and sequence."""

    def __init__(self, client, dst: bytes, index: int, flow: _Flow, job: dict) -> None:
        head = wire.header(wire.FrameType.SEND_PACKET, _KL + job["size"]) + dst
        self.template = bytearray(head + os.urandom(job["size"]))
        self.off = len(head)
        self.client, self.index, self.flow = client, index, flow
        self.coalesce = job["coalesce"]
        self.seq = 0

    async def send(self, n: int, now: int, counted: bool) -> None:
        template, off, index, seq = self.template, self.off, self.index, self.seq
        pack_into = _STAMP.pack_into
        frames = []
        for _ in range(n):
            pack_into(template, off, now, index, seq)
            frames.append(bytes(template))
            seq += 1
        self.seq = seq
        if counted:
            self.flow.sent += n
        await self.client.send_frames([b"".join(frames)] if self.coalesce else frames)


async def _paced(senders: list[_Sender], job: dict, t0: int) -> None:
    """Every paced sender of this process on one timer: one wake-up sends for all of them."""
    rate = job["rate"]
    measure_from = t0 + int(job["warmup"] * 1e9)
    stop = measure_from + int(job["seconds"] * 1e9)
    clock = time.monotonic_ns
    while (now := clock()) < stop:
        due = int((now - t0) * rate // 1_000_000_000)
        for sender in senders:
            n = min(MAX_BATCH, due - sender.seq)
            if n > 0:
                await sender.send(n, now, now >= measure_from)
        await trio.sleep(max(0.0, (due + 1) / rate - (clock() - t0) / 1e9))


async def _flood(sender: _Sender, job: dict, t0: int) -> None:
    """As fast as the server takes them: a task per sender, so one blocked socket stalls only
    its own sender."""
    measure_from = t0 + int(job["warmup"] * 1e9)
    stop = measure_from + int(job["seconds"] * 1e9)
    clock = time.monotonic_ns
    while (now := clock()) < stop:
        await sender.send(MAX_BATCH, now, now >= measure_from)
        await trio.sleep(0)  # let this process's receivers read between flood batches


async def _receiver(client, flows: dict[int, _Flow], job: dict, t0: int) -> None:
    measure_from = t0 + int(job["warmup"] * 1e9)
    measure_to = measure_from + int(job["seconds"] * 1e9)
    unpack_from = _STAMP.unpack_from
    clock = time.monotonic_ns
    while True:
        buf, frames = await client.recv_frames()
        now = clock()
        for ftype, s, e in frames:
            if ftype != _RECV or e - s < _KL + _STAMP.size:
                continue
            sent_at, index, _ = unpack_from(buf, s + _KL)
            if measure_from <= sent_at < measure_to:
                flow = flows[index]
                flow.received += 1
                flow.hist[(now - sent_at) // HIST_NS] += 1


async def _own_cpu(job: dict, t0: int, out: list) -> None:
    """This process's CPU seconds over the measured window (is the generator the limit?)."""
    measure_from = t0 / 1e9 + job["warmup"]
    await trio.sleep(max(0.0, measure_from - time.monotonic()))
    before = sum(os.times()[:2])
    await trio.sleep(job["seconds"])
    out.append(sum(os.times()[:2]) - before)


def _relay_worker(target: dict, job: dict, indices: list[int], ready, start) -> list[dict]:
    """One load process: its pairs of clients, sending and receiving until the drain ends."""
    async def main() -> list[dict]:
        flows = {i: _Flow() for i in indices}
        cpu: list[float] = []
        async with trio.open_nursery() as nursery:
            clients = {}
            for i in indices:  # with a second server, each pair spans the two
                clients[i] = await nursery.start(_hold, target if i % 2 == 0 or
                                                 not target.get("recv") else target["recv"])
            ready.put(len(clients))
            t0 = await trio.to_thread.run_sync(start.get)
            senders = [_Sender(clients[i], clients[i ^ 1].public_key, i, flows[i], job)
                       for i in indices]  # pairs share a process
            if job["rate"]:
                nursery.start_soon(_paced, senders, job, t0)
            else:
                for sender in senders:
                    nursery.start_soon(_flood, sender, job, t0)
            for i in indices:
                nursery.start_soon(_receiver, clients[i], flows, job, t0)
            nursery.start_soon(_own_cpu, job, t0, cpu)
            end = t0 + (job["warmup"] + job["seconds"] + job["drain"]) * 1e9
            await trio.sleep(max(0.0, (end - time.monotonic_ns()) / 1e9))
            nursery.cancel_scope.cancel()
        return [{"index": i, "sent": f.sent, "received": f.received, "hist": dict(f.hist),
                 "load_cpu": cpu[0] if cpu and n == 0 else 0.0}
                for n, (i, f) in enumerate(flows.items())]
    return trio.run(main)


async def _hold(target: dict, task_status=trio.TASK_STATUS_IGNORED) -> None:
    async with connect_target(target) as client:
        task_status.started(client)
        await trio.sleep_forever()


def _pairs_per_proc(clients: int, procs: int) -> list[list[int]]:
    pairs = [[2 * p, 2 * p + 1] for p in range(clients // 2)]
    groups: list[list[int]] = [[] for _ in range(min(procs, len(pairs)))]
    for n, pair in enumerate(pairs):
        groups[n % len(groups)].extend(pair)
    return groups


def run_relay(target: dict, job: dict, procs: int, server_pids: list[int]) -> dict:
    """One relay run; ``server_pids``: the servers on this machine whose CPU use it reports
    (summed: both nodes of a mesh)."""
    ctx = multiprocessing.get_context("fork")
    groups = _pairs_per_proc(job["clients"], procs)
    manager = ctx.Manager()
    ready, start = manager.Queue(), manager.Queue()
    with ctx.Pool(len(groups)) as pool:
        pending = pool.starmap_async(_relay_worker,
                                     [(target, job, g, ready, start) for g in groups])
        for _ in groups:
            _get_or_fail(ready, pending)
        t0 = time.monotonic_ns() + 200_000_000
        for _ in groups:
            start.put(t0)
        cpu = split = None
        if server_pids:
            time.sleep(max(0.0, (t0 - time.monotonic_ns()) / 1e9 + job["warmup"]))
            before = cpu_by_processes(server_pids)
            time.sleep(job["seconds"])
            cpu, split = server_cpu(before, cpu_by_processes(server_pids))
            cpu /= job["seconds"]
        flows = [f for part in pending.get() for f in part]
    manager.shutdown()
    return {**_relay_summary(job, flows, cpu), "server_cpu_split": split}


def server_cpu(before: dict[int, float], after: dict[int, float]) -> tuple[float, list[float]]:
    """CPU seconds a server's process tree used between two ``cpu_by_process`` readings, and
    each process's share of it (the root first: a -workers supervisor, then its workers)."""
    used = [after[p] - before.get(p, 0.0) for p in after]
    total = sum(used)
    return total, [round(u / total, 3) if total else 0.0 for u in used]


def _get_or_fail(queue, pending) -> None:
    while True:
        try:
            return queue.get(timeout=0.2)
        except Exception:  # queue.Empty from the manager proxy
            if pending.ready():
                try:
                    pending.get()  # raises the worker's error
                except Exception as e:
                    while isinstance(e, BaseExceptionGroup) and e.exceptions:
                        e = e.exceptions[0]  # the first cause, out of trio's nurseries
                    raise LoadError(f"a load process failed: {e}") from e
                raise LoadError("a load process ended before it was ready")


def _relay_summary(job: dict, flows: list[dict], cpu: float | None) -> dict:
    sent = sum(f["sent"] for f in flows)
    received = sum(f["received"] for f in flows)
    hist: Counter = Counter()
    for f in flows:
        hist.update(f["hist"])
    seconds = job["seconds"]
    pps = received / seconds
    wire_bits = (job["size"] + _KL + wire.HEADER_LEN) * 8
    return {
        "clients": job["clients"], "size": job["size"], "rate_per_sender": job["rate"],
        "coalesce": job["coalesce"], "seconds": seconds,
        "offered_pps": round(sent / seconds), "delivered_pps": round(pps),
        "delivered_mbit_s": round(pps * job["size"] * 8 / 1e6, 1),
        "delivered_wire_mbit_s": round(pps * wire_bits / 1e6, 1),
        "loss": round(1 - received / sent, 5) if sent else None,
        "latency_ms": {f"p{q}": _percentile(hist, q / 100) for q in (50, 90, 99, 99.9)},
        "server_cpu": None if cpu is None else round(cpu, 3),
        "server_us_per_packet": round(cpu / pps * 1e6, 2) if cpu and pps else None,
        "load_cpu": round(sum(f["load_cpu"] for f in flows) / seconds, 3),
        "sent": sent, "received": received,
    }


def _percentile(hist: Counter, q: float) -> float | None:
    total = sum(hist.values())
    if not total:
        return None
    rank, seen = q * total, 0
    for bucket in sorted(hist):
        seen += hist[bucket]
        if seen >= rank:
            return round((bucket + 1) * HIST_NS / 1e6, 3)  # bucket's upper edge
    return None


# ---- connection scale ---------------------------------------------------------------------------

def _conns_worker(target: dict, count: int, concurrency: int, ready, done) -> None:
    gc_tuning.for_many_connections()

    async def main() -> None:
        limiter = trio.CapacityLimiter(concurrency)
        times: list[float] = []
        failures: list[str] = []
        connected = trio.Event()

        async def one(task_status=trio.TASK_STATUS_IGNORED) -> None:
            async with limiter:
                try:
                    cm = connect_target(target)
                    await cm.__aenter__()
                except (derp_client.DerpClientError, OSError) as e:
                    failures.append(str(e))
                    task_status.started()
                    return
                times.append(time.monotonic())
            task_status.started()
            try:
                await connected.wait()
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):
                    await cm.__aexit__(None, None, None)

        first, cpu_first = time.monotonic(), sum(os.times()[:2])
        async with trio.open_nursery() as nursery:
            async with trio.open_nursery() as starting:
                for _ in range(count):
                    starting.start_soon(nursery.start, one)
            last = max(times, default=first)
            cpu = sum(os.times()[:2]) - cpu_first
            ready.put({"connected": len(times), "failures": len(failures), "cpu": cpu,
                       "first_error": failures[0] if failures else None,
                       "started": first, "finished": last})
            await trio.to_thread.run_sync(done.get)
            nursery.cancel_scope.cancel()
    trio.run(main)


def run_conns(target: dict, conns: int, concurrency: int, procs: int,
              server_pid: int | None, rss_before: int | None) -> dict:
    """``rss_before``: the server's RSS before the first run (later runs reuse its memory)."""
    ctx = multiprocessing.get_context("fork")
    procs = max(1, min(procs, conns))
    counts = [conns // procs + (p < conns % procs) for p in range(procs)]
    manager = ctx.Manager()
    ready, done = manager.Queue(), manager.Queue()
    cpu_before = cpu_by_process(server_pid) if server_pid else None
    with ctx.Pool(procs) as pool:
        pending = pool.starmap_async(_conns_worker,
                                     [(target, n, concurrency, ready, done) for n in counts])
        parts = [_get_or_fail(ready, pending) for _ in counts]
        time.sleep(0.5)  # let the server settle the last handshakes
        rss_after = tree_rss_bytes(server_pid) if server_pid else None
        cpu = split = None
        if server_pid:
            cpu, split = server_cpu(cpu_before, cpu_by_process(server_pid))
        for _ in counts:
            done.put(True)
        pending.get()
    manager.shutdown()
    connected = sum(p["connected"] for p in parts)
    span = max(p["finished"] for p in parts) - min(p["started"] for p in parts)
    errors = [p["first_error"] for p in parts if p["first_error"]]
    return {
        "conns": conns, "concurrency_per_proc": concurrency, "procs": procs,
        "connected": connected, "failures": sum(p["failures"] for p in parts),
        "first_error": errors[0] if errors else None,
        "connects_per_second": round(connected / span) if span > 0 else None,
        "server_cores": None if cpu is None or span <= 0 else round(cpu / span, 2),
        "load_cores": round(sum(p["cpu"] for p in parts) / span, 2) if span > 0 else None,
        "server_cpu_split": split,
        "server_rss_mb": None if rss_after is None else round(rss_after / 2**20, 1),
        "server_cpu_ms_per_conn": (None if cpu is None or not connected
                                   else round(cpu / connected * 1000, 3)),
        "load_cpu_ms_per_conn": (round(sum(p["cpu"] for p in parts) / connected * 1000, 3)
                                 if connected else None),
        "rss_per_conn_kb": (None if rss_after is None or not connected
                            else round((rss_after - rss_before) / connected / 1024, 1)),
    }


def median_row(runs: list[dict]) -> dict:
    """The run with the median rate, whole, so its figures stay consistent with each other."""
    if len(runs) == 1:
        return runs[0]
    key = "delivered_pps" if "delivered_pps" in runs[0] else "connects_per_second"
    ordered = sorted(runs, key=lambda r: r[key] or 0)
    row = dict(ordered[len(ordered) // 2])
    row["runs"] = len(runs)
    row[f"{key}_all"] = [r[key] for r in runs]
    return row
