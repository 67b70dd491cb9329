"""Server CPU instructions per relayed packet, counted by callgrind: repeatable on a busy machine.

Wall-clock figures swing with whatever else the machine runs; instruction counts do not. The
server runs under ``valgrind --tool=callgrind`` and two TLS clients exchange packets in lock
step (``--batch`` packets one way, each as its own TLS record, all received, then back), so
every run gives the server the same reads and writes. Counters are zeroed after the handshakes
and dumped after the exchange: the figure covers the relay path only.

    python benchmarks/derp_instructions.py                  # this checkout
    python benchmarks/derp_instructions.py --tree /tmp/old  # a checkout to compare with
    python benchmarks/derp_instructions.py --conns 200      # per new TLS + DERP connection
    python benchmarks/derp_instructions.py --conns 200 --workers 2  # the same, summed over
                                                            # a -workers supervisor and workers
    python benchmarks/derp_instructions.py --websocket      # DERP over WebSocket (TLS)
    python benchmarks/derp_instructions.py --client [--websocket]  # the load generator's
    python benchmarks/derp_instructions.py --mesh           # across two meshed nodes
    python benchmarks/derp_instructions.py --mesh --pairs 4  # four clients share the link

``--conns N`` counts instead what N new connections cost (TLS handshake, HTTP upgrade, DERP
handshake, registration), opened one after another and all held open until the dump. With
``--workers N`` the server is a ``-workers N`` host, every process of it under callgrind, and
the figure is their sum: what the workers' own machinery (sibling links and the presence
notes over them, metric snapshots, the supervisor) adds to a connection, without the
scheduling noise of CPU time on a machine whose cores the load generator shares. Work done
by the clock (metric snapshots, samplers) grows with callgrind's slowness, so it is also
counted over as long again with the connections held idle, and a second figure leaves it out.
``--client`` counts the other side: the two clients (``derper bench``'s, sending and receiving)
run under callgrind against a plain server, twice, with ``--rounds`` / 5 and ``--rounds``
rounds; the difference over the extra packets leaves start-up and handshakes out.

``--mesh`` starts two meshed derpers, both under callgrind, the sender on the first and the
receiver on the second, and sends one way only: the first node's figure is what a packet costs
the node that forwards it (SendPacket in, ForwardPacket out over its mesh link), the second's
what it costs the node that delivers it (ForwardPacket in, RecvPacket out).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runs from a bare checkout too

import trio  # noqa: E402

from derper.bench.loadgen import connect_target  # noqa: E402
from derper.cli.bench import StartedServer, started_region  # noqa: E402
from derper.metrics.procstat import process_tree  # noqa: E402
from derper.proto import wire  # noqa: E402


async def lockstep(targets: tuple[dict, dict], rounds: int, batch: int, size: int, between,
                   both_ways: bool, pairs: int = 1) -> None:
    """``pairs`` senders on the first target, each with its receiver on the second; each round
    every sender writes its batch at once (so a mesh link carries several clients' packets),
    then every receiver reads all of its own. ``between(option)``: zero or dump the server's
    counters (None: this process is the one counted, by whole runs)."""
    async with contextlib.AsyncExitStack() as stack:
        senders = [await stack.enter_async_context(connect_target(targets[0]))
                   for _ in range(pairs)]
        receivers = [await stack.enter_async_context(connect_target(targets[1]))
                     for _ in range(pairs)]
        payload = bytes(size)
        there = list(zip(senders, receivers))
        steps = [there, [(dst, src) for src, dst in there]] if both_ways else [there]
        frames = {src: [wire.send_packet(dst.public_key, payload)] * batch
                  for step in steps for src, dst in step}
        await until_routed([way for step in steps for way in step], payload)
        await exchange(steps, frames, 2, batch)  # warm every path once
        if between:
            await trio.to_thread.run_sync(between, "--zero")
        await exchange(steps, frames, rounds, batch)
        if between:
            await trio.to_thread.run_sync(between, "--dump")


def client_instructions(args: argparse.Namespace, target: dict) -> int:
    """The clients' instructions for the ``args.rounds - args.rounds // 5`` extra rounds."""
    counts = []
    for rounds in (args.rounds // 5, args.rounds):
        run = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                              sys.executable, __file__, "--count-clients", target["url"],
                              target["cert_pin"], "--rounds", str(rounds), "--batch",
                              str(args.batch), "--size", str(args.size)]
                             + (["--websocket"] if args.websocket else []),
                             capture_output=True, text=True)
        found = re.search(r"(?:refs|Collected) *: *([\d,]+)", run.stderr)
        if run.returncode or not found:
            raise SystemExit(f"the clients under callgrind failed:\n{run.stderr[-2000:]}")
        counts.append(int(found.group(1).replace(",", "")))
    return counts[1] - counts[0]


async def until_routed(ways, payload: bytes) -> None:
    """Until each way delivers: across a mesh, the sender's node learns of the receiver only
    when the receiver's node announces it over the link (packets before that are dropped)."""
    for src, dst in ways:
        while True:
            await src.send_frames([wire.send_packet(dst.public_key, payload)])
            with trio.move_on_after(5):  # a node under callgrind is slow; a drop never comes
                while not any(f[0] == wire.FrameType.RECV_PACKET
                              for f in (await dst.recv_frames())[1]):
                    pass
                break


async def exchange(steps, frames: dict, rounds: int, batch: int) -> None:
    for _ in range(rounds):
        for step in steps:
            for src, _ in step:
                await src.send_frames(frames[src])
            for _, dst in step:
                got = 0
                while got < batch:
                    _, received = await dst.recv_frames()
                    got += sum(1 for f in received if f[0] == wire.FrameType.RECV_PACKET)


async def connect_many(target: dict, conns: int, between) -> None:
    async with trio.open_nursery() as nursery:
        async def hold(task_status=trio.TASK_STATUS_IGNORED) -> None:
            async with connect_target(target):
                task_status.started()
                await trio.sleep_forever()

        for _ in range(5):  # warm every path once
            await nursery.start(hold)
        await trio.to_thread.run_sync(between, "--zero")
        start = trio.current_time()
        for _ in range(conns):
            await nursery.start(hold)
        await trio.sleep(0.5)  # the server's last steps after its ServerInfo write
        span = trio.current_time() - start
        await trio.to_thread.run_sync(between, "--dump")
        # As long again with every connection held and nothing new: what the server does by
        # the clock (metric snapshots, samplers), which callgrind's slowness stretches.
        await trio.sleep(span)
        await trio.to_thread.run_sync(between, "--dump")
        nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", help="checkout whose derper/ runs as the server")
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--batch", type=int, default=10, help="packets per write")
    parser.add_argument("--size", type=int, default=1280)
    parser.add_argument("--pairs", type=int, default=1,
                        help="sender/receiver pairs, all sending at once each round")
    parser.add_argument("--conns", type=int, default=0,
                        help="count N new connections instead of relayed packets")
    parser.add_argument("--workers", type=int, default=1,
                        help="with --conns: a -workers N server, its processes' sum counted")
    parser.add_argument("--websocket", action="store_true",
                        help="DERP over WebSocket, one message per packet")
    parser.add_argument("--allocator", default="malloc",
                        help="PYTHONMALLOC for the server: malloc, as derper serves "
                             "(derper/cli/allocator.py; set here, or its re-run would leave "
                             "valgrind behind), or pymalloc")
    parser.add_argument("--client", action="store_true",
                        help="count the load generator's clients instead of the server")
    parser.add_argument("--count-clients", nargs=2, metavar=("URL", "PIN"),
                        help=argparse.SUPPRESS)  # --client's run under callgrind
    parser.add_argument("--mesh", action="store_true",
                        help="two meshed nodes: instructions per packet on the forwarding "
                             "node and on the delivering node")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the callgrind dump")
    args = parser.parse_args()
    if args.workers > 1 and not args.conns:
        parser.error("--workers counts connections: give --conns N")
    if args.count_clients:
        url, pin = args.count_clients
        target = {"url": url, "cert_pin": pin, "ca_file": None, "websocket": args.websocket}
        trio.run(lockstep, (target, target), args.rounds, args.batch, args.size, None, True)
        return
    if args.client:
        if args.tree:
            parser.error("--client counts this checkout's clients (copy the script to compare)")
        server = StartedServer([])
        try:
            instructions = client_instructions(args, {"url": server.url,
                                                      "cert_pin": server.pin})
        finally:
            server.close()
        packets = 2 * (args.rounds - args.rounds // 5) * args.batch
        report(args, instructions, packets, "load generator")
        return
    wrapper = ["env", f"PYTHONMALLOC={args.allocator}", "valgrind", "--tool=callgrind",
               "--dump-line=no", "--callgrind-out-file=%q{PWD}/callgrind.out.%p"]
    extra = []
    if args.workers > 1:  # the supervisor's workers too, not the helpers ctypes runs at import
        wrapper[-1:-1] = ["--trace-children=yes", "--trace-children-skip=" + ",".join(
            ("*ldconfig*", "*gcc*", "*collect2", "*/ld", "*objdump"))]
        extra = ["-workers", str(args.workers)]
    servers = (started_region([], wrapper=wrapper, cwd=args.tree) if args.mesh
               else [StartedServer(extra, wrapper=wrapper, cwd=args.tree)])
    folder = Path(args.tree or ".")
    kept: list[Path] = []
    counted = [_derpers(process_tree(s.proc.pid)) for s in servers]  # every worker
    try:
        def control(option: str) -> None:
            for pid in (p for tree in counted for p in tree):
                subprocess.run(["callgrind_control", option, str(pid)],
                               check=True, capture_output=True)

        targets = [{"url": s.url, "cert_pin": s.pin, "ca_file": None,
                    "websocket": args.websocket} for s in servers]
        if args.conns:
            trio.run(connect_many, targets[0], args.conns, control)
        else:
            trio.run(lockstep, (targets[0], targets[-1]), args.rounds, args.batch, args.size,
                     control, not args.mesh, args.pairs)
        dumps = [[_dumps(folder, p) for p in tree] for tree in counted]
        kept = [f for tree in dumps for files in tree for f in files]
        # Per tree, the sum over its processes of each one's last dump (the only one, or with
        # --conns the held-idle span) and the one before it (--conns: the connections).
        last = [sum(_summary(files[-1]) for files in tree) for tree in dumps]
        counts = ([sum(_summary(files[-2]) for files in tree) for tree in dumps]
                  if args.conns else last)
    finally:
        for server in servers:
            server.close()
        for f in (f for tree in counted for p in tree
                  for f in [*_dumps(folder, p), folder / f"callgrind.out.{p}"]):
            if not (args.keep and f in kept):
                f.unlink(missing_ok=True)
    if args.mesh:
        packets = args.rounds * args.batch * args.pairs
        result = {"tree": args.tree or ".", "packets": packets, "batch": args.batch,
                  "pairs": args.pairs,
                  "size": args.size, "websocket": args.websocket, "mesh": True,
                  "instructions_forwarding_node": counts[0],
                  "instructions_delivering_node": counts[1],
                  "per_packet_forwarding_node": round(counts[0] / packets),
                  "per_packet_delivering_node": round(counts[1] / packets)}
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"{result['per_packet_forwarding_node']:,} instructions per packet on the "
              f"forwarding node, {result['per_packet_delivering_node']:,} on the delivering "
              f"node ({packets:,} packets of {args.size} B across the mesh, {args.batch} per "
              f"write{_senders(args)}{', WebSocket' if args.websocket else ''}; "
              f"{result['tree']})")
        return
    instructions = counts[0]
    if args.conns:
        by_clock = last[0]
        result = {"tree": args.tree or ".", "conns": args.conns, "workers": args.workers,
                  "processes": len(counted[0]),
                  "instructions": instructions, "instructions_by_clock": by_clock,
                  "instructions_per_conn": round(instructions / args.conns),
                  "instructions_per_conn_less_clock": round((instructions - by_clock)
                                                            / args.conns)}
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        host = (f", summed over the supervisor and {args.workers} workers"
                if args.workers > 1 else "")
        print(f"{result['instructions_per_conn']:,} server instructions per new connection, "
              f"{result['instructions_per_conn_less_clock']:,} less what the server does by "
              f"the clock over as long idle ({args.conns} TLS + DERP connections{host}; "
              f"{result['tree']})")
        return
    report(args, instructions, 2 * args.rounds * args.batch * args.pairs, "server")


def _derpers(pids: list[int]) -> list[int]:
    """The derper processes (not a helper one starts for a moment, such as ``ldconfig`` for
    ctypes, which callgrind follows too)."""
    out = []
    for pid in pids:
        with contextlib.suppress(OSError):
            if "\0-m\0derper\0" in Path(f"/proc/{pid}/cmdline").read_text():
                out.append(pid)
    return out


def _dumps(folder: Path, pid: int) -> list[Path]:
    """A process's callgrind dumps, oldest first."""
    return sorted(folder.glob(f"callgrind.out.{pid}.*"), key=lambda f: int(f.suffix[1:]))


def _summary(dump: Path) -> int:
    return int(re.search(r"^summary: (\d+)", dump.read_text(), re.M).group(1))


def report(args: argparse.Namespace, instructions: int, packets: int, side: str) -> None:
    result = {"tree": args.tree or ".", "side": side, "packets": packets, "batch": args.batch,
              "pairs": args.pairs,
              "size": args.size, "websocket": args.websocket, "instructions": instructions,
              "instructions_per_packet": round(instructions / packets)}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['instructions_per_packet']:,} {side} instructions per relayed packet "
          f"({packets:,} packets of {args.size} B, {args.batch} per write{_senders(args)}"
          f"{', WebSocket' if args.websocket else ''}; {result['tree']})")


def _senders(args) -> str:
    return f", {args.pairs} senders at once" if args.pairs > 1 else ""


if __name__ == "__main__":
    main()
