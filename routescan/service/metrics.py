"""Prometheus metrics of one service instance, through prometheus_client (one registry per app).

Names follow prometheus_client's conventions: counters end in ``_total``, the latency histogram is
in seconds, the loaded detector is an info metric. Store errors and health are read from the store
when Prometheus scrapes (a custom collector), so the number can never drift from the store's own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from routescan.service.store import StoreHealth

# ``*_created`` series double the exposition and no dashboard of ours reads them
disable_created_metrics()

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class StoreCollector(Collector):
    """``routescan_store_errors_total`` and ``routescan_store_up``, read at scrape time."""

    def __init__(self, health: Callable[[], StoreHealth | None]) -> None:
        self._health = health

    def collect(self) -> Iterator[Metric]:
        health = self._health()
        yield CounterMetricFamily(
            "routescan_store_errors",
            "Audit store read / write / purge failures.",
            value=health.errors if health is not None else 0,
        )
        yield GaugeMetricFamily(
            "routescan_store_up",
            "1 when the audit store accepts writes.",
            value=int(health is not None and health.ready),
        )


class Metrics:
    """The service's metrics, registered in their own registry (tests build many apps)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "routescan_requests",
            "HTTP requests by endpoint and status code.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "routescan_request_seconds",
            "Request latency by endpoint.",
            ["endpoint"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.scored = Counter(
            "routescan_scored",
            "Requests scored, by model id and label.",
            ["model_id", "label"],
            registry=self.registry,
        )
        self.flagged = Counter(
            "routescan_flagged", "Requests flagged, by model id.", ["model_id"], registry=self.registry
        )
        self.alerts = Counter(
            "routescan_alerts",
            "Webhook alerts by outcome (sent, failed, dropped).",
            ["outcome"],
            registry=self.registry,
        )
        self.detector = Info("routescan_detector", "The loaded detector.", registry=self.registry)

    def watch_store(self, health: Callable[[], StoreHealth | None]) -> None:
        self.registry.register(StoreCollector(health))

    def value(self, name: str, **labels: str) -> float:
        """One sample's value (0 when absent), e.g. ``value("routescan_alerts_total", outcome="sent")``."""
        return self.registry.get_sample_value(name, labels) or 0.0
