"""What /proc says about a process: CPU seconds and resident memory.

The server reads its own (``pid="self"``) for its metrics; ``derper bench`` reads the server's,
summed over its process tree (a ``-workers`` supervisor and its workers).
"""

from __future__ import annotations

import os
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int | str = "self") -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime, all threads


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size now (``statm``'s second field, in pages)."""
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants, those alive now (a parent before its children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except OSError:
            continue
    return out


def cpu_by_process(pid: int) -> dict[int, float]:
    """CPU seconds of every process of ``pid``'s tree."""
    out = {}
    for p in process_tree(pid):
        try:
            out[p] = cpu_seconds(p)
        except OSError:
            pass
    return out


def cpu_by_processes(pids: list[int]) -> dict[int, float]:
    """``cpu_by_process`` over several trees (both nodes of a mesh benchmark)."""
    out: dict[int, float] = {}
    for pid in pids:
        out.update(cpu_by_process(pid))
    return out


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of ``pid``'s whole tree (shared pages counted in each process)."""
    total = 0
    for p in process_tree(pid):
        try:
            total += rss_bytes(p)
        except OSError:
            pass
    return total
