"""Linear routers and stock checkpoints: what the Qwen2-MoE / Mixtral exports keep of the reference MoEs.

    python scripts/eval_stock_export.py --corpora ../shared/corpora

Needs the four models built first (README, "Reference models"):

    routescan moefy -c configs/models/smollm2-e32k16-shared.yaml -o runs/models/smollm2-e32k16-shared
    routescan moefy -c configs/models/smollm2-e32k16-shared-linear.yaml \
        -o runs/models/smollm2-e32k16-shared-linear
    routescan moefy -c configs/models/smollm2-e16k8.yaml -o runs/models/smollm2-e16k8
    routescan moefy -c configs/models/smollm2-e16k8-linear.yaml -o runs/models/smollm2-e16k8-linear

For each design it reports the linear router against the MLP router (recall of the oracle top-k,
FFN error, perplexity on Alpaca test prompts), then exports the linear model (qwen2-moe for the
shared-expert design, mixtral for the other) at several gate scales 2**-s, in fp32 and bf16, and
measures with transformers' own classes: top-k agreement with the MoEfied model per (token, layer),
logit error, perplexity. Results: docs/stock-export.json and the "Stock checkpoints" section of
docs/reference-model.md (between its markers).
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from routescan.models.loading import load_pretrained
from routescan.models.moefy.convert import common_prefix
from routescan.models.moefy.export import export_stock
from routescan.models.moefy.store import load_moefied, read_report
from routescan.models.quality import lm_stats, routing_and_logits, topk_agreement

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- stock-export:start -->", "<!-- stock-export:end -->"
DESIGNS = (
    ("smollm2-e32k16-shared", "qwen2-moe"),
    ("smollm2-e16k8", "mixtral"),
)


def stock(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    # the eager per-expert loop: grouped_mm refuses some bf16 strides on CPU
    return AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, dtype=dtype, experts_implementation="eager"
    ).eval()


def evaluate(name: str, fmt: str, args, seqs_cache: dict) -> dict:
    mlp_dir, lin_dir = args.models / name, args.models / f"{name}-linear"
    mlp_rep, lin_rep = read_report(mlp_dir).summary(), read_report(lin_dir).summary()
    lin = load_pretrained(lin_dir, experts_implementation="masked_dense")
    mlp = load_pretrained(mlp_dir, experts_implementation="masked_dense")
    enc, pad = lin.encoder, lin.encoder.pad_id
    if "seqs" not in seqs_cache:
        test = json.loads((args.corpora / "alpaca" / "harmless_test.json").read_text(encoding="utf-8"))
        texts = random.Random(args.seed).sample(
            [r["instruction"] for r in test if r.get("instruction")], args.prompts
        )
        seqs_cache["seqs"] = [enc.encode(t)[: args.max_tokens] for t in texts]
    seqs = seqs_cache["seqs"]
    prefix = common_prefix(seqs)
    print(f"[{name}] perplexity of the MLP- and linear-router models on {len(seqs)} prompts", file=sys.stderr)
    ppl_mlp, _ = lm_stats(mlp.model, seqs, prefix, pad)
    ppl_lin, _ = lm_stats(lin.model, seqs, prefix, pad)
    del mlp
    out: dict = {
        "design": name,
        "format": fmt,
        "prompts": len(seqs),
        "tokens": int(sum(len(s) for s in seqs)),
        "mlp": {
            "router_recall": mlp_rep["mean_router_recall"],
            "ffn_error": mlp_rep["mean_router_error"],
            "perplexity": ppl_mlp,
        },
        "linear": {
            "router_recall": lin_rep["mean_router_recall"],
            "ffn_error": lin_rep["mean_router_error"],
            "perplexity": ppl_lin,
        },
        "exports": [],
    }
    reference: dict[str, tuple] = {}
    for dtype_name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        source = load_moefied(lin_dir, dtype=dtype, experts_implementation="eager").eval()
        reference[dtype_name] = routing_and_logits(source, seqs)
        shifts = args.shifts if dtype_name == "float32" else [args.default_shift]
        for shift in shifts:
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                export_stock(source, None, Path(tmp), fmt, dtype=dtype_name, logit_shift=shift)
                model = stock(Path(tmp), dtype)
                sets, logits = routing_and_logits(model, seqs)
                ref_sets, ref_logits = reference[dtype_name]
                diff = (logits - ref_logits).abs()
                ppl, _ = lm_stats(model, seqs, prefix, pad)
            row = {
                "dtype": dtype_name,
                "logit_shift": shift,
                "topk_agreement": topk_agreement(sets, ref_sets),
                "logit_max_abs_error": float(diff.max()),
                "logit_mean_abs_error": float(diff.mean()),
                "logit_scale": float(ref_logits.abs().mean()),
                "perplexity": ppl,
                "seconds": round(time.perf_counter() - t0, 1),
            }
            print(f"[{name}] {json.dumps(row)}", file=sys.stderr)
            out["exports"].append(row)
    return out


def render(results: list[dict], command: str) -> str:
    lines = [
        START,
        "## Stock checkpoints: linear routers, Qwen2-MoE and Mixtral exports",
        "",
        f"Written by `scripts/eval_stock_export.py`; rerun with `{command}`.",
        "",
        "vLLM serves only architectures it implements, so the reference MoEs are exported as stock "
        "checkpoints (`routescan export`). Those need bias-free linear routers, trained here by the same "
        "recipe with `router_hidden: 0` (`configs/models/*-linear.yaml`).",
        "",
        "| design | router | oracle top-k recall | FFN rel. error | perplexity |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        for kind in ("mlp", "linear"):
            m = r[kind]
            lines.append(
                f"| {r['design']} | {'MLP 256' if kind == 'mlp' else 'linear'} | {m['router_recall']:.3f} | "
                f"{m['ffn_error']:.3f} | {m['perplexity']:.2f} |"
            )
    lines += [
        "",
        f"Perplexity on {results[0]['prompts']} Alpaca test prompts ({results[0]['tokens']} tokens, chat "
        "template), instruction tokens only.",
        "",
        "Each linear model exported and loaded with transformers' own class (`Qwen2MoeForCausalLM` / "
        "`MixtralForCausalLM`), against the MoEfied model it came from in the same dtype, one unpadded "
        "prompt at a time:",
        "",
        "| design | format | dtype | gate scale 2^-s | top-k sets equal, (token, layer) | "
        "max abs logit error | "
        "mean abs logit error (mean abs logit) | perplexity (MoEfied) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for e in r["exports"]:
            lines.append(
                f"| {r['design']} | {r['format']} | {e['dtype']} | s = {e['logit_shift']} | "
                f"{e['topk_agreement']:.5f} | {e['logit_max_abs_error']:.2e} | "
                f"{e['logit_mean_abs_error']:.2e} ({e['logit_scale']:.2f}) | {e['perplexity']:.2f} "
                f"({r['linear']['perplexity']:.2f}) |"
            )
    lines += ["", END]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpora", type=Path, default=Path("../shared/corpora"))
    parser.add_argument("--models", type=Path, default=ROOT / "runs" / "models")
    parser.add_argument("--prompts", type=int, default=60)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--shifts", type=int, nargs="+", default=[6, 8, 10, 12, 14, 16])
    parser.add_argument("--default-shift", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    np.random.seed(args.seed)
    cache: dict = {}
    results = [evaluate(name, fmt, args, cache) for name, fmt in DESIGNS]
    command = "python scripts/eval_stock_export.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    (ROOT / "docs" / "stock-export.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    doc = ROOT / "docs" / "reference-model.md"
    text = doc.read_text(encoding="utf-8")
    section = render(results, command.strip())
    if START in text:
        text = text[: text.index(START)] + section + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    doc.write_text(text, encoding="utf-8")
    print(section)


if __name__ == "__main__":
    main()
