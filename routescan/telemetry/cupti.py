"""The GPU collector: CUPTI kernel activity records of each request's prefill, per (layer, expert).

Needs an NVIDIA GPU, its driver and ``cupti-python`` matching the serving PyTorch's CUDA major
(``pip install 'routescan[gpu]'``). Everything that can be checked without a GPU (record conversion,
attribution, error paths) lives in :mod:`routescan.telemetry.cupti_records` and is tested on CPU; this
module is the thin layer that talks to CUPTI and has been written against cupti-python's documented
API, not yet run on a GPU in this repository (see docs/gpu-validation.md).

One request is prefilled per forward pass: kernel sizes are per launch, so a batched prefill would mix
the requests of the batch in every kernel (the router-level collectors can split a batch; raw kernel
grids cannot).
"""

from __future__ import annotations

import importlib
import itertools
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import torch

from routescan.models.adapters import MoEAdapter
from routescan.models.loading import LoadedMoE
from routescan.telemetry.collector import CollectionError, Request, layer_shapes, routing_trace
from routescan.telemetry.cupti_records import EXTERNAL_KIND, KernelAttributor, RegionTag
from routescan.telemetry.schema import Region, RequestTrace, Unit, sum_launches

BUFFER_BYTES = 8 * 1024 * 1024
_NO_GPU_HINT = "use the emulated collector instead (--collector emulated), which needs no GPU"


class GpuUnavailable(RuntimeError):
    """CUPTI cannot run here; the message says why and what to use instead."""


def load_cupti() -> Any:
    """The ``cupti`` module, or :class:`GpuUnavailable` naming the missing piece."""
    try:
        return importlib.import_module("cupti").cupti
    except ImportError as exc:
        raise GpuUnavailable(
            f"cupti-python is not installed ({exc}); on a GPU host: pip install 'routescan[gpu]' "
            f"(its CUDA major must match PyTorch's); otherwise {_NO_GPU_HINT}"
        ) from None


def explain_cupti_error(exc: BaseException) -> GpuUnavailable:
    """One clear message for the ways CUPTI fails at its first real call."""
    kind = type(exc).__name__
    text = str(exc)
    if kind == "NotSupportedError" or "driver is not found" in text.lower() or "libcuda" in text:
        return GpuUnavailable(f"no NVIDIA driver on this machine ({text.strip()[:200]}); {_NO_GPU_HINT}")
    status = str(getattr(exc, "status", ""))
    if "MULTIPLE_SUBSCRIBERS" in status or "MULTIPLE_SUBSCRIBERS" in text.upper():
        return GpuUnavailable(
            "another CUPTI subscriber is active in this process (torch.profiler, Nsight Systems or "
            "another RouteScan collector): CUPTI allows one per process on this driver. Stop it, or "
            f"{_NO_GPU_HINT}"
        )
    if "NOT_INITIALIZED" in status or "NOT_INITIALIZED" in text.upper():
        return GpuUnavailable(
            f"CUPTI could not initialise ({text.strip()[:200]}): the driver is probably older than the "
            "cupti-python release needs; install the cupti-python whose CUDA major matches the driver"
        )
    return GpuUnavailable(f"CUPTI failed: {kind}: {text.strip()[:300]}")


def _profiler_active() -> bool:
    try:
        return bool(torch.autograd.profiler._is_profiler_enabled)  # type: ignore[attr-defined]
    except AttributeError:
        return False


class CuptiSession:
    """Activity tracing for one process: enable, tag regions, flush, hand records to the attributor.

    The completion callback runs on a CUPTI thread: it only appends records (under a lock) and never
    touches Python objects the forward pass uses.
    """

    KINDS = ("CONCURRENT_KERNEL", "EXTERNAL_CORRELATION", "RUNTIME", "DRIVER")

    def __init__(self, cupti: Any | None = None) -> None:
        self.cupti = cupti or load_cupti()
        self.attributor = KernelAttributor()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._enabled: list[Any] = []

    def _requested(self) -> tuple[int, int]:
        return BUFFER_BYTES, 0

    def _completed(self, activities: list) -> None:
        with self._lock:
            self.attributor.ingest(activities)

    def start(self) -> None:
        if _profiler_active():
            raise GpuUnavailable(
                "torch.profiler is recording in this process and owns CUPTI; stop it before collecting"
            )
        c = self.cupti
        try:
            c.activity_register_callbacks(self._requested, self._completed)
            for name in self.KINDS:
                kind = getattr(c.ActivityKind, name)
                c.activity_enable(kind)
                self._enabled.append(kind)
        except Exception as exc:  # cupti raises its own types; each is translated to one message
            self.stop()
            raise explain_cupti_error(exc) from None

    def stop(self) -> None:
        for kind in reversed(self._enabled):
            with suppress(Exception):  # best effort on the way out
                self.cupti.activity_disable(kind)
        self._enabled.clear()

    @contextmanager
    def region(self, tag: RegionTag) -> Iterator[None]:
        ext = next(self._ids)
        with self._lock:
            self.attributor.tag(ext, tag)
        kind = getattr(self.cupti.ExternalCorrelationKind, EXTERNAL_KIND)
        self.cupti.activity_push_external_correlation_id(kind, ext)
        try:
            yield
        finally:
            self.cupti.activity_pop_external_correlation_id(kind)

    def flush(self) -> None:
        torch.cuda.synchronize()
        self.cupti.activity_flush_all(1)  # forced: deliver partially filled buffers now


class CuptiCollector:
    """Prefill requests on the GPU with each MoE layer's expert work tagged; traces from the kernels."""

    name = "cupti"

    def __init__(
        self,
        loaded: LoadedMoE,
        *,
        max_tokens: int = 4096,
        session: CuptiSession | None = None,
        attach: bool = False,
    ) -> None:
        if not torch.cuda.is_available():
            raise GpuUnavailable(f"PyTorch sees no CUDA device; {_NO_GPU_HINT}")
        impl = loaded.adapter.experts_implementation
        if impl not in (None, "eager"):
            raise CollectionError(
                f"the model runs experts_implementation={impl!r}: its kernels do not follow per-expert "
                "token counts. Load it with experts_implementation='eager' (routescan does by default)"
            )
        self.loaded = loaded
        self.max_tokens = max_tokens
        self.attach = attach  # keep every kernel record on the trace (validation against the emulator)
        self._shapes = layer_shapes(loaded.adapter)
        self.session = session or CuptiSession()
        self._request: str | None = None
        self._hit: dict[int, tuple[int, ...]] = {}

    def _enter(self, module: torch.nn.Module, tag: RegionTag) -> None:
        # kept on the module so its forward hook (``post``) closes exactly the region it opened
        module._routescan_region = self.session.region(tag)
        module._routescan_region.__enter__()

    def _hooks(self, adapter: MoEAdapter) -> list[Any]:
        handles = []
        for layer in adapter.layers:

            def router_hook(module, args, output, layer=layer.layer):
                self._hit[layer] = tuple(sorted(set(output[2].flatten().tolist())))

            def pre(module, args, layer=layer.layer):
                if "expert_scope" in type(module).__dict__:
                    # exact: the experts module opens a region per expert itself
                    module.expert_scope = lambda e, layer=layer: self.session.region(
                        RegionTag(self._request or "", layer, e, Region.expert)
                    )
                    module._routescan_region = None
                    return
                self._enter(
                    module,
                    RegionTag(self._request or "", layer, None, Region.expert, self._hit.get(layer, ())),
                )

            def post(module, args, output):
                region = getattr(module, "_routescan_region", None)
                if region is not None:
                    region.__exit__(None, None, None)
                    module._routescan_region = None

            handles.append(layer.router.register_forward_hook(router_hook))
            handles.append(layer.experts.register_forward_pre_hook(pre))
            handles.append(layer.experts.register_forward_hook(post))
            if layer.shared is not None:

                def shared_pre(module, args, layer=layer.layer):
                    self._enter(module, RegionTag(self._request or "", layer, None, Region.shared))

                handles.append(layer.shared.register_forward_pre_hook(shared_pre))
                handles.append(layer.shared.register_forward_hook(post))
        return handles

    def collect(self, requests: Iterable[Request]) -> Iterator[tuple[Request, RequestTrace]]:
        adapter = self.loaded.adapter
        device = next(self.loaded.model.parameters()).device
        self.session.start()
        handles = self._hooks(adapter)
        try:
            for request in requests:
                ids = self.loaded.encoder.encode(request.text)
                if len(ids) > self.max_tokens:
                    raise CollectionError(f"request {request.trace_id}: {len(ids)} tokens > max_tokens")
                self._request = request.trace_id
                self._hit.clear()
                with torch.inference_mode():
                    self.loaded.model(
                        input_ids=torch.tensor([ids], device=device), use_cache=False, logits_to_keep=1
                    )
                self.session.flush()
                with self.session._lock:
                    launches, _stats = self.session.attributor.take(request.trace_id)
                    self.session.attributor.take_other()
                yield request, self._trace(request, launches, len(ids))
        finally:
            for h in handles:
                h.remove()
            for layer in adapter.layers:
                if "expert_scope" in vars(layer.experts):
                    del layer.experts.expert_scope  # back to the class default: no scopes
            self.session.stop()

    def _trace(self, request: Request, launches: Sequence, tokens: int) -> RequestTrace:
        """Kernel records summed per (layer, expert): threads measured, under the source ``cupti``."""
        shapes = self._shapes
        counts, regions = sum_launches(launches, [s.layer for s in shapes], [s.num_experts for s in shapes])
        return routing_trace(
            self.loaded.model_id,
            shapes,
            counts,
            tokens,
            trace_id=request.trace_id,
            collector=self.name,
            source="cupti",
            unit=Unit.threads,
            region_threads=regions,
            launches=list(launches) if self.attach else None,
            row=request.row,
            labels=request.labels,
            experts_implementation=self.loaded.adapter.experts_implementation,
        )
