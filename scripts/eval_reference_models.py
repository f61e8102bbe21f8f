"""Measure the reference MoEs against their dense bases: quality kept, routing behaviour, CPU cost, and a
first look at the benign-vs-harmful routing signal. Writes docs/reference-model.{md,json} and heatmaps.

    .venv/bin/python scripts/eval_reference_models.py \\
        --moe runs/models/smollm2-e16k4 --moe runs/models/smollm2-e32k2-shared --moe runs/models/gemma3-e16k4

Each MoE directory names its base in its config (``moefication.base``), which is loaded too. Prompt
text never leaves this process: only aggregates are written.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from routescan.corpus.unified import load_benign, load_harmful, sample  # noqa: E402
from routescan.models.batching import pad_batch  # noqa: E402
from routescan.models.loading import load_pretrained  # noqa: E402
from routescan.models.moefy.convert import common_prefix  # noqa: E402
from routescan.models.moefy.modules import MoEfiedMLP  # noqa: E402
from routescan.models.moefy.sources import ResolvedBase, load_base  # noqa: E402
from routescan.models.moefy.store import read_report  # noqa: E402
from routescan.models.quality import lm_stats  # noqa: E402
from routescan.telemetry.emulated import EmulatedCollector  # noqa: E402


def batches(
    seqs: Sequence[Sequence[int]], size: int, pad: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, len(seqs), size):
        yield pad_batch(seqs[start : start + size], pad)


@contextmanager
def routed_top_k(model, k: int) -> Iterator[None]:
    """Compute each token with its router's top ``k`` experts instead of the trained design's."""
    routers = [m.router for m in model.modules() if isinstance(m, MoEfiedMLP)]
    saved = [r.top_k for r in routers]
    for r in routers:
        r.top_k = k
    try:
        yield
    finally:
        for r, old in zip(routers, saved, strict=True):
            r.top_k = old


@contextmanager
def oracle_routing(model) -> Iterator[None]:
    """Route every token to the experts whose outputs are largest (what the router tries to predict)."""
    saved = []
    for block in (m for m in model.modules() if isinstance(m, MoEfiedMLP)):
        experts, k = block.experts, block.router.top_k

        def forward(h, experts=experts, k=k):
            gate, up = torch.einsum("th,eih->eti", h, experts.gate_up_proj).chunk(2, dim=-1)
            y = torch.einsum("eti,ehi->eth", experts.act_fn(gate) * up, experts.down_proj)
            idx = torch.topk(torch.linalg.vector_norm(y, dim=-1).T, k, dim=-1).indices
            return None, torch.ones(idx.shape, dtype=h.dtype), idx

        saved.append((block.router, block.router.forward))
        block.router.forward = forward
    try:
        yield
    finally:
        for router, fwd in saved:
            router.forward = fwd


@torch.inference_mode()
def route_counts(loaded, seqs: Sequence[Sequence[int]], batch: int = 16) -> np.ndarray:
    """Per sequence, per layer, per expert: routed-token counts ``[N, L, E]`` (padding excluded)."""
    layers = loaded.adapter.layers
    flat = EmulatedCollector(loaded, batch_size=batch, max_tokens=10**9).count_matrix(seqs)
    return flat.reshape(len(seqs), len(layers), layers[0].num_experts).astype(float)


@torch.inference_mode()
def suffix_topk_change(loaded, pairs: list[tuple[list[int], list[int]]], suffix: int) -> float:
    """Share of (template-suffix token, layer) top-k sets that change between near-identical prompts.

    The trailing chat-template tokens are the same in both prompts of a pair; only their context
    differs by one small edit, so this measures how much routing depends on context.
    """
    adapter, changed, total = loaded.adapter, 0, 0
    for a, b in pairs:
        sels = []
        for seq in (a, b):
            with adapter.record() as rec:
                loaded.model(input_ids=torch.tensor([seq]))
            sels.append({k: v[-suffix:].sort(dim=-1).values for k, v in rec.selections().items()})
        for layer in sels[0]:
            diff = (sels[0][layer] != sels[1][layer]).any(dim=-1)
            changed += int(diff.sum())
            total += diff.numel()
    return changed / max(total, 1)


def tv(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Total-variation distance between per-layer usage distributions (last axis)."""
    return 0.5 * np.abs(p - q).sum(-1)


def shares(counts: np.ndarray) -> np.ndarray:
    return counts / np.maximum(counts.sum(-1, keepdims=True), 1)


@torch.inference_mode()
def prefill_ms(model, seqs, repeats: int = 1) -> float:
    times = []
    for seq in seqs:
        ids = torch.tensor([seq])
        model(input_ids=ids)  # warm caches for this length
        start = time.perf_counter()
        for _ in range(repeats):
            model(input_ids=ids)
        times.append((time.perf_counter() - start) / repeats * 1000)
    return statistics.median(times)


def heatmap(diff: np.ndarray, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lim = float(np.abs(diff).max()) or 1.0
    fig, ax = plt.subplots(figsize=(0.35 * diff.shape[1] + 2.5, 0.22 * diff.shape[0] + 1.6))
    im = ax.imshow(diff, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="usage share: harmful - benign")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate(moe_dir: Path, corpora: Path, args, dense_cache: dict) -> dict:
    report = read_report(moe_dir)
    # masked_dense: identical routing and outputs (tested), several times faster on CPU; the eager
    # loop is loaded too, for the prefill timing that matters for telemetry
    loaded = load_pretrained(moe_dir, experts_implementation="masked_dense")
    meta = loaded.model.config.moefication
    enc, pad = loaded.encoder, loaded.encoder.pad_id
    base_file = Path(meta["base"])
    if str(base_file) not in dense_cache:
        base = (
            ResolvedBase(base_file.parent, base_file.name)
            if base_file.suffix == ".gguf"
            else (ResolvedBase(base_file, None))
        )
        dense_cache.clear()  # one dense model in memory at a time
        dense_cache[str(base_file)] = load_base(base)[0]
    dense = dense_cache[str(base_file)]
    rng = random.Random(args.seed)

    test = json.loads((corpora / "alpaca" / "harmless_test.json").read_text(encoding="utf-8"))
    texts = rng.sample([r["instruction"] for r in test if r.get("instruction")], args.ppl_prompts)
    seqs = [enc.encode(t)[: args.max_tokens] for t in texts]
    prefix = common_prefix(seqs)
    print(f"[{report.name}] perplexity on {len(seqs)} Alpaca test prompts", file=sys.stderr)
    ppl_dense, pred_dense = lm_stats(dense, seqs, prefix, pad)
    ppl_moe, pred_moe = lm_stats(loaded.model, seqs, prefix, pad)
    with oracle_routing(loaded.model):
        ppl_oracle, _ = lm_stats(loaded.model, seqs, prefix, pad)
    num_experts = int(meta["num_experts"])
    sweep = {}
    for k in sorted({num_experts // 4, num_experts // 2, 3 * num_experts // 4, num_experts}):
        with routed_top_k(loaded.model, k):
            sweep[k] = lm_stats(loaded.model, seqs[: args.sweep_prompts], prefix, pad)[0]
    sweep_dense = lm_stats(dense, seqs[: args.sweep_prompts], prefix, pad)[0]
    agree = float(torch.cat([a == b for a, b in zip(pred_dense, pred_moe, strict=True)]).float().mean())
    first = float(np.mean([int(a[-1] == b[-1]) for a, b in zip(pred_dense, pred_moe, strict=True)]))

    print(f"[{report.name}] routing load and stability", file=sys.stderr)
    counts = route_counts(loaded, seqs)
    load = counts.sum(0)  # [L, E]
    p = shares(load)
    entropy = -(p * np.log(np.where(p > 0, p, 1))).sum(-1) / math.log(p.shape[-1])
    max_over_mean = load.max(-1) / load.mean(-1)
    edits = [
        ("append ' Please.'", lambda t: t.rstrip() + " Please."),
        ("lowercase first letter", lambda t: t[:1].lower() + t[1:]),
    ]
    # template tokens after the user content: the common tail of two different requests
    suffix = common_prefix([enc.encode("alpha")[::-1], enc.encode("omega")[::-1]])
    stab_texts = texts[: args.stability_prompts]
    stability = {}
    base_counts = shares(route_counts(loaded, [enc.encode(t) for t in stab_texts]))
    idx = list(range(len(stab_texts)))
    shuffled = idx[1:] + idx[:1]
    stability["random pairs"] = {"fingerprint_tv": float(tv(base_counts, base_counts[shuffled]).mean())}
    for name, edit in edits:
        edited = [edit(t) for t in stab_texts]
        ec = shares(route_counts(loaded, [enc.encode(t) for t in edited]))
        pairs = [(enc.encode(a), enc.encode(b)) for a, b in zip(stab_texts, edited, strict=True)][:50]
        stability[name] = {
            "fingerprint_tv": float(tv(base_counts, ec).mean()),
            "suffix_topk_changed": suffix_topk_change(loaded, pairs, suffix) if suffix else None,
        }

    print(f"[{report.name}] CPU prefill time", file=sys.stderr)
    timing_seqs = seqs[: args.timing_prompts]
    torch.set_num_threads(args.threads)
    ms_dense, ms_masked = prefill_ms(dense, timing_seqs), prefill_ms(loaded.model, timing_seqs)
    for module in loaded.model.modules():
        if hasattr(module, "implementation"):
            module.implementation = "eager"
    ms_moe = prefill_ms(loaded.model, timing_seqs)
    for module in loaded.model.modules():
        if hasattr(module, "implementation"):
            module.implementation = "masked_dense"

    print(f"[{report.name}] benign vs harmful routing (first look, no detector)", file=sys.stderr)
    harmful = sample(load_harmful(corpora), args.signal_prompts, args.seed)
    benign = sample(
        [r for r in load_benign(corpora, splits=("val",)) if not r.hard_negative],
        args.signal_prompts,
        args.seed,
    )
    h = shares(route_counts(loaded, [enc.encode(r.text)[: args.max_tokens] for r in harmful]))
    b = shares(route_counts(loaded, [enc.encode(r.text)[: args.max_tokens] for r in benign]))
    diff = h.mean(0) - b.mean(0)
    half = len(b) // 2
    null = b[:half].mean(0) - b[half:].mean(0)
    fig = ROOT / "docs" / "figures" / f"signal-{report.name}.png"
    heatmap(
        diff, f"{report.name}: mean expert-usage share, harmful - benign ({len(h)} vs {len(b)} prompts)", fig
    )
    layer_tv = tv(h.mean(0), b.mean(0))
    null_tv = tv(b[:half].mean(0), b[half:].mean(0))

    summary = report.summary()
    return {
        "name": report.name,
        "design": {
            k: meta[k]
            for k in ("num_experts", "top_k", "expert_intermediate", "shared_intermediate", "router_hidden")
        },
        "conversion": {
            "seconds": report.seconds,
            "calibration_prompts": report.calibration_prompts,
            "calibration_tokens": report.calibration_tokens,
            "partitions": {
                k: sum(r.partition == k for r in report.layers) for k in ("coactivation", "parameters")
            },
            **summary,
        },
        "quality": {
            "prompts": len(seqs),
            "ppl_dense": ppl_dense,
            "ppl_moe": ppl_moe,
            "ppl_moe_oracle_routing": ppl_oracle,
            "greedy_agreement": agree,
            "first_token_agreement": first,
            "top_k_sweep": {
                "prompts": min(len(seqs), args.sweep_prompts),
                "dense": sweep_dense,
                "ppl_by_k": sweep,
            },
        },
        "load": {
            "entropy_mean": float(entropy.mean()),
            "entropy_min": float(entropy.min()),
            "max_over_mean_mean": float(max_over_mean.mean()),
            "max_over_mean_worst": float(max_over_mean.max()),
        },
        "stability": stability,
        "prefill_ms": {
            "threads": args.threads,
            "prompts": len(timing_seqs),
            "median_tokens": statistics.median(len(s) for s in timing_seqs),
            "dense": ms_dense,
            "moe": ms_moe,
            "moe_masked_dense": ms_masked,
        },
        "signal": {
            "harmful": len(h),
            "benign": len(b),
            "figure": str(fig.relative_to(ROOT)),
            "layer_tv_mean": float(layer_tv.mean()),
            "layer_tv_max": float(layer_tv.max()),
            "top_layers": [int(i) for i in np.argsort(-layer_tv)[:5]],
            "null_tv_mean": float(null_tv.mean()),
            "null_tv_max": float(null_tv.max()),
            "max_abs_diff": float(np.abs(diff).max()),
            "null_max_abs_diff": float(np.abs(null).max()),
        },
    }


def _fmt(x: float | None) -> str:
    return "n/a (no template)" if x is None else f"{x:.3f}"


def render(results: list[dict], command: str) -> str:
    lines = [
        "# Reference MoEs: what MoEfication keeps, how they route, what they cost",
        "",
        "Written by `scripts/eval_reference_models.py`; rerun with:",
        "",
        f"```bash\n{command}\n```",
        "",
        "Models are built first with `routescan moefy -c configs/models/<name>.yaml -o runs/models/<name>` "
        "(see README). Calibration and router training read only the Alpaca *train* split; everything "
        "below is measured on held-out prompts (Alpaca test for quality, Alpaca val + harmful corpora for "
        "the signal).",
        "",
        "## Designs and conversion",
        "",
        "| model | E | top-k | expert width | shared width | router | partition (coact / params) | "
        "build s | router recall | FFN rel. error (router) | (oracle) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        d, c = r["design"], r["conversion"]
        lines.append(
            f"| {r['name']} | {d['num_experts']} | {d['top_k']} | {d['expert_intermediate']} | "
            f"{d['shared_intermediate']} | MLP {d['router_hidden']} | {c['partitions']['coactivation']} / "
            f"{c['partitions']['parameters']} | {c['seconds']:.0f} | {c['mean_router_recall']:.3f} | "
            f"{c['mean_router_error']:.3f} | {c['mean_oracle_error']:.3f} |"
        )
    lines += [
        "",
        "Router recall: share of the oracle top-k experts (largest output norm) the trained router picks, on "
        "held-out calibration tokens. FFN relative error: ||dense FFN - MoE FFN|| / ||dense FFN||, mean over "
        "layers.",
        "",
        "## Quality kept (Alpaca test split)",
        "",
        "| model | prompts | ppl dense | ppl MoE | ppl MoE, oracle routing | greedy next-token agreement | "
        "first reply token agreement |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        q = r["quality"]
        lines.append(
            f"| {r['name']} | {q['prompts']} | {q['ppl_dense']:.2f} | {q['ppl_moe']:.2f} | "
            f"{q['ppl_moe_oracle_routing']:.2f} | {q['greedy_agreement']:.3f} | "
            f"{q['first_token_agreement']:.3f} |"
        )
    lines += [
        "",
        "Perplexity is over the instruction tokens (the chat template's shared system prefix is excluded).",
        "",
        "### How much of the FFN must run: perplexity when each token uses its router's top k",
        "",
        "| model | prompts | dense | " + " | ".join(f"k = {f} E" for f in ("1/4", "1/2", "3/4", "1")) + " |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        sw = r["quality"]["top_k_sweep"]
        cells = [f"{v:.2f} (k={k})" for k, v in sorted(sw["ppl_by_k"].items(), key=lambda kv: int(kv[0]))]
        lines.append(f"| {r['name']} | {sw['prompts']} | {sw['dense']:.2f} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "The routers were trained for the design's k; other k reuse their ranking. With k = E the MoE "
        "computes the whole FFN and matches the dense model (up to float summation order).",
        "",
        "## Routing: load balance, stability, CPU prefill",
        "",
        "| model | load entropy / log E (mean, min layer) | max/mean load (mean, worst layer) | "
        "fingerprint TV: random pairs | + ' Please.' | lowercase first letter | template-suffix top-k "
        "changed (+ ' Please.' / lowercase) | prefill ms dense | prefill ms MoE eager (masked dense) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ld, s, t = r["load"], r["stability"], r["prefill_ms"]
        pl, lc = s["append ' Please.'"], s["lowercase first letter"]
        lines.append(
            f"| {r['name']} | {ld['entropy_mean']:.3f}, {ld['entropy_min']:.3f} | "
            f"{ld['max_over_mean_mean']:.2f}, {ld['max_over_mean_worst']:.2f} | "
            f"{s['random pairs']['fingerprint_tv']:.3f} | {pl['fingerprint_tv']:.3f} | "
            f"{lc['fingerprint_tv']:.3f} | "
            f"{_fmt(pl['suffix_topk_changed'])} / {_fmt(lc['suffix_topk_changed'])} | {t['dense']:.1f} | "
            f"{t['moe']:.1f} ({t['moe_masked_dense']:.1f}) |"
        )
    t0 = results[0]["prefill_ms"]
    lines += [
        "",
        "Fingerprint TV: mean over layers of the total-variation distance between two prompts' per-layer "
        "expert-usage distributions (the quantity the detector reads). Template-suffix top-k changed: the "
        "trailing chat-template tokens are identical in both prompts of a pair; the share of (token, layer) "
        "whose top-k set changes measures how context-dependent routing is. Prefill: batch 1, "
        f"{t0['threads']} torch threads, median over {t0['prompts']} prompts (median {t0['median_tokens']} "
        "tokens); the MoE runs the per-expert eager loop (one set of kernels per hit expert), which is what "
        "makes launch sizes follow routing, not the fastest CPU path.",
        "",
        "## A first look at the signal (no detector trained)",
        "",
        "| model | harmful / benign prompts | per-layer TV between class means (mean, max) | top layers | "
        "null: benign half vs half (mean, max) | max abs usage diff (null) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        g = r["signal"]
        lines.append(
            f"| {r['name']} | {g['harmful']} / {g['benign']} | {g['layer_tv_mean']:.3f}, "
            f"{g['layer_tv_max']:.3f} | "
            f"{', '.join(map(str, g['top_layers']))} | {g['null_tv_mean']:.3f}, {g['null_tv_max']:.3f} | "
            f"{g['max_abs_diff']:.3f} ({g['null_max_abs_diff']:.3f}) |"
        )
    lines += [""]
    for r in results:
        lines += [f"![{r['name']}]({Path(r['signal']['figure']).relative_to('docs')})", ""]
    lines += [
        "The benign side is the Alpaca validation split (hard negatives excluded here), the harmful side a "
        "seeded sample of the harmful corpus. Harmful and Alpaca prompts also differ in length and style, so "
        "a gap here is not yet evidence of a *harm* signal; the detector work (leave-one-domain-out, "
        "length-only baseline) is what tests that.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moe", action="append", type=Path, required=True, help="A `routescan moefy` output dir")
    ap.add_argument("--corpora", type=Path, default=ROOT.parent / "shared" / "corpora")
    ap.add_argument("--ppl-prompts", type=int, default=200)
    ap.add_argument("--sweep-prompts", type=int, default=60)
    ap.add_argument("--stability-prompts", type=int, default=100)
    ap.add_argument("--timing-prompts", type=int, default=30)
    ap.add_argument("--signal-prompts", type=int, default=300)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "reference-model.md")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    results, dense_cache = [], {}
    for moe in tqdm(args.moe, desc="models", unit="model"):
        results.append(evaluate(moe, args.corpora, args, dense_cache))
    command = ".venv/bin/python scripts/eval_reference_models.py " + " ".join(f"--moe {m}" for m in args.moe)
    args.out.write_text(render(results, command), encoding="utf-8")
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(json.dumps([{"name": r["name"], **r["quality"]} for r in results], indent=2))


if __name__ == "__main__":
    main()
