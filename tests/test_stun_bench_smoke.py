"""The STUN benchmark's smoke mode runs end to end: a correctness check, not a speed check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "stun_bench.py"


def test_smoke_run_gets_answers_and_writes_json(tmp_path):
    out = tmp_path / "stun_bench.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--smoke", "--json", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    [run] = report["runs"]
    assert run["server"] == "ours"
    assert run["responses"] > 0 and run["invalid"] == 0
    assert report["summary"]["ours"]["responses_per_second"] > 0
    assert "ours" in proc.stdout
