"""How a host's work is split over ``-workers`` processes (pure).

What a worker is told by its supervisor travels in one environment variable (JSON): its index,
the inherited socket descriptors, the directory the workers share and the secret that lets them
link to each other. The host-wide limits are split into equal shares, one per worker, so their
sum is the limit the operator set: SO_REUSEPORT spreads new connections over the workers by a
hash of the client's address and port, so the shares fill evenly.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError

ROLE_ENV = "DERPER_WORKER_ROLE"  # set by the supervisor for its workers; not for operators
MAX_WORKERS = 64


def worker_count(text: str, cpus: int | None = None) -> int:
    """``-workers``: a number of processes, or ``auto`` (one per CPU this process may use)."""
    text = text.strip().lower()
    if text == "auto":
        if cpus is None:
            cpus = len(os.sched_getaffinity(0))
        return max(1, min(cpus, MAX_WORKERS))
    if not text.isdigit() or not 1 <= int(text) <= MAX_WORKERS:
        raise ConfigError(f"-workers must be auto or a number from 1 to {MAX_WORKERS}, "
                          f"not {text!r}")
    return int(text)


def share(total: int, count: int, index: int) -> int:
    """Worker ``index``'s part of an integer limit (0 = no cap stays 0); the parts sum to
    ``total`` and each is at least 1."""
    if total <= 0:
        return total
    return max(1, total // count + (1 if index < total % count else 0))


def rate_share(rate: float, count: int) -> float:
    """A worker's part of a rate (inf = unlimited stays inf)."""
    return rate if math.isinf(rate) else rate / count


def snapshot_path(runtime_dir: str | Path, index: int) -> Path:
    """Where worker ``index`` keeps its metrics for the others (``workers.host_metrics``)."""
    return Path(runtime_dir) / f"worker-{index}.metrics.json"


@dataclass(frozen=True)
class WorkerRole:
    """What one worker process is, as its supervisor made it."""

    index: int
    count: int
    runtime_dir: str  # sockets and metric snapshots the workers share (the supervisor's own)
    sibling_key: bytes  # the mesh key of the links between workers; never the region's
    key_path: str  # the server key file the supervisor loaded or made (the host's identity)
    supervisor_pid: int
    fds: dict[str, list[int]] = field(default_factory=dict)  # inherited sockets by listener
    ready_fd: int = -1  # written once when the worker listens
    lifeline_fd: int = -1  # reads EOF when the supervisor is gone, however it went

    @property
    def owner(self) -> bool:
        """Worker 0 does what happens once per host: ACME, the metrics listener."""
        return self.index == 0

    def socket_path(self, index: int) -> Path:
        return Path(self.runtime_dir) / f"worker-{index}.sock"

    def snapshot_path(self, index: int) -> Path:
        return snapshot_path(self.runtime_dir, index)

    @property
    def challenge_dir(self) -> Path:
        """HTTP-01 tokens: the CA's request may reach any worker's port-80 helper."""
        return Path(self.runtime_dir) / "acme-webroot"

    @property
    def siblings(self) -> list[int]:
        return [i for i in range(self.count) if i != self.index]

    def to_env(self) -> str:
        return json.dumps({"index": self.index, "count": self.count,
                           "runtime_dir": self.runtime_dir,
                           "sibling_key": self.sibling_key.hex(), "key_path": self.key_path,
                           "supervisor_pid": self.supervisor_pid, "fds": self.fds,
                           "ready_fd": self.ready_fd, "lifeline_fd": self.lifeline_fd})

    @classmethod
    def from_env(cls, text: str) -> WorkerRole:
        try:
            d = json.loads(text)
            return cls(int(d["index"]), int(d["count"]), str(d["runtime_dir"]),
                       bytes.fromhex(d["sibling_key"]), str(d["key_path"]),
                       int(d["supervisor_pid"]),
                       {k: [int(fd) for fd in v] for k, v in d["fds"].items()},
                       int(d["ready_fd"]), int(d["lifeline_fd"]))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"{ROLE_ENV} is not a worker role the supervisor wrote ({e}); "
                              "it is set by derper -workers for its own workers only") from e
