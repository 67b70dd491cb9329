"""Turns on the event loop for connections that are not relaying: handshakes and closes.

The shell around ``limits.LoopShare``. Such work asks for a ``turn`` before each step (a TLS
handshake step, an HTTP request, the DERP handshake, a session's teardown) and is charged the
loop time the step took. Beyond the share, steps wait in line and ``run`` lets one go per pass
of the scheduler: between two of them every relaying session that has something to do gets its
turn. There are three lines, served in rotation so none waits behind another's flood: steps of
connections on their way in (handshakes, requests), closes (``close_turn``), and the accept
loops (``admit``), which also wait behind every step of a connection on its way in: new
connections queue in the kernel's accept queue, which costs the relay nothing, and work already
started is finished first. A newcomer's handshake thus never waits behind thousands of sessions
closing at once.
"""

from __future__ import annotations

import time
from typing import Callable

import trio

from .limits import LoopShare

# A measured step that awaited (a send the peer did not take at once) is charged at most this:
# waiting is not loop time, and a peer must not be able to spend others' share by stalling.
MAX_CHARGE = 0.01


class Pacer:
    """``relayed``: a counter that grows with relayed packets (busy or quiet). ``run`` must be
    running (the server's nursery) for a waiting step ever to get its turn."""

    def __init__(self, relayed: Callable[[], int], clock: Callable[[], float] = time.perf_counter,
                 **share) -> None:
        self._relayed = relayed
        self._clock = clock
        self.share = LoopShare(clock(), **share)
        self._steps = trio.lowlevel.ParkingLot()  # connections on their way in, in order
        self._closes = trio.lowlevel.ParkingLot()  # connections closing, in order
        self._admits = trio.lowlevel.ParkingLot()  # accept loops: after every step
        self._lines = (self._steps, self._closes, self._admits)
        self._next = 0  # the line ``run`` looks at first
        self._idle = trio.lowlevel.ParkingLot()  # ``run``, while nobody waits
        self.charged = 0.0  # loop seconds charged so far
        self.waited = 0  # turns that had to wait

    def _may_run(self) -> bool:
        return self.share.may_run(self._clock(), self._relayed())

    async def turn(self) -> None:
        """Before a step of work under way: returns at once (no checkpoint) if the share
        allows it and nobody is waiting, else waits in line."""
        if not self._steps and self._may_run():
            return
        await self._park(self._steps)

    async def close_turn(self) -> None:
        """Before closing a connection: as ``turn``, in the line of closes."""
        if not self._closes and self._may_run():
            return
        await self._park(self._closes)

    async def admit(self) -> None:
        """Before accepting a connection: at once if the share allows it and nobody waits,
        else after every step waiting."""
        if not self._steps and not self._admits and self._may_run():
            return
        await self._park(self._admits)

    async def _park(self, lot: trio.lowlevel.ParkingLot) -> None:
        self.waited += 1
        if self._idle:
            self._idle.unpark()
        await lot.park()

    def charge(self, seconds: float) -> None:
        """A step took ``seconds`` of the loop (capped at MAX_CHARGE)."""
        seconds = min(seconds, MAX_CHARGE)
        self.charged += seconds
        self.share.charge(self._clock(), seconds)

    def measured(self) -> _Measured:
        """``with pacer.measured(): <a step>``: charge what it takes."""
        return _Measured(self)

    async def call(self, step: Callable[[], object]) -> object:
        """``step()`` in its turn, charged."""
        await self.turn()
        start = self._clock()
        try:
            return step()
        finally:
            self.charge(self._clock() - start)

    async def run(self) -> None:
        """Hand out turns, one per pass of the scheduler, to the lines in rotation; an accept
        only while no step is waiting."""
        lines = self._lines
        while True:
            steps = bool(self._steps)
            for k in range(3):
                i = (self._next + k) % 3
                if lines[i] and (i != 2 or not steps):
                    lines[i].unpark()
                    self._next = i + 1
                    break
            else:
                await self._idle.park()
                continue
            await trio.lowlevel.checkpoint()  # the next turn in the next pass


class _Measured:
    __slots__ = ("_pacer", "_start")

    def __init__(self, pacer: Pacer) -> None:
        self._pacer = pacer

    def __enter__(self) -> None:
        self._start = self._pacer._clock()

    def __exit__(self, *exc) -> None:
        pacer = self._pacer
        pacer.charge(pacer._clock() - self._start)
