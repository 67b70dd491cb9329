"""What a new TLS connection costs before any DERP, trio or Python work: the machine's floor.

Both ends run as plain blocking ``ssl`` sockets (OpenSSL does the whole handshake in C), in two
processes, one connection after another, with the same certificate chain (self-signed P-256 IP
certificate plus the meta certificate) and client context as ``derper bench conns``. Each side
reads its own CPU time. ``cores / (server + client CPU per connection)`` is then the most new
connections per second this machine can make when the load generator runs on it too, whatever
the server is written in. The handshake alone, both ends over memory BIOs in one process, is
measured too: the part no TCP stack or event loop can take away.

    python benchmarks/tls_floor.py                # 2000 connections
    python benchmarks/tls_floor.py --smoke --json out.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import socket
import ssl
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runs from a bare checkout too

from derper.certs.bundle import ensure_ip_cert, load_manual  # noqa: E402
from derper.certs.context import make_context  # noqa: E402
from derper.net.dial import pinned_context  # noqa: E402
from derper.proto import metacert  # noqa: E402
from derper.proto.keys import KeyPair  # noqa: E402


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _server_context() -> ssl.SSLContext:
    with tempfile.TemporaryDirectory() as certdir:
        ensure_ip_cert(Path(certdir), "127.0.0.1")
        bundle = load_manual(Path(certdir), "127.0.0.1")
    return make_context(bundle, metacert.build(KeyPair.generate().public), None)


def _serve(listener: socket.socket, count: int, out) -> None:
    ctx = _server_context()
    out.put("ready")
    start = _cpu()
    for _ in range(count):
        conn, _ = listener.accept()
        with ctx.wrap_socket(conn, server_side=True) as tls:  # the handshake
            tls.recv(1)  # the client's close
    out.put(_cpu() - start)


def _connect(port: int, count: int, out) -> None:
    ctx = pinned_context()
    start = _cpu()
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            ctx.wrap_socket(sock).close()
    out.put(_cpu() - start)


def _in_memory(count: int) -> float:
    """CPU seconds per handshake with no sockets at all: both ends over memory BIOs."""
    server_ctx, client_ctx = _server_context(), pinned_context()
    start = _cpu()
    for _ in range(count):
        c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
        client = client_ctx.wrap_bio(c_in, c_out)
        server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
        done = set()
        while len(done) < 2:
            for side, obj, out, peer_in in ((0, client, c_out, s_in), (1, server, s_out, c_in)):
                if side not in done:
                    try:
                        obj.do_handshake()
                        done.add(side)
                    except ssl.SSLWantReadError:
                        pass
                peer_in.write(out.read())
    return (_cpu() - start) / count


def run(count: int) -> dict:
    mp = multiprocessing.get_context("fork")
    listener = socket.create_server(("127.0.0.1", 0), backlog=128)
    results = mp.Queue()
    server = mp.Process(target=_serve, args=(listener, count, results))
    server.start()
    assert results.get(timeout=30) == "ready"
    client_out = mp.Queue()
    client = mp.Process(target=_connect, args=(listener.getsockname()[1], count, client_out))
    client.start()
    client_cpu = client_out.get(timeout=300)
    server_cpu = results.get(timeout=30)
    client.join()
    server.join()
    listener.close()
    per_conn = (server_cpu + client_cpu) / count
    cores = len(os.sched_getaffinity(0))
    return {"connections": count, "cores": cores, "openssl": ssl.OPENSSL_VERSION,
            "memory_bio_cpu_ms_per_handshake": round(_in_memory(count) * 1000, 3),
            "server_cpu_ms_per_conn": round(server_cpu / count * 1000, 3),
            "client_cpu_ms_per_conn": round(client_cpu / count * 1000, 3),
            "ceiling_connects_per_second": round(cores / per_conn) if per_conn else None}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conns", type=int, default=2000)
    parser.add_argument("--json", type=Path, default=Path("tls_floor.json"))
    parser.add_argument("--smoke", action="store_true", help="a few connections: correctness")
    args = parser.parse_args(argv)
    report = run(20 if args.smoke else args.conns)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{report['openssl']}, TLS + TCP only, {report['connections']:,} connections:"
          f" server {report['server_cpu_ms_per_conn']:.2f} ms, client"
          f" {report['client_cpu_ms_per_conn']:.2f} ms of CPU per connection;"
          f" at most {report['ceiling_connects_per_second']:,} connections/s on"
          f" {report['cores']} cores with both ends on them")
    print(f"Both ends of the handshake alone, no sockets:"
          f" {report['memory_bio_cpu_ms_per_handshake']:.2f} ms of CPU")


if __name__ == "__main__":
    main()
