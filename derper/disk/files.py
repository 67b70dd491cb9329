"""Writing files that must never be seen half-written: keys, certificates, the ACME cache."""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# A fresh name, created exclusively and never through a symlink: a file or link planted in the
# directory beforehand cannot redirect the write.
_TMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def write_atomic(path: Path, data: bytes, mode: int, *, replace: bool) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then publish it whole.

    ``replace=False`` publishes with link(), which fails with FileExistsError if ``path``
    appeared meanwhile (never clobber a key someone else just created); ``replace=True``
    renames over the old file, so readers see the old or the new content, nothing between.
    The directory is fsynced afterwards, so the new name survives a power cut too.
    Raises OSError (a full disk leaves the old file as it was); the temporary file never
    outlives the call.
    """
    write_atomic_group([(path, data, mode)], replace=replace)


def write_atomic_group(files: list[tuple[Path, bytes, int]], *, replace: bool) -> None:
    """``write_atomic`` for files that only make sense together (a certificate and its key):
    every one is written and fsynced before any is published, so a full disk or a failed
    write leaves the old set whole, never a new key beside an old certificate."""
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data, mode in files:
            tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
            fd = os.open(tmp, _TMP_FLAGS, mode)
            staged.append((tmp, path))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for tmp, path in staged:
            if replace:
                os.replace(tmp, path)
            else:
                os.link(tmp, path)
        for parent in {path.parent for _, path in staged}:
            _fsync_dir(parent)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` itself (flock on the directory: no lock file
    left behind) for a create-if-missing step that two processes may run at once (two
    derpers, or workers, starting together): the second waits, then sees what the first made.
    Raises OSError."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` (and parents) as a 0700 directory if missing; raises OSError."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def unwritable_reason(path: Path) -> str | None:
    """Why a directory at ``path`` cannot be written or created (an strerror); None if it can.

    Only looks: the configuration check asks before anything is made.
    """
    existing = path
    while not os.path.exists(existing):  # "/" and "." exist, so this ends
        existing = existing.parent
    if not os.path.isdir(existing):
        return os.strerror(errno.ENOTDIR)
    if not os.access(existing, os.W_OK | os.X_OK):
        return os.strerror(errno.EACCES)
    return None
