"""Writing files that must never be seen half-written: keys, certificates, the ACME cache."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, data: bytes, mode: int, *, replace: bool) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then publish it whole.

    ``replace=False`` publishes with link(), which fails with FileExistsError if ``path``
    appeared meanwhile (never clobber a key someone else just created); ``replace=True``
    renames over the old file, so readers see the old or the new content, nothing between.
    Raises OSError; the temporary file never outlives the call.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` (and parents) as a 0700 directory if missing; raises OSError."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
