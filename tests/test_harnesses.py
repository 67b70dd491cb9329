"""The attack and soak harnesses run end to end (short): correctness, not speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run(script: str, *args: str, tmp_path: Path) -> dict | list:
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), *args, "--json", str(out)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text())


def test_soak_smoke_finds_nothing_growing(tmp_path):
    report = run("soak.py", "--smoke", tmp_path=tmp_path)
    assert report["problems"] == []
    sent, received = report["relayed"]
    assert sent > 1000 and received == sent
    assert report["churned"] > 20 and report["stun"][1] == report["stun"][0]
    assert len(report["samples"]) >= 8


def test_attack_smoke_survives_and_the_canary_relays(tmp_path):
    rows = run("attacks.py", "--smoke", "--only",
               "slowloris_50_addresses,protocol_errors,stun_unknown_attribute", tmp_path=tmp_path)
    for row in rows:
        assert row["alive"], row
        assert row["delivered"] == row["sent"] > 50, row
    stun = next(r for r in rows if r["attack"] == "stun_unknown_attribute")
    assert stun.get("stun_amplification", 0) <= 1.0  # a small 420 is not sent at all


def test_workers_benchmark_smoke_measures_both(tmp_path):
    report = run("workers.py", "--smoke", "--only", "storm,stun,relay", tmp_path=tmp_path)
    results = report["results"]
    assert results["storm"]["2"]["failures"] == 0 and results["storm"]["2"]["server_ms_per_conn"]
    assert len(results["storm"]["2"]["worker_shares"]) == 2
    assert results["stun"]["1"]["replies_per_second"] > 0
    assert len(results["stun"]["2"]["worker_shares"]) == 2
    assert results["relay"]["2"]["loss"] == 0 and results["relay"]["2"]["delivered_mbit_s"] > 0
