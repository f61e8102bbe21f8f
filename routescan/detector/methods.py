"""The detector and its baselines, behind one interface so every protocol treats them alike.

- ``invariant``: :class:`InvariantRiskClassifier`, hyper-parameters chosen by inner
  leave-one-environment-out splits of the training rows only;
- ``logreg`` / ``gbm``: plain logistic regression and gradient boosting on the same fingerprints
  (what a detector without invariance does; fixed, standard settings);
- ``length``: logistic regression on log prompt length alone (what any telemetry carries);
- ``tfidf``: TF-IDF + logistic regression on the prompt *text*, the content-auditing reference point.
  It is the only method that reads text, and only inside an evaluation run, from the corpus rebuilt in
  memory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from routescan.detector.dataset import LabelledSet
from routescan.detector.invariant import InvariantRiskClassifier
from routescan.detector.metrics import auroc
from routescan.detector.protocols import environment_splits

# Small on purpose: every point costs one fit per inner split, per outer fold. NO_SELECTION keeps
# every feature (the estimator is then a group-balanced logistic regression): the inner
# leave-one-environment-out splits decide whether dropping unstable features pays on this data.
NO_SELECTION = None
DEFAULT_GRID: tuple[dict[str, Any], ...] = tuple(
    {"min_effect": m, "C": c} for m in (NO_SELECTION, 0.1, 0.3) for c in (0.03, 0.3)
)

Scorer = Callable[[LabelledSet], np.ndarray]


@dataclass
class SearchResult:
    params: dict[str, Any]
    table: list[dict[str, Any]] = field(default_factory=list)


def search_invariant(
    data: LabelledSet,
    *,
    grid: tuple[dict[str, Any], ...] = DEFAULT_GRID,
    n_splits: int = 3,
    seed: int = 0,
    base_params: Mapping[str, Any] | None = None,
) -> SearchResult:
    """Pick the grid point with the best mean AUROC over inner held-out environments."""
    env = data.environments()
    splits = environment_splits(env, data.y, data.base, n_splits=n_splits, seed=seed)
    if not splits:
        return SearchResult(dict(grid[0]))
    table = []
    for point in grid:
        params = {**(base_params or {}), **point, "calibrate": False, "random_state": seed}
        scores = []
        for train, test in splits:
            clf = InvariantRiskClassifier(**params).fit(data.X[train], data.y[train], env[train])
            scores.append(auroc(data.y[test], clf.decision_function(data.X[test])))
        table.append({**point, "inner_auroc": float(np.mean(scores))})
    best = max(table, key=lambda row: row["inner_auroc"])
    return SearchResult({k: best[k] for k in grid[0]}, table)


def fit_invariant(
    data: LabelledSet, *, seed: int = 0, calibrate: bool = True, grid=DEFAULT_GRID
) -> tuple[InvariantRiskClassifier, SearchResult]:
    found = search_invariant(data, grid=grid, seed=seed)
    clf = InvariantRiskClassifier(**found.params, calibrate=calibrate, random_state=seed)
    return clf.fit(data.X, data.y, data.environments()), found


def _logreg() -> Pipeline:
    return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, class_weight="balanced", max_iter=5000))


def _gbm(seed: int) -> HistGradientBoostingClassifier:
    # sized for ~1,000 features x ~7,000 rows on one core (the report refits it for every held-out
    # group): coarse bins, no sample weights (AUROC is rank-based; weighting only slows the histograms)
    return HistGradientBoostingClassifier(
        max_iter=60,
        learning_rate=0.15,
        max_bins=32,
        early_stopping=False,
        random_state=seed,
    )


def train_method(
    name: str, data: LabelledSet, *, texts: Mapping[str, str] | None = None, seed: int = 0
) -> tuple[Scorer, dict[str, Any]]:
    """Fit method ``name`` on ``data``; returns a scorer (higher = more harmful) and fit notes."""
    if name == "invariant":
        clf, found = fit_invariant(data, seed=seed, calibrate=False)
        notes = {"params": found.params, "selected_features": len(clf.selected_)}
        return (lambda d: clf.decision_function(d.X)), notes
    if name == "logreg":
        model = _logreg().fit(data.X, data.y)
        return (lambda d: model.decision_function(d.X)), {}
    if name == "gbm":
        gbm = _gbm(seed).fit(data.X, data.y)
        return (lambda d: gbm.predict_proba(d.X)[:, 1]), {}
    if name == "volume":
        vol = LogisticRegression(class_weight="balanced").fit(np.log1p(data.launched)[:, None], data.y)
        return (lambda d: vol.decision_function(np.log1p(d.launched)[:, None])), {}
    if name == "length":
        lr = LogisticRegression(class_weight="balanced").fit(np.log(data.prompt_tokens)[:, None], data.y)
        return (lambda d: lr.decision_function(np.log(d.prompt_tokens)[:, None])), {}
    if name == "tfidf":
        if texts is None:
            raise ValueError("the tfidf baseline needs the corpus texts (evaluate with --corpora)")
        pipe = make_pipeline(
            TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True, max_features=200_000),
            LogisticRegression(C=10.0, class_weight="balanced", max_iter=5000),
        )
        pipe.fit([texts[i] for i in data.ids], data.y)
        return (lambda d: pipe.decision_function([texts[i] for i in d.ids])), {}
    raise ValueError(f"unknown method '{name}'; known: {', '.join(METHODS)}")


METHODS = ("invariant", "logreg", "gbm", "volume", "length", "tfidf")
# "volume" reads only the trace's total prefill threads: the floor any launch observer reaches
TELEMETRY_METHODS = ("invariant", "logreg", "gbm", "volume")
