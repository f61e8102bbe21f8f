"""The trace record, ``routescan.trace/2``: one request's prefill routing as a layers x experts count
matrix, and nothing else.

Every part of RouteScan exchanges this record (collectors -> files -> featurizer -> agent -> daemon).
It is strict: unknown fields are rejected (``extra="forbid"``), every string field is constrained to
a character set and length that identifiers need and free text does not, every integer is bounded by
what hardware produces, and the schema is versioned. A trace never carries prompt text, token ids or
per-token expert order: only per-request aggregates, because per-token routing is known to leak most
of the prompt.

``counts[i][e]`` is what layer ``layers[i]``'s expert ``e`` received: routed (token, slot) pairs
(``unit="tokens"``, what routers and the emulator see) or threads (``unit="threads"``, what a kernel
collector such as CUPTI measured). Kernel launches are derived from token counts by a launch model
when featurising or scoring (:mod:`routescan.telemetry.launch`), so one trace serves every signal.
Per-kernel launches may ride along as an optional attachment (``launches``), to validate CUPTI
against the emulator. ``routescan.trace/1`` (launch lists) stays readable: :meth:`TraceV1.to_v2`.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Iterable, Sequence
from enum import StrEnum
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    Strict,
    StringConstraints,
    field_serializer,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

SCHEMA_VERSION: Literal["routescan.trace/2"] = "routescan.trace/2"
SCHEMA_V1: Literal["routescan.trace/1"] = "routescan.trace/1"

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
MAX_WIDTH = 2**20  # hidden / intermediate widths: above any published model's (DeepSeek-V3: 18,432)
MAX_WINDOWS = 4096  # window count matrices per trace: a 256k-token prompt in windows of 64

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


class ExportLevel(StrEnum):
    """How much of a request's routing a record carries (:mod:`routescan.privacy.levels`): ``full``
    (the counts, or the whole fingerprint), ``layers`` (per-layer summaries), ``harm`` (a few
    quantised directions learned for harm) or ``score`` (the on-host detector's binned score)."""

    full = "full"
    layers = "layers"
    harm = "harm"
    score = "score"


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


class CountMatrix:
    """A trace's per-(layer, expert) counts: one flat, read-only int64 array in layer order.

    It is validated from nested JSON lists (strict integers, as every other field) or taken from the
    binary wire's little-endian array (:mod:`routescan.telemetry.wire`) without a Python int per
    count; both paths hold the values to the same bounds. Row widths are the trace's
    ``experts_per_layer``, checked by the trace.
    """

    __slots__ = ("flat", "row_lengths", "top")

    def __init__(self, flat: np.ndarray, row_lengths: tuple[int, ...] | None = None) -> None:
        flat = np.asarray(flat)
        if flat.ndim != 1 or flat.dtype.kind not in "iu":
            raise ValueError("counts must be integers")
        flat = flat.astype(np.int64, copy=flat.dtype != np.int64)
        self.top = int(flat.max()) if flat.size else 0  # the largest count, kept for the trace's checks
        if flat.size and (self.top > MAX_COUNT or (flat.dtype.kind == "i" and int(flat.min()) < 0)):
            raise ValueError(f"counts must be integers in [0, {MAX_COUNT}]")
        flat.flags.writeable = False
        self.flat = flat
        self.row_lengths = row_lengths

    @classmethod
    def of(cls, rows: Sequence[Sequence[int]]) -> CountMatrix:
        """From per-layer rows of integers (what collectors build)."""
        lengths = tuple(len(r) for r in rows)
        try:
            flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=sum(lengths))
        except (OverflowError, TypeError, ValueError):
            raise ValueError(f"counts must be integers in [0, {MAX_COUNT}]") from None
        return cls(flat, lengths)

    def rows(self, widths: Sequence[int]) -> list[np.ndarray]:
        """Per-layer views of the counts (``widths``: experts per layer)."""
        return np.split(self.flat, np.cumsum(widths)[:-1]) if len(widths) else []

    def tolist(self, widths: Sequence[int]) -> list[list[int]]:
        return [row.tolist() for row in self.rows(widths)]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CountMatrix) and np.array_equal(self.flat, other.flat)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"CountMatrix({self.flat.size} counts, total {int(self.flat.sum())})"

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        rows = core_schema.list_schema(
            core_schema.list_schema(core_schema.int_schema(strict=True), max_length=MAX_EXPERTS),
            max_length=MAX_LAYERS,
        )
        from_rows = core_schema.no_info_after_validator_function(cls.of, rows)
        return core_schema.json_or_python_schema(
            json_schema=from_rows,
            python_schema=core_schema.union_schema(
                [core_schema.is_instance_schema(cls), from_rows], mode="left_to_right"
            ),
            # Python mode keeps the matrix itself (model_dump -> model_validate round-trips; the binary
            # wire packs the array); JSON gets flat lists here and nested rows from the trace
            serialization=core_schema.plain_serializer_function_ser_schema(
                lambda m: m.flat.tolist(), when_used="json"
            ),
        )

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        row = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": MAX_COUNT}}
        return {"type": "array", "items": row, "description": "per layer, one count per expert"}


Width = Annotated[int, Strict(), Field(ge=0, le=MAX_WIDTH)]
ExpertsPerLayer = Annotated[
    list[Annotated[int, Strict(), Field(ge=1, le=MAX_EXPERTS)]], Field(max_length=MAX_LAYERS)
]
TopK = Annotated[list[Annotated[int, Strict(), Field(ge=1, le=MAX_TOP_K)]], Field(max_length=MAX_LAYERS)]
PromptTokens = Annotated[int, Strict(), Field(ge=1, le=MAX_PROMPT_TOKENS)]
Row = Count  # a source-file row number


class LayerDims(_Strict):
    """One MoE layer's widths, under the names launch-model formulas use (configs/launch/)."""

    H: Annotated[int, Strict(), Field(ge=1, le=MAX_WIDTH)]  # hidden size
    I: Annotated[int, Strict(), Field(ge=1, le=MAX_WIDTH)]  # noqa: E741  # expert intermediate size
    SI: Width = 0  # shared-expert intermediate size (0: no shared expert)
    G: Annotated[int, Strict(), Field(ge=1, le=2)] = 2  # 2 when the experts are gated (gate + up)

    def env(self, experts: int, top_k: int | None) -> dict[str, int]:
        """The launch-model variables of a layer of these widths (E, K, H, I, SI, G)."""
        env = {"E": experts, "H": self.H, "I": self.I, "SI": self.SI, "G": self.G}
        if top_k is not None:
            env["K"] = top_k
        return env


class Windows(_Strict):
    """The same prefill's counts over consecutive chunks of ``tokens`` prompt tokens (the last may be
    shorter): what chunked prefill hands a serving engine. Window ``w`` covers prompt positions
    ``[w * tokens, (w + 1) * tokens)``; the windows sum to the trace's counts."""

    tokens: Annotated[int, Strict(), Field(ge=1, le=MAX_PROMPT_TOKENS)]
    counts: Annotated[list[CountMatrix], Field(min_length=2, max_length=MAX_WINDOWS)]


class RequestTrace(_Strict):
    """``routescan.trace/2``: one request's prefill as a per-(layer, expert) count matrix, never text."""

    schema_version: Literal["routescan.trace/2"] = SCHEMA_VERSION
    trace_id: TraceId
    model_id: ModelId
    collector: Name
    # what the counts measure: "router" for routed (token, slot) pairs, else the kernel signal a
    # collector measured in threads ("cupti"; a trace/1 file keeps its launch model's name)
    source: Name = "router"
    unit: Unit = Unit.tokens
    layers: Annotated[list[Index], Field(min_length=1, max_length=MAX_LAYERS)]
    experts_per_layer: ExpertsPerLayer
    top_k: TopK | None = None
    # the layers' widths, needed to derive kernel launches from token counts (launch models): one
    # LayerDims for every layer, or one per layer
    dims: LayerDims | Annotated[list[LayerDims], Field(max_length=MAX_LAYERS)] | None = None
    prompt_tokens: PromptTokens
    counts: CountMatrix
    # per layer, prefill threads of the MoE work that is not one expert's (router, fused or shared
    # kernels), where a kernel collector measured them; launch models derive it from token counts
    region_threads: Annotated[list[Count], Field(max_length=MAX_LAYERS)] | None = None
    # optional per-kernel attachment (CUPTI validation); never needed to featurise or score
    launches: Annotated[list[KernelLaunch], Field(max_length=MAX_LAUNCHES)] | None = None
    row: Row | None = None
    labels: Labels = Field(default_factory=dict)
    experts_implementation: Name | None = None
    # optional: the counts per window of prompt tokens (collect --window), for long prompts whose
    # per-request sum dilutes a short request inside a long template; only on prompts longer than
    # one window
    windows: Windows | None = None
    # a trace is the full level by definition (its counts are the whole routing); the field says so
    # in every record, so a daemon that takes only reduced records refuses it by level, not by shape
    export_level: Literal[ExportLevel.full] = ExportLevel.full

    @model_validator(mode="after")
    def _consistent(self) -> RequestTrace:
        n = len(self.layers)
        _check_layout(self, "top_k", "dims", "region_threads")
        counts = self.counts
        if counts.row_lengths is not None and list(counts.row_lengths) != list(self.experts_per_layer):
            raise ValueError("counts must have one row per layer, one entry per expert of that layer")
        if counts.flat.size != sum(self.experts_per_layer):
            raise ValueError(
                f"counts hold {counts.flat.size} entries but the layers have "
                f"{sum(self.experts_per_layer)} experts"
            )
        if self.unit == Unit.tokens:
            # a token takes each expert at most once, and top_k experts in all
            if counts.top > self.prompt_tokens:
                raise ValueError("counts: an expert received more tokens than the prompt has")
            if self.top_k is not None and n:
                widths = self.experts_per_layer
                if min(widths) == max(widths):  # most MoEs: one reshape instead of per-row offsets
                    sums = counts.flat.reshape(n, widths[0]).sum(axis=1)
                else:
                    sums = np.add.reduceat(counts.flat, self.offsets()[:-1])
                k = self.top_k
                per_token = k[0] if min(k) == max(k) else np.asarray(k, dtype=np.int64)  # most MoEs: one k
                if (sums > per_token * self.prompt_tokens).any():
                    raise ValueError("counts: a layer routed more than prompt_tokens x top_k")
        if self.launches is not None:
            _check_launches(self.launches, self.layers, self.experts_per_layer)
        if self.windows is not None:
            self._check_windows(self.windows)
        return self

    def _check_windows(self, windows: Windows) -> None:
        expected = -(-self.prompt_tokens // windows.tokens)
        if len(windows.counts) != expected:
            raise ValueError(
                f"windows: {len(windows.counts)} windows of {windows.tokens} tokens, but a "
                f"{self.prompt_tokens}-token prompt has {expected}"
            )
        size = sum(self.experts_per_layer)
        if any(m.flat.size != size for m in windows.counts):
            raise ValueError(f"windows: every window holds {size} counts, one per (layer, expert)")
        if self.unit == Unit.tokens and max(m.top for m in windows.counts) > windows.tokens:
            raise ValueError("windows: an expert received more tokens than its window has")
        if not np.array_equal(np.sum([m.flat for m in windows.counts], axis=0), self.counts.flat):
            raise ValueError("windows: the windows' counts must sum to the trace's counts")

    @field_serializer("counts", when_used="json")
    def _nested(self, counts: CountMatrix) -> list[list[int]]:
        return counts.tolist(self.experts_per_layer)

    @field_serializer("windows", when_used="json")
    def _nested_windows(self, windows: Windows | None) -> dict[str, Any] | None:
        if windows is None:
            return None
        return {
            "tokens": windows.tokens,
            "counts": [m.tolist(self.experts_per_layer) for m in windows.counts],
        }

    def window_tokens(self) -> list[int]:
        """Prompt tokens in each window (one entry, the prompt, for a trace without windows)."""
        if self.windows is None:
            return [self.prompt_tokens]
        w, n = self.windows.tokens, len(self.windows.counts)
        return [w] * (n - 1) + [self.prompt_tokens - w * (n - 1)]

    def window_traces(self) -> list[RequestTrace]:
        """Each window as a trace of its own (its tokens, its counts; ids and labels kept), which
        featurises and scores like any request; the trace itself when it has no windows."""
        if self.windows is None:
            return [self]
        return [
            self.model_copy(update={"counts": m, "prompt_tokens": t, "windows": None, "launches": None})
            for m, t in zip(self.windows.counts, self.window_tokens(), strict=True)
        ]

    def offsets(self) -> np.ndarray:
        """Where each layer's row starts in ``counts.flat``, and its end."""
        return np.concatenate(([0], np.cumsum(self.experts_per_layer)))

    def layer_dims(self, i: int) -> LayerDims | None:
        if self.dims is None or isinstance(self.dims, LayerDims):
            return self.dims
        return self.dims[i]

    def is_empty(self) -> bool:
        """No expert received anything: a trace with nothing to score."""
        return not self.counts.flat.any()


def _check_layout(trace: RequestTrace | TraceV1, *per_layer: str) -> None:
    """A trace's layer layout: one entry per layer in experts_per_layer and in each per-layer field
    named (a field that is None, or one value standing for every layer, is not a list)."""
    n = len(trace.layers)
    if len(trace.experts_per_layer) != n:
        raise ValueError("layers and experts_per_layer must have one entry per layer")
    if len(set(trace.layers)) != n:
        raise ValueError("layers must be unique")
    for name in per_layer:
        value = getattr(trace, name)
        if isinstance(value, list) and len(value) != n:
            raise ValueError(f"{name} must have one entry per layer")


def _check_launches(launches: list[KernelLaunch], layers: list[int], experts: list[int]) -> None:
    n_experts = dict(zip(layers, experts, strict=True))
    for i, launch in enumerate(launches):
        if launch.region in (Region.expert, Region.layer, Region.shared):
            if launch.layer not in n_experts:
                raise ValueError(f"launches[{i}] names layer {launch.layer}, not an MoE layer of this trace")
            if launch.expert is not None and launch.expert >= n_experts[launch.layer]:
                raise ValueError(
                    f"launches[{i}] names expert {launch.expert} but layer {launch.layer} "
                    f"has {n_experts[launch.layer]} experts"
                )


def sum_launches(
    launches: Iterable[KernelLaunch], layers: Sequence[int], experts_per_layer: Sequence[int]
) -> tuple[list[list[int]], list[int]]:
    """Prefill threads of kernel launches summed per (layer, expert), and per layer for the MoE work
    that is not one expert's (``layer`` and ``shared`` regions): the one place launches become a
    count matrix (CUPTI records, trace/1 files). ``other`` launches (attention...) are not counted."""
    index = {layer: i for i, layer in enumerate(layers)}
    counts = [[0] * n for n in experts_per_layer]
    regions = [0] * len(layers)
    for launch in launches:
        if launch.phase != Phase.prefill or launch.region == Region.other or launch.layer not in index:
            continue
        i = index[launch.layer]
        if launch.region == Region.expert:
            counts[i][launch.expert] += launch.threads  # type: ignore[index]
        else:
            regions[i] += launch.threads
    return counts, regions


class TraceV1(_Strict):
    """``routescan.trace/1``: a request as a list of kernel launches. Read-only legacy: files written
    before trace/2 are read through :meth:`to_v2`."""

    schema_version: Literal["routescan.trace/1"] = SCHEMA_V1
    trace_id: TraceId
    model_id: ModelId
    collector: Name
    launch_model: Name
    unit: Unit = Unit.threads
    layers: Annotated[list[Index], Field(max_length=MAX_LAYERS)]
    experts_per_layer: ExpertsPerLayer
    top_k: TopK | None = None
    prompt_tokens: PromptTokens
    launches: Annotated[list[KernelLaunch], Field(max_length=MAX_LAUNCHES)]
    row: Row | None = None
    labels: Labels = Field(default_factory=dict)
    experts_implementation: Name | None = None

    @model_validator(mode="after")
    def _consistent(self) -> TraceV1:
        _check_layout(self, "top_k")
        _check_launches(self.launches, self.layers, self.experts_per_layer)
        return self

    def to_v2(self) -> RequestTrace:
        """The same request as trace/2. The counts are the launches' prefill threads summed per
        (layer, expert), in this trace's unit, under its launch model's name as the source, so a
        fingerprint of the converted trace equals the fingerprint trace/1 gave."""
        counts, regions = sum_launches(self.launches, self.layers, self.experts_per_layer)
        return RequestTrace(
            trace_id=self.trace_id,
            model_id=self.model_id,
            collector=self.collector,
            source=self.launch_model,
            unit=self.unit,
            layers=list(self.layers),
            experts_per_layer=list(self.experts_per_layer),
            top_k=None if self.top_k is None else list(self.top_k),
            prompt_tokens=self.prompt_tokens,
            counts=CountMatrix.of(counts),
            region_threads=regions if any(regions) else None,
            row=self.row,
            labels=dict(self.labels),
            experts_implementation=self.experts_implementation,
        )
