"""Open files: take what the system allows, and cap DERP connections below it.

Every connection is a file descriptor. Left at a low soft limit (1024 under many systemd
defaults, 20,000 here), a busy relay hit ``EMFILE``: accepts failed in a loop and new clients
waited seconds. The hard limit is ours to take, and a connection cap derived from it turns
"out of files" into a clean HTTP 503 while certificates, metrics, STUN and half-open
connections still have descriptors to spare.
"""

from __future__ import annotations

import resource

HEADROOM = 256  # logs, certificate files, metrics scrapes, STUN, DNS, the key file


def raise_soft_limit() -> int:
    """Raise the open-file soft limit to the hard one; returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass  # a container may forbid it: the cap below follows whatever we have
    return soft


def connection_cap(open_files: int, max_handshakes: int) -> int:
    """DERP connections that fit beside both half-open pools (main port and HTTP helper)."""
    half_open = 2 * (max_handshakes or 1024)
    return max(64, open_files - half_open - HEADROOM)
