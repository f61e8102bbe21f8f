"""Train detectors: operating points always come from out-of-fold scores, so no threshold is set
on the rows that fitted the model.

- :func:`train_detector`: the plain baseline (standardised fingerprints, class-balanced logistic
  regression) from any fingerprint table and label column, stratified folds; the demo default.
- :func:`fit_detector`: a detector from labelled corpus traces (``routescan train``): folds that hold
  whole environments out (:class:`~routescan.detector.invariant.EnvironmentKFold`), probabilities
  from ``CalibratedClassifierCV`` (sigmoid, on those folds' out-of-fold scores, one refit model), and
  for the invariant estimator its hyper-parameters from ``GridSearchCV`` on inner held-out
  environments.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from sklearn import config_context
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import PredefinedSplit, StratifiedKFold, cross_val_predict
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from routescan.detector.artifact import Detector, DetectorCard, OperatingPoint
from routescan.detector.dataset import LabelledSet
from routescan.detector.invariant import EnvironmentKFold
from routescan.detector.metrics import fpr_threshold
from routescan.features.fingerprint import FingerprintSpec
from routescan.privacy.levels import (
    DEFAULT_SCORE_BINS,
    FULL,
    LAYERS,
    ExportSpec,
    fit_harm,
    quantile_edges,
    reduce,
)
from routescan.telemetry.schema import ExportLevel

DETECTOR_METHODS = ("logreg", "invariant")


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
        threshold = fpr_threshold(benign, fpr) if benign.size else 0.5
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


def forget_requests(estimator: Any) -> None:
    """Drop the metadata-routing requests (``set_fit_request``) from a fitted estimator and those
    inside it: they only matter while fitting, and skops cannot save them (it recurses)."""
    seen: set[int] = set()

    def walk(obj: Any) -> None:
        if id(obj) in seen or not hasattr(obj, "get_params"):
            return
        seen.add(id(obj))
        vars(obj).pop("_metadata_request", None)
        for value in vars(obj).values():
            for item in value if isinstance(value, list | tuple) else [value]:
                walk(getattr(item, "estimator", None) if hasattr(item, "calibrators") else item)

    walk(estimator)


@dataclass
class FittedDetector:
    estimator: CalibratedClassifierCV
    # calibrated out-of-fold harm probabilities of the training rows: where operating points come from
    oof_proba: np.ndarray
    description: str
    search: list[dict[str, Any]] = field(default_factory=list)


def fit_detector(
    data: LabelledSet, *, method: str = "logreg", seed: int = 0, n_splits: int = 5
) -> FittedDetector:
    """A calibrated detector on every row of ``data`` (drop hard negatives first unless they should
    train as benign). ``method``: ``logreg`` (standardised fingerprints, class-balanced logistic
    regression) or ``invariant`` (:class:`InvariantRiskClassifier`, searched)."""
    from routescan.detector.methods import logreg_pipeline, search_invariant

    if method not in DETECTOR_METHODS:
        raise ValueError(f"unknown detector method '{method}'; choose from {', '.join(DETECTOR_METHODS)}")
    env = data.environments()
    # environments held out whole: out-of-fold scores are scores on unseen domains / families
    # one fold number per row (PredefinedSplit): CalibratedClassifierCV(ensemble=False) does not pass
    # groups to its splitter, and a fold array is smaller in the artifact than a list of index pairs
    test_fold = np.empty(len(data), dtype=np.int64)
    for k, (_, te) in enumerate(EnvironmentKFold(n_splits, random_state=seed).split(data.X, data.y, env)):
        test_fold[te] = k
    folds = PredefinedSplit(test_fold)
    table: list[dict[str, Any]] = []
    if method == "invariant":
        search = search_invariant(data, seed=seed)
        base = search.best_estimator_
        table = [
            {**params, "inner_auroc": float(score)}
            for params, score in zip(
                search.cv_results_["params"], search.cv_results_["mean_test_score"], strict=True
            )
        ]
        described = (
            f"InvariantRiskClassifier({', '.join(f'{k}={v}' for k, v in search.best_params_.items())})"
        )
    else:
        base = logreg_pipeline(seed)
        described = "StandardScaler + LogisticRegression(class_weight=balanced, C=1)"
    # metadata routing hands every row's environment to the invariant estimator's fit
    params = {"groups": env} if method == "invariant" else {}
    with config_context(enable_metadata_routing=True):
        calibrated = CalibratedClassifierCV(base, method="sigmoid", cv=folds, ensemble=False)
        calibrated.fit(data.X, data.y, **params)
        oof = cross_val_predict(base, data.X, data.y, cv=folds, method="decision_function", params=params)
    forget_requests(calibrated)
    calibrator = calibrated.calibrated_classifiers_[0].calibrators[0]
    return FittedDetector(
        calibrated,
        np.clip(calibrator.predict(oof), 0.0, 1.0),
        f"CalibratedClassifierCV(sigmoid, environment folds) of {described}",
        table,
    )


def with_score_bins(detector: Detector, data: LabelledSet, *, bins: int = DEFAULT_SCORE_BINS) -> Detector:
    """``detector`` with its score level's bins fitted on labelled traffic: environment-balanced
    quantiles of its scores on ``data`` (routescan.privacy.levels.quantile_edges), its operating-point
    thresholds among the edges. ``routescan train`` fits them on out-of-fold scores; this sets them on
    a detector trained before export levels (scores on its own training traffic are in-sample)."""
    scores = detector.full_proba(data.X)
    thresholds = [p.threshold for p in detector.card.operating_points]
    edges = quantile_edges(scores, data.environments(), bins=bins, thresholds=thresholds)
    card = detector.card.model_copy(update={"score_bins": edges})
    return Detector(detector.estimator, card)


def at_export_level(data: LabelledSet, level: ExportLevel) -> tuple[LabelledSet, ExportSpec]:
    """The training set as records of ``level``, and the level fitted on it: ``full`` as is,
    ``layers`` (per-layer summaries), ``harm`` (8 PLS directions quantised to half a standard
    deviation: the frontier's ``harm-8x0.5``). A detector trained on them scores only that level.
    The score level needs no training set of its own: it comes from a full detector's bins."""
    if level == ExportLevel.full:
        return data, FULL
    if level == ExportLevel.score:
        raise ValueError(
            "the score level is not trained: train a full detector (its card carries the score bins) "
            "and serve or export it at --export-level score"
        )
    export = LAYERS if level == ExportLevel.layers else fit_harm(data.X, data.y, k=8, step=0.5)
    return replace(data, X=reduce(data.X, export, data.spec), windows=_no_windows(len(data))), export


def _no_windows(n: int) -> np.ndarray:
    # window fingerprints are full-level records: a reduced training set carries none
    empty = np.empty(n, dtype=object)
    for i in range(n):
        empty[i] = np.empty((0, 0), dtype=np.float32)
    return empty
