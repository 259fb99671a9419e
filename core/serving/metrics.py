"""Prometheus metrics of one service, in its own ``CollectorRegistry`` so several apps (and tests) can coexist."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from core.serving.batching import BatchStats

__all__ = ["CONTENT_TYPE_LATEST", "ServiceMetrics"]

# Latency buckets sized for model services whose targets are tens to hundreds of milliseconds.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _BatchCollector(Collector):
    """Reads the micro-batcher's histogram at scrape time, so it survives model reloads without bookkeeping."""

    def __init__(self, app_name: str, *, stats: Callable[[], BatchStats | None], version: Callable[[], int | None]):
        self.app_name = app_name
        self.stats = stats
        self.version = version

    def collect(self) -> Iterator[GaugeMetricFamily | HistogramMetricFamily]:
        stats = self.stats() or BatchStats()
        buckets: list[tuple[str, float]] = []
        for bound in _BATCH_BUCKETS:
            buckets.append((str(bound), float(sum(c for size, c in stats.sizes.items() if size <= bound))))
        buckets.append(("+Inf", float(stats.batches)))
        hist = HistogramMetricFamily("keel_batch_size", "Requests per model call (micro-batch size).", labels=["app"])
        hist.add_metric([self.app_name], buckets, sum_value=float(stats.items))
        yield hist
        gauge = GaugeMetricFamily(
            "keel_model_version", "Registry version of the model now serving (-1: none loaded).", labels=["app"]
        )
        version = self.version()
        gauge.add_metric([self.app_name], float(-1 if version is None else version))
        yield gauge


class ServiceMetrics:
    """Request counter, latency histogram and batch-size histogram of one app.

    Args:
        app_name: value of the ``app`` label on every series.
    """

    def __init__(self, app_name: str) -> None:
        self.app_name = app_name
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["app", "route", "method", "status"]
        self.requests = Counter("keel_http_requests", "HTTP requests handled.", labels, registry=self.registry)
        self.latency = Histogram(
            "keel_http_request_duration_seconds",
            "Time from request to the end of the response.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )

    def observe_request(self, *, route: str, method: str, status: int, seconds: float) -> None:
        values = (self.app_name, route, method, str(status))
        self.requests.labels(*values).inc()
        self.latency.labels(*values).observe(seconds)

    def track_batches(self, *, stats: Callable[[], BatchStats | None], version: Callable[[], int | None]) -> None:
        """Exposes the batch-size histogram and the serving model version, read lazily at each scrape."""
        self.registry.register(_BatchCollector(self.app_name, stats=stats, version=version))

    def render(self) -> bytes:
        """The Prometheus text exposition of every series."""
        return generate_latest(self.registry)
