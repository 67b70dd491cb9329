"""Hints only the relay host can give: is anything listening on the ports, does ufw block them.

The parsers of ``/proc/net/{tcp,udp}{,6}`` and of ``ufw status verbose`` are pure; ``hints``
reads them (``ufw`` only when it is installed and this runs as root, since it needs root) and
turns each port into one sentence for the ``fix:`` line of a check that failed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

_TCP_LISTEN = "0A"
_UFW_RULE = re.compile(r"^(?P<ports>[0-9,:]+)(?:/(?P<proto>tcp|udp))?(?: \(v6\))?\s+"
                       r"(?P<action>ALLOW|DENY|REJECT|LIMIT)(?: IN)?\s", re.M)


def listening_ports(proc_net: str, udp: bool) -> set[int]:
    """Local ports bound in one ``/proc/net/{tcp,udp}{,6}`` table: listening TCP sockets, or
    any bound UDP socket (UDP has no listen state)."""
    ports = set()
    for line in proc_net.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4 or ":" not in fields[1]:
            continue
        if udp or fields[3] == _TCP_LISTEN:
            ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def ufw_allows(status: str, port: int, proto: str) -> bool | None:
    """Whether ``ufw status verbose`` lets ``port``/``proto`` in: None when ufw is inactive
    (it blocks nothing), else True/False by the first matching rule and the default policy."""
    if "Status: active" not in status:
        return None
    for m in _UFW_RULE.finditer(status):
        if m.group("proto") not in (None, proto):
            continue
        if any(_in_range(part, port) for part in m.group("ports").split(",")):
            return m.group("action") in ("ALLOW", "LIMIT")
    return bool(re.search(r"Default: allow \(incoming\)", status))


def _in_range(part: str, port: int) -> bool:
    low, _, high = part.partition(":")
    return int(low) <= port <= int(high or low)


def hint(proto: str, port: int, listening: set[int] | None, ufw: str | None) -> str:
    """One sentence about ``port``/``proto`` on this host, for a fix line; "" if nothing is
    known. ``ufw``: its status text, "" when installed but unreadable, None when absent."""
    where = f"{proto.upper()} {port}"
    parts = []
    if listening is not None:
        if port in listening:
            parts.append(f"On this host something listens on {where}, so the block is "
                         "between here and the internet (firewall, security group, NAT).")
        else:
            parts.append(f"On this host nothing listens on {where}: is derper running "
                         "(systemctl status derper, docker ps) with this port?")
    if ufw == "":
        parts.append("ufw is installed: run the check as root to see whether it blocks "
                     f"{port}/{proto} (sudo ufw status).")
    elif ufw is not None:
        allowed = ufw_allows(ufw, port, proto)
        if allowed is False:
            parts.append(f"ufw is active and does not allow {port}/{proto}: "
                         f"sudo ufw allow {port}/{proto}.")
        elif allowed:
            parts.append(f"ufw allows {port}/{proto}.")
    return " ".join(parts)


def hints(ports: list[tuple[str, int]], timeout: float) -> dict[tuple[str, int], str]:
    """``hint`` for each (proto, port) from this machine's socket tables and ufw."""
    tables: dict[str, set[int] | None] = {}
    for proto in ("tcp", "udp"):
        found: set[int] | None = None
        for suffix in ("", "6"):
            try:
                text = Path(f"/proc/net/{proto}{suffix}").read_text()
            except OSError:
                continue
            found = (found or set()) | listening_ports(text, proto == "udp")
        tables[proto] = found
    ufw = _ufw_status(timeout)
    return {(proto, port): hint(proto, port, tables[proto], ufw) for proto, port in ports}


def _ufw_status(timeout: float) -> str | None:
    if shutil.which("ufw") is None:
        return None
    if os.geteuid() != 0:
        return ""
    try:
        done = subprocess.run(["ufw", "status", "verbose"], capture_output=True, text=True,
                              timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout if done.returncode == 0 else ""
