"""Export a MoEfied model as a stock MoE checkpoint that vLLM (and transformers) serve natively.

vLLM serves only the architectures it implements, and a MoEfied model's blocks are RouteScan's own.
Two stock architectures can express a MoEfied Llama-family model (SmolLM2) exactly:

- ``qwen2-moe`` (``Qwen2MoeForCausalLM``): routed experts plus one shared expert behind a sigmoid
  gate. Llama attention has no q/k/v biases, Qwen2's has: they are written as zeros. The shared
  expert's gate weights are 0, so its factor is sigmoid(0) = 0.5, compensated by doubling the shared
  expert's down-projection.
- ``mixtral`` (``MixtralForCausalLM``): routed experts only.

Both weight the chosen experts by a softmax over their gate logits (renormalised over the top k),
where a MoEfied block sums its chosen experts unweighted. The gate is the MoEfied router's linear map
times ``2**-s``: a power-of-two scale is exact in binary floating point, so every scaled logit keeps
its order, and the softmax of such close logits is nearly uniform, ``(1/k)(1 + O(2**-s))``. Each
expert's down-projection is multiplied by k to compensate the 1/k. Both stock classes choose their
top k *after* the softmax, on probabilities that all sit near 1/E, so ``s`` cannot be large: two
experts whose logits differ by less than about ``2**(s-24)`` round to the same fp32 probability and may
swap. ``s`` trades the output error (halves per step) against such swaps (double per step);
docs/reference-model.md measures both on the reference models. fp16 is refused: its probabilities
are too coarse to keep the order.

These architectures have a bias-free *linear* router, so only a MoEfied model built with
``router_hidden: 0`` (``configs/models/*-linear.yaml``) exports.

Checkpoints are written in the per-expert tensor layout of the published Qwen1.5-MoE / Mixtral
checkpoints, which both vLLM and transformers read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from torch import nn

from routescan.models.moefy.convert import ConversionError, decoder_layers
from routescan.models.moefy.modules import MoEfiedMLP

ExportFormat = Literal["qwen2-moe", "mixtral"]
FORMATS: tuple[str, ...] = ("qwen2-moe", "mixtral")
# The config key that names the MoEfied recipe an exported checkpoint came from (the model id).
EXPORT_KEY = "routescan_export"
DEFAULT_LOGIT_SHIFT = 12  # chosen by measurement: docs/reference-model.md, "Stock checkpoints"
WEIGHTS = "model.safetensors"
_BASES = ("llama",)  # Llama-family decoder layers: pre-norm RMSNorm, rotary attention, no biases
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _blocks(model: nn.Module) -> list[MoEfiedMLP]:
    blocks = [layer.mlp for layer in decoder_layers(model)]
    if not all(isinstance(b, MoEfiedMLP) for b in blocks):
        raise ConversionError(
            "every decoder layer must be a MoEfied block: export a `routescan moefy` output"
        )
    return blocks  # type: ignore[return-value]


def check_exportable(model: nn.Module, fmt: str) -> list[MoEfiedMLP]:
    """The model's MoE blocks, or a :class:`ConversionError` saying why ``fmt`` cannot express it."""
    if fmt not in FORMATS:
        raise ConversionError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    config = model.config
    if config.model_type not in _BASES:
        raise ConversionError(
            f"the base architecture is {config.model_type!r}; {fmt} expresses Llama-family layers only "
            "(Gemma's (1 + w) norms and extra post-norms have no place in it)"
        )
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ConversionError("the base model has attention or MLP biases, which the export does not carry")
    blocks = _blocks(model)
    first = blocks[0]
    if any(not isinstance(b.router.net, nn.Linear) or b.router.net.bias is not None for b in blocks):
        raise ConversionError(
            f"{fmt} needs bias-free linear routers; this model has MLP routers. Rebuild it with "
            "`router_hidden: 0` (configs/models/*-linear.yaml) and export that"
        )
    if fmt == "mixtral" and first.shared_expert is not None:
        raise ConversionError("mixtral has no shared expert; export a shared-expert design as qwen2-moe")
    if fmt == "qwen2-moe" and first.shared_expert is None:
        raise ConversionError("qwen2-moe needs a shared expert; export a design without one as mixtral")
    return blocks


def _stock_config(model: nn.Module, fmt: str, dtype: str, logit_shift: int) -> dict[str, Any]:
    src = model.config
    blocks = _blocks(model)
    first = blocks[0]
    num_experts, top_k = first.router.num_experts, first.router.top_k
    expert_width = int(first.experts.down_proj.shape[-1])
    common = {
        "vocab_size": src.vocab_size,
        "hidden_size": src.hidden_size,
        "num_hidden_layers": src.num_hidden_layers,
        "num_attention_heads": src.num_attention_heads,
        "num_key_value_heads": src.num_key_value_heads,
        "hidden_act": first.experts.activation,
        "max_position_embeddings": src.max_position_embeddings,
        "rms_norm_eps": src.rms_norm_eps,
        "rope_parameters": dict(src.rope_parameters),
        "rope_theta": float(src.rope_parameters.get("rope_theta", 10000.0)),
        "tie_word_embeddings": bool(src.tie_word_embeddings),
        "bos_token_id": src.bos_token_id,
        "eos_token_id": src.eos_token_id,
        "pad_token_id": src.pad_token_id,
        "num_experts_per_tok": top_k,
        "torch_dtype": dtype,
        "dtype": dtype,
        EXPORT_KEY: {
            "name": src.moefication["name"],
            "format": fmt,
            "logit_shift": logit_shift,
            "source": {k: src.moefication[k] for k in ("version", "base", "seed")},
        },
    }
    head_dim = getattr(src, "head_dim", None) or src.hidden_size // src.num_attention_heads
    if head_dim * src.num_attention_heads != src.hidden_size:
        raise ConversionError("head_dim x heads != hidden size, which neither format expresses")
    if fmt == "mixtral":
        return {
            **common,
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "intermediate_size": expert_width,
            "num_local_experts": num_experts,
            "head_dim": head_dim,
            "sliding_window": None,
            "router_jitter_noise": 0.0,
        }
    shared = first.shared_expert
    assert shared is not None
    return {
        **common,
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        "intermediate_size": int(shared.down_proj.in_features),
        "moe_intermediate_size": expert_width,
        "shared_expert_intermediate_size": int(shared.down_proj.in_features),
        "num_experts": num_experts,
        "norm_topk_prob": True,  # renormalise over the chosen k, as Mixtral does: weights 1/k each
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "qkv_bias": True,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": src.num_hidden_layers,
    }


@torch.no_grad()
def stock_state_dict(
    model: nn.Module, fmt: str, *, logit_shift: int = DEFAULT_LOGIT_SHIFT
) -> dict[str, torch.Tensor]:
    """The export's tensors under the published checkpoints' names (float32, contiguous)."""
    blocks = check_exportable(model, fmt)
    base = model.base_model
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": base.embed_tokens.weight}
    out["model.norm.weight"] = base.norm.weight
    if not model.config.tie_word_embeddings:
        out["lm_head.weight"] = model.lm_head.weight
    scale = 2.0**-logit_shift
    for i, (layer, block) in enumerate(zip(decoder_layers(model), blocks, strict=True)):
        p = f"model.layers.{i}"
        attn = layer.self_attn
        out[f"{p}.input_layernorm.weight"] = layer.input_layernorm.weight
        out[f"{p}.post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[f"{p}.self_attn.{name}.weight"] = getattr(attn, name).weight
        if fmt == "qwen2-moe":
            for name in ("q_proj", "k_proj", "v_proj"):
                rows = getattr(attn, name).weight.shape[0]
                out[f"{p}.self_attn.{name}.bias"] = torch.zeros(rows, dtype=attn.q_proj.weight.dtype)
        experts = block.experts
        k = block.router.top_k
        width = experts.down_proj.shape[-1]
        moe, names = (f"{p}.mlp", ("gate_proj", "up_proj", "down_proj"))
        if fmt == "mixtral":
            moe, names = (f"{p}.block_sparse_moe", ("w1", "w3", "w2"))
        out[f"{moe}.gate.weight"] = block.router.net.weight * scale
        for e in range(experts.num_experts):
            gate, up = experts.gate_up_proj[e][:width], experts.gate_up_proj[e][width:]
            out[f"{moe}.experts.{e}.{names[0]}.weight"] = gate
            out[f"{moe}.experts.{e}.{names[1]}.weight"] = up
            out[f"{moe}.experts.{e}.{names[2]}.weight"] = experts.down_proj[e] * k
        if fmt == "qwen2-moe":
            shared = block.shared_expert
            assert shared is not None
            out[f"{moe}.shared_expert.gate_proj.weight"] = shared.gate_proj.weight
            out[f"{moe}.shared_expert.up_proj.weight"] = shared.up_proj.weight
            out[f"{moe}.shared_expert.down_proj.weight"] = shared.down_proj.weight * 2.0
            out[f"{moe}.shared_expert_gate.weight"] = torch.zeros(1, shared.gate_proj.in_features)
    return {name: t.detach().float().contiguous().clone() for name, t in out.items()}


def export_stock(
    model: nn.Module,
    tokenizer: Any,
    out: str | Path,
    fmt: str,
    *,
    dtype: str = "float32",
    logit_shift: int = DEFAULT_LOGIT_SHIFT,
) -> Path:
    """Write ``model`` (a MoEfied model with linear routers) to ``out`` as a ``fmt`` checkpoint.

    The weights are written to a temporary name and moved into place last, so an interrupted export
    never leaves a directory that looks complete.
    """
    if dtype not in _DTYPES:
        raise ConversionError(
            f"dtype {dtype!r}: choose float32 or bfloat16 (float16 cannot keep the order of the "
            "near-uniform gate probabilities)"
        )
    if not 0 <= logit_shift <= 64:
        raise ConversionError("logit_shift must be in 0..64")
    tensors = stock_state_dict(model, fmt, logit_shift=logit_shift)
    tensors = {name: t.to(_DTYPES[dtype]) for name, t in tensors.items()}
    config = _stock_config(model, fmt, dtype, logit_shift)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    generation = {
        k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] is not None
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    tmp = out / (WEIGHTS + ".partial")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / WEIGHTS)
    return out


__all__ = [
    "DEFAULT_LOGIT_SHIFT",
    "EXPORT_KEY",
    "FORMATS",
    "check_exportable",
    "export_stock",
    "stock_state_dict",
]
