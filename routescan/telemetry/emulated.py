"""The emulated collector: run a model's prefill on CPU (or any torch device), read routing from the
adapters, and write each request's per-(layer, expert) routed counts as a trace/2 record.

Launch models turn those counts into the kernel launches a GPU backend would make when the trace is
featurised or scored, so the trace is what a GPU collector's would be for the same routing, with no
GPU: that is what lets the detector be trained and tested on machines without one. Only per-request
aggregates are kept: counts per (layer, expert), never which token went where.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

from routescan.models.batching import pad_batch
from routescan.models.loading import LoadedMoE
from routescan.telemetry.collector import (
    CollectionError,
    Request,
    layer_shapes,
    routing_trace,
    step_counts,
)
from routescan.telemetry.launch import LaunchModel
from routescan.telemetry.schema import RequestTrace

__all__ = ["CollectionError", "EmulatedCollector", "Request"]


class EmulatedCollector:
    """Prefill on CPU (or any torch device) with routers hooked; one trace/2 per request.

    Requests are batched with right padding; padding positions are dropped before counting, and a
    test proves batched and one-by-one collection give identical traces. ``attach``: also write the
    per-kernel launches a launch model gives for the counts (to compare with CUPTI records on a GPU).
    ``window``: also keep the counts of every ``window`` prompt tokens of a longer prompt
    (:class:`~routescan.telemetry.schema.Windows`).
    """

    name = "emulated"

    def __init__(
        self,
        loaded: LoadedMoE,
        *,
        batch_size: int = 8,
        max_tokens: int = 4096,
        attach: LaunchModel | None = None,
        window: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if window is not None and window < 1:
            raise ValueError("window must be >= 1 prompt tokens")
        self.window = window
        self.loaded = loaded
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.attach = attach
        self._shapes = layer_shapes(loaded.adapter)
        self._device = next(loaded.model.parameters()).device

    def encode(self, request: Request) -> list[int]:
        ids = self.loaded.encoder.encode(request.text)
        if not ids:
            raise CollectionError(f"request {request.trace_id}: the prompt encodes to no tokens")
        if len(ids) > self.max_tokens:
            raise CollectionError(
                f"request {request.trace_id}: {len(ids)} tokens exceed max_tokens={self.max_tokens} "
                "(raise --max-tokens or shorten the request)"
            )
        return ids

    def check_lengths(self, requests: Sequence[Request]) -> None:
        """Encode every request once before any is collected, and refuse the whole run if some do
        not fit ``max_tokens``: an hour of collection should not end on the longest request."""
        lengths = [(len(self.loaded.encoder.encode(r.text)), r.trace_id) for r in requests]
        empty = [i for n, i in lengths if n == 0]
        if empty:
            raise CollectionError(f"{len(empty)} request(s) encode to no tokens, e.g. {empty[:3]}")
        long = sorted((n, i) for n, i in lengths if n > self.max_tokens)
        if long:
            raise CollectionError(
                f"{len(long)} request(s) exceed max_tokens={self.max_tokens} (the longest, "
                f"{long[-1][1]}, has {long[-1][0]} tokens; e.g. {[i for _, i in long[:3]]}); nothing "
                f"was collected: raise --max-tokens to {long[-1][0]} or drop them"
            )

    def route_tokens(self, encoded: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Prefill token-id sequences as one batch; each one's routed counts, flat in layer order."""
        return self._route(encoded)[0]

    def _route(self, encoded: Sequence[Sequence[int]]) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
        """Each sequence's routed counts and, with ``window``, its per-window counts (none for a
        sequence of one window)."""
        input_ids, attention = pad_batch([list(ids) for ids in encoded], self.loaded.encoder.pad_id)
        width = input_ids.shape[1]
        with torch.inference_mode(), self.loaded.adapter.record() as recorder:
            self.loaded.model(
                input_ids=input_ids.to(self._device),
                attention_mask=attention.to(self._device),
                use_cache=False,
                logits_to_keep=1,
            )
            selections = recorder.selections()
        counts = step_counts(
            selections, [(i * width, len(ids)) for i, ids in enumerate(encoded)], self._shapes
        )
        w = self.window
        owners, spans = [], []
        for i, ids in enumerate(encoded):
            if w is not None and len(ids) > w:
                for lo in range(0, len(ids), w):
                    owners.append(i)
                    spans.append((i * width + lo, min(w, len(ids) - lo)))
        windows: list[list[np.ndarray]] = [[] for _ in encoded]
        for i, c in zip(owners, step_counts(selections, spans, self._shapes) if spans else [], strict=True):
            windows[i].append(c)
        return counts, windows

    def count_matrix(self, encoded: Sequence[Sequence[int]]) -> np.ndarray:
        """``[sequences, sum of experts per layer]`` routed counts of token-id sequences, batched by
        ``batch_size`` (research code: routing statistics without building traces)."""
        rows: list[np.ndarray] = []
        for lo in range(0, len(encoded), self.batch_size):
            rows.extend(self.route_tokens(encoded[lo : lo + self.batch_size]))
        return np.stack(rows) if rows else np.zeros((0, sum(s.num_experts for s in self._shapes)), np.int64)

    def collect_batch(self, requests: Sequence[Request]) -> list[RequestTrace]:
        """Traces of one batch of requests, in order."""
        encoded = [self.encode(r) for r in requests]
        impl = self.loaded.adapter.experts_implementation
        out = []
        counts_of, windows_of = self._route(encoded)
        for request, ids, counts, windows in zip(requests, encoded, counts_of, windows_of, strict=True):
            out.append(
                routing_trace(
                    self.loaded.model_id,
                    self._shapes,
                    counts,
                    len(ids),
                    trace_id=request.trace_id,
                    collector=self.name,
                    launches=self._launches(counts, len(ids)) if self.attach is not None else None,
                    row=request.row,
                    labels=request.labels,
                    experts_implementation=impl,
                    windows=(self.window, windows) if windows else None,
                )
            )
        return out

    def _launches(self, counts: np.ndarray, tokens: int) -> list:
        assert self.attach is not None
        launches, pos = [], 0
        for shape in self._shapes:
            row = counts[pos : pos + shape.num_experts].tolist()
            env = shape.dims.env(shape.num_experts, shape.top_k)
            launches.extend(self.attach.layer_launches(shape.layer, env, row, tokens))
            pos += shape.num_experts
        return launches

    def collect(self, requests: Iterable[Request]) -> Iterator[tuple[Request, RequestTrace]]:
        """Stream ``(request, trace)`` in input order, ``batch_size`` prompts per forward pass."""
        batch: list[Request] = []
        for request in requests:
            batch.append(request)
            if len(batch) == self.batch_size:
                yield from zip(batch, self.collect_batch(batch), strict=True)
                batch = []
        if batch:
            yield from zip(batch, self.collect_batch(batch), strict=True)
