"""Memory freed after a connection storm goes back to the system (glibc keeps it otherwise);
after many connections, a full collection first (Python keeps what cycles and free lists hold)."""

from __future__ import annotations

import os
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
        await memory.trim_forever(lambda: 0, lambda: 0, interval=0.05, check=0.01)

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


STORM = """
import gc, os, trio
from derper import memory
from derper.metrics.procstat import rss_bytes

gc.disable()  # as the server's thresholds make it: no full collection of its own
base = rss_bytes()
keep = []
for i in range(300_000):  # what closed connections leave: garbage in cycles, a few survivors
    a = [i, bytes(64)]
    a.append([a])
    if i % 300 == 0:
        keep.append(bytes(64))
del a
grown = rss_bytes()
closed = [0]

async def main():
    async with trio.open_nursery() as nursery:
        nursery.start_soon(memory.trim_forever, lambda: closed[0], lambda: 3, 0.05, 0.01)
        await trio.sleep(0.3)  # trims, but no storm yet: no collection
        print(rss_bytes())
        closed[0] = memory.COLLECT_AFTER  # now many connections have come and gone
        await trio.sleep(0.3)
        nursery.cancel_scope.cancel()

trio.run(main)
print(base, grown, rss_bytes())
"""


def test_after_many_connections_a_collection_frees_what_cycles_held():
    if memory._malloc_trim() is None:
        pytest.skip("not glibc: nothing is kept back, nothing to trim")
    env = dict(os.environ, PYTHONMALLOC="malloc")
    out = subprocess.run([sys.executable, "-c", STORM], capture_output=True, text=True,
                         check=True, env=env).stdout
    trimmed_only, base, grown, collected = map(int, out.split())
    assert grown - base > 100 << 20
    assert trimmed_only - base > (grown - base) * 3 / 4  # garbage in cycles is not free
    assert collected - base < (grown - base) / 4


def test_a_collection_comes_with_the_trim_or_after_a_storm_and_only_with_few_left():
    policy = memory.Reclaim(closed=50, now=0.0, interval=10.0)
    storm = 50 + memory.COLLECT_AFTER
    assert policy.step(storm - 1, live=0, now=1.0) == (False, False)  # not yet a storm
    assert policy.step(storm, live=memory.COLLECT_MAX_LIVE + 1, now=1.5) == (False, False)
    assert policy.step(storm, live=memory.COLLECT_MAX_LIVE, now=2.0) == (True, True)  # at once
    assert policy.step(storm, live=0, now=11.9) == (False, False)  # 10 s from then
    assert policy.step(storm, live=0, now=12.0) == (False, True)  # none closed since: a trim
    assert policy.step(storm + 10, live=0, now=21.0) == (False, False)
    assert policy.step(storm + 10, live=0, now=22.0) == (True, True)  # with the periodic trim
    assert policy.step(storm + 20, live=memory.COLLECT_MAX_LIVE + 1, now=32.0) == (False, True)


def test_a_smaller_storm_is_collected_once_its_closes_die_down():
    policy = memory.Reclaim(closed=0, now=0.0, interval=10.0)
    closed = 0
    for i in range(1, 13):  # 3 s of 200 closes a second, a trickle of 2 a second after
        closed += 50 if i <= 12 else 0
        assert policy.step(closed, live=30, now=0.25 * i) == (False, False)
    got = []
    for i in range(13, 25):
        closed += 1 if i % 2 else 0
        got.append(policy.step(closed, live=30, now=0.25 * i))
    assert got.count((True, True)) == 1  # within a second of the storm dying down
    assert got.index((True, True)) <= 4
