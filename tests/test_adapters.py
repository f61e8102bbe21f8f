"""Adapters report the experts each architecture's router really selected.

The expected choice is recomputed independently: from the MoE block's input (captured by a
separate pre-hook) and the router's weights, with each family's published selection rule written
out here, not taken from transformers' router code path.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from routescan.models.adapters import UnsupportedModelError, get_adapter, supported_model_types
from routescan.models.tiny import build_tiny_moe, tiny_model_types


def _topk_set(scores: torch.Tensor, k: int) -> torch.Tensor:
    return scores.topk(k, dim=-1).indices


def _grouped(scores_for_choice: torch.Tensor, n_group: int, topk_group: int, k: int, group_score: str):
    tokens, experts = scores_for_choice.shape
    grouped = scores_for_choice.view(tokens, n_group, experts // n_group)
    gscore = grouped.max(-1).values if group_score == "max" else grouped.topk(2, dim=-1).values.sum(-1)
    keep = gscore.topk(topk_group, dim=-1).indices
    mask = torch.zeros(tokens, n_group, dtype=torch.bool).scatter_(1, keep, True)
    mask = mask.unsqueeze(-1).expand(-1, -1, experts // n_group).reshape(tokens, experts)
    return scores_for_choice.masked_fill(~mask, float("-inf")).topk(k, dim=-1).indices


def expected_selection(model_type: str, layer, hidden: torch.Tensor) -> torch.Tensor:
    router = layer.router
    x = hidden.reshape(-1, hidden.shape[-1]).float()
    weight = router.weight.float()
    bias = getattr(router, "bias", None)
    logits = F.linear(x, weight, bias.float() if isinstance(bias, torch.Tensor) else None)
    k = layer.top_k
    config = layer.block.config if hasattr(layer.block, "config") else None
    if model_type in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"):
        return _topk_set(logits.softmax(-1), k)
    if model_type in ("granitemoe", "gpt_oss"):
        return _topk_set(logits, k)
    if model_type == "deepseek_v2":
        return _grouped(logits.softmax(-1), router.num_group, router.topk_group, k, "max")
    if model_type == "deepseek_v3":
        choice = logits.sigmoid() + router.e_score_correction_bias
        return _grouped(choice, router.num_group, router.topk_group, k, "top2sum")
    if model_type == "phimoe":
        # sparsemixer at inference: the best expert, then the best of the rest.
        first = logits.argmax(-1, keepdim=True)
        second = logits.scatter(-1, first, float("-inf")).argmax(-1, keepdim=True)
        return torch.cat([first, second], dim=-1)
    raise AssertionError(f"no reference rule for {model_type} ({config})")


EXPECTED_MOE_LAYERS = {"deepseek_v2": [1, 2], "deepseek_v3": [1, 2]}


@pytest.mark.parametrize("model_type", tiny_model_types())
def test_adapter_matches_independent_recomputation(model_type: str) -> None:
    model = build_tiny_moe(model_type, seed=3)
    adapter = get_adapter(model)
    assert [layer.layer for layer in adapter.layers] == EXPECTED_MOE_LAYERS.get(model_type, [0, 1, 2])
    assert all(layer.num_experts == 8 and layer.top_k == 2 for layer in adapter.layers)

    block_inputs: dict[int, torch.Tensor] = {}
    handles = [
        layer.block.register_forward_pre_hook(
            lambda mod, args, layer_id=layer.layer: block_inputs.__setitem__(
                layer_id, args[0].detach().clone()
            )
        )
        for layer in adapter.layers
    ]
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(7))
    try:
        with torch.inference_mode(), adapter.record() as recorder:
            model(input_ids=ids, use_cache=False)
            got = recorder.selections()
    finally:
        for h in handles:
            h.remove()

    for layer in adapter.layers:
        with torch.no_grad():
            expected = expected_selection(model_type, layer, block_inputs[layer.layer])
        observed = got[layer.layer]
        assert observed.shape == (22, 2)
        assert torch.equal(observed.sort(-1).values, expected.sort(-1).values), (
            f"{model_type} layer {layer.layer}"
        )


def test_shared_expert_dimensions_are_reported() -> None:
    qwen = get_adapter(build_tiny_moe("qwen2_moe"))
    assert all(layer.shared_intermediate == 64 for layer in qwen.layers)
    mixtral = get_adapter(build_tiny_moe("mixtral"))
    assert all(layer.shared_intermediate == 0 for layer in mixtral.layers)
    gptoss = get_adapter(build_tiny_moe("gpt_oss"))  # transposed expert weights
    assert (gptoss.layers[0].hidden, gptoss.layers[0].intermediate) == (64, 32)


def test_hooks_are_removed_after_recording() -> None:
    model = build_tiny_moe("olmoe")
    adapter = get_adapter(model)
    with adapter.record():
        pass
    assert all(not layer.router._forward_hooks for layer in adapter.layers)


def test_dense_model_is_refused_with_supported_list() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
        )
    )
    with pytest.raises(UnsupportedModelError) as err:
        get_adapter(dense)
    message = str(err.value)
    assert "'llama'" in message
    for model_type in ("mixtral", "deepseek_v3", "gpt_oss"):
        assert model_type in message
    assert set(tiny_model_types()) <= set(supported_model_types())
