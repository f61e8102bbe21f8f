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
from routescan.telemetry.collector import LayerShape, layer_shapes, routing_trace, step_counts
from routescan.telemetry.schema import RequestTrace


@dataclass(frozen=True)
class Span:
    """Rows ``[start, start + length)`` of a step's flattened tokens belong to ``request_id``.

    A prompt prefilled in chunks (vLLM's chunked prefill) has one span per step: ``first`` marks the
    chunk that starts at prompt position 0 and ``last`` the one that ends the prompt. Counts are
    summed over a request's chunks and its trace is queued when the last one closes.
    """

    request_id: str
    start: int
    length: int
    labels: tuple[tuple[str, Any], ...] = ()
    first: bool = True
    last: bool = True


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


def sampled(request_id: str, sampling: float) -> bool:
    """Deterministic per request id, so every process of a deployment agrees."""
    if sampling >= 1.0:
        return True
    digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < sampling


@dataclass
class _Open:
    counts: np.ndarray
    tokens: int
    labels: tuple[tuple[str, Any], ...]


class PrefillTraces:
    """The one path from a step's per-request counts to queued traces, shared by every agent
    (transformers' :class:`RouteScanAgent`, the vLLM plugin): chunk sums, sampling, the trace build.

    Not thread-safe: one serving thread feeds it.
    """

    def __init__(
        self,
        sender: TraceSender,
        shapes: Sequence[LayerShape],
        *,
        model_id: str,
        collector: str,
        sampling: float = 1.0,
        experts_implementation: str | None = None,
        max_open: int = 4096,
    ) -> None:
        if not 0.0 <= sampling <= 1.0:
            raise ValueError("sampling must be in [0, 1]")
        self.sender = sender
        self.shapes = list(shapes)
        self.model_id = model_id
        self.collector = collector
        self.sampling = sampling
        self.experts_implementation = experts_implementation
        self.max_open = max_open
        self._open: dict[str, _Open] = {}
        self.incomplete = 0  # chunks of prompts whose start was never seen (a prefix-cache hit, a restart)

    def keep(self, spans: Sequence[Span]) -> list[Span]:
        """The spans of sampled requests. Sampling is a function of the request id, so every chunk of
        a prompt gets the same answer."""
        return [s for s in spans if sampled(s.request_id, self.sampling)]

    def add(self, spans: Sequence[Span], counts: Sequence[np.ndarray]) -> None:
        """One step's routed counts per span (flat, layer-major); queues the traces of prompts that end."""
        for span, c in zip(spans, counts, strict=True):
            if span.first:
                if len(self._open) >= self.max_open:
                    # prompts whose last chunk never came (aborted requests): drop the oldest
                    self._open.pop(next(iter(self._open)))
                state = self._open[span.request_id] = _Open(np.array(c, dtype=np.int64), 0, span.labels)
            else:
                state = self._open.get(span.request_id)
                if state is None:
                    # the prompt's first tokens were never counted here: a trace of the rest would be
                    # a different prompt's fingerprint, so none is sent (counted, logged by callers)
                    self.incomplete += 1
                    continue
                state.counts += c
            state.tokens += span.length
            if span.last:
                del self._open[span.request_id]
                self.sender.submit(self._builder(span.request_id, state))

    def _builder(self, request_id: str, state: _Open) -> Callable[[], RequestTrace]:
        def build() -> RequestTrace:
            return routing_trace(
                self.model_id,
                self.shapes,
                state.counts,
                state.tokens,
                trace_id=request_id,
                collector=self.collector,
                labels=dict(state.labels),
                experts_implementation=self.experts_implementation,
            )

        return build


class RouteScanAgent:
    """Per-request prefill traces (trace/2) from a transformers model's routing, shipped by a
    :class:`TraceSender`.

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
        self.adapter = get_adapter(model)
        self.traces = PrefillTraces(
            sender,
            layer_shapes(self.adapter),
            model_id=model_id,
            collector=self.collector,
            sampling=sampling,
            experts_implementation=self.adapter.experts_implementation,
        )
        self.sender = sender
        self._recorder = RoutingRecorder(self.adapter, enabled=False)
        self._handles = self._recorder.attach()

    @property
    def sampling(self) -> float:
        return self.traces.sampling

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def sampled(self, request_id: str) -> bool:
        return sampled(request_id, self.traces.sampling)

    @contextmanager
    def step(self, spans: Sequence[Span]) -> Iterator[None]:
        """Bracket one prefill forward step; its requests' traces are queued when it closes."""
        spans = self.traces.keep(spans)
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
        counts = step_counts(selections, [(s.start, s.length) for s in spans], self.traces.shapes)
        self.traces.add(spans, counts)
