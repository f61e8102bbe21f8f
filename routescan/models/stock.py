"""A small stock-architecture MoE checkpoint made in seconds, for serving engines' integration tests.

vLLM serves only the architectures it implements, and its CPU attention refuses heads narrower than
64, so the tiny test models (routescan.models.tiny) cannot be served. This builds a random-weight
Llama of head_dim 64, MoEfies it with linear routers on random token sequences (seconds on CPU),
and exports it as a stock checkpoint (routescan.models.moefy.export) with a word-level tokenizer:
the same export path the real reference models take, at a size CI can serve.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from routescan.models.tokenizer import WORDS, save_word_tokenizer

SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4)


def build_stock_tiny(out: str | Path, fmt: str = "qwen2-moe", *, seed: int = 0) -> Path:
    """Write a random ``fmt`` MoE (2 layers, 8 experts top-2, head_dim 64) with its tokenizer to ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from routescan.models.moefy.convert import moefy_model
    from routescan.models.moefy.export import export_stock
    from routescan.models.moefy.spec import MoefySpec

    config = LlamaConfig(
        vocab_size=len(WORDS),
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=False,
        **SHAPE,
    )
    torch.manual_seed(seed)
    dense = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    shared = 128 if fmt == "qwen2-moe" else 0
    spec = MoefySpec.model_validate(
        {
            "name": f"tiny-{fmt}-seed{seed}",
            "base": {"path": "random"},
            "moe": {"num_experts": 8, "top_k": 2, "shared_neurons": shared, "router_hidden": 0},
            "calibration": {"prompts": 32, "batch_size": 8, "partition_tokens": 512},
            "router_training": {"epochs": 2, "batch_size": 256},
            "seed": seed,
        }
    )
    rng = np.random.default_rng(seed)
    sequences = [[2, *rng.integers(6, len(WORDS), size=int(rng.integers(8, 40))).tolist()] for _ in range(32)]
    moefy_model(dense, sequences, spec, pad_id=0, base="random-llama")
    out = Path(out)
    export_stock(dense, None, out, fmt)
    save_word_tokenizer(out)
    return out


__all__ = ["SHAPE", "build_stock_tiny"]
