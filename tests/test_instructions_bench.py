"""``benchmarks/derp_instructions.py --conns N --workers 2`` end to end: every process of a
-workers host under callgrind, their dumps summed, the clock's share counted apart. Correctness
only (a handful of connections); the figures are in the README."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.system import require_binary

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "derp_instructions.py"


def test_instructions_per_connection_summed_over_the_workers(tmp_path):
    require_binary("valgrind", "valgrind")
    out = tmp_path / "i.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--conns", "4", "--workers", "2",
                           "--tree", str(SCRIPT.parent.parent), "--json", str(out)],
                          capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["workers"] == 2 and result["conns"] == 4
    assert result["processes"] == 3  # the supervisor and both workers, each under callgrind
    # A TLS + DERP handshake is millions of instructions. The clock's share is counted apart;
    # with 4 connections one garbage collection or snapshot more or less in either span moves
    # the difference by as much as the connections themselves, so only 200 give a figure.
    assert result["instructions_per_conn"] > 10**6
    assert result["instructions_by_clock"] > 0
    assert "summed over the supervisor and 2 workers" in proc.stdout
    assert not list(Path(SCRIPT.parent.parent).glob("callgrind.out.*"))  # nothing left behind
