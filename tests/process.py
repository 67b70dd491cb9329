"""Run the real ``derper`` console script as a child process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from contextlib import asynccontextmanager
from pathlib import Path

import trio

DERPER = str(Path(sys.executable).with_name("derper"))


async def stun_query(port: int) -> None:
    """A Tailscale STUN request to 127.0.0.1:``port`` must get Go's exact reply."""
    from stun.message import respond, tailscale_request

    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        await sock.bind(("127.0.0.1", 0))
        request = tailscale_request(os.urandom(12))
        await sock.sendto(request, ("127.0.0.1", port))
        with trio.fail_after(5):
            reply, _ = await sock.recvfrom(1500)
        expected, _ = respond(request, "127.0.0.1", sock.getsockname()[1])
        assert reply == expected


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DerperProcess:
    def __init__(self, args: list[str], workdir: Path, env: dict | None = None,
                 wrapper: list[str] = ()) -> None:
        """``wrapper`` goes in front of the command (e.g. ``prlimit --nofile=...``, which
        execs derper under the same pid)."""
        self.log_path = workdir / f"derper-{len(list(workdir.glob('derper-*.log')))}.log"
        self.out_path = self.log_path.with_suffix(".out")
        self._log = open(self.log_path, "wb")
        self._out = open(self.out_path, "wb")
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("DERP_")}
        full_env.update(env or {})
        self.proc = subprocess.Popen([*wrapper, DERPER, *args], stdout=self._out, stderr=self._log,
                                     env=full_env)

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    async def wait_for_log(self, text: str, timeout: float = 15) -> None:
        with trio.fail_after(timeout):
            while text not in self.log:
                if self.proc.poll() is not None:
                    raise AssertionError(f"derper exited ({self.proc.returncode}):\n{self.log}")
                await trio.sleep(0.02)

    async def wait(self, timeout: float = 10) -> int:
        with trio.fail_after(timeout):
            while self.proc.poll() is None:
                await trio.sleep(0.02)
        return self.proc.returncode

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self._log.close()
        self._out.close()


@asynccontextmanager
async def derper(args: list[str], workdir: Path, env: dict | None = None,
                 ready: str = "derper listening", wrapper: list[str] = ()):
    """A derper process, running and past the ``ready`` log line, killed on exit."""
    proc = DerperProcess(args, workdir, env, wrapper)
    try:
        await proc.wait_for_log(ready)
        yield proc
    finally:
        proc.close()


@asynccontextmanager
async def notified_derper(args: list[str], workdir: Path):
    """A derper told to notify a socket of ours as systemd's (``NOTIFY_SOCKET``): yields the
    process and that socket, to read what it tells systemd. Killed on exit."""
    path = str(workdir / "notify")
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        await sock.bind(path)
        proc = DerperProcess(args, workdir, env={"NOTIFY_SOCKET": path})
        try:
            yield proc, sock
        finally:
            proc.close()


def run_derper(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """Run derper to completion (for commands that must exit at once)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("DERP_")}
    full_env.update(env or {})
    return subprocess.run([DERPER, *args], capture_output=True, text=True, timeout=30,
                          env=full_env)
