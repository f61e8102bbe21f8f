"""vLLM general plugin (entry point group ``vllm.general_plugins``): per-request routing telemetry.

vLLM calls :func:`register` in the API process, the engine core and every worker, before the worker
builds its model; it may call it more than once. The plugin is idempotent and does nothing outside
workers. In a worker it wraps the model runner so that, once the model is loaded, every FusedMoE
layer's top-k expert ids are captured, and each forward step is split per request from the step's
scheduled tokens (requests' tokens are packed back to back in input-batch order).

vLLM's fused MoE kernels launch the same grid whatever the routing (see docs/deploy.md), so the
per-expert signal must come from ``topk_ids``; this is why the default signal here is ``router``.

This layer is kept thin on purpose: vLLM cannot run on the CPU-only CI machines, so everything under
it (agent, sender, daemon) is tested against a transformers model served in a separate process, and
this module is import-tested where vLLM is installed. The attribute names below follow vLLM's v1
worker (GPUModelRunner.load_model / execute_model, SchedulerOutput.num_scheduled_tokens,
InputBatch.req_ids, FusedMoE routers' set_capture_fn); check them against the vLLM you deploy.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

log = logging.getLogger("routescan.vllm")
_LOCK = threading.Lock()
_REGISTERED = False


def _in_worker() -> bool:
    # vLLM sets this in worker processes it spawns; the API server and engine core do not load models
    return os.environ.get("ROUTESCAN_FORCE_WORKER") == "1" or "VLLM_WORKER_MULTIPROC_METHOD" in os.environ


def register() -> None:
    """Entry point. Safe to call any number of times, in any vLLM process."""
    global _REGISTERED
    with _LOCK:
        if _REGISTERED or os.environ.get("ROUTESCAN_AGENT", "1") == "0":
            return
        _REGISTERED = True
    try:
        from vllm.v1.worker import gpu_model_runner  # type: ignore[import-not-found]
    except ImportError:
        log.info("routescan: vLLM v1 worker not importable here; plugin inactive")
        return
    _patch(gpu_model_runner.GPUModelRunner)


def _patch(runner_cls: Any) -> None:
    if getattr(runner_cls, "_routescan_patched", False):
        return
    original_load, original_execute = runner_cls.load_model, runner_cls.execute_model

    def load_model(self, *args, **kwargs):
        out = original_load(self, *args, **kwargs)
        try:
            self._routescan = _VllmAgent(self.model, model_id=os.environ.get("ROUTESCAN_MODEL_ID", ""))
        except Exception as exc:  # telemetry must never take the server down
            log.warning("routescan: agent not attached: %s", exc)
            self._routescan = None
        return out

    def execute_model(self, scheduler_output, *args, **kwargs):
        agent = getattr(self, "_routescan", None)
        if agent is None:
            return original_execute(self, scheduler_output, *args, **kwargs)
        with agent.step(self, scheduler_output):
            return original_execute(self, scheduler_output, *args, **kwargs)

    runner_cls.load_model, runner_cls.execute_model = load_model, execute_model
    runner_cls._routescan_patched = True


class _VllmAgent:
    """Capture FusedMoE top-k ids during a step; split them per request by scheduled token counts."""

    def __init__(self, model: Any, *, model_id: str) -> None:
        from vllm.model_executor.layers.fused_moe import FusedMoE  # type: ignore[import-not-found]

        from routescan.agent import sender_from_env
        from routescan.telemetry.collector import LayerShape
        from routescan.telemetry.schema import LayerDims

        if not model_id:
            raise ValueError("set ROUTESCAN_MODEL_ID to the model id the daemon's detector was trained on")
        self.layers = [m for m in model.modules() if isinstance(m, FusedMoE)]
        if not self.layers:
            raise ValueError("no FusedMoE layer in this model")
        self.sender = sender_from_env()
        self.model_id = model_id
        # vLLM's FusedMoE layers are numbered in module order; their widths are fixed at load time
        self.shapes = [
            LayerShape(
                index,
                layer.global_num_experts,
                layer.top_k,
                LayerDims(H=layer.hidden_size, I=layer.intermediate_size_per_partition),
            )
            for index, layer in enumerate(self.layers)
        ]
        self.buffer: dict[int, list] | None = None
        for index, layer in enumerate(self.layers):
            router = getattr(layer, "router", None)
            if router is None or not hasattr(router, "set_capture_fn"):
                raise ValueError("this vLLM's FusedMoE has no router capture hook; upgrade vLLM")
            router.set_capture_fn(lambda ids, index=index: self._capture(index, ids))

    def _capture(self, index: int, topk_ids: Any) -> None:
        if self.buffer is not None:
            self.buffer.setdefault(index, []).append(topk_ids.detach())

    def step(self, runner: Any, scheduler_output: Any):
        from contextlib import contextmanager

        from routescan.agent.agent import packed_spans

        @contextmanager
        def ctx():
            order = list(runner.input_batch.req_ids)
            scheduled = scheduler_output.num_scheduled_tokens
            prefilling = {r.req_id for r in getattr(scheduler_output, "scheduled_new_reqs", [])}
            self.buffer = {} if prefilling else None
            try:
                yield
            finally:
                buffer, self.buffer = self.buffer, None
                if buffer:
                    lengths = [int(scheduled.get(r, 0)) for r in order]
                    spans = [s for s in packed_spans(order, lengths) if s.request_id in prefilling]
                    self._emit(buffer, spans)

        return ctx()

    def _emit(self, buffer: dict[int, list], spans: list) -> None:
        import torch

        from routescan.telemetry.collector import routing_trace, step_counts

        ids = {i: torch.cat(v).cpu() for i, v in buffer.items()}
        per_request = step_counts(ids, [(s.start, s.length) for s in spans], self.shapes)
        for span, counts in zip(spans, per_request, strict=True):

            def build(span=span, counts=counts):
                return routing_trace(
                    self.model_id,
                    self.shapes,
                    counts,
                    span.length,
                    trace_id=span.request_id,
                    collector="vllm-agent",
                )

            self.sender.submit(build)
