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
from routescan.privacy.levels import DEFAULT_SCORE_BINS
from routescan.telemetry.schema import ExportLevel


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
    method: Annotated[
        str,
        typer.Option(
            help="invariant (default): InvariantRiskClassifier, feature selection searched by "
            "GridSearchCV on held-out environments, regression balanced over environments; on the "
            "reference corpus the search keeps every feature, and the balancing beats plain logreg on "
            "wrappers and held-out hard negatives (docs/results.md). logreg: standardised fingerprints "
            "+ class-balanced logistic regression, about 10x cheaper to fit."
        ),
    ] = "invariant",
    hard_negatives: Annotated[
        bool,
        typer.Option(
            "--hard-negatives/--no-hard-negatives",
            help="Train on the corpus's hard negatives (benign requests that look harmful) as benign "
            "rows: the hard-negative protocol of docs/results.md measures what that buys.",
        ),
    ] = True,
    notes: Annotated[str, typer.Option(help="Free text for the card (no prompts!).")] = "",
    launch_model: SignalOption = None,
    export_level: Annotated[
        ExportLevel,
        typer.Option(
            help="The records it will score (docs/privacy.md): full (default; its card also carries the "
            "score level's bins), or layers / harm, whose parameters go into the card. The score level "
            "needs no detector of its own.",
        ),
    ] = ExportLevel.full,
) -> None:
    """Fit a detector on every labelled trace of a corpus and save it with its card.

    Probabilities come from scikit-learn's CalibratedClassifierCV (sigmoid) over folds that hold
    whole environments out (harm domains, wrapper families, the benign pool spread over all), and
    the 1% / 5% FPR operating points from the same out-of-fold scores, so no threshold is set on the
    rows that fitted it. The detector file pins the model, signal (--launch-model) and fingerprint
    spec: scoring anything else is refused.

    Example:

      routescan train runs/traces/smollm2.jsonl -l router -o runs/detectors/smollm2-router.zip
    """
    friendly_errors(_train)(
        traces, out, detector_id, version, default_operating_point, seed, launch_model, method,
        hard_negatives, notes, export_level,
    )  # fmt: skip


def _train(
    traces: Path,
    out: Path,
    detector_id: str | None,
    version: str,
    op: str,
    seed: int,
    signal: str | None,
    method: str,
    hard_negatives: bool,
    notes: str,
    export_level: ExportLevel = ExportLevel.full,
) -> None:
    from collections import Counter

    from routescan.detector.artifact import Detector, DetectorCard
    from routescan.detector.dataset import LabelledSet
    from routescan.detector.metrics import auroc
    from routescan.detector.train import at_export_level, fit_detector, operating_points
    from routescan.privacy.levels import quantile_edges
    from routescan.telemetry.io import read_traces

    data = LabelledSet.from_traces(read_traces(traces), launch_model=signal)
    if not hard_negatives:
        data = data.subset(np.flatnonzero(~data.hard_negative))
    data, export = at_export_level(data, export_level)
    console.print(
        f"training on {len(data)} traces ({int(data.y.sum())} harmful) with {method}, "
        f"export level {export.describe()}"
    )
    fitted = fit_detector(data, method=method, seed=seed)
    points = operating_points(fitted.oof_proba, data.y)
    bins = None
    if export_level == ExportLevel.full:
        # the score export level's bins, on the same out-of-fold scores the thresholds come from
        bins = quantile_edges(
            fitted.oof_proba,
            data.environments(),
            bins=DEFAULT_SCORE_BINS,
            thresholds=[p.threshold for p in points],
        )
    spec = data.spec
    by_source = Counter(zip(data.source.tolist(), data.y.tolist(), strict=True))
    ident = detector_id or f"routescan-{spec.model_id}-{spec.launch_model}".replace("/", ".")[:128]
    card = DetectorCard(
        detector_id=ident,
        version=version,
        spec=spec,
        operating_points=points,
        score_bins=bins,
        export=export,
        default_operating_point=op,
        estimator=fitted.description,
        training_command="routescan " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        corpus={
            "traces": traces.name,
            "environments": sorted(set(data.environments().tolist())),
            # rows per (source, label): what the detector learned "benign" and "harmful" from
            "sources": {
                f"{src}:{'harmful' if y else 'benign'}": n for (src, y), n in sorted(by_source.items())
            },
        },
        training={
            "rows": len(data),
            "harmful": int(data.y.sum()),
            "benign": int((data.y == 0).sum()),
            "hard_negatives": int(data.hard_negative.sum()),
            "wrapped": int(data.wrapped.sum()),
            "method": method,
            "search": fitted.search,
            "seed": seed,
        },
        metrics={
            "out_of_fold_auroc": auroc(data.y, fitted.oof_proba),
            "out_of_fold": "environment folds: harm domains and wrapper families held out whole",
        },
        notes=notes,
    )
    Detector(fitted.estimator, card).save(out)
    summary = {
        "out": str(out),
        "detector_id": ident,
        **card.metrics,
        "operating_points": {p.name: p.threshold for p in points},
    }
    console.print(f"wrote {out}")
    typer.echo(json.dumps(summary))


def score_bins(
    detector: Annotated[
        str, typer.Argument(help="Detector file, or the name of a shipped reference detector.")
    ],
    traces: Annotated[Path, typer.Argument(help="Labelled corpus traces of the traffic it was trained on.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the detector with its bins.")],
    bins: Annotated[
        int,
        typer.Option(
            min=2,
            max=64,
            help="Quantile bins (the operating-point thresholds add up to 2 edges). The default is the "
            "network default's, from docs/privacy.md's frontier.",
        ),
    ] = DEFAULT_SCORE_BINS,
    hard_negatives: Annotated[
        bool, typer.Option(help="Count hard negatives among the traffic (off: as training leaves them out).")
    ] = False,
) -> None:
    """Fit a detector's score export level: bin edges at environment-balanced quantiles of its scores
    on labelled traffic, its operating-point thresholds among them (docs/privacy.md). `routescan
    train` does this itself; use this for a detector trained before export levels."""
    friendly_errors(_score_bins)(detector, traces, out, bins, hard_negatives)


def _score_bins(detector: str, traces: Path, out: Path, bins: int, hard_negatives: bool) -> None:
    from routescan.detector.artifact import Detector, detector_path
    from routescan.detector.dataset import LabelledSet
    from routescan.detector.train import with_score_bins
    from routescan.telemetry.io import read_traces

    det = Detector.load(detector_path(detector))
    data = LabelledSet.from_traces(read_traces(traces), det.spec)
    if not hard_negatives:
        data = data.subset(np.flatnonzero(~data.hard_negative))
    binned = with_score_bins(det, data, bins=bins)
    binned.save(out)
    edges = binned.card.score_bins or []
    console.print(f"wrote {out}: {len(edges) + 1} score bins from {len(data)} traces")
    typer.echo(json.dumps({"out": str(out), "bins": len(edges) + 1, "edges": edges}))
