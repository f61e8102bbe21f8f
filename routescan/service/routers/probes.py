"""``/healthz`` and ``/readyz``: open to probes, answer without touching request data."""

from __future__ import annotations

import logging

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter(tags=["probes"])
log = logging.getLogger("routescan.service")


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Ready when the detector is loaded and the audit store accepts writes; otherwise 503 with why."""
    runtime = getattr(request.app.state, "runtime", None)
    if runtime is None:
        body = {"ready": False, "detector_loaded": False, "store_writable": False, "reason": "starting"}
        return JSONResponse(body, status_code=503)
    health = await anyio.to_thread.run_sync(runtime.store.health)
    body = {
        "ready": health.ready,
        "detector_loaded": True,
        "store_writable": health.writable,
        "store": {
            "backend": health.backend,
            "writer_alive": health.writer_alive,
            "database_present": health.database_present,
            "errors": health.errors,
            "last_commit_failed": health.last_commit_failed,
        },
        "reason": health.reason,
    }
    return JSONResponse(body, status_code=200 if health.ready else 503)
