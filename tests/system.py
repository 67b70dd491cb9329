"""Real peers from Debian packages: tests install what they need instead of mocking it.

CI runs as root with apt reachable; on a machine where neither holds, the test is skipped with
the reason, never silently passed.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess

import pytest

_apt_updated = False
# Parallel test runs (or a package manager already running) hold dpkg's lock: wait, don't fail.
_WAIT_FOR_LOCK = ("-o", "DPkg::Lock::Timeout=600")


def require_binary(binary: str, package: str) -> str:
    """Path of ``binary``, installing Debian ``package`` first if it is missing."""
    path = shutil.which(binary)
    if path:
        return path
    proc = _install(binary, package)
    path = shutil.which(binary)
    if not path:
        pytest.fail(f"apt-get install {package} did not provide {binary}:\n{proc.stderr[-2000:]}")
    return path


def require_file(path: str, package: str) -> str:
    """``path`` (a plugin such as nginx's stream module), installing ``package`` if missing."""
    if os.path.exists(path):
        return path
    proc = _install(path, package)
    if not os.path.exists(path):
        pytest.fail(f"apt-get install {package} did not provide {path}:\n{proc.stderr[-2000:]}")
    return path


def _install(what: str, package: str) -> subprocess.CompletedProcess:
    global _apt_updated
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(f"{what} missing and cannot apt-get install {package} (not root)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if not _apt_updated:
        subprocess.run(["apt-get", *_WAIT_FOR_LOCK, "update", "-qq"], check=False, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
        _apt_updated = True
    return subprocess.run(["apt-get", *_WAIT_FOR_LOCK, "install", "-y", "-qq",
                           "--no-install-recommends", package],
                          env=env, capture_output=True, text=True, timeout=600)


def has_ipv6_loopback() -> bool:
    """Whether ``::1`` can be bound here (some containers have no IPv6 at all)."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False
