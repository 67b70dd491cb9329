"""Garbage-collector settings for a process that holds thousands of connections.

Each new connection allocates a few hundred tracked objects that live as long as it does; at
Python's default thresholds (700, 10, 10) the collector spent a quarter of the server's CPU per
new connection walking them again (``derper bench conns``: 1.03 -> 0.74 ms/conn). The relay hot
path allocates no tracked objects, so rarer young passes cost it nothing. The load generator's
connection workers take the same setting for the same reason.
"""

from __future__ import annotations

import gc

THRESHOLDS = (20_000, 50, 100)


def for_many_connections() -> None:
    gc.set_threshold(*THRESHOLDS)
