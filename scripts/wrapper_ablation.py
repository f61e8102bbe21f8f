"""Why do unseen jailbreak wrappers stay below the domain figures? Re-run the two protocols of
``routescan evaluate`` (same folds) with other featurisations and regularisation strengths, to test
whether the per-token normalisation of fp/1 or the L2 strength is what holds wrappers back.

    .venv/bin/python scripts/wrapper_ablation.py runs/traces/smollm2.jsonl -l router

Prints a Markdown table (mean / min AUROC over held-out groups) and writes it, with the per-family
AUROCs, to docs/wrapper-ablation.json. Reads traces only: no text is involved.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from routescan.detector.dataset import LabelledSet  # noqa: E402
from routescan.detector.invariant import InvariantRiskClassifier  # noqa: E402
from routescan.detector.metrics import auroc  # noqa: E402
from routescan.detector.protocols import family_folds, lodo_folds  # noqa: E402
from routescan.telemetry.io import read_traces  # noqa: E402


def routed_counts(data: LabelledSet) -> np.ndarray:
    """Per-(layer, expert) launch totals rebuilt from fp/1: share x per-token total x prompt tokens."""
    blocks = []
    for layer in data.spec.layer_slices():
        per_token = data.X[:, layer.total_per_token]
        blocks.append(data.X[:, layer.shares] * (per_token * data.prompt_tokens)[:, None])
    return np.hstack(blocks)


def plain_lr(C: float = 1.0):
    return make_pipeline(StandardScaler(), LogisticRegression(C=C, class_weight="balanced", max_iter=3000))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("traces", type=Path, help="corpus traces (routescan collect --corpus)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "wrapper-ablation.json")
    ap.add_argument("--launch-model", "-l", default=None, help="signal (default: hf-eager for routed counts)")
    args = ap.parse_args()

    data = LabelledSet.from_traces(read_traces(args.traces), launch_model=args.launch_model)
    env = data.environments()
    counts = routed_counts(data)
    folds = lodo_folds(data) + family_folds(data)
    variants = {
        "fp/1 shares, plain LR": (data.X, lambda: plain_lr()),
        "raw counts, plain LR": (counts, lambda: plain_lr()),
        "log1p counts, plain LR": (np.log1p(counts), lambda: plain_lr()),
        "sqrt counts, plain LR": (np.sqrt(counts), lambda: plain_lr()),
        "counts + fp/1, plain LR": (np.hstack([counts, data.X]), lambda: plain_lr()),
    }
    for C in (0.003, 0.01, 0.03, 0.1):
        variants[f"fp/1, group-balanced LR C={C}"] = (
            data.X,
            lambda C=C: InvariantRiskClassifier(min_effect=None, C=C, calibrate=False),
        )
    rows = {}
    for name, (features, make) in variants.items():
        started = time.perf_counter()
        scores: dict[str, dict[str, float]] = {"lodo": {}, "wrapper": {}}
        for fold in folds:
            model = make()
            if isinstance(model, InvariantRiskClassifier):
                model.fit(features[fold.train], data.y[fold.train], env[fold.train])
            else:
                model.fit(features[fold.train], data.y[fold.train])
            held = model.decision_function(features[fold.test])
            scores[fold.protocol][fold.held_out] = auroc(data.y[fold.test], held)
        rows[name] = scores
        lo, wr = list(scores["lodo"].values()), list(scores["wrapper"].values())
        print(
            f"| {name} | {np.mean(lo):.3f} / {np.min(lo):.3f} | {np.mean(wr):.3f} / {np.min(wr):.3f} | "
            f"{time.perf_counter() - started:.0f} s |",
            flush=True,
        )
    body = {"traces": str(args.traces), "variants": rows}
    args.out.write_text(json.dumps(body, indent=1), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
