"""The scoring service (FastAPI): score traces or fingerprints, keep an audit log, export metrics.

One router per resource (``routescan/service/routers``), typed dependencies
(``routescan/service/deps.py``), and middleware that refuses what never belongs here before any
route runs (``routescan/service/guards.py``). Everything a request carries is validated by strict
schemas before it is touched; error bodies name the field and the reason but never echo values.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.middleware.trustedhost import TrustedHostMiddleware

from routescan import __version__
from routescan.detector.artifact import Detector, DetectorMismatch
from routescan.detector.artifact import detector_path as resolve_detector
from routescan.detector.scoring import InputRejected, Scorer, resolve_operating_point
from routescan.service.alerts import AlertSender
from routescan.service.deps import Runtime
from routescan.service.guards import BrowserGuard, RequestMetrics
from routescan.service.metrics import Metrics
from routescan.service.routers import audits, docs, probes, scores
from routescan.service.routers import detector as detector_routes
from routescan.service.routers import metrics as metrics_routes
from routescan.service.scoring import BatchTooLarge, FullFromNetwork, ScoringService, why
from routescan.service.settings import ServiceSettings
from routescan.service.store import AuditStore, StoreError, StoreReadError, open_audit_store
from routescan.telemetry.schema import ExportLevel

log = logging.getLogger("routescan.service")


def open_store(settings: ServiceSettings) -> AuditStore:
    """The audit store the settings name: a PostgreSQL URL (a fleet) or a SQLite file (one host)."""
    return open_audit_store(
        settings.audit_store_target(),
        retention_days=settings.retention_days,
        commit_window_s=settings.commit_window_ms / 1000,
    )


def create_app(
    settings: ServiceSettings, *, detector: Detector | None = None, store: AuditStore | None = None
) -> FastAPI:
    """Build the app. The lifespan loads the detector and opens the store unless they are given
    (the CLI opens both first, so their errors are one clear line before the server starts)."""
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        det = detector or Detector.load(resolve_detector(settings.detector))
        det = settings.scoring_detector(det)
        if det.export.level != ExportLevel.full:
            log.info("scoring '%s' export-level records (%s)", det.export.level.value, det.export.describe())
        point = resolve_operating_point(det.card, name=settings.operating_point)
        audit = store or open_store(settings)
        alerts = None
        if settings.webhook_url:
            alerts = AlertSender(
                settings.webhook_url,
                metrics=metrics,
                max_queue=settings.webhook_queue,
                retries=settings.webhook_retries,
                timeout_s=settings.webhook_timeout_s,
            ).start()
        service = ScoringService(Scorer(det, point), audit, metrics, settings, alerts)
        card = det.card
        metrics.detector.info(
            {
                "detector_id": card.detector_id,
                "version": card.version,
                "demo": str(card.demo).lower(),
                "model_id": card.spec.model_id,
                "operating_point": point.name,
            }
        )
        metrics.watch_model(card.spec.model_id)
        app.state.runtime = Runtime(service=service, store=audit)
        # Everything loaded so far (libraries, the detector) lives as long as the daemon. Frozen, the
        # cyclic collector no longer walks it on each full collection: those walks tripled the cost
        # of validating a batch of traces (scripts/bench_service.py; docs/benchmarks.md).
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()
            app.state.runtime = None
            if alerts is not None:
                alerts.close()
            audit.close()

    app = FastAPI(
        title="RouteScan",
        version=__version__,
        description="Scores MoE routing telemetry (traces or fingerprints) for harm. Never accepts text.",
        lifespan=lifespan,
        # served by routers/docs.py behind the token instead
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.runtime = None
    metrics.watch_store(lambda: app.state.runtime.store.health() if app.state.runtime else None)

    # added last = runs first: count everything, then refuse foreign hosts and browsers
    app.add_middleware(BrowserGuard)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=settings.trusted_hosts())
    app.add_middleware(RequestMetrics, metrics=metrics)

    for module in (scores, audits, detector_routes, probes, metrics_routes, docs):
        app.include_router(module.router)
    _install_error_handlers(app)
    _publish_body_schemas(app, scores.BODY_MODELS)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": [why(e) for e in exc.errors()][:20]}, status_code=422)

    @app.exception_handler(DetectorMismatch)
    async def mismatch(_: Request, exc: DetectorMismatch) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(InputRejected)
    async def rejected(_: Request, exc: InputRejected) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(FullFromNetwork)
    async def full_from_network(_: Request, exc: FullFromNetwork) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=403)

    @app.exception_handler(BatchTooLarge)
    async def too_many(_: Request, exc: BatchTooLarge) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=413)

    @app.exception_handler(StoreReadError)
    async def unreadable(_: Request, exc: StoreReadError) -> JSONResponse:
        return JSONResponse(
            {"detail": "the audit store could not be read; the daemon's log and /readyz say why"},
            status_code=503,
        )

    @app.exception_handler(StoreError)
    async def store_failed(_: Request, exc: StoreError) -> JSONResponse:
        return JSONResponse(
            {"detail": "the audit store could not record this score; it was not acknowledged"},
            status_code=503,
        )


def _publish_body_schemas(app: FastAPI, models: tuple[type[BaseModel], ...]) -> None:
    """Add the request-body models (validated by hand from the raw body) to the OpenAPI components."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = generate()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in models:
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, definition in body.pop("$defs", {}).items():
                components.setdefault(name, definition)
            components[model.__name__] = body
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
