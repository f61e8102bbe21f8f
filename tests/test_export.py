"""`routescan export`: a MoEfied model as a stock Qwen2-MoE / Mixtral checkpoint that transformers' own
classes load and that routes exactly as the MoEfied model does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_word_tokenizer
from test_moefy import dense, sequences, spec
from transformers import AutoModelForCausalLM, MixtralForCausalLM, Qwen2MoeForCausalLM
from typer.testing import CliRunner

from routescan.cli.main import app
from routescan.models.loading import load_pretrained
from routescan.models.moefy import load_moefied, moefy_model, save_moefied
from routescan.models.moefy.convert import ConversionError
from routescan.models.moefy.export import EXPORT_KEY, export_stock
from routescan.models.quality import routing_and_logits, topk_agreement

# Stated tolerance: the stock softmax weights are (1/k)(1 + O(2**-s)) instead of exactly 1/k, and the
# sums run in another order, so fp32 logits agree to ~1e-5 here (s = 12; the error halves per step of
# s); routing may flip only where two experts' logits tie to about 2**(s-24).
LOGIT_ATOL = 1e-4
TOPK_AGREEMENT = 0.999


def linear_spec(num_experts: int, top_k: int, shared: int):
    s = spec(num_experts, top_k, shared).model_dump()
    s["moe"]["router_hidden"] = 0
    return type(spec(2, 1)).model_validate(s)


def moefied(tmp_path: Path, *, num_experts: int, top_k: int, shared: int, seed: int = 0) -> Path:
    model = dense("llama", torch.float32, seed=seed)
    report = moefy_model(model, sequences(), linear_spec(num_experts, top_k, shared), pad_id=0, base="tiny")
    out = tmp_path / "moefied"
    save_word_tokenizer(out)
    save_moefied(model, None, out, report)
    return out


def held_out(n: int = 12) -> list[list[int]]:
    # prompts the routers never saw (other seed), of varied lengths
    return sequences(n, seed=7)


@pytest.mark.parametrize(
    ("fmt", "cls", "num_experts", "top_k", "shared"),
    [("qwen2-moe", Qwen2MoeForCausalLM, 4, 2, 16), ("mixtral", MixtralForCausalLM, 4, 2, 0)],
)
def test_stock_classes_load_the_export_and_route_as_the_moefied_model(
    tmp_path: Path, fmt: str, cls: type, num_experts: int, top_k: int, shared: int
) -> None:
    src = moefied(tmp_path, num_experts=num_experts, top_k=top_k, shared=shared)
    out = tmp_path / fmt
    model = load_moefied(src)
    export_stock(model, None, out, fmt)
    stock = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, experts_implementation="eager")
    assert isinstance(stock, cls)
    seqs = held_out()
    ref_sets, ref_logits = routing_and_logits(model.eval(), seqs)
    got_sets, got_logits = routing_and_logits(stock.eval(), seqs)
    agree = topk_agreement(ref_sets, got_sets)
    assert agree >= TOPK_AGREEMENT, f"top-k sets agree on {agree:.4f} of (token, layer) pairs"
    torch.testing.assert_close(got_logits, ref_logits, rtol=0, atol=LOGIT_ATOL)
    # the routing really is sparse: the export is not the dense model in disguise
    assert ref_sets.shape[-1] == top_k < num_experts


def test_exported_traces_carry_the_recipe_model_id_and_the_same_counts(tmp_path: Path) -> None:
    from routescan.telemetry.emulated import EmulatedCollector, Request

    src = moefied(tmp_path, num_experts=4, top_k=2, shared=16)
    out = tmp_path / "qwen"
    export_stock(load_moefied(src), None, out, "qwen2-moe")
    save_word_tokenizer(out)
    prompts = [Request(f"r{i}", " ".join(f"w{(i * 7 + j) % 100}" for j in range(5 + i))) for i in range(6)]
    a = load_pretrained(src, chat_template=False)
    b = load_pretrained(out, chat_template=False)
    assert a.model_id == b.model_id == "tiny-moefied"
    ta = [t for _, t in EmulatedCollector(a).collect(prompts)]
    tb = [t for _, t in EmulatedCollector(b).collect(prompts)]
    for x, y in zip(ta, tb, strict=True):
        assert x.layers == y.layers and x.dims == y.dims and x.prompt_tokens == y.prompt_tokens
        assert np.array_equal(x.counts.flat, y.counts.flat) and x.counts.flat.sum() > 0


def test_bf16_export_keeps_the_routing(tmp_path: Path) -> None:
    src = moefied(tmp_path, num_experts=4, top_k=2, shared=16)
    out = tmp_path / "bf16"
    export_stock(load_moefied(src), None, out, "qwen2-moe", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    stock = AutoModelForCausalLM.from_pretrained(
        out, local_files_only=True, dtype=torch.bfloat16, experts_implementation="eager"
    )
    bf16_ref = load_moefied(src, dtype=torch.bfloat16)
    seqs = held_out()
    ref_sets, _ = routing_and_logits(bf16_ref.eval(), seqs)
    got_sets, _ = routing_and_logits(stock.eval(), seqs)
    # bf16 rounds every activation to 8 bits of mantissa, so near-ties may flip; most pairs must hold
    assert topk_agreement(ref_sets, got_sets) >= 0.95


def test_export_refuses_what_the_format_cannot_express(tmp_path: Path) -> None:
    mlp = dense("llama", torch.float32)
    moefy_model(mlp, sequences(), spec(4, 2, 16), pad_id=0, base="tiny")  # MLP routers
    with pytest.raises(ConversionError, match="router_hidden: 0"):
        export_stock(mlp, None, tmp_path / "a", "qwen2-moe")
    shared = load_moefied(moefied(tmp_path, num_experts=4, top_k=2, shared=16))
    with pytest.raises(ConversionError, match="no shared expert"):
        export_stock(shared, None, tmp_path / "b", "mixtral")
    with pytest.raises(ConversionError, match="float16"):
        export_stock(shared, None, tmp_path / "c", "qwen2-moe", dtype="float16")
    gemma = dense("gemma", torch.float32)
    moefy_model(gemma, sequences(), linear_spec(4, 2, 0), pad_id=0, base="tiny")
    with pytest.raises(ConversionError, match="Llama-family"):
        export_stock(gemma, None, tmp_path / "d", "mixtral")
    assert not any((tmp_path / d).exists() for d in "abcd")


def test_export_cli(tmp_path: Path) -> None:
    src = moefied(tmp_path, num_experts=4, top_k=2, shared=0)
    out = tmp_path / "mixtral"
    result = CliRunner().invoke(app, ["export", str(src), "-o", str(out), "--format", "mixtral"])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config[EXPORT_KEY]["name"] == "tiny-moefied"
    assert (out / "tokenizer.json").exists()
    again = CliRunner().invoke(app, ["export", str(src), "-o", str(out), "--format", "mixtral"])
    assert again.exit_code != 0 and "already holds a model" in again.output
    bad = CliRunner().invoke(app, ["export", str(src), "-o", str(tmp_path / "x"), "--format", "llama"])
    assert bad.exit_code != 0 and "unknown export format" in bad.output


def test_collect_reads_the_export_in_the_dtype_it_is_served_in(tmp_path: Path) -> None:
    from routescan.telemetry.io import read_traces

    out = tmp_path / "qwen"
    export_stock(load_moefied(moefied(tmp_path, num_experts=4, top_k=2, shared=16)), None, out, "qwen2-moe")
    save_word_tokenizer(out)
    prompts = tmp_path / "p.csv"
    prompts.write_text("id,prompt\na,w1 w2 w3\nb,tell me about topic w7\n", encoding="utf-8")
    runner = CliRunner()
    args = ["collect", "--model", str(out), "--prompts", str(prompts), "--no-chat-template"]
    ok = runner.invoke(app, [*args, "--out", str(tmp_path / "bf16.jsonl"), "--dtype", "bfloat16"])
    assert ok.exit_code == 0, ok.output
    traces = list(read_traces(tmp_path / "bf16.jsonl"))
    assert [t.model_id for t in traces] == ["tiny-moefied"] * 2 and all(t.counts.flat.sum() for t in traces)
    bad = runner.invoke(app, [*args, "--out", str(tmp_path / "x.jsonl"), "--dtype", "float16"])
    assert bad.exit_code != 0 and "choose float32 or bfloat16" in bad.output
