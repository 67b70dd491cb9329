"""Real containers with podman: a local Debian base (no registry), images cached by tag.

Recipe and host quirks: testing-real-peers.md ("Containers"). The base image is made once with
debootstrap and kept under its tag, so later runs skip the ~60 s bootstrap; the derper image is
rebuilt each session (cached layers make that a few seconds).
"""

from __future__ import annotations

import os
import resource
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tests.system import require_binary

REPO = Path(__file__).resolve().parent.parent
BASE_IMAGE = "localhost/derper-test-base:bookworm"
SYSTEMD_IMAGE = "localhost/derper-test-systemd:bookworm"
HOST_CA = "/etc/ssl/certs/ca-certificates.crt"
SYSTEMD_CONTAINERFILE = f"""\
FROM {BASE_IMAGE}
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \\
    --no-install-recommends systemd systemd-sysv dbus procps >/dev/null \\
    && rm -rf /var/lib/apt/lists/*
CMD ["/sbin/init"]
"""


class Podman:
    """``podman`` with this host's fixes (runc, rlimits within the hard limit)."""

    def __init__(self, workdir: Path) -> None:
        require_binary("podman", "podman")
        require_binary("runc", "runc")
        require_binary("slirp4netns", "slirp4netns")
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        conf = workdir / "containers.conf"
        conf.write_text(f'[containers]\ndefault_ulimits = ["nofile={hard}:{hard}", '
                        f'"nproc=4096:4096"]\n[engine]\nruntime = "runc"\n')
        self.env = dict(os.environ, CONTAINERS_CONF=str(conf))
        self.workdir = workdir

    def __call__(self, *args: str, check: bool = True, timeout: float = 300,
                 input: bytes | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run(["podman", *args], env=self.env, capture_output=True,
                              timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout.decode()[-3000:]}\n{proc.stderr.decode()[-3000:]}")
        return proc

    def out(self, *args: str, **kw) -> str:
        return self(*args, **kw).stdout.decode()

    def logs(self, name: str) -> str:
        """What the container wrote to stdout, then to stderr (the log lines)."""
        proc = self("logs", name, check=False)
        return proc.stdout.decode() + proc.stderr.decode()

    def has_image(self, tag: str) -> bool:
        return self("image", "exists", tag, check=False).returncode == 0

    def build(self, tag: str, context: Path, *args: str) -> None:
        self("build", "--format", "docker", "--pull=never", "-v", f"{HOST_CA}:{HOST_CA}:ro",
             "-t", tag, *args, str(context), timeout=600)

    def base_image(self) -> str:
        """Debian bookworm with Python, made with debootstrap (no registry needed)."""
        if not self.has_image(BASE_IMAGE):
            require_binary("debootstrap", "debootstrap")
            with tempfile.TemporaryDirectory(dir=self.workdir) as rootfs:
                subprocess.run(["debootstrap", "--variant=minbase",
                                "--include=python3,python3-venv,python3-pip,ca-certificates",
                                "bookworm", rootfs], check=True, capture_output=True,
                               timeout=900)
                tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
                self("import", "--change", 'CMD ["python3"]', "-", BASE_IMAGE,
                     input=tar.stdout.read(), timeout=600)
                assert tar.wait() == 0
        return BASE_IMAGE

    def systemd_image(self) -> str:
        """The base plus systemd as PID 1 (and procps for /bin/kill), as on a real VM."""
        self.base_image()
        if not self.has_image(SYSTEMD_IMAGE):
            context = self.workdir / "systemd-image"
            context.mkdir(exist_ok=True)
            (context / "Containerfile").write_text(SYSTEMD_CONTAINERFILE)
            self.build(SYSTEMD_IMAGE, context)
        return SYSTEMD_IMAGE

    def run_detached(self, image: str, *args: str,
                     network: str | None = "--network=slirp4netns") -> str:
        """Start a uniquely named container, by default on slirp4netns (no host netfilter
        changes); ``network=None`` when ``args`` choose the network."""
        name = f"derper-test-{uuid.uuid4().hex[:10]}"
        self("run", "-d", "--name", name, *([network] if network else []), *args, image)
        return name

    def remove(self, name: str) -> None:
        self("rm", "-f", "-t", "2", name, check=False)

    def wait_for(self, predicate, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
            time.sleep(0.2)
