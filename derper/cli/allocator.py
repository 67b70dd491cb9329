"""The server runs on glibc's malloc: ``derper`` re-runs itself with ``PYTHONMALLOC=malloc``.

Python's own small-object allocator hands memory back only a whole 1 MiB arena at a time, and
only when nothing at all is left in it; after thousands of connections have come and gone, a
few surviving objects keep nearly every arena they grew alive, for good (3,000 DERP sessions
left 44-65 MB behind). glibc's malloc gives it back page by page (``derper.memory``). The
allocator is chosen when the interpreter starts, hence the re-run, once, before anything is
loaded; an allocator set by the operator (``PYTHONMALLOC=pymalloc``, say) is left alone.
"""

from __future__ import annotations

import os
import sys
from typing import Mapping

VARIABLE, ALLOCATOR = "PYTHONMALLOC", "malloc"


def exec_with_malloc(environ: Mapping[str, str]) -> None:
    """Replace this process with the same command on glibc's malloc; returns only if an
    allocator is set already (or the re-run cannot be made: then on Python's)."""
    if VARIABLE in environ or not sys.executable or len(sys.orig_argv) < 2:
        return
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]],
                  {**environ, VARIABLE: ALLOCATOR})
    except OSError:
        return
