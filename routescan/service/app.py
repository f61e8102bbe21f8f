"""The scoring service (FastAPI): score traces or fingerprints, keep an audit log, export metrics.

Everything a request carries is validated by strict schemas before it is touched; error bodies
name the field and the reason but never echo values back, since a refused field may hold text.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from routescan import __version__
from routescan.detector.artifact import Detector, DetectorMismatch, default_detector_path
from routescan.service.alerts import AlertSender
from routescan.service.metrics import Metrics
from routescan.service.schemas import (
    AuditPage,
    AuditRow,
    BatchRequest,
    BatchResult,
    DetectorInfo,
    ScoreRequest,
    ScoreResult,
)
from routescan.service.settings import ServiceSettings
from routescan.service.store import AuditRecord, AuditStore, StoreError


class Scorer:
    """Score requests with one detector at one operating point, and record each in the store."""

    def __init__(
        self,
        detector: Detector,
        operating_point: str | None,
        store: AuditStore,
        metrics: Metrics,
        alerts: AlertSender | None = None,
    ) -> None:
        self.detector = detector
        self.point = detector.card.operating_point(operating_point)
        self.store = store
        self.metrics = metrics
        self.alerts = alerts

    def features(self, items: list[ScoreRequest]) -> np.ndarray:
        rows = []
        for index, item in enumerate(items):
            try:
                if item.trace is not None:
                    rows.append(self.detector.features(item.trace))
                else:
                    self.detector.check_fingerprint(item.fingerprint)  # type: ignore[arg-type]
                    rows.append(np.asarray(item.fingerprint.values, dtype=np.float64))  # type: ignore[union-attr]
            except DetectorMismatch as exc:
                raise DetectorMismatch(f"item {index}: {exc}" if len(items) > 1 else str(exc)) from None
        return np.vstack(rows)

    async def score(self, items: list[ScoreRequest]) -> tuple[list[ScoreResult], float]:
        start = time.perf_counter()
        scores = self.detector.predict_proba(self.features(items))
        card, point, now = self.detector.card, self.point, time.time()
        results, records = [], []
        for item, score in zip(items, scores, strict=True):
            model_id = item.trace.model_id if item.trace is not None else item.fingerprint.model_id  # type: ignore[union-attr]
            label = "flagged" if score >= point.threshold else "ok"
            records.append(
                AuditRecord(
                    item.trace_id,
                    model_id,
                    float(score),
                    label,
                    card.detector_id,
                    card.version,
                    point.name,
                    now,
                )
            )
            results.append(
                dict(
                    trace_id=item.trace_id,
                    model_id=model_id,
                    score=float(score),
                    label=label,
                    threshold=point.threshold,
                    operating_point=point.name,
                    detector_id=card.detector_id,
                    detector_version=card.version,
                    demo_detector=card.demo,
                )
            )
        await asyncio.wrap_future(self.store.submit(records))  # acknowledged only once committed
        latency_ms = (time.perf_counter() - start) * 1e3
        out = [ScoreResult(**r, latency_ms=latency_ms) for r in results]
        for result in out:
            self.metrics.inc("routescan_scored_total", model_id=result.model_id, label=result.label)
            if result.label == "flagged":
                self.metrics.inc("routescan_flagged_total", model_id=result.model_id)
                if self.alerts is not None:
                    self.alerts.send(result.model_dump(mode="json"))
        return out, latency_ms


class RequestMetrics:
    """Count requests and time them per route (a plain ASGI middleware: no per-request task hop)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", "unmatched")
            self.metrics.inc("routescan_requests_total", endpoint=endpoint, status=str(status[0]))
            self.metrics.observe("routescan_request_seconds", time.perf_counter() - start, endpoint=endpoint)


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413, by header and by bytes actually read."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._too_large(send)
            return
        # Read the body here (the app reads all of it anyway), so an oversized chunked body is
        # refused with 413 before any parsing, whatever the framework does with errors in receive().
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay([message], receive), send)
                return
            size += len(message.get("body", b""))
            if size > self.limit:
                await self._too_large(send)
                return
            parts.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        whole: Message = {"type": "http.request", "body": b"".join(parts), "more_body": False}
        await self.app(scope, _replay([whole], receive), send)

    async def _too_large(self, send: Send) -> None:
        response = JSONResponse(
            {"detail": f"request body over the {self.limit}-byte limit (max_body_bytes)"}, 413
        )
        await response({"type": "http"}, _empty_receive, send)


def _replay(messages: list[Message], then: Receive) -> Receive:
    """Hand out ``messages`` first, then defer to the real ``receive`` (e.g. to see a disconnect)."""
    queue = list(messages)

    async def receive() -> Message:
        if queue:
            return queue.pop(0)
        return await then()

    return receive


async def _empty_receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


def _why(error: dict[str, Any]) -> dict[str, Any]:
    """A validation error without its input value (which may be the very text being refused)."""
    loc = [str(p) for p in error.get("loc", ())]
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        msg = (
            f"unknown field '{loc[-1] if loc else '?'}' is not accepted: RouteScan takes telemetry "
            "(traces or fingerprints) only, never text or other fields"
        )
    elif kind == "json_invalid":
        msg = "the body is not valid JSON"
    else:
        msg = str(error.get("msg", "invalid value"))
    return {"loc": loc, "type": kind, "msg": msg}


def create_app(settings: ServiceSettings, *, detector: Detector | None = None) -> FastAPI:
    """Build the app; the detector and the store are opened by the lifespan (or given, for tests)."""
    token = settings.api_token()
    metrics = Metrics()
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        det = detector or Detector.load(settings.detector or default_detector_path())
        store = AuditStore(
            settings.db_path(),
            retention_days=settings.retention_days,
            commit_window_s=settings.commit_window_ms / 1000,
        ).open()
        alerts = None
        if settings.webhook_url:
            alerts = AlertSender(
                settings.webhook_url,
                metrics=metrics,
                max_queue=settings.webhook_queue,
                retries=settings.webhook_retries,
                timeout_s=settings.webhook_timeout_s,
            ).start()
        state["scorer"] = Scorer(det, settings.operating_point, store, metrics, alerts)
        card = det.card
        metrics.set(
            "routescan_detector_info",
            1,
            detector_id=card.detector_id,
            version=card.version,
            demo=str(card.demo).lower(),
            model_id=card.spec.model_id,
        )
        try:
            yield
        finally:
            if alerts is not None:
                alerts.close()
            store.close()

    app = FastAPI(
        title="RouteScan",
        version=__version__,
        description="Scores MoE routing telemetry (traces or fingerprints) for harm. Never accepts text.",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)

    async def require_token(request: Request) -> None:
        if token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(value.strip().encode(), token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    def scorer() -> Scorer:
        if "scorer" not in state:
            raise HTTPException(503, "the detector is not loaded yet")
        return state["scorer"]

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": [_why(e) for e in exc.errors()][:20]}, status_code=422)

    @app.exception_handler(DetectorMismatch)
    async def mismatch(_: Request, exc: DetectorMismatch) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(StoreError)
    async def store_failed(_: Request, exc: StoreError) -> JSONResponse:
        return JSONResponse(
            {"detail": "the audit store could not record this score; it was not acknowledged"},
            status_code=503,
        )

    auth = [Depends(require_token)]
    conflict = {409: {"description": "input of another model / launch model / fingerprint spec"}}

    @app.post(
        "/v1/score",
        response_model=ScoreResult,
        dependencies=auth,
        responses=conflict,
        openapi_extra=_json_body(ScoreRequest),
    )
    async def score_one(request: Request) -> ScoreResult:
        """Score one trace or fingerprint; the result is recorded in the audit log before it is returned."""
        item = await _parse(request, ScoreRequest)
        results, _ = await scorer().score([item])
        return results[0]

    @app.post(
        "/v1/score/batch",
        response_model=BatchResult,
        dependencies=auth,
        responses={**conflict, 413: {"description": "more items than max_batch"}},
        openapi_extra=_json_body(BatchRequest),
    )
    async def score_batch(request: Request) -> BatchResult | JSONResponse:
        """Score up to ``max_batch`` items in one call (one model pass, one audit transaction)."""
        batch = await _parse(request, BatchRequest)
        if len(batch.items) > settings.max_batch:
            return JSONResponse(
                {"detail": f"{len(batch.items)} items, over max_batch={settings.max_batch}"}, 413
            )
        results, latency = await scorer().score(batch.items)
        return BatchResult(
            results=results, flagged=sum(r.label == "flagged" for r in results), latency_ms=latency
        )

    @app.get("/v1/audits", response_model=AuditPage, dependencies=auth)
    async def audits(
        since: Annotated[datetime | None, Query(description="ISO 8601 time, inclusive")] = None,
        until: Annotated[datetime | None, Query(description="ISO 8601 time, exclusive")] = None,
        label: Literal["flagged", "ok"] | None = None,
        model_id: Annotated[str | None, Query(max_length=200)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0, le=2**62)] = 0,
    ) -> AuditPage:
        """The audit log, oldest first, filtered and paged (``next_offset`` is null on the last page)."""
        rows = await asyncio.to_thread(
            scorer().store.query,
            since=_ts(since),
            until=_ts(until),
            label=label,
            model_id=model_id,
            limit=limit + 1,
            offset=offset,
        )
        items = [
            AuditRow(**{**r, "created": datetime.fromtimestamp(r["created"], UTC)}) for r in rows[:limit]
        ]
        return AuditPage(items=items, next_offset=offset + limit if len(rows) > limit else None)

    @app.get("/v1/detector", response_model=DetectorInfo, dependencies=auth)
    async def detector_info() -> DetectorInfo:
        """What is loaded: model, fingerprint spec, thresholds, training summary."""
        s = scorer()
        card = s.detector.card
        return DetectorInfo(
            detector_id=card.detector_id,
            version=card.version,
            demo=card.demo,
            model_id=card.spec.model_id,
            launch_model=card.spec.launch_model,
            fingerprint_spec=card.spec.model_dump(mode="json"),
            features=card.spec.dim,
            operating_points=[p.model_dump() for p in card.operating_points],
            active_operating_point=s.point.name,
            estimator=card.estimator,
            training_command=card.training_command,
            corpus=card.corpus,
            training=card.training,
            metrics=card.metrics,
            notes=card.notes,
        )

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """Ready when the detector is loaded and the audit store accepts writes."""
        s = state.get("scorer")
        writable = bool(s) and await asyncio.to_thread(s.store.writable)
        ready = bool(s) and writable
        body = {"ready": ready, "detector_loaded": bool(s), "store_writable": writable}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", dependencies=auth, response_class=PlainTextResponse)
    async def prometheus() -> PlainTextResponse:
        """Prometheus metrics: requests, latency histograms, flagged counts by model id, store errors."""
        s = state.get("scorer")
        if s is not None:
            metrics.set("routescan_store_errors_total", float(s.store.errors))
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    _publish_body_schemas(app, (ScoreRequest, BatchRequest))
    app.state.metrics = metrics
    app.state.routescan = state
    return app


M = TypeVar("M", bound=BaseModel)


async def _parse(request: Request, model: type[M]) -> M:
    """Validate the raw body in pydantic-core (Rust JSON parsing): a trace carries hundreds of
    launches, and parsing it in Python first (FastAPI's default) doubles the cost per request."""
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:
        errors = exc.errors(include_input=False, include_url=False)
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in errors]) from None


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def _publish_body_schemas(app: FastAPI, models: tuple[type[BaseModel], ...]) -> None:
    """Add the request-body models (parsed by hand in :func:`_parse`) to the OpenAPI components."""
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


def _ts(value: datetime | None) -> float | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()
