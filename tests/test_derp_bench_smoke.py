"""``derper bench`` and the TLS floor run end to end in smoke mode: correctness, not speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from derper.cli.bench import StartedServer

TLS_FLOOR = Path(__file__).resolve().parent.parent / "benchmarks" / "tls_floor.py"


def run_smoke(tmp_path: Path, *mode: str) -> tuple[dict, str]:
    out = tmp_path / "derp_bench.json"
    proc = subprocess.run([sys.executable, "-m", "derper", "bench", *mode, "-smoke",
                           "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text()), proc.stdout


def test_relay_smoke_delivers_timestamped_packets_over_tls(tmp_path):
    report, stdout = run_smoke(tmp_path)
    assert report["started_server"] and report["target"].startswith("https://")
    [run] = report["runs"]
    assert run["clients"] == 2 and run["size"] == 1280
    assert run["sent"] > 0 and 0 < run["received"] <= run["sent"]
    assert run["delivered_mbit_s"] > 0
    assert 0 < run["latency_ms"]["p50"] <= run["latency_ms"]["p99"]
    assert run["server_cpu"] is not None
    assert "delivered pkt/s" in stdout


def test_mesh_smoke_sends_every_packet_across_two_started_nodes(tmp_path):
    report, stdout = run_smoke(tmp_path, "-mesh", "-server-nice", "3")
    [run] = report["runs"]
    assert " -> " in report["target"] and report["server_nice"] == 3
    assert run["sent"] > 0 and 0 < run["received"] <= run["sent"]
    assert run["server_cpu"] is not None  # both nodes'


def test_started_server_runs_at_the_niceness_asked_for():
    server = StartedServer([], nice=3)
    try:
        assert os.getpriority(os.PRIO_PROCESS, server.proc.pid) == \
            min(19, os.getpriority(os.PRIO_PROCESS, 0) + 3)
    finally:
        server.close()


def test_relay_smoke_over_websocket(tmp_path):
    report, stdout = run_smoke(tmp_path, "-websocket")
    [run] = report["runs"]
    assert report["transport"] == "websocket" and "over websocket" in stdout
    assert run["sent"] > 0 and 0 < run["received"] <= run["sent"]


def test_conns_smoke_holds_idle_clients_and_reads_server_memory(tmp_path):
    report, stdout = run_smoke(tmp_path, "conns")
    [run] = report["runs"]
    assert run["connected"] == run["conns"] == 20 and run["failures"] == 0
    assert run["connects_per_second"] > 0
    assert run["rss_per_conn_kb"] is not None and run["server_cpu_ms_per_conn"] > 0
    assert run["load_cpu_ms_per_conn"] > 0
    assert "connects/s" in stdout


def test_tls_floor_smoke_measures_both_ends(tmp_path):
    out = tmp_path / "tls_floor.json"
    proc = subprocess.run([sys.executable, str(TLS_FLOOR), "--smoke",
                           "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["connections"] == 20
    assert report["server_cpu_ms_per_conn"] > 0 and report["client_cpu_ms_per_conn"] > 0
    assert report["ceiling_connects_per_second"] > 0
    assert report["memory_bio_cpu_ms_per_handshake"] > 0
    assert "connections/s" in proc.stdout
