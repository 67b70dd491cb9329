"""DERP through a real nginx (``deploy/nginx/derper-http.conf``: TLS at nginx, derper with
``-certmode none`` behind it) against the same load straight to a TLS derper: what the proxy
costs. The load is ``derper bench``'s (8 clients in pairs, 1280-byte packets, one TLS record
each), runs interleaved (direct, nginx, direct, nginx, ...), medians reported.

    python benchmarks/behind_nginx.py                    # 8 x 5k pkt/s, 3 runs each
    python benchmarks/behind_nginx.py --websocket        # the same over WebSocket
    python benchmarks/behind_nginx.py --rate 10000 --repeat 5 --json out.json
    python benchmarks/behind_nginx.py --smoke --json out.json  # a seconds-long correctness run
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trustme

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runs from a bare checkout too

from derper.bench.loadgen import median_row, run_relay  # noqa: E402
from derper.cli.bench import StartedServer, free_port, wait_listening  # noqa: E402
from tests.proxies import nginx_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=5000, help="packets/s per sender")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--websocket", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.clients, args.rate, args.seconds, args.repeat = 2, 200, 0.5, 1
    job = {"clients": args.clients, "size": 1280, "rate": args.rate, "coalesce": False,
           "seconds": args.seconds, "warmup": 1.0, "drain": 1.0}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
        port = free_port()
        derper = subprocess.Popen([sys.executable, "-m", "derper", "-certmode", "none",
                                   "-a", f"127.0.0.1:{port}", "-c", str(tmp / "derper.key"),
                                   "-stun=false", "-metrics-addr", "off"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        nginx_port = free_port()
        nginx = subprocess.Popen(nginx_config("http", tmp, ca, nginx_port, port),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        direct = StartedServer([])
        try:
            wait_listening(port, derper, 10)
            wait_listening(nginx_port, nginx, 10)
            proxied = {"url": f"https://127.0.0.1:{nginx_port}/derp", "cert_pin": None,
                       "ca_file": str(tmp / "ca.pem"), "websocket": args.websocket}
            straight = {"url": direct.url, "cert_pin": direct.pin, "ca_file": None,
                        "websocket": args.websocket}
            runs: dict[str, list] = {"direct": [], "nginx": []}
            for _ in range(args.repeat):
                runs["direct"].append(run_relay(straight, job, 4, [direct.proc.pid]))
                runs["nginx"].append(run_relay(proxied, job, 4, [derper.pid]))
                time.sleep(0.5)
        finally:
            direct.close()
            for proc in (nginx, derper):
                proc.send_signal(signal.SIGTERM)
                proc.wait(10)
    rows = {name: median_row(r) for name, r in runs.items()}
    transport = "WebSocket" if args.websocket else "Upgrade: DERP"
    print(f"{args.clients} x {args.rate:,} pkt/s over {transport}, {args.repeat} runs each, "
          "medians")
    print(f"{'path':<8} {'Mbit/s':>7} {'loss':>7} {'p50 ms':>7} {'p99 ms':>7} {'derper CPU':>10}")
    for name, r in rows.items():
        lat = r["latency_ms"]
        print(f"{name:<8} {r['delivered_mbit_s']:>7.0f} {r['loss']:>7.2%} {lat['p50']:>7.2f}"
              f" {lat['p99']:>7.2f} {r['server_cpu']:>10.0%}")
    ratio = rows["nginx"]["delivered_mbit_s"] / rows["direct"]["delivered_mbit_s"]
    print(f"nginx / direct throughput: {ratio:.2f}x (target >= 0.8x)")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "runs": runs, "ratio": ratio,
                                         "websocket": args.websocket}, indent=2) + "\n")


if __name__ == "__main__":
    main()
