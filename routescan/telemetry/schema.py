"""Trace schema: what one request's prefill launched, per (layer, expert), and nothing else.

These models cross process boundaries (collector -> file -> featurizer -> service), so they are
strict: unknown fields are rejected (``extra="forbid"``), every string field is constrained to a
character set and length that identifiers need and free text does not, and the schema is
versioned. A trace never carries prompt text, token ids or per-token expert order: only
per-request aggregates, because per-token routing is known to leak most of the prompt.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

SCHEMA_VERSION: Literal["routescan.trace/1"] = "routescan.trace/1"

# Identifiers: no whitespace, so a sentence cannot hide in them.
TRACE_ID_PATTERN = r"^[A-Za-z0-9._:\-]{1,128}$"
LABEL_TOKEN_PATTERN = r"^[A-Za-z0-9._:/+\-]{0,64}$"
TraceId = Annotated[str, StringConstraints(pattern=TRACE_ID_PATTERN)]
# Model ids look like "HuggingFaceTB/SmolLM2-135M-Instruct" or "tiny-mixtral-seed0".
ModelId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._:/@+\-]{1,200}$")]
Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._:\-]{1,64}$")]
# Kernel names come from launch models or CUPTI (demangled C++), never from a request. C++ symbols
# contain spaces ("void at::native::..."), so the guard here is the character set and the length.
KernelName = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z0-9_.:<>,()\[\]*&~ +\-]{1,512}$", strip_whitespace=False)
]
# Label values carried through from the prompt file (label, domain, wrapper family...). Short
# tokens or numbers only: a prompt is rejected here even if it was configured as a label column.
LabelValue = Annotated[str, StringConstraints(pattern=LABEL_TOKEN_PATTERN)] | int | float | bool | None
LabelKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]


class Phase(StrEnum):
    prefill = "prefill"
    decode = "decode"


class Region(StrEnum):
    """Where in the MoE layer a kernel ran. Only ``expert`` launches carry per-expert routing."""

    expert = "expert"  # one routed expert's computation (expert field is set)
    layer = "layer"  # per-layer MoE work over all experts at once (router, fused kernels)
    shared = "shared"  # always-on shared experts (size depends on token count only)
    other = "other"  # outside any MoE region (attention, norms...), kept apart


class Unit(StrEnum):
    """What ``threads`` counts. ``router`` traces count routed (token, slot) pairs instead."""

    threads = "threads"
    tokens = "tokens"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)


Dim3 = tuple[Annotated[int, Field(ge=0)], Annotated[int, Field(ge=0)], Annotated[int, Field(ge=0)]]


class KernelLaunch(_Strict):
    """One kernel launch (or, for the ``router`` source, one per-expert token count)."""

    kernel: KernelName
    layer: Annotated[int, Field(ge=0)] | None = None
    expert: Annotated[int, Field(ge=0)] | None = None
    region: Region = Region.expert
    grid: Dim3
    block: Dim3
    threads: Annotated[int, Field(ge=0)]
    phase: Phase = Phase.prefill
    start_ns: Annotated[int, Field(ge=0)] | None = None
    end_ns: Annotated[int, Field(ge=0)] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> KernelLaunch:
        expected = math.prod(self.grid) * math.prod(self.block)
        if self.threads != expected:
            raise ValueError(f"threads={self.threads} but grid x block = {expected}")
        if self.region == Region.expert and self.expert is None:
            raise ValueError("an 'expert' region launch needs an expert index")
        if self.region != Region.expert and self.expert is not None:
            raise ValueError(f"a '{self.region.value}' region launch cannot name an expert")
        if self.start_ns is not None and self.end_ns is not None and self.end_ns < self.start_ns:
            raise ValueError("end_ns precedes start_ns")
        return self


class RequestTrace(_Strict):
    """One request's prefill telemetry: per-request aggregates only, never text."""

    schema_version: Literal["routescan.trace/1"] = SCHEMA_VERSION
    trace_id: TraceId
    model_id: ModelId
    collector: Name
    launch_model: Name
    unit: Unit = Unit.threads
    layers: list[Annotated[int, Field(ge=0)]]
    experts_per_layer: list[Annotated[int, Field(ge=1)]]
    top_k: list[Annotated[int, Field(ge=1)]] | None = None
    prompt_tokens: Annotated[int, Field(ge=1)]
    launches: list[KernelLaunch]
    row: Annotated[int, Field(ge=0)] | None = None
    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict)
    experts_implementation: Name | None = None

    @model_validator(mode="after")
    def _consistent(self) -> RequestTrace:
        if len(self.layers) != len(self.experts_per_layer):
            raise ValueError("layers and experts_per_layer must have the same length")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError("layers must be unique")
        if self.top_k is not None and len(self.top_k) != len(self.layers):
            raise ValueError("top_k must have one entry per layer")
        n_experts = dict(zip(self.layers, self.experts_per_layer, strict=True))
        for i, launch in enumerate(self.launches):
            if launch.region in (Region.expert, Region.layer, Region.shared):
                if launch.layer not in n_experts:
                    raise ValueError(
                        f"launches[{i}] names layer {launch.layer}, not an MoE layer of this trace"
                    )
                if launch.expert is not None and launch.expert >= n_experts[launch.layer]:
                    raise ValueError(
                        f"launches[{i}] names expert {launch.expert} but layer {launch.layer} "
                        f"has {n_experts[launch.layer]} experts"
                    )
        return self

    def expert_threads(self) -> dict[tuple[int, int], int]:
        """Prefill threads summed per (layer, expert), the quantity fingerprints are built from."""
        out: dict[tuple[int, int], int] = {}
        for launch in self.launches:
            if launch.region == Region.expert and launch.phase == Phase.prefill:
                key = (launch.layer, launch.expert)  # type: ignore[assignment]
                out[key] = out.get(key, 0) + launch.threads  # type: ignore[index]
        return out

    def aggregated(self) -> RequestTrace:
        """The same trace with one summary launch per (layer, expert, region, phase).

        Fingerprints read only these sums, so they are unchanged; a trace with thousands of per-kernel
        launches (eager loops over many experts) shrinks to one record per expert. The summary keeps
        the threads as ``grid = (threads, 1, 1)``, ``block = (1, 1, 1)`` and the kernel name ``sum``.
        """
        sums: dict[tuple, list[int | None]] = {}
        for launch in self.launches:
            key = (launch.layer, launch.expert, launch.region, launch.phase)
            entry = sums.setdefault(key, [0, None, None])
            entry[0] += launch.threads
            if launch.start_ns is not None:
                entry[1] = launch.start_ns if entry[1] is None else min(entry[1], launch.start_ns)
            if launch.end_ns is not None:
                entry[2] = launch.end_ns if entry[2] is None else max(entry[2], launch.end_ns)
        launches = [
            KernelLaunch(
                kernel="sum",
                layer=layer,
                expert=expert,
                region=region,
                grid=(threads, 1, 1),
                block=(1, 1, 1),
                threads=threads,
                phase=phase,
                start_ns=start,
                end_ns=end,
            )
            for (layer, expert, region, phase), (threads, start, end) in sums.items()
        ]
        return self.model_copy(update={"launches": launches})
