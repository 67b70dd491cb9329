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
    # A TLS + DERP handshake is millions of instructions; the clock's share is apart.
    assert result["instructions_per_conn"] > result["instructions_per_conn_less_clock"] > 10**6
    assert result["instructions_by_clock"] > 0
    assert "summed over the supervisor and 2 workers" in proc.stdout
    assert not list(Path(SCRIPT.parent.parent).glob("callgrind.out.*"))  # nothing left behind
