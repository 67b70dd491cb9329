"""Memory freed after a connection storm goes back to the system (glibc keeps it otherwise)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from derper import memory

CODE = """
import trio
from derper import memory
from derper.metrics.procstat import rss_bytes

base = rss_bytes()
# What TLS connections do to the heap: many mid-sized blocks, all freed at the end, with a
# few survivors scattered among them so the heap's top cannot shrink by itself.
blocks = [bytearray(48 << 10) for _ in range(3000)]
survivors = blocks[::500]
del blocks
grown = rss_bytes()

async def main():
    with trio.move_on_after(0.2):
        await memory.trim_forever(0.05)

trio.run(main)
print(base, grown, rss_bytes())
"""


def test_freed_heap_goes_back_to_the_system():
    if memory._malloc_trim() is None:
        pytest.skip("not glibc: nothing is kept back, nothing to trim")
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True,
                         check=True).stdout
    base, grown, trimmed = map(int, out.split())
    assert grown - base > 100 << 20  # the blocks were on the heap and stayed there when freed
    assert trimmed - base < (grown - base) / 4
