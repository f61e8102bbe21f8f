"""Prometheus metrics of one service instance, through prometheus_client (one registry per app).

Names follow prometheus_client's conventions: counters end in ``_total``, the latency histogram is
in seconds, the loaded detector is an info metric. Store errors and health are read from the store
when Prometheus scrapes (a custom collector), so the number can never drift from the store's own.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from routescan.service.store import StoreHealth

# ``*_created`` series double the exposition and no dashboard of ours reads them
disable_created_metrics()

SCORE_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
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


AGENT_OUTCOMES = ("submitted", "sent", "dropped", "spooled", "replayed", "rejected", "build_errors")
# microsecond CPU-time counters the agent reports beside its outcomes (SenderCounters)
AGENT_TIMES = {"step_us": "step", "forward_us": "forward", "sender_us": "sender"}
_AGENT_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,64}$")
MAX_AGENTS = 1000  # bounds the series a misbehaving client could create


class AgentCollector(Collector):
    """``routescan_agent_traces_total{agent, outcome}``: the totals each in-process agent reports
    with its batches (spooled and dropped traces happen where the daemon cannot see them)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._agents: OrderedDict[str, dict[str, int]] = OrderedDict()

    def report(self, agent: str | None, counters: str | None) -> bool:
        """Record one report (header values); anything malformed is ignored, never an error."""
        if not agent or not counters or not _AGENT_ID.match(agent) or len(counters) > 512:
            return False
        values: dict[str, int] = {}
        for part in counters.split(","):
            name, _, number = part.partition("=")
            if (name in AGENT_OUTCOMES or name in AGENT_TIMES) and number.isdigit() and len(number) <= 16:
                values[name] = int(number)
        if not values:
            return False
        with self._lock:
            self._agents[agent] = values
            self._agents.move_to_end(agent)
            while len(self._agents) > MAX_AGENTS:
                self._agents.popitem(last=False)
        return True

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "routescan_agent_traces",
            "Traces per in-process agent and outcome, as the agent last reported them.",
            labels=["agent", "outcome"],
        )
        with self._lock:
            snapshot = [(a, dict(v)) for a, v in self._agents.items()]
        seconds = CounterMetricFamily(
            "routescan_agent_seconds",
            "Seconds an agent reported: part=step (wall time the vLLM plugin added after each forward "
            "step, on the serving thread), forward (those forwards' wall time, for the ratio), sender "
            "(CPU time of its background thread).",
            labels=["agent", "part"],
        )
        for agent, values in snapshot:
            for name, value in values.items():
                if name in AGENT_TIMES:
                    seconds.add_metric([agent, AGENT_TIMES[name]], value / 1e6)
                else:
                    family.add_metric([agent, name], value)
        yield family
        yield seconds


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
        self.scores = Histogram(
            "routescan_score",
            "Harm scores by model id (the distribution, not only what crossed the threshold).",
            ["model_id"],
            buckets=SCORE_BUCKETS,
            registry=self.registry,
        )
        self.detector = Info("routescan_detector", "The loaded detector.", registry=self.registry)
        self.agents = AgentCollector()
        self.registry.register(self.agents)
        for outcome in ("sent", "failed", "dropped"):  # a series at 0 beats "no data" on a dashboard
            self.alerts.labels(outcome=outcome)

    def watch_model(self, model_id: str) -> None:
        """Start the per-model series at 0 for the model the detector reads."""
        for label in ("ok", "flagged"):
            self.scored.labels(model_id=model_id, label=label)
        self.flagged.labels(model_id=model_id)

    def watch_store(self, health: Callable[[], StoreHealth | None]) -> None:
        self.registry.register(StoreCollector(health))

    def value(self, name: str, **labels: str) -> float:
        """One sample's value (0 when absent), e.g. ``value("routescan_alerts_total", outcome="sent")``."""
        return self.registry.get_sample_value(name, labels) or 0.0
