"""`routescan train`: fit the domain-invariant detector on labelled corpus traces and save it."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from routescan.cli.common import SignalOption, console, friendly_errors


def train(
    traces: Annotated[
        Path, typer.Argument(help="Labelled traces (.jsonl / .parquet) from `routescan collect --corpus`.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Detector file to write (.zip: card + skops).")],
    detector_id: Annotated[
        str | None, typer.Option(help="Detector id (default: routescan-<model id>-<launch model>).")
    ] = None,
    version: Annotated[str, typer.Option(help="Detector version written into its card.")] = "1.0.0",
    default_operating_point: Annotated[
        str, typer.Option(help="Operating point the service applies: fpr1 or fpr5.")
    ] = "fpr5",
    seed: Annotated[int, typer.Option(help="Seed of subsamples and folds.")] = 0,
    launch_model: SignalOption = None,
) -> None:
    """Fit the domain-invariant detector (routescan.detector.invariant) on every labelled trace.

    Hyper-parameters are chosen by inner leave-one-environment-out splits (harm domains, wrapper
    families); probabilities are Platt-calibrated and the 1% / 5% FPR operating points come from
    out-of-fold scores. Hard negatives are kept out of training. The detector file pins the model,
    signal (--launch-model) and fingerprint spec: scoring anything else is refused.

    Example:

      routescan train runs/traces/smollm2.jsonl -l hf-eager -o runs/detectors/smollm2-hf-eager.zip
    """
    friendly_errors(_train)(traces, out, detector_id, version, default_operating_point, seed, launch_model)


def _train(
    traces: Path, out: Path, detector_id: str | None, version: str, op: str, seed: int, signal: str | None
) -> None:
    from routescan.detector.artifact import Detector, DetectorCard
    from routescan.detector.dataset import LabelledSet
    from routescan.detector.methods import fit_invariant
    from routescan.detector.metrics import auroc
    from routescan.detector.train import operating_points
    from routescan.telemetry.io import read_traces

    data = LabelledSet.from_traces(read_traces(traces), launch_model=signal)
    data = data.subset(np.flatnonzero(~data.hard_negative))
    console.print(f"training on {len(data)} traces ({int(data.y.sum())} harmful); choosing hyper-parameters")
    clf, found = fit_invariant(data, seed=seed, calibrate=True)
    points = operating_points(clf.oof_proba_, data.y)
    spec = data.spec
    ident = detector_id or f"routescan-{spec.model_id}-{spec.launch_model}".replace("/", ".")[:128]
    card = DetectorCard(
        detector_id=ident,
        version=version,
        spec=spec,
        operating_points=points,
        default_operating_point=op,
        estimator=f"InvariantRiskClassifier({', '.join(f'{k}={v}' for k, v in found.params.items())})",
        training_command="routescan " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        corpus={"traces": traces.name, "environments": list(clf.environments_)},
        training={
            "rows": len(data),
            "harmful": int(data.y.sum()),
            "benign": int((data.y == 0).sum()),
            "selected_features": len(clf.selected_),
            "search": found.table,
            "seed": seed,
        },
        metrics={"out_of_fold_auroc": auroc(data.y, clf.oof_proba_)},
    )
    Detector(clf, card).save(out)
    summary = {
        "out": str(out),
        "detector_id": ident,
        **card.metrics,
        "selected": len(clf.selected_),
        "params": found.params,
        "operating_points": {p.name: p.threshold for p in points},
    }
    console.print(f"wrote {out}")
    typer.echo(json.dumps(summary))
