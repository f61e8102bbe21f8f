"""Routing fingerprints: a trace -> a fixed-length float vector with a name per feature.

Spec ``routescan.fp/1``, for each MoE layer (in layer order):

- ``L{l}.E{e}.share``: expert e's share of the layer's expert-attributed threads (sums to 1 over
  the layer's experts, 0 everywhere if the layer launched nothing per expert);
- ``L{l}.total_per_token``: the layer's expert-attributed threads divided by prompt tokens;
- ``L{l}.active``: experts that launched anything;
- ``L{l}.entropy``: Shannon entropy (nats) of the layer's shares.

The vector depends only on per-(layer, expert) sums and the prompt length, so it ignores kernel
order and is the same for the same routing whichever collector (emulated or CUPTI) produced the
trace. The spec is pinned to one model and launch model: a trace of another is refused.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, Strict, field_validator

from routescan.telemetry.schema import (
    MAX_COUNT,
    LabelKey,
    Labels,
    ModelId,
    Name,
    Phase,
    Region,
    RequestTrace,
    TraceId,
    Unit,
)

SPEC_VERSION: Literal["routescan.fp/1"] = "routescan.fp/1"
FINGERPRINT_SCHEMA: Literal["routescan.fingerprint/1"] = "routescan.fingerprint/1"


class FingerprintMismatch(ValueError):
    """A trace does not fit a fingerprint spec (other model, launch model or layer layout)."""


class FingerprintSpec(BaseModel):
    """What a fingerprint vector means: which model, launch model and layer layout it reads."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal["routescan.fp/1"] = SPEC_VERSION
    model_id: ModelId
    launch_model: Name
    unit: Unit
    layers: list[int]
    experts_per_layer: list[int]

    @classmethod
    def from_trace(cls, trace: RequestTrace) -> FingerprintSpec:
        return cls(
            model_id=trace.model_id,
            launch_model=trace.launch_model,
            unit=trace.unit,
            layers=list(trace.layers),
            experts_per_layer=list(trace.experts_per_layer),
        )

    @property
    def dim(self) -> int:
        return sum(self.experts_per_layer) + 3 * len(self.layers)

    def feature_names(self) -> list[str]:
        names: list[str] = []
        for layer, n_experts in zip(self.layers, self.experts_per_layer, strict=True):
            names.extend(f"L{layer}.E{e}.share" for e in range(n_experts))
            names.extend((f"L{layer}.total_per_token", f"L{layer}.active", f"L{layer}.entropy"))
        return names

    def check(self, trace: RequestTrace) -> None:
        """Raise :class:`FingerprintMismatch` naming what differs."""
        for what, mine, theirs in (
            ("model", self.model_id, trace.model_id),
            ("launch model", self.launch_model, trace.launch_model),
            ("unit", self.unit, trace.unit),
            ("layers", self.layers, trace.layers),
            ("experts per layer", self.experts_per_layer, trace.experts_per_layer),
        ):
            if mine != theirs:
                raise FingerprintMismatch(
                    f"trace {trace.trace_id} has {what} {theirs!r}, but the fingerprint spec expects {mine!r}"
                )

    def transform(self, trace: RequestTrace) -> np.ndarray:
        """One trace -> vector of length :attr:`dim` (float64)."""
        self.check(trace)
        per_layer = {
            layer: np.zeros(n, dtype=np.float64)
            for layer, n in zip(self.layers, self.experts_per_layer, strict=True)
        }
        for launch in trace.launches:
            if launch.region == Region.expert and launch.phase == Phase.prefill:
                per_layer[launch.layer][launch.expert] += launch.threads  # type: ignore[index]
        out = np.empty(self.dim, dtype=np.float64)
        pos = 0
        for layer in self.layers:
            threads = per_layer[layer]
            total = float(threads.sum())
            shares = threads / total if total > 0 else threads
            n = threads.size
            out[pos : pos + n] = shares
            nz = shares[shares > 0]
            out[pos + n] = total / trace.prompt_tokens
            out[pos + n + 1] = float(np.count_nonzero(threads))
            out[pos + n + 2] = float(-(nz * np.log(nz)).sum()) if nz.size else 0.0
            pos += n + 3
        return out

    def transform_many(self, traces: Iterable[RequestTrace]) -> np.ndarray:
        rows = [self.transform(t) for t in traces]
        return np.vstack(rows) if rows else np.zeros((0, self.dim))


class Fingerprint(BaseModel):
    """One request's fingerprint as it crosses a process boundary (e.g. to the scoring service)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal["routescan.fingerprint/1"] = FINGERPRINT_SCHEMA
    spec_version: Literal["routescan.fp/1"] = SPEC_VERSION
    trace_id: TraceId
    model_id: ModelId
    launch_model: Name
    values: Annotated[list[Annotated[float, Strict()]], Field(min_length=1, max_length=1_000_000)]
    row: Annotated[int, Strict(), Field(ge=0, le=MAX_COUNT)] | None = None
    labels: Labels = Field(default_factory=dict)

    @field_validator("values")
    @classmethod
    def _finite(cls, values: list[float]) -> list[float]:
        if not all(math.isfinite(v) for v in values):
            raise ValueError("fingerprint values must be finite numbers")
        return values


def fingerprint(trace: RequestTrace, spec: FingerprintSpec | None = None) -> Fingerprint:
    spec = spec or FingerprintSpec.from_trace(trace)
    return Fingerprint(
        trace_id=trace.trace_id,
        model_id=trace.model_id,
        launch_model=trace.launch_model,
        values=spec.transform(trace).tolist(),
        row=trace.row,
        labels=dict(trace.labels),
    )


def label_columns(traces: Sequence[RequestTrace]) -> list[str]:
    keys: dict[str, None] = {}
    for trace in traces:
        keys.update(dict.fromkeys(trace.labels))
    return list(keys)


__all__ = [
    "FINGERPRINT_SCHEMA",
    "SPEC_VERSION",
    "Fingerprint",
    "FingerprintMismatch",
    "FingerprintSpec",
    "LabelKey",
    "fingerprint",
    "label_columns",
]
