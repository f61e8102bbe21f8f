"""Train a detector from a fingerprint table and a label column.

This is the plain baseline (standardised fingerprints, class-balanced logistic regression) that
the service ships as its demo default. Operating points come from out-of-fold scores, so the
thresholds are not fitted on the rows that set them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from routescan.detector.artifact import Detector, DetectorCard, OperatingPoint
from routescan.features.fingerprint import FingerprintSpec


def baseline_estimator(C: float = 1.0, seed: int = 0) -> Pipeline:
    return Pipeline(
        [
            ("scale", StandardScaler()),
            ("clf", LogisticRegression(C=C, class_weight="balanced", max_iter=2000, random_state=seed)),
        ]
    )


def operating_points(
    scores: np.ndarray, y: np.ndarray, fprs: tuple[float, ...] = (0.01, 0.05)
) -> list[OperatingPoint]:
    """Thresholds at target false-positive rates, from benign (y == 0) scores."""
    benign, harmful = scores[y == 0], scores[y == 1]
    points = []
    for fpr in fprs:
        # the smallest threshold whose benign exceedance rate is <= fpr
        threshold = float(np.quantile(benign, 1.0 - fpr, method="higher")) if benign.size else 0.5
        threshold = min(1.0, np.nextafter(threshold, 2.0))
        points.append(
            OperatingPoint(
                name=f"fpr{round(fpr * 100):g}",
                threshold=threshold,
                target_fpr=fpr,
                measured_fpr=float((benign >= threshold).mean()) if benign.size else None,
                measured_tpr=float((harmful >= threshold).mean()) if harmful.size else None,
            )
        )
    return points


def train_detector(
    X: np.ndarray,
    y: np.ndarray,
    spec: FingerprintSpec,
    *,
    detector_id: str,
    version: str,
    demo: bool = False,
    C: float = 1.0,
    seed: int = 0,
    default_operating_point: str = "fpr5",
    training_command: str = "",
    corpus: dict[str, Any] | None = None,
    notes: str = "",
) -> Detector:
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=int)
    if set(np.unique(y)) != {0, 1}:
        raise ValueError("training needs both classes (labels 0 = benign, 1 = harmful)")
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    oof = cross_val_predict(baseline_estimator(C, seed), X, y, cv=folds, method="predict_proba")[:, 1]
    estimator = baseline_estimator(C, seed).fit(X, y)
    card = DetectorCard(
        detector_id=detector_id,
        version=version,
        demo=demo,
        spec=spec,
        operating_points=operating_points(oof, y),
        default_operating_point=default_operating_point,
        estimator=f"StandardScaler + LogisticRegression(class_weight=balanced, C={C:g})",
        training_command=training_command,
        corpus=corpus or {},
        training={"rows": len(y), "harmful": int(y.sum()), "benign": int((y == 0).sum()), "seed": seed},
        metrics={"out_of_fold_auroc": float(roc_auc_score(y, oof)), "folds": 5},
        notes=notes,
    )
    return Detector(estimator, card)
