"""One ``/metrics`` and one ``/debug/varz`` for the whole host under ``-workers``.

Every worker writes its metrics to a snapshot file in the shared directory once a second; the
worker a scrape reaches adds the others' latest snapshots to its own live values, each family
by its ``combine`` rule. Why not prometheus-client's multiprocess mode: our counters are plain
integers bumped on the relay's hot path and read only on scrape; the multiprocess mode would
turn every increment into a write to a memory-mapped file, per packet. A snapshot costs one
small file write per second instead, and a worker that hangs or dies cannot stall a scrape.
"""

from __future__ import annotations

import heapq
import itertools
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Callable

import trio

from ..metrics.counters import Histogram, Stats
from ..metrics.exposition import Metric
from ..metrics.status import SENDERS_EVERY, TOP_SENDERS, Counts
from .plan import WorkerRole

SNAPSHOT_EVERY = 1.0  # seconds; a scrape sees the other workers this fresh


def encode(metrics: list[Metric], pid: int, board: Counts | None = None) -> bytes:
    out = []
    for m in metrics:
        d = {"name": m.name, "kind": m.kind, "help": m.help, "order": list(m.order),
             "varz": m.varz, "prom": m.prom, "prom_kind": m.prom_kind,
             "prom_scale": m.prom_scale, "varz_help": m.varz_help, "combine": m.combine,
             "samples": [[list(map(list, labels)), value] for labels, value in m.samples]}
        if m.histogram is not None:
            h = m.histogram
            d["histogram"] = [list(h.bounds), h.by_value, h.over_sum]
        out.append(d)
    doc: dict = {"pid": pid, "metrics": out}
    if board is not None:
        doc["board"] = {"stats": board.stats.to_json(), "clients": board.clients,
                        "connections": board.connections, "stun": list(board.stun),
                        "senders": board.senders}
    return json.dumps(doc, separators=(",", ":")).encode()


def decode(data: bytes) -> tuple[int, list[Metric]]:
    """(the worker's pid, its metrics); ValueError if the snapshot is not one of ours."""
    return _decode(json.loads(data))


def _decode(doc: dict) -> tuple[int, list[Metric]]:
    try:
        metrics = []
        for d in doc["metrics"]:
            hist = None
            if "histogram" in d:
                bounds, by_value, over_sum = d["histogram"]
                hist = Histogram(tuple(bounds))
                hist.by_value, hist.over_sum = list(by_value), over_sum
            samples = tuple((tuple(tuple(kv) for kv in labels), value)
                            for labels, value in d["samples"])
            metrics.append(Metric(d["name"], d["kind"], d["help"], samples, hist,
                                  tuple(d["order"]), d["varz"], d["prom"], d["prom_kind"],
                                  d["prom_scale"], d["varz_help"], d["combine"]))
        return int(doc["pid"]), metrics
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"not a worker metrics snapshot: {e}") from e


def merge(per_worker: list[list[Metric]]) -> list[Metric]:
    """The host's metrics from each worker's (index = worker), family by family, in the
    first worker's order."""
    families: dict[tuple, list[tuple[int, Metric]]] = {}
    for index, metrics in enumerate(per_worker):
        for m in metrics:
            families.setdefault((m.name, m.prom, m.varz, m.order), []).append((index, m))
    return [_combine(members) for members in families.values()]


def _combine(members: list[tuple[int, Metric]]) -> Metric:
    first = members[0][1]
    rule = first.combine
    if rule == "first" or len(members) == 1 and rule != "worker":
        return first
    if first.histogram is not None:
        h = Histogram(first.histogram.bounds)
        for _, m in members:
            if m.histogram is not None and m.histogram.bounds == h.bounds:
                h.by_value = [a + b for a, b in zip(h.by_value, m.histogram.by_value)]
                h.over_sum += m.histogram.over_sum
        return replace(first, histogram=h)
    values: dict[tuple, float] = {}
    for index, m in members:
        for labels, value in m.samples:
            if rule == "worker":
                labels = tuple(sorted(labels + (("worker", str(index)),)))
            if labels in values:
                values[labels] = max(values[labels], value) if rule == "max" else \
                    values[labels] + value
            else:
                values[labels] = value
    return replace(first, samples=tuple(sorted(values.items())))


class HostMetrics:
    """A worker's view of the host: its own live metrics plus the others' snapshots."""

    def __init__(self, role: WorkerRole, own: Callable[[], list[Metric]],
                 board: Callable[[], Counts], rank_senders: Callable[[float], None]) -> None:
        """``board``: this worker's status counts; ``rank_senders`` refreshes their list of
        heaviest senders (every few snapshots)."""
        self.role, self._own, self._board, self._rank = role, own, board, rank_senders
        self.pids: dict[int, int] = {role.index: os.getpid()}  # worker → pid, from snapshots

    def own(self) -> list[Metric]:
        """This worker's metrics, with the per-worker families that show the balance."""
        metrics = self._own()
        connections = stun = 0.0
        for m in metrics:
            if m.name == "derp_current_connections":
                connections = sum(v for _, v in m.samples)
            elif m.name == "stun_requests" and m.varz is False:
                stun = sum(v for _, v in m.samples)
        cpu = os.times()
        return metrics + [
            Metric("derper_worker_connections", "gauge", "DERP connections on each worker",
                   (((), connections),), varz=False, combine="worker"),
            Metric("derper_worker_stun_requests", "counter", "STUN datagrams each worker took",
                   (((), stun),), varz=False, combine="worker"),
            Metric("derper_worker_cpu_seconds", "counter", "CPU time each worker has used",
                   (((), cpu.user + cpu.system),), varz=False, combine="worker"),
        ]

    def host_pids(self) -> list[int]:
        """The supervisor and every worker last heard of (``process_*`` on /metrics)."""
        return [os.getppid(), *self.pids.values()]

    def _others(self) -> list[dict]:
        """The other workers' latest snapshots (a missing one: not started yet, or restarting;
        its clients are reconnecting)."""
        docs = []
        for index in self.role.siblings:
            try:
                doc = json.loads(self.role.snapshot_path(index).read_bytes())
                self.pids[index] = int(doc["pid"])
            except (OSError, ValueError, KeyError, TypeError):
                self.pids.pop(index, None)
                continue
            docs.append(doc)
        return docs

    def counts(self) -> Counts:
        """The status page's counts for the whole host."""
        mine = self._board()
        boards = [d["board"] for d in self._others() if isinstance(d.get("board"), dict)]
        try:
            senders = heapq.nlargest(TOP_SENDERS, [*mine.senders, *(
                s for b in boards for s in b["senders"])], key=lambda s: s["bytes_per_second"])
            return Counts(Stats.summed([mine.stats.to_json(), *(b["stats"] for b in boards)]),
                          mine.clients + sum(b["clients"] for b in boards),
                          mine.connections + sum(b["connections"] for b in boards),
                          [sum(v) for v in zip(mine.stun, *(b["stun"] for b in boards))],
                          senders)
        except (KeyError, TypeError):
            return mine  # a snapshot from another version: this worker's own figures

    def __call__(self) -> list[Metric]:
        per_worker: list[list[Metric]] = [self.own()]
        for doc in self._others():
            try:
                per_worker.append(_decode(doc)[1])
            except ValueError:
                continue
        merged = merge(per_worker)
        merged.append(Metric("derper_workers_reporting", "gauge",
                             "-workers processes whose metrics this scrape includes",
                             (((), len(per_worker)),), varz=False))
        return merged

    async def write_forever(self) -> None:
        """This worker's snapshot, once a second (rename: readers never see half a file)."""
        path = self.role.snapshot_path(self.role.index)
        tmp = Path(f"{path}.tmp")
        pid = os.getpid()
        for tick in itertools.count():
            if tick % SENDERS_EVERY == 0:
                self._rank(trio.current_time())
            tmp.write_bytes(encode(self.own(), pid, self._board()))
            os.replace(tmp, path)
            await trio.sleep(SNAPSHOT_EVERY)
