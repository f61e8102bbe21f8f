"""``POST /v1/score`` and ``POST /v1/score/batch``."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Response
from pydantic import BaseModel

from routescan.service.deps import Authorized, BodyDep, ServiceDep
from routescan.service.schemas import (
    AGENT_HEADER,
    COUNTERS_HEADER,
    REPLAY_HEADER,
    BatchRequest,
    BatchResult,
    ScoreRequest,
    ScoreResult,
)
from routescan.telemetry.wire import MEDIA_TYPE

router = APIRouter(prefix="/v1", tags=["scores"], dependencies=[Authorized])
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "missing or wrong bearer token"},
    403: {"description": "a full-level record from a peer off this host (allow_full_from_network is off)"},
    409: {"description": "input of another model / launch model / fingerprint spec / export level"},
    413: {"description": "body over max_body_bytes, or more items than max_batch"},
    415: {"description": "neither application/json nor application/msgpack"},
    422: {"description": "invalid, empty or out-of-range input (the field is named, never echoed)"},
    503: {"description": "the audit store could not record the score; it was not acknowledged"},
}


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    # the body is read and validated by hand (BodyDep, then pydantic-core on the raw bytes), so
    # the OpenAPI request body is declared here: the same schema in JSON or MessagePack (the count
    # matrix as the binary wire's extension, routescan.telemetry.wire)
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    content = {"application/json": {"schema": ref}, MEDIA_TYPE: {"schema": ref}}
    return {"requestBody": {"required": True, "content": content}}


@router.post("/score", response_model=ScoreResult, responses=_ERRORS, openapi_extra=_json_body(ScoreRequest))
async def score_one(body: BodyDep, service: ServiceDep) -> Response:
    """Score one trace or fingerprint; the result is in the audit log before it is returned."""
    results, _ = await service.score(body.data, batch=False, binary=body.binary, local=body.local)
    # serialised here: the result is built from validated values, so FastAPI's response-model
    # validation and encoding would only repeat work on the hot path (the schema stays documented)
    return Response(results[0].model_dump_json(), media_type="application/json")


@router.post(
    "/score/batch", response_model=BatchResult, responses=_ERRORS, openapi_extra=_json_body(BatchRequest)
)
async def score_batch(
    body: BodyDep,
    service: ServiceDep,
    agent: Annotated[str | None, Header(alias=AGENT_HEADER, include_in_schema=False)] = None,
    agent_counters: Annotated[str | None, Header(alias=COUNTERS_HEADER, include_in_schema=False)] = None,
    replay: Annotated[str | None, Header(alias=REPLAY_HEADER, include_in_schema=False)] = None,
) -> Response:
    """Score up to ``max_batch`` items in one call (one model pass, one audit transaction)."""
    service.metrics.agents.report(agent, agent_counters)
    results, latency = await service.score(
        body.data, batch=True, binary=body.binary, replay=replay == "1", local=body.local
    )
    flagged = sum(r.label == "flagged" for r in results)
    batch = BatchResult.model_construct(results=results, flagged=flagged, latency_ms=latency)
    return Response(batch.model_dump_json(), media_type="application/json")


BODY_MODELS = (ScoreRequest, BatchRequest)
