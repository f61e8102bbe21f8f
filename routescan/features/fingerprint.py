"""Routing fingerprints: a trace -> a fixed-length float vector with a name per feature.

Spec ``routescan.fp/1``, for each MoE layer (in layer order):

- ``L{l}.E{e}.share``: expert e's share of the layer's expert-attributed threads (sums to 1 over
  the layer's experts, 0 everywhere if the layer launched nothing per expert);
- ``L{l}.total_per_token``: the layer's expert-attributed threads divided by prompt tokens;
- ``L{l}.active``: experts that launched anything;
- ``L{l}.entropy``: Shannon entropy (nats) of the layer's shares.

The vector depends only on per-(layer, expert) sums and the prompt length, so it is the same for
the same routing whichever collector produced the trace: routed token counts put through the launch
model, or the launch model's kernels as a kernel collector measured them. The spec is pinned to one
model and signal: a trace of another is refused.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, Strict, field_validator
from scipy.special import entr

from routescan.telemetry.launch import LaunchModel, LaunchModelError, SignalThreads, signal_threads
from routescan.telemetry.registry import load_launch_model
from routescan.telemetry.schema import (
    ExportLevel,
    LabelKey,
    Labels,
    ModelId,
    Name,
    RequestTrace,
    Row,
    TraceId,
    Unit,
)

ROUTER = "router"  # the source of routed (token, slot) counts, which any launch model can turn into threads
# The signal read from routed counts when none is named: what a GPU's eager experts loop launches,
# the per-expert kernel signal RouteScan is built on (docs/results.md compares the others).
DEFAULT_SIGNAL = "hf-eager"

SPEC_VERSION: Literal["routescan.fp/1"] = "routescan.fp/1"
FINGERPRINT_SCHEMA: Literal["routescan.fingerprint/1"] = "routescan.fingerprint/1"


def derives_signals(trace: RequestTrace) -> bool:
    """Whether any launch model can turn the trace's counts into its signal: routed token counts
    that carry the layer widths. Otherwise (measured threads, trace/1 router files without widths)
    the trace gives only its own signal."""
    return trace.source == ROUTER and trace.unit == Unit.tokens and trace.dims is not None


class FingerprintMismatch(ValueError):
    """A trace does not fit a fingerprint spec (other model, signal or layer layout)."""


@dataclass(frozen=True)
class LayerSlice:
    """Where one MoE layer's features sit in a fingerprint vector."""

    layer: int
    shares: slice
    total_per_token: int
    active: int
    entropy: int


class FingerprintSpec(BaseModel):
    """What a fingerprint vector means: which model, signal (launch model) and layer layout it reads.

    A trace gives the spec's signal in one of two ways: its counts are that signal as measured
    (``source`` is the launch model's name, in its unit: CUPTI threads, or router counts for the
    ``router`` signal), or they are routed token counts, which the launch model turns into the
    threads its kernels would launch."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal["routescan.fp/1"] = SPEC_VERSION
    model_id: ModelId
    launch_model: Name
    unit: Unit
    layers: list[int]
    experts_per_layer: list[int]
    _bound: LaunchModel | None = PrivateAttr(default=None)

    @classmethod
    def from_trace(
        cls, trace: RequestTrace, launch_model: LaunchModel | str | None = None
    ) -> FingerprintSpec:
        """The spec of ``trace``'s model under a signal. Default: :data:`DEFAULT_SIGNAL` for routed
        token counts, the trace's own signal for measured threads (CUPTI, trace/1 files) and for
        counts without the layer widths a launch model needs (trace/1 router files)."""
        if launch_model is None and derives_signals(trace):
            launch_model = DEFAULT_SIGNAL
        if isinstance(launch_model, str):
            launch_model = load_launch_model(launch_model)
        spec = cls(
            model_id=trace.model_id,
            launch_model=launch_model.name if launch_model is not None else trace.source,
            unit=launch_model.unit if launch_model is not None else trace.unit,
            layers=list(trace.layers),
            experts_per_layer=list(trace.experts_per_layer),
        )
        return spec.bind(launch_model) if launch_model is not None else spec

    def __eq__(self, other: object) -> bool:
        # the bound launch model object is how the signal is computed, not what the spec means
        return isinstance(other, FingerprintSpec) and self.model_dump() == other.model_dump()

    def __hash__(self) -> int:
        return hash(self.model_dump_json())

    def bind(self, launch_model: LaunchModel) -> FingerprintSpec:
        """Use this launch model object for the spec's signal (one from a YAML path, say)."""
        if launch_model.name != self.launch_model:
            raise FingerprintMismatch(
                f"launch model '{launch_model.name}' is not the spec's signal '{self.launch_model}'"
            )
        self._bound = launch_model
        return self

    def signal(self) -> LaunchModel:
        """The launch model that turns routed counts into the spec's signal; a mismatch when there
        is none of that name (a ``cupti`` spec, an unshipped tile table): routed counts cannot give it."""
        bound = self._bound
        if bound is None:
            try:
                bound = self._bound = load_launch_model(self.launch_model)
            except LaunchModelError:
                raise FingerprintMismatch(
                    f"the spec's signal '{self.launch_model}' is no launch model RouteScan has (built-in "
                    "ones, or a YAML in ROUTESCAN_CONFIG_DIR/launch/): send that signal's own measurements"
                ) from None
        return bound

    @property
    def dim(self) -> int:
        return sum(self.experts_per_layer) + 3 * len(self.layers)

    def feature_names(self) -> list[str]:
        names: list[str] = []
        for layer, n_experts in zip(self.layers, self.experts_per_layer, strict=True):
            names.extend(f"L{layer}.E{e}.share" for e in range(n_experts))
            names.extend((f"L{layer}.total_per_token", f"L{layer}.active", f"L{layer}.entropy"))
        return names

    def layer_slices(self) -> list[LayerSlice]:
        """Each layer's place in the vector: its experts' shares, then total per token, active, entropy."""
        out, pos = [], 0
        for layer, n in zip(self.layers, self.experts_per_layer, strict=True):
            out.append(LayerSlice(layer, slice(pos, pos + n), pos + n, pos + n + 1, pos + n + 2))
            pos += n + 3
        return out

    def measured(self, trace: RequestTrace) -> bool:
        """True when the trace's counts are this signal as is; False when the launch model applies.
        Raises :class:`FingerprintMismatch` naming what differs when the trace cannot give it."""
        for what, mine, theirs in (
            ("model", self.model_id, trace.model_id),
            ("layers", self.layers, trace.layers),
            ("experts per layer", self.experts_per_layer, trace.experts_per_layer),
        ):
            if mine != theirs:
                raise FingerprintMismatch(
                    f"trace {trace.trace_id} has {what} {theirs!r}, but the fingerprint spec expects {mine!r}"
                )
        if trace.source == self.launch_model and trace.unit == self.unit:
            return True
        if trace.source == ROUTER and trace.unit == Unit.tokens:
            return False
        raise FingerprintMismatch(
            f"trace {trace.trace_id} holds '{trace.source}' {trace.unit.value}, which cannot give the "
            f"spec's signal '{self.launch_model}': send routed token counts (source 'router') or "
            f"'{self.launch_model}' measurements"
        )

    def check(self, trace: RequestTrace) -> None:
        """Raise :class:`FingerprintMismatch` naming what differs."""
        if not self.measured(trace):
            try:
                self.signal()
            except FingerprintMismatch as exc:
                raise FingerprintMismatch(f"trace {trace.trace_id} holds routed counts, but {exc}") from None

    def transform(self, trace: RequestTrace) -> np.ndarray:
        """One trace -> vector of length :attr:`dim` (float64)."""
        return self.transform_many([trace])[0]

    def transform_many(self, traces: Iterable[RequestTrace]) -> np.ndarray:
        """Traces -> ``(n, dim)`` matrix, computed for the whole batch at once."""
        traces = list(traces)
        if not traces:
            return np.empty((0, self.dim), dtype=np.float64)
        tokens = np.array([t.prompt_tokens for t in traces], dtype=np.float64)
        return self._vectors(self.threads(traces).expert, tokens)

    def launched(self, traces: Sequence[RequestTrace]) -> np.ndarray:
        """Every prefill thread of each trace under this signal, per-layer work included: what an
        observer who cannot attribute launches to experts sees (for vLLM's fused MoE, a function of
        length only)."""
        if not traces:
            return np.empty(0)
        sig = self.threads(traces)
        return sig.expert.sum(axis=1) + sig.region.sum(axis=1)

    def threads(self, traces: Sequence[RequestTrace]) -> SignalThreads:
        """The spec's signal of a batch of traces: measured ones read as they are, routed ones put
        through the launch model, each kind in one call."""
        measured = np.array([self.measured(t) for t in traces])
        expert = region = None
        for as_is in (True, False):
            idx = np.flatnonzero(measured == as_is)
            if not idx.size:
                continue
            part = signal_threads([traces[i] for i in idx], None if as_is else self.signal())
            if idx.size == len(traces):  # the usual batch: one kind of trace, nothing to scatter
                return part
            if expert is None:
                expert = np.empty((len(traces), part.expert.shape[1]))
                region = np.empty((len(traces), part.region.shape[1]))
            expert[idx], region[idx] = part.expert, part.region
        return SignalThreads(expert, region)

    def _vectors(self, threads: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        n_layers = len(self.layers)
        widths = set(self.experts_per_layer)
        if len(widths) == 1:  # every layer as wide: all layers at once
            (width,) = widths
            blocks = [threads.reshape(len(threads), n_layers, width)]
        else:
            edges = np.cumsum([0, *self.experts_per_layer])
            blocks = [threads[:, lo:hi][:, None, :] for lo, hi in itertools.pairwise(edges)]
        parts = []
        for block in blocks:  # (traces, layers, experts)
            total = block.sum(axis=2)
            shares = block / np.where(total > 0, total, 1.0)[:, :, None]
            extra = np.stack(
                # entr(x) = -x log x, 0 at 0: the routing entropy in one pass
                [
                    total / tokens[:, None],
                    np.count_nonzero(block, axis=2).astype(np.float64),
                    entr(shares).sum(axis=2),
                ],
                axis=2,
            )
            parts.append(np.concatenate([shares, extra], axis=2))
        if len(parts) == 1:
            return parts[0].reshape(len(threads), -1)
        return np.concatenate([p.reshape(len(threads), -1) for p in parts], axis=1)


class Fingerprint(BaseModel):
    """One request's fingerprint as it crosses a process boundary (e.g. to the scoring service)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal["routescan.fingerprint/1"] = FINGERPRINT_SCHEMA
    spec_version: Literal["routescan.fp/1"] = SPEC_VERSION
    trace_id: TraceId
    model_id: ModelId
    launch_model: Name
    values: Annotated[list[Annotated[float, Strict()]], Field(min_length=1, max_length=1_000_000)]
    row: Row | None = None
    labels: Labels = Field(default_factory=dict)
    # which export level the values are (routescan.privacy.levels); a detector scores only its own
    export_level: ExportLevel = ExportLevel.full

    @field_validator("values")
    @classmethod
    def _finite(cls, values: list[float]) -> list[float]:
        if not all(math.isfinite(v) for v in values):
            raise ValueError("fingerprint values must be finite numbers")
        return values


def fingerprints(
    traces: Sequence[RequestTrace],
    spec: FingerprintSpec,
    *,
    values: np.ndarray | None = None,
    export_level: ExportLevel = ExportLevel.full,
) -> list[Fingerprint]:
    """Fingerprints of traces under ``spec`` (featurised as one batch), or records of another export
    level whose ``values`` (one row per trace) were derived from them."""
    X = spec.transform_many(traces) if values is None else values
    return [
        Fingerprint(
            trace_id=t.trace_id,
            model_id=t.model_id,
            launch_model=spec.launch_model,
            values=x.tolist(),
            row=t.row,
            labels=dict(t.labels),
            export_level=export_level,
        )
        for t, x in zip(traces, X, strict=True)
    ]


def fingerprint(trace: RequestTrace, spec: FingerprintSpec | None = None) -> Fingerprint:
    return fingerprints([trace], spec or FingerprintSpec.from_trace(trace))[0]


def label_columns(traces: Sequence[RequestTrace]) -> list[str]:
    keys: dict[str, None] = {}
    for trace in traces:
        keys.update(dict.fromkeys(trace.labels))
    return list(keys)


__all__ = [
    "DEFAULT_SIGNAL",
    "FINGERPRINT_SCHEMA",
    "SPEC_VERSION",
    "Fingerprint",
    "FingerprintMismatch",
    "FingerprintSpec",
    "LabelKey",
    "LayerSlice",
    "derives_signals",
    "fingerprint",
    "fingerprints",
    "label_columns",
]
