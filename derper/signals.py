"""SIGHUP, SIGTERM and SIGINT, taken in one place so that a storm of them cannot hurt.

A Python-level handler runs between bytecodes, even inside itself: thousands of signals in a
burst nest handler in handler until RecursionError escapes into whatever was running (an
attack run killed the server with 2 x 2,000 ``kill -HUP``). Here the signals are blocked in
every thread and one worker thread takes them with ``sigwait``. The kernel keeps at most one
pending instance of each, so a storm coalesces into a few deliveries and no Python code runs
in signal context at all.
"""

from __future__ import annotations

import signal
from typing import AsyncIterator

import trio

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def block(signals=HANDLED) -> None:
    """Hold ``signals`` pending from now on, for ``receive`` to take: call it from the main
    thread before other threads start (threads made later, such as trio's, inherit the mask)
    and before saying it listens, so that an early SIGHUP cannot kill the process."""
    signal.pthread_sigmask(signal.SIG_BLOCK, set(signals))


async def receive(signals=HANDLED) -> AsyncIterator[int]:
    """Yield each signal number as it arrives (coalesced), until the caller stops.

    Blocks ``signals`` first (``block``), if the caller has not yet.
    """
    wanted = set(signals)
    block(wanted)
    while True:
        # The waiting thread cannot be interrupted; on cancel it is abandoned, blocked in
        # sigwait, and ends with the process.
        yield await trio.to_thread.run_sync(signal.sigwait, wanted, abandon_on_cancel=True)
