"""``/metrics`` on ``-metrics-addr``: the exposition as a prometheus-client registry, served by
hypercorn's trio worker on its own listener so scrapes never queue behind DERP traffic; the
status page (``/status``, ``/status.json``) shares that listener, so it is never on the public
DERP port.

The collector converts ``exposition.Metric`` at scrape time; names follow Prometheus
conventions (``promtool check metrics`` passes): Go's base name, ``_total`` on counters,
seconds instead of milliseconds.
"""

from __future__ import annotations

import json
import logging
import operator
from typing import Callable, Iterable
from urllib.parse import parse_qs

from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app
from prometheus_client import make_asgi_app
from prometheus_client.core import (CollectorRegistry, CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, InfoMetricFamily, Metric)
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from ..net.addr import host_literal, parse_addr
from . import exposition, statuspage
from .status import StatusBoard

DEFAULT_ADDR = "127.0.0.1:9437"  # loopback; not Prometheus's own 9090
_TEXT = "text/plain; charset=utf-8"

_FAMILIES = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily}


def convert(m: exposition.Metric) -> Metric | None:
    """One exposition metric as a prometheus-client family, or None if it is varz-only."""
    if m.prom is None:
        return None
    kind = m.prom_kind or m.kind
    name = m.prom_name
    if kind == "histogram":
        buckets = [("+Inf" if b == float("inf") else str(b), c)
                   for b, c in m.histogram.cumulative()]
        return HistogramMetricFamily(name, m.help, buckets=buckets, sum_value=m.histogram.sum)
    label_names = [k for k, _ in m.samples[0][0]] if m.samples else []
    if kind == "info":
        family = InfoMetricFamily(name, m.help, labels=[])
        family.add_metric([], dict(m.samples[0][0]))
        return family
    family = _FAMILIES[kind](name, m.help, labels=label_names)
    for labels, value in m.samples:
        family.add_metric([v for _, v in labels], value * m.prom_scale)
    return family


class DerpCollector:
    """Reads the live exposition on every scrape: nothing is copied on the hot path."""

    def __init__(self, metrics: Callable[[], list[exposition.Metric]]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        for m in self._metrics():
            family = convert(m)
            if family is not None:
                yield family


_PROCESS_COMBINE = {"process_start_time_seconds": min, "process_max_fds": max}


class HostProcessCollector:
    """``process_*`` summed over the processes of the host's ``-workers`` and their supervisor
    (the start time is the earliest): memory and CPU of the whole relay, as one process had."""

    def __init__(self, pids: Callable[[], Iterable[int]]) -> None:
        self._pids = pids

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        for pid in self._pids():
            for family in ProcessCollector(pid=lambda pid=pid: pid, registry=None).collect():
                have = families.get(family.name)
                if have is None:
                    families[family.name] = family
                    continue
                combine = _PROCESS_COMBINE.get(family.name, operator.add)
                have.samples = [mine._replace(value=combine(mine.value, theirs.value))
                                for mine, theirs in zip(have.samples, family.samples)]
        return list(families.values())


def registry(metrics: Callable[[], list[exposition.Metric]],
             host_pids: Callable[[], Iterable[int]] | None = None) -> CollectorRegistry:
    """A private registry (not the global default) so several servers can run in one process.

    ``host_pids``: under -workers, the processes whose ``process_*`` figures add up."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(DerpCollector(metrics))
    if host_pids is None:
        ProcessCollector(registry=reg)  # process_resident_memory_bytes, _open_fds, _cpu_seconds…
    else:
        reg.register(HostProcessCollector(host_pids))
    PlatformCollector(registry=reg)  # python_info
    return reg


async def _respond(send, status: int, body: bytes, content_type: str,
                   extra: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type.encode()),
                            (b"content-length", str(len(body)).encode()),
                            (b"x-content-type-options", b"nosniff"), *extra]})
    await send({"type": "http.response.body", "body": body})


def _since(query: bytes) -> float | None:
    """``?since=UNIX``; ValueError if it is there but not a number."""
    values = parse_qs(query.decode("latin-1")).get("since")
    return float(values[0]) if values else None


def _asgi(reg: CollectorRegistry, status: StatusBoard):
    metrics_app = make_asgi_app(reg)

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        path = scope["path"]
        if path == "/metrics":
            await metrics_app(scope, receive, send)
        elif path == "/status.json":
            try:
                since = _since(scope.get("query_string", b""))
            except ValueError:
                await _respond(send, 400, b"since= wants Unix seconds\n", _TEXT)
                return
            body = json.dumps(status.snapshot(since), separators=(",", ":")).encode()
            await _respond(send, 200, body, "application/json", ((b"cache-control", b"no-store"),))
        elif (found := statuspage.asset(path.rstrip("/") or "/")):
            body, content_type = found
            await _respond(send, 200, body, content_type,
                           ((b"content-security-policy", statuspage.CSP),
                            (b"cache-control", b"no-cache")))
        else:
            await _respond(send, 404, b"derper serves /metrics and /status here\n", _TEXT)

    return app


class MetricsListener:
    """A bound ``/metrics`` socket; binding first lets the server report a bad address early."""

    def __init__(self, addr: str) -> None:
        host, port = parse_addr(addr)
        self.config = HypercornConfig()
        self.config.bind = [f"{host_literal(host) or '0.0.0.0'}:{port}"]
        self.config.accesslog = None
        errors = logging.getLogger("derper.metrics.counters.hypercorn")
        errors.setLevel(logging.WARNING)  # not its "Running on" banner: we log our own line
        self.config.errorlog = errors
        self.sockets = self.config.create_sockets()  # OSError if the address is unusable
        sock = self.sockets.insecure_sockets[0]
        sock.listen(self.config.backlog)
        self.host = host_literal(host) or "0.0.0.0"
        self.port = sock.getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    @property
    def status_url(self) -> str:
        return f"http://{self.host}:{self.port}/status"

    async def serve(self, reg: CollectorRegistry, status: StatusBoard) -> None:
        """Serve /metrics and the status page until cancelled."""
        await worker_serve(wrap_app(_asgi(reg, status), self.config.wsgi_max_body_size, "asgi"),
                           self.config, sockets=self.sockets)
