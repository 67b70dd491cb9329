"""``-workers N``: the supervisor process, and the worker's side of their contract.

The supervisor does what must happen once per host before any worker starts (the server key,
the self-signed certificate and its printed pin, the ACME account key: ``Server.prepare``),
binds one set of sockets per worker on the same ports (SO_REUSEPORT), and starts each worker as
``python -m derper`` with the same flags, its sockets and its role (``plan.WorkerRole``). It
reports ``started`` (systemd's READY) once every worker listens, passes SIGHUP on, turns
SIGTERM and SIGINT into a SIGTERM for each worker (each tells its clients it is restarting),
and restarts a worker that dies, after a delay that grows while it keeps dying. Each worker
holds the read end of a pipe to it (``lifeline``): when the supervisor dies, the worker reads
EOF and shuts down, so none is left behind.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Mapping

import trio

from .. import logs, signals
from ..disk.keyfile import write_key_file
from ..errors import ConfigError
from ..net.addr import host_literal
from ..net.server_sockets import ServerSockets
from ..proto.keys import public_text
from ..server import Server
from .plan import ROLE_ENV, WorkerRole, snapshot_path

log = logs.get("derper.workers")

RESTART_MIN, RESTART_MAX = 0.5, 30.0  # delay before restarting a dead worker, doubling
STABLE_AFTER = 60.0  # a worker that ran this long restarts after RESTART_MIN again
STOP_MARGIN = 10.0  # beyond -shutdown-grace, what a worker gets before SIGKILL


class WorkerStartError(ConfigError):
    """A worker died before the host was ready: the same would happen again."""


class Supervisor:
    def __init__(self, server: Server, count: int, argv: list[str],
                 environ: Mapping[str, str], key_path: Path | None) -> None:
        """``server``: the configuration, checked and prepared (key, certificates) but not
        run; ``key_path``: its key file (None: a throwaway -dev key, written for the workers
        into the shared directory)."""
        self.server, self.count, self.argv = server, count, argv
        # Only the supervisor speaks to systemd (READY once, for the whole host).
        self.environ = {k: v for k, v in environ.items() if k != "NOTIFY_SOCKET"}
        self.key_path = key_path
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="derper-workers-",
                                                 dir=environ.get("RUNTIME_DIRECTORY")))
        self.sibling_key = secrets.token_bytes(32)
        self.sockets: list[ServerSockets] = []
        self.procs: dict[int, trio.Process] = {}
        self.ready: set[int] = set()
        self.stopping = False
        self.restarts = 0
        self._all_ready = trio.Event()

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Until SIGTERM/SIGINT (or a cancel); raises OSError if the sockets cannot be bound."""
        signals.block()
        try:
            await self._bind()
            await self._serve(task_status)
        finally:
            with trio.CancelScope(shield=True):
                await self._stop_all()
                for sockets in self.sockets:
                    await sockets.aclose()
            shutil.rmtree(self.runtime_dir, ignore_errors=True)

    async def _serve(self, task_status) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._signal_loop, nursery.cancel_scope)
                for index in range(self.count):
                    nursery.start_soon(self._keep, index)
                await self._all_ready.wait()
                main = self.sockets[0]
                where = host_literal(self.server.listen_host)
                log.info("derper listening", workers=self.count,
                         addr=f"{where}:{main.ports['main']}",
                         stun=f"{where}:{main.ports['stun']}/udp" if main.stun else None,
                         pids=",".join(str(p.pid) for _, p in sorted(self.procs.items())),
                         server_key=public_text(self.server.relay.public_key))
                task_status.started(self)  # systemd's READY=1, from the command layer
        except BaseExceptionGroup as group:
            failed = group.subgroup(WorkerStartError)
            if failed is None:
                raise
            while isinstance(failed, BaseExceptionGroup):
                failed = failed.exceptions[0]
            raise failed from None

    async def _bind(self) -> None:
        # First without SO_REUSEPORT, closed at once: a port another program holds is refused
        # as it would be without workers, instead of being silently shared with it.
        probe = await self.server.open_sockets()
        ports = probe.ports
        await probe.aclose()
        for _ in range(self.count):
            self.sockets.append(await self.server.open_sockets(reuse_port=True, ports=ports))

    def _role(self, index: int, ready_fd: int, lifeline_fd: int) -> WorkerRole:
        key_path = self.key_path
        if key_path is None:
            key_path = self.runtime_dir / "server.key"
            if not key_path.exists():
                write_key_file(key_path, self.server.relay.keypair)
        return WorkerRole(index, self.count, os.fspath(self.runtime_dir), self.sibling_key,
                          os.fspath(key_path), os.getpid(), self.sockets[index].fds(), ready_fd,
                          lifeline_fd)

    async def _keep(self, index: int) -> None:
        """Run worker ``index``, and again whenever it dies, until the host stops. A worker that
        dies before the host was ever ready is a start-up failure: the host stops with it."""
        delay = RESTART_MIN
        while not self.stopping:
            started = time.monotonic()
            try:
                code = await self._run_worker(index)
            except OSError as e:  # no process at all (out of memory, out of pids)
                code = 1
                log.error("cannot start a worker", worker=index, error=e.strerror or str(e))
            if self.stopping:
                return
            if not self._all_ready.is_set():
                raise WorkerStartError(f"worker {index} exited during start-up ({code}); its "
                                       "log lines above say why")
            self.restarts += 1
            if time.monotonic() - started > STABLE_AFTER:
                delay = RESTART_MIN
            how = (f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}")
            log.error("worker died; restarting it", worker=index, how=how,
                      restart_in=f"{delay:.1f}s", restarts=self.restarts)
            snapshot_path(self.runtime_dir, index).unlink(missing_ok=True)  # stale gauges
            await trio.sleep(delay)
            delay = min(delay * 2, RESTART_MAX)

    async def _run_worker(self, index: int) -> int:
        read_end, write_end = os.pipe()
        life_read, life_write = os.pipe()
        role = self._role(index, write_end, life_read)
        env = {**self.environ, ROLE_ENV: role.to_env()}
        fds = [fd for group in role.fds.values() for fd in group] + [write_end, life_read]
        try:
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "derper", *self.argv], env=env, pass_fds=fds)
        except BaseException:
            os.close(life_write)
            raise
        finally:
            os.close(write_end)
            os.close(life_read)
        self.procs[index] = proc
        ready = trio.lowlevel.FdStream(read_end)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._await_ready, index, ready)
                code = await proc.wait()
                nursery.cancel_scope.cancel()
        finally:
            self.ready.discard(index)
            await ready.aclose()
            os.close(life_write)
        return code

    async def _await_ready(self, index: int, ready: trio.lowlevel.FdStream) -> None:
        if await ready.receive_some(1):
            self.ready.add(index)
            if len(self.ready) == self.count:
                self._all_ready.set()

    async def _signal_loop(self, scope: trio.CancelScope) -> None:
        async for signum in signals.receive():
            if signum == signal.SIGHUP:
                log.info("SIGHUP: passing it to every worker")
                self._signal_all(signal.SIGHUP)
            else:
                log.info("shutting down the workers", signal=signal.Signals(signum).name)
                await self._stop_all()
                scope.cancel()
                return

    def _signal_all(self, signum: int) -> None:
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.send_signal(signum)

    async def _stop_all(self) -> None:
        """SIGTERM to every worker (each tells its clients it is restarting), SIGKILL for any
        still there after the grace period."""
        self.stopping = True
        self._signal_all(signal.SIGTERM)
        with trio.move_on_after(self.server.config.shutdown_grace + STOP_MARGIN):
            for proc in list(self.procs.values()):
                await proc.wait()
        for proc in self.procs.values():
            if proc.returncode is None:
                log.error("worker did not stop in time; killing it", pid=proc.pid)
                proc.kill()
                await proc.wait()


class WorkerReady:
    """The ``task_status`` a worker's ``Server.run`` reports to: tell the supervisor."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def started(self, value: object = None) -> None:
        os.write(self.fd, b"R")
        os.close(self.fd)
