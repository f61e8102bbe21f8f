"""The in-process agent: attach to a loaded MoE inside a serving process, emit one trace per prefill.

The serving code brackets each prefill forward step with :meth:`RouteScanAgent.step`, naming which
rows of the step's flattened token batch belong to which request (``spans``). While a step is open
the router hooks keep each layer's selected experts; when it closes, the agent counts, per request
and layer, how many (token, slot) pairs went to each expert, and hands those small counts to the
sender, which builds the trace/2 record off the forward path. Calls outside a step (decode) are
ignored.

Which signal sources can be split per request in a batched step. Router-level sources can: each
token row's experts are known, and the trace's routed counts give ``router`` and every launch model
computed from routing (``hf-eager``...) at the daemon. Raw kernel grids cannot: one fused kernel
serves the whole batch, so CUPTI records of a batched step only give per-step totals; the agent
therefore always derives per-request traces from routing, and uses kernel records (where a GPU
collector runs) as a cross-check of step totals.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from routescan.agent.sender import TraceSender
from routescan.models.adapters import RoutingRecorder, get_adapter
from routescan.telemetry.collector import layer_shapes, routing_trace, step_counts
from routescan.telemetry.schema import RequestTrace


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
    """Per-request prefill traces (trace/2) from a model's routing, shipped by a :class:`TraceSender`.

    One forward thread per agent: the router hooks record into the agent's one recorder while a
    step is open. The trace carries routed token counts; the daemon's detector derives whatever
    signal it reads from them, so the agent needs no launch model.
    """

    collector = "agent"

    def __init__(
        self,
        model: torch.nn.Module,
        sender: TraceSender,
        *,
        model_id: str,
        sampling: float = 1.0,
    ) -> None:
        if not 0.0 <= sampling <= 1.0:
            raise ValueError("sampling must be in [0, 1]")
        self.adapter = get_adapter(model)
        self.sender = sender
        self.sampling = sampling
        self.model_id = model_id
        self._shapes = layer_shapes(self.adapter)
        self._recorder = RoutingRecorder(self.adapter, enabled=False)
        self._handles = self._recorder.attach()

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

    @contextmanager
    def step(self, spans: Sequence[Span]) -> Iterator[None]:
        """Bracket one prefill forward step; its requests' traces are queued when it closes."""
        spans = [s for s in spans if self.sampled(s.request_id)]
        recorder = self._recorder
        recorder.clear()
        recorder.enabled = bool(spans)
        try:
            yield
        finally:
            recorder.enabled = False
        if not spans:
            return
        selections = recorder.selections()
        recorder.clear()
        if not selections:
            return
        per_request = step_counts(selections, [(s.start, s.length) for s in spans], self._shapes)
        for span, counts in zip(spans, per_request, strict=True):
            self.sender.submit(self._builder(span, counts))

    def _builder(self, span: Span, counts: np.ndarray) -> Callable[[], RequestTrace]:
        def build() -> RequestTrace:
            return routing_trace(
                self.model_id,
                self._shapes,
                counts,
                span.length,
                trace_id=span.request_id,
                collector=self.collector,
                labels=dict(span.labels),
                experts_implementation=self.adapter.experts_implementation,
            )

        return build
