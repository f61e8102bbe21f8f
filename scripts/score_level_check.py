"""A detector at its score export level beside itself at full, on labelled traces: AUROC overall and
within wrapper families, whether the verdicts at each operating point are the same, and how many
distinct values the level sends. Scores on the detector's own training traffic are in-sample: this
checks the bins, the frontier (routescan frontier) measures held-out detection.

    python scripts/score_level_check.py smollm2-e32k16-shared-router runs/traces/smollm2-bench.jsonl
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from routescan.detector.artifact import Detector, detector_path
from routescan.detector.dataset import LabelledSet
from routescan.detector.metrics import auroc
from routescan.privacy.levels import bin_scores
from routescan.telemetry.io import read_traces
from routescan.telemetry.schema import ExportLevel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("detector", help="detector file or shipped name")
    parser.add_argument("traces", help="labelled corpus traces")
    args = parser.parse_args()
    det = Detector.load(detector_path(args.detector))
    data = LabelledSet.from_traces(read_traces(args.traces), det.spec)
    data = data.subset(np.flatnonzero(~data.hard_negative))
    full = det.full_proba(data.X)
    binned = bin_scores(full, det.at_level(ExportLevel.score).export)
    families = [f for f in sorted(set(data.family)) if f != "none"]

    def within(scores: np.ndarray) -> float:
        per_family = [auroc(data.y[data.family == f], scores[data.family == f]) for f in families]
        return float(np.nanmean(per_family))

    out = {
        "rows": len(data),
        "score_bins_fitted": det.card.score_bins is not None,
        "distinct_values": len(np.unique(binned)),
        "auroc": {"full": auroc(data.y, full), "score": auroc(data.y, binned)},
        "auroc_within_wrapper_families": {"full": within(full), "score": within(binned)},
        "same_verdicts": {
            p.name: bool(np.array_equal(full >= p.threshold, binned >= p.threshold))
            for p in det.card.operating_points
        },
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
