"""Trace schema: what one request's prefill launched, per (layer, expert), and nothing else.

These models cross process boundaries (collector -> file -> featurizer -> service), so they are
strict: unknown fields are rejected (``extra="forbid"``), every string field is constrained to a
character set and length that identifiers need and free text does not, and the schema is
versioned. A trace never carries prompt text, token ids or per-token expert order: only
per-request aggregates, because per-token routing is known to leak most of the prompt.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict, StringConstraints, model_validator

SCHEMA_VERSION: Literal["routescan.trace/1"] = "routescan.trace/1"

# Bounds from what hardware and serving engines can produce, so no value can overflow a float64
# downstream (a 10**310 integer once crashed featurising) and a hostile trace stays cheap to check.
MAX_COUNT = 2**53 - 1  # threads / token-slots: exact in float64; far above any prefill's launches
MAX_BLOCK = 1024  # CUDA's threads-per-block limit (every dimension of a block is within it)
MAX_PROMPT_TOKENS = 2**24  # 16.7M tokens: above the longest context any serving engine takes
MAX_LAYERS = 1024
MAX_EXPERTS = 65_536
MAX_TOP_K = 1024
MAX_LAUNCHES = 131_072  # a per-kernel trace of a 58-layer x 256-expert MoE is ~90k launches
MAX_LABELS = 16
MAX_NS = 2**63 - 1

Count = Annotated[int, Strict(), Field(ge=0, le=MAX_COUNT)]

# Identifiers are opaque tokens, never text. The character set keeps whitespace out; the segment
# rules below keep sentences ("how-to-pick-the-lock") and encoded text (base64url) out too. What
# collectors really emit passes: corpus ids (h-00012, w-h-00012-3fa9c2d1, x0-harmbench-00012),
# row-0000001, vLLM / OpenAI request ids (chatcmpl-<32 hex>[-<hex suffix>]) and UUIDs.
TRACE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,95}$"
_ID_SEGMENT = re.compile(r"[._:\-]")
_HEX = re.compile(r"^[0-9A-Fa-f]+$")
_MAX_ID_SEGMENTS = 8
_MAX_ID_WORDS = 3
_MAX_OPAQUE_SEGMENT = 12


def trace_id_problem(value: str) -> str | None:
    """Why ``value`` cannot be a trace id (None when it can). The message never quotes the value."""
    if not re.match(TRACE_ID_PATTERN, value):
        return "ids are 1-96 letters, digits or . _ : - (starting with a letter or digit)"
    segments = [s for s in _ID_SEGMENT.split(value) if s]
    if len(segments) > _MAX_ID_SEGMENTS:
        return f"ids have at most {_MAX_ID_SEGMENTS} segments between . _ : -"
    words = [s for s in segments if s.isalpha() and len(s) > 1]
    if len(words) > _MAX_ID_WORDS:
        return f"ids carry at most {_MAX_ID_WORDS} alphabetic words (a sentence is not an id)"
    for s in segments:
        mixed = not s.isalpha() and not s.isdigit()
        if mixed and len(s) > _MAX_OPAQUE_SEGMENT and not _HEX.match(s):
            return (
                f"long opaque id segments must be hexadecimal (uuid, hash); a mixed segment over "
                f"{_MAX_OPAQUE_SEGMENT} characters looks like encoded text"
            )
    return None


def _refusing(problem: Callable[[str], str | None]) -> AfterValidator:
    """A validator that refuses a value for the reason ``problem`` gives (never quoting the value)."""

    def check(value: str) -> str:
        reason = problem(value)
        if reason:
            raise ValueError(reason)
        return value

    return AfterValidator(check)


TraceId = Annotated[str, Strict(), _refusing(trace_id_problem)]
LABEL_TOKEN_PATTERN = r"^[A-Za-z0-9._:/+\-]{0,64}$"
# Model ids look like "HuggingFaceTB/SmolLM2-135M-Instruct" or "tiny-mixtral-seed0".
ModelId = Annotated[str, Strict(), StringConstraints(pattern=r"^[A-Za-z0-9._:/@+\-]{1,200}$")]
Name = Annotated[str, Strict(), StringConstraints(pattern=r"^[A-Za-z0-9._:\-]{1,64}$")]

# Kernel names come from launch models (snake_case) or CUPTI (C++ symbols, cleaned by the
# collector). C++ puts a space between two words only around type keywords ("void f",
# "unsigned int", "(anonymous namespace)", "float const*"), so any other pair of words is prose.
KERNEL_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.:<>,()\[\]*&~ +\-]{0,255}$"
_CPP_WORDS = frozenset(
    [
        "void",
        "unsigned",
        "signed",
        "long",
        "short",
        "int",
        "char",
        "float",
        "double",
        "bool",
        "const",
        "volatile",
        "struct",
        "class",
        "enum",
        "union",
        "anonymous",
        "namespace",
        "typename",
        "operator",
        "half",
    ]
)
_WORD_PAIR = re.compile(r"([A-Za-z_]\w*) +(?=([A-Za-z_]\w*))")


def kernel_name_problem(value: str) -> str | None:
    if not re.match(KERNEL_NAME_PATTERN, value):
        return "kernel names are 1-256 characters of a C++ symbol or identifier"
    for first, second in _WORD_PAIR.findall(value):
        if first not in _CPP_WORDS and second not in _CPP_WORDS:
            return "kernel names hold symbols, not prose (two plain words in a row)"
    return None


def clean_kernel_name(raw: str) -> str:
    """A raw CUPTI name in the form the schema takes: refused characters become ``_``, the length is
    capped, and a space between two words that C++ would not separate with one becomes ``_``."""
    clean = re.sub(r"[^A-Za-z0-9_.:<>,()\[\]*&~ +\-]", "_", raw)[:256].strip()
    clean = re.sub(r"^[^A-Za-z_]+", "", clean)

    def join(match: re.Match[str]) -> str:
        first, second = match.group(1), match.group(2)
        keep = first in _CPP_WORDS or second in _CPP_WORDS
        return first + (" " if keep else "_")

    return _WORD_PAIR.sub(join, clean) or "kernel"


KernelName = Annotated[str, Strict(), _refusing(kernel_name_problem)]
# Label values carried through from the prompt file (label, domain, wrapper family...). Short
# tokens or numbers only: a prompt is rejected here even if it was configured as a label column.
LabelValue = (
    Annotated[str, Strict(), StringConstraints(pattern=LABEL_TOKEN_PATTERN)]
    | Annotated[int, Strict(), Field(ge=-MAX_COUNT, le=MAX_COUNT)]
    | Annotated[float, Strict(), Field(allow_inf_nan=False)]
    | bool
    | None
)
# Label keys are column names an operator chose (label, domain, hard_negative): an identifier of
# at most three words.
LABEL_KEY_PATTERN = r"^[A-Za-z][A-Za-z0-9]*(?:_[A-Za-z0-9]+){0,2}$"
LabelKey = Annotated[str, Strict(), StringConstraints(pattern=LABEL_KEY_PATTERN, max_length=32)]
Labels = Annotated[dict[LabelKey, LabelValue], Field(max_length=MAX_LABELS)]


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


Dim3 = tuple[Count, Count, Count]
BlockDim = tuple[
    Annotated[int, Strict(), Field(ge=0, le=MAX_BLOCK)],
    Annotated[int, Strict(), Field(ge=0, le=MAX_BLOCK)],
    Annotated[int, Strict(), Field(ge=0, le=MAX_BLOCK)],
]
Index = Annotated[int, Strict(), Field(ge=0, le=MAX_EXPERTS)]
Nanos = Annotated[int, Strict(), Field(ge=0, le=MAX_NS)]


class KernelLaunch(_Strict):
    """One kernel launch (or, for the ``router`` source, one per-expert token count)."""

    kernel: KernelName
    layer: Index | None = None
    expert: Index | None = None
    region: Region = Region.expert
    grid: Dim3
    block: BlockDim
    threads: Count
    phase: Phase = Phase.prefill
    start_ns: Nanos | None = None
    end_ns: Nanos | None = None

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
    layers: Annotated[list[Index], Field(max_length=MAX_LAYERS)]
    experts_per_layer: Annotated[
        list[Annotated[int, Strict(), Field(ge=1, le=MAX_EXPERTS)]], Field(max_length=MAX_LAYERS)
    ]
    top_k: (
        Annotated[list[Annotated[int, Strict(), Field(ge=1, le=MAX_TOP_K)]], Field(max_length=MAX_LAYERS)]
        | None
    ) = None
    prompt_tokens: Annotated[int, Strict(), Field(ge=1, le=MAX_PROMPT_TOKENS)]
    launches: Annotated[list[KernelLaunch], Field(max_length=MAX_LAUNCHES)]
    row: Annotated[int, Strict(), Field(ge=0, le=MAX_COUNT)] | None = None
    labels: Labels = Field(default_factory=dict)
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
