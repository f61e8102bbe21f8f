"""Prometheus text-format metrics, kept in process (a few counters and one histogram family)."""

from __future__ import annotations

import threading
from collections import defaultdict

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

_HELP = {
    "routescan_requests_total": ("counter", "HTTP requests by endpoint and status code."),
    "routescan_request_seconds": ("histogram", "Request latency by endpoint."),
    "routescan_scored_total": ("counter", "Requests scored, by model id and label."),
    "routescan_flagged_total": ("counter", "Requests flagged, by model id."),
    "routescan_store_errors_total": ("counter", "Audit store read / write failures."),
    "routescan_alerts_total": ("counter", "Webhook alerts by outcome (sent, failed, dropped)."),
    "routescan_detector_info": ("gauge", "The loaded detector (value 1)."),
}


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    body = ",".join(
        f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for k, v in sorted(labels.items())
    )
    return "{" + body + "}"


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, dict[tuple, float]] = defaultdict(lambda: defaultdict(float))
        self._hist: dict[tuple, list[float]] = {}
        self._gauges: dict[str, dict[tuple, float]] = defaultdict(dict)

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._counters[name][key] += amount

    def set(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self._gauges[name][tuple(sorted(labels.items()))] = value

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            counts = self._hist.setdefault(key, [0.0] * (len(BUCKETS) + 2))  # buckets..., count, sum
            for i, edge in enumerate(BUCKETS):
                if seconds <= edge:
                    counts[i] += 1
            counts[-2] += 1
            counts[-1] += seconds

    def value(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._counters[name].get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            names = sorted(set(self._counters) | set(self._gauges) | {k[0] for k in self._hist} | set(_HELP))
            for name in names:
                kind, text = _HELP.get(name, ("untyped", name))
                lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
                for key, value in sorted(self._counters.get(name, {}).items()):
                    lines.append(f"{name}{_labels(dict(key))} {value:g}")
                for key, value in sorted(self._gauges.get(name, {}).items()):
                    lines.append(f"{name}{_labels(dict(key))} {value:g}")
                for (hname, key), counts in sorted(self._hist.items()):
                    if hname != name:
                        continue
                    labels = dict(key)
                    for edge, count in zip(BUCKETS, counts, strict=False):
                        lines.append(f"{name}_bucket{_labels({**labels, 'le': f'{edge:g}'})} {count:g}")
                    lines.append(f"{name}_bucket{_labels({**labels, 'le': '+Inf'})} {counts[-2]:g}")
                    lines.append(f"{name}_count{_labels(labels)} {counts[-2]:g}")
                    lines.append(f"{name}_sum{_labels(labels)} {counts[-1]:.6f}")
        return "\n".join(lines) + "\n"
