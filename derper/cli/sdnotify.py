"""systemd readiness (sd_notify): tell a ``Type=notify`` unit's manager that derper listens.

So ``systemctl start derper`` returns once clients can connect (and the self-signed certificate
exists for ``derper derpmap``). A no-op outside systemd; never fails the server.
"""

from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``READY=1``) to ``$NOTIFY_SOCKET``; whether it was delivered."""
    path = os.environ.get("NOTIFY_SOCKET", "")
    if not path:
        return False
    if path.startswith("@"):  # abstract namespace
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(path)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True
