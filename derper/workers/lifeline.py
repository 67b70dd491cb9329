"""A worker's tie to its supervisor: gone with it, however it went.

The supervisor keeps the write end of a pipe whose read end only this worker has. When the
supervisor dies (SIGKILL included) the kernel closes its end and the worker reads EOF.
PR_SET_PDEATHSIG would not do: it fires when the parent *thread* ends, and trio starts
processes from a worker thread that ends when idle.
"""

from __future__ import annotations

import os

import trio

from .plan import WorkerRole


def check_supervisor(role: WorkerRole) -> None:
    """At start: exit now if the supervisor is already gone."""
    if os.getppid() != role.supervisor_pid:
        raise SystemExit("derper worker: the supervisor is gone")


async def wait_for_supervisor_exit(role: WorkerRole) -> None:
    """Return when the supervisor has died (its end of the lifeline closed)."""
    lifeline = trio.lowlevel.FdStream(role.lifeline_fd)
    while await lifeline.receive_some(64):
        pass
