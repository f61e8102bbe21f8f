"""What every collector shares: the request it is given, the protocol it implements, the layer shapes
it reads off a model, and the one function that turns routing into a ``routescan.trace/2`` record.

Collectors (emulated forward pass, CUPTI on a GPU, the in-process agent, the vLLM plugin) all yield
``(request, trace)`` pairs; files, resume and staging are the caller's
(:class:`routescan.telemetry.io.TraceSink`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from routescan.telemetry.schema import CountMatrix, LayerDims, RequestTrace, Unit, Windows

if TYPE_CHECKING:  # torch is imported by the collectors that run models, not by this module
    import torch

    from routescan.models.adapters import MoEAdapter


class CollectionError(ValueError):
    """A request could not be collected; the message names it by id, never by text."""


@dataclass
class Request:
    """One request to collect. ``text`` is used for encoding and then dropped."""

    trace_id: str
    text: str = field(repr=False)
    row: int | None = None
    labels: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Collector(Protocol):
    """Anything that turns requests into traces, one per request, in input order."""

    name: str

    def collect(self, requests: Iterable[Request]) -> Iterator[tuple[Request, RequestTrace]]: ...


@dataclass(frozen=True)
class LayerShape:
    """One MoE layer as a trace describes it: the model's own layer index, width, top-k and dims."""

    layer: int
    num_experts: int
    top_k: int
    dims: LayerDims


def layer_shapes(adapter: MoEAdapter) -> list[LayerShape]:
    return [
        LayerShape(
            x.layer,
            x.num_experts,
            x.top_k,
            LayerDims(H=x.hidden, I=x.intermediate, SI=x.shared_intermediate, G=2 if x.gated else 1),
        )
        for x in adapter.layers
    ]


def config_layer_shapes(config: Any) -> list[LayerShape]:
    """The layer layout of the model ``config`` (a transformers config) describes, found exactly as
    :func:`layer_shapes` finds it on the loaded model: the model is built on the meta device (no
    weights, no memory) and read by the adapter registry. A serving engine that holds only the config
    (the vLLM plugin) gets the layout the transformers collector writes for the same checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM

    from routescan.models.adapters import get_adapter

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return layer_shapes(get_adapter(model))


def routed_counts(
    selections: Mapping[int, torch.Tensor], start: int, length: int, shapes: Sequence[LayerShape]
) -> np.ndarray:
    """Routed (token, slot) pairs per (layer, expert), flat in layer order, of rows
    ``[start, start + length)`` of each layer's ``[tokens, top_k]`` selected-expert ids (one request's
    slice of a batched step)."""
    return step_counts(selections, [(start, length)], shapes)[0]


def step_counts(
    selections: Mapping[int, torch.Tensor], spans: Sequence[tuple[int, int]], shapes: Sequence[LayerShape]
) -> list[np.ndarray]:
    """:func:`routed_counts` of each ``(start, length)`` span of one step. The one place routing
    becomes counts: every router-level collector (emulated, agent, vLLM) calls it. When every layer
    is as wide (most MoEs) the whole step is one bincount keyed by (request, layer, expert), not one
    per request and layer (4x faster at the primary shape). Spans must not overlap."""
    import torch

    widths = {shape.num_experts for shape in shapes}
    if spans and len(widths) == 1 and len({selections[s.layer].shape for s in shapes}) == 1:
        (width,) = widths
        stacked = torch.stack([selections[s.layer] for s in shapes]).to(torch.int32)  # [layers, tokens, k]
        low, high = torch.aminmax(stacked)
        if int(low) < 0 or int(high) >= width:
            # an id past the width would land in the next layer's counts
            raise ValueError(f"a router selected an expert outside 0..{width - 1}")
        return list(span_counts(stacked, spans, width).cpu().numpy())
    out = []
    for start, length in spans:
        parts = [
            torch.bincount(selections[s.layer][start : start + length].reshape(-1), minlength=s.num_experts)
            for s in shapes
        ]
        out.append(torch.cat(parts).cpu().numpy())
    return out


def span_counts(stacked: torch.Tensor, spans: Sequence[tuple[int, int]], width: int) -> torch.Tensor:
    """``[spans, layers * width]`` routed counts of ``stacked`` (``[layers, tokens, k]`` expert ids,
    each in ``0..width-1``) for each ``(start, length)`` row span: one bincount keyed by
    (span, layer, expert). Device work only, no host synchronisation, so a serving engine can call it
    on its forward path and copy the small result off the device asynchronously."""
    import torch

    layers, tokens, _ = stacked.shape
    # rows of no span go to a last, discarded key range
    owner = torch.full((tokens,), len(spans), dtype=torch.int32, device=stacked.device)
    for index, (start, length) in enumerate(spans):
        owner[start : start + length] = index
    size = layers * width
    layer = torch.arange(layers, dtype=torch.int32, device=stacked.device).view(-1, 1, 1) * width
    key = (owner.view(1, -1, 1) * size + layer + stacked.to(torch.int32)).reshape(-1)
    counts = torch.bincount(key, minlength=(len(spans) + 1) * size)[: len(spans) * size]
    return counts.view(len(spans), size)


def routing_trace(
    model_id: str,
    shapes: Sequence[LayerShape],
    counts: np.ndarray | Sequence[Sequence[int]],
    tokens: int,
    *,
    trace_id: str,
    collector: str,
    source: str = "router",
    unit: Unit = Unit.tokens,
    region_threads: Sequence[int] | None = None,
    launches: list | None = None,
    row: int | None = None,
    labels: Mapping[str, Any] | None = None,
    experts_implementation: str | None = None,
    windows: tuple[int, Sequence[np.ndarray]] | None = None,
) -> RequestTrace:
    """The trace/2 record of one request: the one builder every collector calls. ``windows``:
    (window length, each window's flat counts), for a prompt longer than one window."""
    dims = [s.dims for s in shapes]
    matrix = CountMatrix(counts) if isinstance(counts, np.ndarray) else CountMatrix.of(counts)
    return RequestTrace(
        trace_id=trace_id,
        model_id=model_id,
        collector=collector,
        source=source,
        unit=unit,
        layers=[s.layer for s in shapes],
        experts_per_layer=[s.num_experts for s in shapes],
        top_k=[s.top_k for s in shapes],
        # one entry stands for every layer when they are all alike (most MoEs): a smaller record
        dims=dims[0] if len(set(dims)) == 1 else dims,
        prompt_tokens=int(tokens),
        counts=matrix,
        region_threads=None if region_threads is None else list(region_threads),
        launches=launches,
        row=row,
        labels=dict(labels or {}),
        experts_implementation=experts_implementation,
        windows=None
        if windows is None
        else Windows(tokens=windows[0], counts=[CountMatrix(np.asarray(c)) for c in windows[1]]),
    )


COLLECTORS = ("emulated", "cupti")


def open_collector(
    kind: str,
    loaded: Any,
    *,
    batch_size: int = 4,
    max_tokens: int = 4096,
    attach: str | None = None,
    window: int | None = None,
) -> Collector:
    """The collector named ``kind`` over a loaded model. ``attach``: keep per-kernel launches on each
    trace (emulated: the named launch model's; cupti: the kernel records, with any non-empty value).
    CUPTI reads one request per forward pass (kernel grids cannot be split per request).
    ``window``: per-window counts too (emulated only: kernel grids cannot be split per window)."""
    if kind == "emulated":
        from routescan.telemetry.emulated import EmulatedCollector
        from routescan.telemetry.registry import load_launch_model

        model = load_launch_model(attach) if attach else None
        return EmulatedCollector(
            loaded, batch_size=batch_size, max_tokens=max_tokens, attach=model, window=window
        )
    if kind == "cupti":
        from routescan.telemetry.cupti import CuptiCollector, GpuUnavailable

        if window is not None:
            raise CollectionError("--window needs the emulated collector: kernel grids are per forward pass")
        try:
            collector = CuptiCollector(loaded, max_tokens=max_tokens, attach=bool(attach))
        except GpuUnavailable as exc:
            raise CollectionError(str(exc)) from None
        loaded.model.to("cuda")
        return collector
    raise CollectionError(f"--collector must be one of {', '.join(COLLECTORS)}, not {kind!r}")
