"""Wire schemas of the scoring API (``routescan.api/1``). Strict: unknown fields are refused.

A request carries one trace or one fingerprint, both already text-free by their own schemas;
responses carry scores and identifiers only.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from routescan.features.fingerprint import Fingerprint
from routescan.telemetry.schema import ModelId, RequestTrace, TraceId

API_VERSION: Literal["routescan.api/1"] = "routescan.api/1"
# Headers an in-process agent adds to its batches: its name, and its own counters (what it spooled
# or dropped never reaches the daemon otherwise), as "submitted=N,sent=N,...".
AGENT_HEADER = "x-routescan-agent"
COUNTERS_HEADER = "x-routescan-agent-counters"
# set by the agent on batches it replays from its spool: they may have been recorded already
REPLAY_HEADER = "x-routescan-replay"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScoreRequest(_Strict):
    """One trace (from any collector) or one fingerprint of the detector's spec, not both."""

    trace: RequestTrace | None = None
    fingerprint: Fingerprint | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> ScoreRequest:
        if (self.trace is None) == (self.fingerprint is None):
            raise ValueError("give exactly one of 'trace' or 'fingerprint'")
        return self

    @property
    def trace_id(self) -> str:
        return self.trace.trace_id if self.trace is not None else self.fingerprint.trace_id  # type: ignore[union-attr]


class BatchRequest(_Strict):
    items: Annotated[list[ScoreRequest], Field(min_length=1)]


class ScoreResult(_Strict):
    api_version: Literal["routescan.api/1"] = API_VERSION
    trace_id: TraceId
    model_id: ModelId
    score: Annotated[float, Field(ge=0.0, le=1.0)]
    label: Literal["flagged", "ok"]
    threshold: float
    operating_point: str
    detector_id: str
    detector_version: str
    demo_detector: bool
    latency_ms: float


class BatchResult(_Strict):
    api_version: Literal["routescan.api/1"] = API_VERSION
    results: list[ScoreResult]
    flagged: int
    latency_ms: float


class AuditRow(_Strict):
    id: int
    trace_id: TraceId
    model_id: ModelId
    score: float
    label: Literal["flagged", "ok"]
    detector_id: str
    detector_version: str
    operating_point: str
    created: datetime


class AuditPage(_Strict):
    items: list[AuditRow]
    next_offset: int | None
    next_after: int | None = None


class DetectorInfo(_Strict):
    detector_id: str
    version: str
    demo: bool
    model_id: str
    launch_model: str
    fingerprint_spec: dict[str, Any]
    features: int
    operating_points: list[dict[str, Any]]
    active_operating_point: str
    estimator: str
    training_command: str
    corpus: dict[str, Any]
    training: dict[str, Any]
    metrics: dict[str, Any]
    notes: str
    # the records this daemon scores (level, bins or projection) and the values each holds
    export: dict[str, Any] = Field(default_factory=dict)
    export_values: int | None = None
