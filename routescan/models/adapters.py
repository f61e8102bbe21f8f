"""MoE adapters: find every MoE layer of a loaded transformers model and observe its routing.

transformers 5 gives its MoE families one shape: a sparse block owns a router module that returns
``(router_logits, top_k_weights, top_k_index)`` over the flattened ``(batch * seq, hidden)`` tokens,
and an experts module called with ``(hidden, top_k_index, top_k_weights)``. An architecture entry
therefore only has to name the block classes and the router / experts / shared-expert attributes;
the same forward hook then reads the selected experts of every architecture. The recorder keeps
selections in memory for the collector to aggregate; nothing per-token leaves this module.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


class UnsupportedModelError(ValueError):
    """The model is not an MoE architecture RouteScan has an adapter for."""


@dataclass(frozen=True)
class MoEArchitecture:
    """How to find the MoE blocks of one model family. Register new ones with
    :func:`register_architecture`."""

    name: str
    model_types: tuple[str, ...]
    block_classes: tuple[str, ...]
    router_attr: str
    experts_attr: str = "experts"
    shared_attr: str | None = None
    routing: str = "softmax top-k"


@dataclass
class MoELayer:
    """One MoE layer as the collectors see it: modules plus the dimensions launch models need."""

    layer: int
    path: str
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    shared: nn.Module | None
    num_experts: int
    top_k: int
    hidden: int
    intermediate: int
    shared_intermediate: int = 0
    gated: bool = True

    def dims(self) -> dict[str, int]:
        """Variables a launch model's formulas may use (see configs/launch/README.md)."""
        return {
            "E": self.num_experts,
            "K": self.top_k,
            "H": self.hidden,
            "I": self.intermediate,
            "SI": self.shared_intermediate,
            "G": 2 if self.gated else 1,
        }


_REGISTRY: dict[str, MoEArchitecture] = {}


def register_architecture(arch: MoEArchitecture) -> MoEArchitecture:
    """Add (or replace) an architecture; its ``model_types`` are matched against ``config.model_type``."""
    for model_type in arch.model_types:
        _REGISTRY[model_type] = arch
    return arch


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


for _arch in (
    MoEArchitecture("mixtral", ("mixtral",), ("MixtralSparseMoeBlock",), "gate"),
    MoEArchitecture(
        "qwen2_moe",
        ("qwen2_moe",),
        ("Qwen2MoeSparseMoeBlock",),
        "gate",
        shared_attr="shared_expert",
        routing="softmax top-k plus one gated always-on shared expert",
    ),
    MoEArchitecture("qwen3_moe", ("qwen3_moe",), ("Qwen3MoeSparseMoeBlock",), "gate"),
    MoEArchitecture("olmoe", ("olmoe",), ("OlmoeSparseMoeBlock",), "gate"),
    MoEArchitecture(
        "granitemoe",
        ("granitemoe",),
        ("GraniteMoeMoE",),
        "router",
        routing="top-k logits, softmax over the k",
    ),
    MoEArchitecture(
        "deepseek_v2",
        ("deepseek_v2",),
        ("DeepseekV2Moe",),
        "gate",
        shared_attr="shared_experts",
        routing="softmax, greedy or group-limited greedy top-k, shared experts",
    ),
    MoEArchitecture(
        "deepseek_v3",
        ("deepseek_v3",),
        ("DeepseekV3MoE",),
        "gate",
        shared_attr="shared_experts",
        routing="sigmoid + correction bias, grouped top-k (top-2 sum per group), shared experts",
    ),
    MoEArchitecture("phimoe", ("phimoe",), ("PhimoeSparseMoeBlock",), "router", routing="sparsemixer top-2"),
    MoEArchitecture("gpt_oss", ("gpt_oss",), ("GptOssMLP",), "router", routing="top-k logits with bias"),
):
    register_architecture(_arch)

_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)(?:\.|$)")


def _expert_dims(experts: nn.Module) -> tuple[int, int, int]:
    """(num_experts, hidden, intermediate) from the stacked expert weights."""
    down = getattr(experts, "down_proj", None)
    if not isinstance(down, torch.Tensor) or down.dim() != 3:
        raise UnsupportedModelError(
            f"{type(experts).__name__} does not hold stacked expert weights (down_proj [E, ., .])"
        )
    num_experts = int(down.shape[0])
    if getattr(experts, "is_transposed", False):
        intermediate, hidden = int(down.shape[1]), int(down.shape[2])
    else:
        hidden, intermediate = int(down.shape[1]), int(down.shape[2])
    return num_experts, hidden, intermediate


def _shared_intermediate(shared: nn.Module | None) -> int:
    if shared is None:
        return 0
    down = getattr(shared, "down_proj", None)
    if isinstance(down, nn.Linear):
        return int(down.in_features)
    return 0


class MoEAdapter:
    """The MoE layers of one loaded model, and a recorder of its routing decisions."""

    def __init__(self, model: nn.Module, arch: MoEArchitecture) -> None:
        self.model = model
        self.arch = arch
        self.layers: list[MoELayer] = []
        config = getattr(model, "config", None)
        for path, module in model.named_modules():
            if type(module).__name__ not in arch.block_classes:
                continue
            match = _LAYER_INDEX.search(path)
            if match is None:
                raise UnsupportedModelError(f"cannot tell the layer index of MoE block '{path}'")
            router = getattr(module, arch.router_attr)
            experts = getattr(module, arch.experts_attr)
            shared = getattr(module, arch.shared_attr) if arch.shared_attr else None
            num_experts, hidden, intermediate = _expert_dims(experts)
            top_k = getattr(router, "top_k", None) or getattr(config, "num_experts_per_tok", None)
            if not top_k:
                raise UnsupportedModelError(f"cannot tell top-k of MoE block '{path}'")
            self.layers.append(
                MoELayer(
                    layer=int(match.group(1)),
                    path=path,
                    block=module,
                    router=router,
                    experts=experts,
                    shared=shared,
                    num_experts=num_experts,
                    top_k=int(top_k),
                    hidden=hidden,
                    intermediate=intermediate,
                    shared_intermediate=_shared_intermediate(shared),
                    gated=bool(getattr(experts, "has_gate", True)),
                )
            )
        if not self.layers:
            raise UnsupportedModelError(
                f"model type '{getattr(config, 'model_type', '?')}' is registered as '{arch.name}' but no "
                f"module of class {', '.join(arch.block_classes)} was found in it"
            )
        self.layers.sort(key=lambda layer: layer.layer)

    @property
    def experts_implementation(self) -> str | None:
        config = getattr(self.model, "config", None)
        if self.arch is MOEFIED:
            return str(getattr(self.layers[0].experts, "implementation", "eager"))
        return getattr(config, "_experts_implementation", None)

    @contextmanager
    def record(self) -> Iterator[RoutingRecorder]:
        """Hook every router for the duration of the block; hooks are removed even on error."""
        recorder = RoutingRecorder(self)
        handles = recorder.attach()
        try:
            yield recorder
        finally:
            for handle in handles:
                handle.remove()


@dataclass
class RoutingRecorder:
    """Selected experts per MoE layer, in router call order, for the forward passes it saw while
    ``enabled``. The one router hook of RouteScan: collectors attach it for a pass, the in-process
    agent keeps it attached and enables it for prefill steps only."""

    adapter: MoEAdapter
    enabled: bool = True
    _calls: dict[int, list[torch.Tensor]] = field(default_factory=dict)

    def attach(self) -> list[Any]:
        """Hook every router; returns the handles to remove."""
        return [
            layer.router.register_forward_hook(self._hook_for(layer.layer)) for layer in self.adapter.layers
        ]

    def _hook_for(self, layer: int):
        def hook(module: nn.Module, args: tuple, output: tuple) -> None:
            if not self.enabled:
                return
            indices = output[2] if isinstance(output, tuple) else None
            if not isinstance(indices, torch.Tensor):
                raise UnsupportedModelError(
                    f"router {type(module).__name__} did not return (logits, weights, indices)"
                )
            self._calls.setdefault(layer, []).append(indices.detach().reshape(-1, indices.shape[-1]))

        return hook

    def clear(self) -> None:
        self._calls.clear()

    def selections(self) -> dict[int, torch.Tensor]:
        """Layer -> int64 tensor ``[tokens, top_k]`` of selected experts (flattened batch-major)."""
        return {layer: torch.cat(calls).to("cpu", torch.int64) for layer, calls in self._calls.items()}


# MoEfied dense models (routescan moefy) keep their dense model_type; their config's ``moefication``
# entry says the FFNs were replaced by these blocks. The experts only have the per-expert eager path.
MOEFIED = MoEArchitecture(
    "moefied",
    (),
    ("MoEfiedMLP",),
    "router",
    shared_attr="shared_expert",
    routing="MoEfication: learned router, unweighted top-k of FFN neuron groups, optional shared group",
)


def is_moefied(config: object) -> bool:
    meta = getattr(config, "moefication", None)
    return isinstance(meta, dict) and str(meta.get("version", "")).startswith("routescan.moefy/")


def get_adapter(model: nn.Module) -> MoEAdapter:
    """The adapter for ``model``; a clear error names the supported model types otherwise."""
    config = getattr(model, "config", None)
    if is_moefied(config):
        return MoEAdapter(model, MOEFIED)
    model_type = getattr(config, "model_type", None)
    arch = _REGISTRY.get(model_type or "")
    if arch is None:
        raise UnsupportedModelError(
            f"model type '{model_type}' is not a Mixture-of-Experts architecture RouteScan has an adapter "
            f"for. Supported: {', '.join(supported_model_types())}, and dense models converted with "
            "`routescan moefy`. For another transformers MoE, "
            "register one with routescan.models.register_architecture(MoEArchitecture(...))."
        )
    return MoEAdapter(model, arch)
