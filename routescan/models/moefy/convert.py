"""MoEfication (Zhang et al., 2022) of a dense transformers causal LM, layer by layer, on CPU.

For each decoder layer's gated FFN ``down(act(gate x) * up x)``:

1. calibration: the FFN inputs of generic benign prompts (Alpaca train split only) are recorded from
   one pass of the *dense* model;
2. experts: the FFN's neurons are split into E equal groups by balanced k-means (on co-activation or
   on parameters; ``auto`` keeps, per layer, the split whose oracle top-k output is closer to the
   dense FFN on held-out tokens); an optional always-on shared expert takes the most used neurons;
3. router: a small MLP learns, from the FFN input, which k experts contribute most to the output
   (the oracle labels are the k largest ``||expert output||``), and the layer then computes only those.

The converted layers are :class:`MoEfiedMLP` blocks, so the model is a real MoE: unchosen experts are
never computed, and the adapter registry reads their routing like any transformers MoE.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn
from torch.nn import functional as F
from transformers.activations import ACT2FN

from routescan.models.batching import pad_batch
from routescan.models.moefy.modules import MoEfiedMLP
from routescan.models.moefy.partition import PARTITIONS, partition_neurons, shared_neurons
from routescan.models.moefy.spec import MoEDesign, MoefySpec, RouterTraining

MOEFY_VERSION = "routescan.moefy/1"

Progress = Callable[[str, int, int], None]  # (stage, done, total)


class ConversionError(ValueError):
    """The model cannot be MoEfied as asked; the message says why and what to change."""


# ---------------------------------------------------------------------------------------- model anatomy


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "base_model", model), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConversionError(
            f"{type(model).__name__} has no base_model.layers list; MoEfication supports decoder-only "
            "transformers LMs (Llama, Gemma, Qwen, Mistral, ...)"
        )
    return layers


def activation_name(config: Any) -> str:
    name = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    if not isinstance(name, str) or name not in ACT2FN:
        raise ConversionError(f"cannot tell the FFN activation of {type(config).__name__} (got {name!r})")
    return name


@dataclass
class DenseFFN:
    gate: torch.Tensor  # [I, H]
    up: torch.Tensor  # [I, H]
    down: torch.Tensor  # [H, I]
    act: nn.Module

    @classmethod
    def of(cls, mlp: nn.Module) -> DenseFFN:
        parts = [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if not all(isinstance(p, nn.Linear) for p in parts) or not hasattr(mlp, "act_fn"):
            raise ConversionError(
                f"{type(mlp).__name__} is not a gated FFN with gate_proj / up_proj / down_proj / act_fn"
            )
        if any(p.bias is not None for p in parts):
            raise ConversionError(
                f"{type(mlp).__name__} has FFN biases, which MoEfication here does not split"
            )
        gate, up, down = (p.weight.detach() for p in parts)
        return cls(gate, up, down, mlp.act_fn)

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """``act(gate x) * up x``: what each neuron feeds into down_proj, ``[tokens, I]``."""
        return self.act(F.linear(x, self.gate)) * F.linear(x, self.up)


def build_moe_mlp(
    ffn: DenseFFN,
    experts: Sequence[torch.Tensor],
    shared: torch.Tensor,
    *,
    top_k: int,
    activation: str,
    router_hidden: int,
) -> MoEfiedMLP:
    """A :class:`MoEfiedMLP` whose experts are exact slices of ``ffn`` (router left untrained)."""
    sizes = {int(e.numel()) for e in experts}
    if len(sizes) != 1:
        raise ConversionError(f"experts must have equal sizes, got {sorted(sizes)}")
    hidden = ffn.gate.shape[1]
    block = MoEfiedMLP(
        hidden,
        len(experts),
        sizes.pop(),
        top_k,
        activation,
        shared_intermediate=int(shared.numel()),
        router_hidden=router_hidden,
    ).to(ffn.gate.dtype)
    with torch.no_grad():
        for e, idx in enumerate(experts):
            block.experts.gate_up_proj[e].copy_(torch.cat([ffn.gate[idx], ffn.up[idx]], dim=0))
            block.experts.down_proj[e].copy_(ffn.down[:, idx])
        if block.shared_expert is not None:
            block.shared_expert.gate_proj.weight.copy_(ffn.gate[shared])
            block.shared_expert.up_proj.weight.copy_(ffn.up[shared])
            block.shared_expert.down_proj.weight.copy_(ffn.down[:, shared])
    return block


def install_moe(model: nn.Module, meta: dict[str, Any]) -> None:
    """Replace every layer's FFN by an (uninitialised) MoE block of the shape ``meta`` describes.

    Used to rebuild a saved MoEfied model before its weights are loaded.
    """
    config = model.config
    activation = meta["activation"]
    hidden = int(config.hidden_size)
    for layer in decoder_layers(model):
        layer.mlp = MoEfiedMLP(
            hidden,
            int(meta["num_experts"]),
            int(meta["expert_intermediate"]),
            int(meta["top_k"]),
            activation,
            shared_intermediate=int(meta["shared_intermediate"]),
            router_hidden=int(meta["router_hidden"]),
        ).to(next(model.parameters()).dtype)


# ---------------------------------------------------------------------------------------- calibration


def calibration_prompts(corpora: Path, spec: MoefySpec) -> list[str]:
    path = corpora / spec.calibration.corpus
    if "harmless_train" not in path.name:
        # The routing must be label-blind: a harmful corpus or an evaluation split here would leak.
        raise ConversionError(
            f"calibration corpus {path.name}: only the Alpaca train split (harmless_train.json) is allowed"
        )
    if not path.exists():
        raise ConversionError(f"{path}: not found; pass --corpora pointing at the shared corpora folder")
    rows = json.loads(path.read_text(encoding="utf-8"))
    texts = [r["instruction"] for r in rows if isinstance(r, dict) and r.get("instruction")]
    if len(texts) < spec.calibration.prompts:
        raise ConversionError(f"{path}: {len(texts)} prompts, fewer than calibration.prompts")
    return random.Random(spec.seed).sample(texts, spec.calibration.prompts)


def common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != first[i] for s in seqs):
            return i
    return n


@torch.inference_mode()
def capture_ffn_inputs(
    model: nn.Module,
    sequences: Sequence[Sequence[int]],
    *,
    pad_id: int,
    batch_size: int,
    progress: Progress | None = None,
) -> list[torch.Tensor]:
    """Every layer's FFN input for every token, ``[tokens, H]`` per layer, from one dense pass.

    The chat template's shared prefix (system prompt, role markers) is the same for every prompt; it is
    kept once so it does not dominate what the routers learn.
    """
    layers = decoder_layers(model)
    prefix = common_prefix(sequences) if len(sequences) > 1 else 0
    buffers: list[list[torch.Tensor]] = [[] for _ in layers]
    state: dict[str, torch.Tensor] = {}

    def hook_for(i: int):
        def hook(module: nn.Module, args: tuple) -> None:
            buffers[i].append(args[0][state["mask"]].float().clone())

        return hook

    handles = [layer.mlp.register_forward_pre_hook(hook_for(i)) for i, layer in enumerate(layers)]
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    try:
        for start in range(0, len(order), batch_size):
            ids, attention = pad_batch([sequences[i] for i in order[start : start + batch_size]], pad_id)
            mask = attention.bool()
            if start > 0:
                mask[:, :prefix] = False
            else:
                mask[1:, :prefix] = False
            state["mask"] = mask
            model.base_model(input_ids=ids, attention_mask=attention)
            if progress:
                progress("calibration pass", min(start + batch_size, len(order)), len(order))
    finally:
        for handle in handles:
            handle.remove()
    return [torch.cat(b) for b in buffers]


# ---------------------------------------------------------------------------------------- one layer


class LayerReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    layer: int
    partition: str
    oracle_error: dict[str, float]  # per partition tried: relative error of oracle top-k
    router_error: float  # relative error of the trained router's top-k vs the dense FFN
    router_recall: float  # share of the oracle top-k the router picks
    load: list[float]  # share of routed slots per expert on held-out tokens


def expert_contributions(
    a: torch.Tensor, down: torch.Tensor, experts: Sequence[torch.Tensor]
) -> torch.Tensor:
    """``||expert e's output||`` per token, ``[tokens, E]``: how much each expert matters."""
    out = torch.empty(a.shape[0], len(experts), dtype=a.dtype)
    for e, idx in enumerate(experts):
        out[:, e] = torch.linalg.vector_norm(F.linear(a[:, idx], down[:, idx]), dim=-1)
    return out


def selection_error(
    a: torch.Tensor,
    down: torch.Tensor,
    experts: Sequence[torch.Tensor],
    shared: torch.Tensor,
    selected: torch.Tensor,
) -> float:
    """``||dense - moe|| / ||dense||`` over tokens when each token computes only ``selected`` experts."""
    dense = F.linear(a, down)
    keep = torch.zeros_like(a)
    keep[:, shared] = 1.0
    for e, idx in enumerate(experts):
        rows = (selected == e).any(dim=-1)
        keep[rows.nonzero().flatten().unsqueeze(1), idx.unsqueeze(0)] = 1.0
    moe = F.linear(a * keep, down)
    return float(torch.linalg.norm(dense - moe) / torch.linalg.norm(dense).clamp_min(1e-12))


def train_router(
    router: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    cfg: RouterTraining,
    *,
    seed: int,
) -> None:
    """Fit ``router.net`` to predict the oracle top-k set (multi-label BCE), in place.

    Inputs are standardised while training and the scaling is folded into the first linear layer
    afterwards, so the saved router takes the raw FFN input (some norms emit large activations). A
    bias-free first layer (the linear router) is only scaled, not centred: a centring would need a bias.
    """
    net = router.net
    first = net[0] if isinstance(net, nn.Sequential) else net
    std = x.std(dim=0).clamp_min(1e-6)
    mean = x.mean(dim=0) if first.bias is not None else torch.zeros_like(std)
    xs = (x - mean) / std
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.Linear):
                bound = 1.0 / module.in_features**0.5
                module.weight.uniform_(-bound, bound, generator=gen)
                if module.bias is not None:
                    module.bias.zero_()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * max(1, -(-len(xs) // cfg.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps)
    with torch.enable_grad():
        for _ in range(cfg.epochs):
            perm = torch.randperm(len(xs), generator=gen)
            for start in range(0, len(xs), cfg.batch_size):
                idx = perm[start : start + cfg.batch_size]
                loss = F.binary_cross_entropy_with_logits(net(xs[idx]), labels[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    with torch.no_grad():
        # W (x - m) / s + b  ==  (W / s) x + (b - W (m / s))
        w = first.weight / std
        if first.bias is not None:
            first.bias.sub_(first.weight @ (mean / std))
        first.weight.copy_(w)


def _split(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(n * val_fraction))
    return perm[n_val:], perm[:n_val]


def convert_layer(
    index: int,
    mlp: nn.Module,
    x: torch.Tensor,
    spec: MoefySpec,
    activation: str,
) -> tuple[MoEfiedMLP, LayerReport]:
    """MoEfy one FFN from its calibration inputs ``x [tokens, H]``."""
    design: MoEDesign = spec.moe
    ffn = DenseFFN.of(mlp)
    x = x.to(ffn.gate.dtype)
    seed = spec.seed * 1000 + index
    train_idx, val_idx = _split(len(x), spec.calibration.val_fraction, seed)
    x_val = x[val_idx]
    a_val = ffn.activations(x_val)
    gen = torch.Generator().manual_seed(seed)
    sample = train_idx[torch.randperm(len(train_idx), generator=gen)[: spec.calibration.partition_tokens]]
    a_sample = ffn.activations(x[sample])
    importance = a_sample.abs().mean(dim=0) * torch.linalg.vector_norm(ffn.down, dim=0)
    shared = shared_neurons(importance, design.shared_neurons)

    kinds = PARTITIONS if design.partition == "auto" else (design.partition,)
    candidates: dict[str, list[torch.Tensor]] = {}
    oracles: dict[str, torch.Tensor] = {}
    oracle_error: dict[str, float] = {}
    for kind in kinds:
        experts = partition_neurons(
            kind, ffn.gate, ffn.up, a_sample, num_experts=design.num_experts, shared=shared, seed=seed
        )
        oracle = torch.topk(expert_contributions(a_val, ffn.down, experts), design.top_k, dim=-1).indices
        candidates[kind] = experts
        oracles[kind] = oracle
        oracle_error[kind] = selection_error(a_val, ffn.down, experts, shared, oracle)
    kind = min(oracle_error, key=oracle_error.__getitem__)
    experts = candidates[kind]

    block = build_moe_mlp(
        ffn, experts, shared, top_k=design.top_k, activation=activation, router_hidden=design.router_hidden
    )
    x_train = x[train_idx]
    contrib = expert_contributions(ffn.activations(x_train), ffn.down, experts)
    labels = torch.zeros_like(contrib)
    labels.scatter_(1, torch.topk(contrib, design.top_k, dim=-1).indices, 1.0)
    train_router(block.router, x_train, labels, spec.router_training, seed=seed)
    del contrib, labels

    with torch.no_grad():
        chosen = block.router(x_val)[2]
    oracle = oracles[kind]
    recall = (chosen.unsqueeze(-1) == oracle.unsqueeze(-2)).any(dim=-1).float().mean()
    counts = torch.bincount(chosen.flatten(), minlength=design.num_experts).double()
    report = LayerReport(
        layer=index,
        partition=kind,
        oracle_error=oracle_error,
        router_error=selection_error(a_val, ffn.down, experts, shared, chosen),
        router_recall=float(recall),
        load=(counts / counts.sum()).tolist(),
    )
    return block, report


# ---------------------------------------------------------------------------------------- whole model


class MoefyReport(BaseModel):
    """What the converter did and how close each layer stays to the dense FFN (moefy-report.json)."""

    model_config = ConfigDict(extra="forbid")

    schema_version: str = MOEFY_VERSION
    name: str
    base: str
    spec: dict[str, Any]
    calibration_prompts: int
    calibration_tokens: int
    seconds: float
    layers: list[LayerReport]

    def summary(self) -> dict[str, float]:
        return {
            "mean_router_error": float(np.mean([r.router_error for r in self.layers])),
            "mean_oracle_error": float(np.mean([min(r.oracle_error.values()) for r in self.layers])),
            "mean_router_recall": float(np.mean([r.router_recall for r in self.layers])),
        }


def moefication_meta(spec: MoefySpec, model: nn.Module, activation: str, base: str) -> dict[str, Any]:
    """The ``config.moefication`` entry: enough to rebuild the blocks, plus where they came from."""
    d = spec.moe
    intermediate = int(model.config.intermediate_size)
    return {
        "version": MOEFY_VERSION,
        "name": spec.name,
        "base": base,
        "num_experts": d.num_experts,
        "top_k": d.top_k,
        "expert_intermediate": (intermediate - d.shared_neurons) // d.num_experts,
        "shared_intermediate": d.shared_neurons,
        "router_hidden": d.router_hidden,
        "activation": activation,
        "partition": d.partition,
        "chat_template": spec.base.chat_template,
        "seed": spec.seed,
    }


def moefy_model(
    model: nn.Module,
    sequences: Sequence[Sequence[int]],
    spec: MoefySpec,
    *,
    pad_id: int,
    base: str,
    progress: Progress | None = None,
) -> MoefyReport:
    """Convert ``model`` in place (every decoder layer's FFN becomes a MoE block); returns the report.

    ``sequences`` are the tokenised calibration prompts.
    """
    started = time.perf_counter()
    torch.manual_seed(spec.seed)
    activation = activation_name(model.config)
    layers = decoder_layers(model)
    intermediate = int(model.config.intermediate_size)
    routed = intermediate - spec.moe.shared_neurons
    if routed <= 0 or routed % spec.moe.num_experts:
        raise ConversionError(
            f"FFN width {intermediate} minus {spec.moe.shared_neurons} shared neurons does not split into "
            f"{spec.moe.num_experts} equal experts; change moe.num_experts or moe.shared_neurons"
        )
    inputs = capture_ffn_inputs(
        model, sequences, pad_id=pad_id, batch_size=spec.calibration.batch_size, progress=progress
    )
    tokens = int(inputs[0].shape[0])
    reports = []
    for i, layer in enumerate(layers):
        block, report = convert_layer(i, layer.mlp, inputs[i], spec, activation)
        layer.mlp = block
        inputs[i] = torch.empty(0)  # free as we go: all layers' inputs together are the peak memory
        reports.append(report)
        if progress:
            progress("experts + routers", i + 1, len(layers))
    model.config.moefication = moefication_meta(spec, model, activation, base)
    return MoefyReport(
        name=spec.name,
        base=base,
        spec=spec.model_dump(),
        calibration_prompts=len(sequences),
        calibration_tokens=tokens,
        seconds=round(time.perf_counter() - started, 1),
        layers=reports,
    )
