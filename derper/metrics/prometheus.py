"""``/metrics`` on ``-metrics-addr``: the exposition as a prometheus-client registry, served by
hypercorn's trio worker on its own listener so scrapes never queue behind DERP traffic.

The collector converts ``exposition.Metric`` at scrape time; names follow Prometheus
conventions (``promtool check metrics`` passes): Go's base name, ``_total`` on counters,
seconds instead of milliseconds.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app
from prometheus_client import make_asgi_app
from prometheus_client.core import (CollectorRegistry, CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, InfoMetricFamily, Metric)
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from ..net.addr import host_literal, parse_addr
from . import exposition

DEFAULT_ADDR = "127.0.0.1:9437"  # loopback; not Prometheus's own 9090

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


def registry(metrics: Callable[[], list[exposition.Metric]]) -> CollectorRegistry:
    """A private registry (not the global default) so several servers can run in one process."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(DerpCollector(metrics))
    ProcessCollector(registry=reg)  # process_resident_memory_bytes, _open_fds, _cpu_seconds…
    PlatformCollector(registry=reg)  # python_info
    return reg


def _asgi(reg: CollectorRegistry):
    metrics_app = make_asgi_app(reg)

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
        elif scope["path"] == "/metrics":
            await metrics_app(scope, receive, send)
        else:
            body = b"derper metrics are at /metrics\n"
            await send({"type": "http.response.start", "status": 404,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

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

    async def serve(self, reg: CollectorRegistry) -> None:
        """Serve until cancelled."""
        await worker_serve(wrap_app(_asgi(reg), self.config.wsgi_max_body_size, "asgi"),
                           self.config, sockets=self.sockets)
