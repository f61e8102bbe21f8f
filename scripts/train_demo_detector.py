"""Train the demo detector shipped inside the package (routescan/detector/default/).

    python scripts/train_demo_detector.py --corpora ../shared/corpora

It reads a seeded tiny random Mixtral's routing (hf-eager launch model) of harmful prompts and
benign Alpaca val/test prompts, and fits the plain baseline. It is a DEMO: the tiny model has random
weights, so this proves the serving path, not detection quality. The real detector is trained on
the real-weights reference MoE (see docs/results.md once it lands).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

from routescan.corpus.unified import load_benign, load_harmful, sample
from routescan.detector.train import train_detector
from routescan.features.fingerprint import FingerprintSpec
from routescan.models.loading import load_tiny
from routescan.telemetry.emulated import EmulatedCollector, Request

OUT = Path(__file__).resolve().parents[1] / "routescan" / "detector" / "default"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpora", type=Path, default=Path("../shared/corpora"))
    parser.add_argument("--harmful", type=int, default=800)
    parser.add_argument("--benign", type=int, default=800)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    harmful = sample(load_harmful(args.corpora), args.harmful, args.seed)
    benign = sample([r for r in load_benign(args.corpora) if not r.hard_negative], args.benign, args.seed)
    rows = harmful + benign
    loaded = load_tiny("mixtral", seed=0)
    collector = EmulatedCollector(loaded, batch_size=16)
    requests = [Request(f"{'h' if r.label else 'b'}-{r.row}", r.text) for r in rows]
    traces = [t for _, t in collector.collect(requests)]
    spec = FingerprintSpec.from_trace(traces[0], "hf-eager")
    X = spec.transform_many(traces)
    y = np.array([r.label for r in rows])
    command = "python scripts/train_demo_detector.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    detector = train_detector(
        X,
        y,
        spec,
        detector_id="routescan-demo-tiny-mixtral",
        version="0.1.0",
        demo=True,
        seed=args.seed,
        training_command=command.strip(),
        corpus={
            "harmful": {"file": "harmful.csv", "rows": len(harmful), "dedup": True},
            "benign": {
                "file": "benign.csv",
                "rows": len(benign),
                "splits": ["val", "test"],
                "hard_negatives": "excluded",
            },
            "sampling_seed": args.seed,
        },
        notes="DEMO detector: reads a seeded tiny random-weight Mixtral (3 MoE layers x 8 experts, top-2, "
        "byte tokenizer, no chat template). It exists so `routescan serve` works out of the box; it says "
        "nothing about detection quality on real models.",
    )
    path = detector.save(args.out / "demo-detector.zip")
    card = detector.card
    points = "\n".join(
        f"| {p.name} | {p.threshold:.4f} | {p.measured_fpr:.3f} | {p.measured_tpr:.3f} |"
        for p in card.operating_points
    )
    (args.out / "MODEL_CARD.md").write_text(
        f"# {card.detector_id} {card.version} (DEMO)\n\n{card.notes}\n\n"
        f"- Reads: model `{card.spec.model_id}`, launch model `{card.spec.launch_model}`, fingerprint spec "
        f"`{card.spec.version}` ({card.spec.dim} features)\n"
        f"- Estimator: {card.estimator}\n"
        f"- Training command: `{card.training_command}`\n"
        f"- Corpus: {json.dumps(card.corpus)}\n"
        f"- Out-of-fold AUROC (5-fold, same distribution, no held-out domains): "
        f"{card.metrics['out_of_fold_auroc']:.3f}\n\n"
        "| operating point | threshold | out-of-fold FPR | out-of-fold TPR |\n|---|---:|---:|---:|\n"
        f"{points}\n",
        encoding="utf-8",
    )
    print(
        f"wrote {path} ({path.stat().st_size} bytes); "
        f"out-of-fold AUROC {card.metrics['out_of_fold_auroc']:.3f}"
    )


if __name__ == "__main__":
    main()
