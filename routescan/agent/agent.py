"""The in-process agent: attach to a loaded MoE inside a serving process, emit one trace per prefill.

The serving code brackets each prefill forward step with :meth:`RouteScanAgent.step`, naming which
rows of the step's flattened token batch belong to which request (``spans``). While a step is open the
router hooks keep each layer's selected experts; when it closes, the agent counts, per request and
layer, how many (token, slot) pairs went to each expert, and hands those small counts to the sender,
which builds the trace through the launch model off the forward path. Calls outside a step (decode)
are ignored.

Which signal sources can be split per request in a batched step. Router-level sources (``router``,
and launch models computed from routing such as ``hf-eager``) can: each token row's experts are
known. Raw kernel grids cannot: one fused kernel serves the whole batch, so CUPTI records of a
batched step only give per-step totals; the agent therefore always derives per-request traces from
routing, and uses kernel records (where a GPU collector runs) as a cross-check of step totals.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from routescan.agent.sender import TraceSender
from routescan.models.adapters import get_adapter
from routescan.telemetry.emulated import RoutingCounts, layer_shapes, trace_from_routing
from routescan.telemetry.launch import LaunchModel
from routescan.telemetry.registry import load_launch_model


@dataclass(frozen=True)
class Span:
    """Rows ``[start, start + length)`` of a step's flattened tokens belong to ``request_id``."""

    request_id: str
    start: int
    length: int
    labels: tuple[tuple[str, Any], ...] = ()


def padded_spans(request_ids: Sequence[str], lengths: Sequence[int], width: int) -> list[Span]:
    """Spans of a right-padded ``[batch, width]`` batch (transformers style)."""
    return [Span(r, i * width, n) for i, (r, n) in enumerate(zip(request_ids, lengths, strict=True))]


def packed_spans(request_ids: Sequence[str], lengths: Sequence[int]) -> list[Span]:
    """Spans of a packed batch, requests' tokens back to back (vLLM style)."""
    out, pos = [], 0
    for r, n in zip(request_ids, lengths, strict=True):
        out.append(Span(r, pos, n))
        pos += n
    return out


class RouteScanAgent:
    """Per-request prefill traces from a model's routing, shipped by a :class:`TraceSender`."""

    collector = "agent"

    def __init__(
        self,
        model: torch.nn.Module,
        sender: TraceSender,
        *,
        model_id: str,
        launch_model: str | LaunchModel = "router",
        sampling: float = 1.0,
        aggregate: bool = True,
    ) -> None:
        if not 0.0 <= sampling <= 1.0:
            raise ValueError("sampling must be in [0, 1]")
        self.adapter = get_adapter(model)
        self.sender = sender
        self.launch_model = load_launch_model(launch_model) if isinstance(launch_model, str) else launch_model
        self.sampling = sampling
        # one summed launch per (layer, expert): same fingerprint, ~7x less to build, send and store
        self.aggregate = aggregate
        self.model_id = model_id
        self._shapes = layer_shapes(self.adapter)
        self._local = threading.local()
        self._handles = [
            layer.router.register_forward_hook(self._hook(layer.layer)) for layer in self.adapter.layers
        ]

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def sampled(self, request_id: str) -> bool:
        """Deterministic per request id, so every process of a deployment agrees."""
        if self.sampling >= 1.0:
            return True
        digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64 < self.sampling

    def _hook(self, layer: int):
        def hook(module: torch.nn.Module, args: tuple, output: tuple) -> None:
            buf = getattr(self._local, "buffer", None)
            if buf is not None:
                buf.setdefault(layer, []).append(output[2].detach().reshape(-1, output[2].shape[-1]))

        return hook

    @contextmanager
    def step(self, spans: Sequence[Span]) -> Iterator[None]:
        """Bracket one prefill forward step; its requests' traces are queued when it closes."""
        spans = [s for s in spans if self.sampled(s.request_id)]
        self._local.buffer = {} if spans else None
        try:
            yield
        finally:
            buffer, self._local.buffer = self._local.buffer, None
        if not spans or not buffer:
            return
        selections = {layer: torch.cat(calls).to("cpu") for layer, calls in buffer.items()}
        for span in spans:
            routing = RoutingCounts.from_selections(selections, span.start, span.length, self._shapes)
            self.sender.submit(self._builder(span, routing))

    def _builder(self, span: Span, routing: RoutingCounts):
        def build():
            return trace_from_routing(
                self.model_id,
                self._shapes,
                self.launch_model,
                routing,
                trace_id=span.request_id,
                collector=self.collector,
                labels=dict(span.labels),
                experts_implementation=self.adapter.experts_implementation,
                aggregate=self.aggregate,
            )

        return build
