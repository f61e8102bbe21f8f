"""Seeded tiny random-weight MoE models of every supported architecture, built from configs.

They need no download, build in milliseconds, and exercise the real transformers modules, so
tests and the embedded demo run the same code paths as a production model. They prove
plumbing, not science: detection and privacy figures come from the real-weights reference MoEs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from routescan.models.tokenizer import ByteTokenizer

if TYPE_CHECKING:  # torch and transformers load on first build: the names alone are cheap
    import torch
    from transformers import PreTrainedModel

_COMMON: dict[str, Any] = dict(
    vocab_size=ByteTokenizer.VOCAB_SIZE,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    pad_token_id=ByteTokenizer.PAD_ID,
    bos_token_id=ByteTokenizer.BOS_ID,
    eos_token_id=ByteTokenizer.EOS_ID,
    tie_word_embeddings=False,
)

_DEEPSEEK_ATTENTION: dict[str, Any] = dict(
    num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8
)

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=64),
    "qwen2_moe": dict(
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        intermediate_size=64,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    ),
    "qwen3_moe": dict(
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=64, head_dim=16
    ),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, intermediate_size=32),
    "granitemoe": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32),
    "deepseek_v2": dict(
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        intermediate_size=64,
        n_shared_experts=1,
        first_k_dense_replace=1,
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=2,
        q_lora_rank=None,
        **_DEEPSEEK_ATTENTION,
    ),
    "deepseek_v3": dict(
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        intermediate_size=64,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=4,
        topk_group=2,
        q_lora_rank=16,
        **_DEEPSEEK_ATTENTION,
    ),
    "phimoe": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32),
    "gpt_oss": dict(
        num_local_experts=8,
        num_experts_per_tok=2,
        intermediate_size=32,
        head_dim=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    ),
}


def tiny_model_types() -> list[str]:
    return sorted(TINY_CONFIGS)


def build_tiny_moe(
    model_type: str, *, seed: int = 0, experts_implementation: str = "eager", **overrides: Any
) -> PreTrainedModel:
    """A seeded random-weight MoE causal LM of ``model_type`` (see :func:`tiny_model_types`)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_type not in TINY_CONFIGS:
        raise ValueError(f"no tiny config for '{model_type}'; choose one of {', '.join(tiny_model_types())}")
    kwargs = {**_COMMON, **TINY_CONFIGS[model_type], **overrides}
    if "num_hidden_layers" in overrides and "layer_types" in kwargs and model_type == "gpt_oss":
        kwargs["layer_types"] = [
            "sliding_attention" if i % 2 == 0 else "full_attention"
            for i in range(kwargs["num_hidden_layers"])
        ]
    config = AutoConfig.for_model(model_type, **kwargs)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config, experts_implementation=experts_implementation)
        _randomize_routing_buffers(model, seed)
    finally:
        torch.random.set_rng_state(generator_state)
    model.config.name_or_path = f"tiny-{model_type}-seed{seed}"
    return model.eval()


def _randomize_routing_buffers(model: torch.nn.Module, seed: int) -> None:
    """DeepSeek-V3 initialises its expert-score correction bias to zeros; give it values so grouped
    top-k is exercised the way a trained model exercises it."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    for module in model.modules():
        bias = getattr(module, "e_score_correction_bias", None)
        if isinstance(bias, torch.Tensor):
            with torch.no_grad():
                bias.copy_(torch.rand(bias.shape, generator=gen) * 0.2)
