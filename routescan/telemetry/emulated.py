"""The emulated collector: run a model's prefill on CPU, read routing from the adapters, and turn
per-(layer, expert) routed counts into the launches a GPU backend would make (a launch model).

It produces exactly the trace a GPU collector would for the same routing, with no GPU: that is
what lets the detector be trained and tested on machines without one. Only per-request
aggregates are kept: counts per (layer, expert), never which token went where.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from routescan.models.adapters import MoEAdapter
from routescan.models.batching import pad_batch
from routescan.models.loading import LoadedMoE
from routescan.telemetry.launch import LaunchModel
from routescan.telemetry.schema import RequestTrace


class CollectionError(ValueError):
    """A request could not be collected; the message names it by id, never by text."""


@dataclass
class Request:
    """One request to collect. ``text`` is used for encoding and then dropped."""

    trace_id: str
    text: str = field(repr=False)
    row: int | None = None
    labels: dict[str, Any] = field(default_factory=dict)


@dataclass
class RoutingCounts:
    """Per-request routing aggregate: layer -> routed (token, slot) pairs per expert."""

    tokens: int
    counts: dict[int, list[int]]

    @classmethod
    def from_selections(
        cls, selections: Mapping[int, torch.Tensor], start: int, length: int, shapes: Sequence[LayerShape]
    ) -> RoutingCounts:
        """Count rows ``[start, start + length)`` of each layer's ``[tokens, top_k]`` selected-expert ids
        (one request's slice of a batched step) into per-expert routed pairs."""
        counts = {}
        for shape in shapes:
            rows = selections[shape.layer][start : start + length].reshape(-1)
            counts[shape.layer] = torch.bincount(rows, minlength=shape.num_experts).tolist()
        return cls(tokens=length, counts=counts)


@dataclass(frozen=True)
class LayerShape:
    """What a launch model needs to know about one MoE layer: its id, width and formula variables."""

    layer: int
    num_experts: int
    top_k: int
    dims: dict[str, int]


def layer_shapes(adapter: MoEAdapter) -> list[LayerShape]:
    return [LayerShape(x.layer, x.num_experts, x.top_k, x.dims()) for x in adapter.layers]


def trace_from_routing(
    model_id: str,
    shapes: Sequence[LayerShape],
    launch_model: LaunchModel,
    routing: RoutingCounts,
    *,
    trace_id: str,
    collector: str,
    row: int | None = None,
    labels: dict[str, Any] | None = None,
    experts_implementation: str | None = None,
    aggregate: bool = False,
) -> RequestTrace:
    """A trace from routing counts through a launch model: the one place every router-level
    collector (emulated, in-process agent, vLLM plugin) turns counts into launches.
    ``aggregate``: one summed launch per (layer, expert or region), as ``RequestTrace.aggregated``."""
    launches = []
    for shape in shapes:
        launches.extend(
            launch_model.layer_launches(
                shape.layer, shape.dims, routing.counts[shape.layer], routing.tokens, aggregate=aggregate
            )
        )
    return RequestTrace(
        trace_id=trace_id,
        model_id=model_id,
        collector=collector,
        launch_model=launch_model.name,
        unit=launch_model.unit,
        layers=[shape.layer for shape in shapes],
        experts_per_layer=[shape.num_experts for shape in shapes],
        top_k=[shape.top_k for shape in shapes],
        prompt_tokens=routing.tokens,
        launches=launches,
        row=row,
        labels=labels or {},
        experts_implementation=experts_implementation,
    )


class EmulatedCollector:
    """Prefill on CPU (or any torch device) with routers hooked; traces through launch models.

    Requests are batched with right padding; padding positions are dropped before counting, and a
    test proves batched and one-by-one collection give identical traces.
    """

    name = "emulated"

    def __init__(
        self,
        loaded: LoadedMoE,
        launch_models: Sequence[LaunchModel],
        *,
        batch_size: int = 8,
        max_tokens: int = 4096,
        aggregate: bool = False,
    ) -> None:
        if not launch_models:
            raise ValueError("at least one launch model is needed")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.loaded = loaded
        self.launch_models = list(launch_models)
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.aggregate = aggregate
        self._shapes = layer_shapes(loaded.adapter)
        self._device = next(loaded.model.parameters()).device

    def route(self, requests: Sequence[Request]) -> list[RoutingCounts]:
        """Prefill ``requests`` as one batch and return each one's routing counts."""
        encoded = []
        for request in requests:
            ids = self.loaded.encoder.encode(request.text)
            if not ids:
                raise CollectionError(f"request {request.trace_id}: the prompt encodes to no tokens")
            if len(ids) > self.max_tokens:
                raise CollectionError(
                    f"request {request.trace_id}: {len(ids)} tokens exceed max_tokens={self.max_tokens} "
                    "(raise --max-tokens or shorten the request)"
                )
            encoded.append(ids)
        input_ids, attention = pad_batch(encoded, self.loaded.encoder.pad_id)
        width = input_ids.shape[1]
        adapter = self.loaded.adapter
        with torch.inference_mode(), adapter.record() as recorder:
            self.loaded.model(
                input_ids=input_ids.to(self._device),
                attention_mask=attention.to(self._device),
                use_cache=False,
                logits_to_keep=1,
            )
            selections = recorder.selections()
        return self.count(selections, [len(ids) for ids in encoded], width)

    def count(
        self, selections: dict[int, torch.Tensor], lengths: list[int], width: int
    ) -> list[RoutingCounts]:
        """Per-request (layer, expert) counts from a batch's selections; padding rows are skipped."""
        return [
            RoutingCounts.from_selections(selections, i * width, length, self._shapes)
            for i, length in enumerate(lengths)
        ]

    def collect_batch(self, requests: Sequence[Request]) -> list[dict[str, RequestTrace]]:
        """Traces of one batch: for each request, launch-model name -> trace."""
        results = []
        for request, routing in zip(requests, self.route(requests), strict=True):
            results.append(
                {
                    lm.name: trace_from_routing(
                        self.loaded.model_id,
                        self._shapes,
                        lm,
                        routing,
                        trace_id=request.trace_id,
                        collector=self.name,
                        row=request.row,
                        labels=request.labels,
                        experts_implementation=self.loaded.adapter.experts_implementation,
                        aggregate=self.aggregate,
                    )
                    for lm in self.launch_models
                }
            )
        return results

    def collect(self, requests: Iterable[Request]) -> Iterator[tuple[Request, dict[str, RequestTrace]]]:
        """Stream ``(request, traces)`` in input order, ``batch_size`` prompts per forward pass."""
        batch: list[Request] = []
        for request in requests:
            batch.append(request)
            if len(batch) == self.batch_size:
                yield from zip(batch, self.collect_batch(batch), strict=True)
                batch = []
        if batch:
            yield from zip(batch, self.collect_batch(batch), strict=True)
