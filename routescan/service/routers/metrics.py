"""``GET /metrics``: Prometheus exposition of the instance's registry."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from routescan.service.deps import Authorized, MetricsDep

router = APIRouter(tags=["metrics"], dependencies=[Authorized])


@router.get("/metrics", response_class=Response)
async def prometheus(metrics: MetricsDep) -> Response:
    """Requests, latency histograms, scored / flagged by model id, store errors and health, alerts."""
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
