"""The fairness benchmark's smoke mode runs end to end: a correctness check, not a speed check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "fairness.py"


def test_smoke_run_relays_both_flows_within_the_limit(tmp_path):
    out = tmp_path / "fairness.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--smoke", "--json", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    for phase in ("interactive_alone", "interactive_beside_bulk"):
        flow = report[phase]
        assert flow["sent"] > 10 and flow["received"] == flow["sent"], flow
    # The budget holds (a token bucket cannot be beaten) and bulk gets real use of it.
    assert 0 < report["bulk"]["bytes_per_second"] <= 1.1 * report["limit_bytes_per_second"]
    per_client = report["rate_config"]
    assert 0 < per_client["bytes_per_second"] <= 1.1 * per_client["bytes_per_second_limit"]
    assert "interactive_beside_bulk" in proc.stdout
