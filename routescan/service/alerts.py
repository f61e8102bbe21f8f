"""Webhook alerts for flagged requests, sent off the request path.

A bounded queue decouples scoring from the webhook: when it is full the alert is dropped and
counted, so a slow or dead webhook can never slow scoring. The payload is the score result
(ids, score, label, detector), never text.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from typing import Any

from routescan.service.metrics import Metrics

log = logging.getLogger("routescan.alerts")


class AlertSender:
    def __init__(
        self,
        url: str,
        *,
        metrics: Metrics,
        max_queue: int = 1000,
        retries: int = 3,
        timeout_s: float = 2.0,
        backoff_s: float = 0.2,
    ) -> None:
        self.url = url
        self.metrics = metrics
        self.retries = retries
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._run, name="routescan-alerts", daemon=True)
        self._stopping = threading.Event()

    def start(self) -> AlertSender:
        self._thread.start()
        return self

    def send(self, payload: dict[str, Any]) -> bool:
        """Queue an alert without blocking; False (and a counted drop) when the queue is full."""
        try:
            self._queue.put_nowait(payload)
            return True
        except queue.Full:
            self.metrics.alerts.labels(outcome="dropped").inc()
            return False

    def close(self, timeout: float = 2.0) -> None:
        self._stopping.set()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        self._thread.join(timeout=timeout)

    def _run(self) -> None:
        import httpx

        with httpx.Client(timeout=self.timeout_s) as client:
            while True:
                payload = self._queue.get()
                if payload is None:
                    return
                self._deliver(client, payload)

    def _deliver(self, client: Any, payload: dict[str, Any]) -> None:
        import httpx

        for attempt in range(self.retries + 1):
            if self._stopping.is_set() and attempt:
                break
            try:
                response = client.post(self.url, json=payload)
                if response.status_code < 500:
                    outcome = "sent" if response.is_success else "failed"
                    self.metrics.alerts.labels(outcome=outcome).inc()
                    return
            except httpx.HTTPError as exc:
                log.debug("webhook attempt %d failed: %s", attempt + 1, type(exc).__name__)
            time.sleep(self.backoff_s * (2**attempt))
        self.metrics.alerts.labels(outcome="failed").inc()
