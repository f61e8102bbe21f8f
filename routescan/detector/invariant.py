"""A domain-invariant harm classifier over routing fingerprints (scikit-learn estimator API).

Why this design. A fingerprint has hundreds of features; many separate harmful from benign prompts in
the training data only because of *what the harmful prompts are about* (an expert that handles
chemistry fires on weapons requests). Such topic features flip or vanish on a harm domain the model
never saw. The features worth keeping are the ones whose harmful-vs-benign shift has the same sign
and a useful size in every training environment (harm domain, or jailbreak wrapper family).

``fit(X, y, groups)`` therefore:

1. measures, per environment g, each feature's standardised effect (harmful in g vs benign of g, or
   vs the plain benign pool when g has no benign of its own);
2. scores each feature by a low quantile of its sign-aligned effects across environments (the
   worst case, ``quantile=0``, is a minimax / group-DRO criterion) and keeps those above
   ``min_effect``;
3. repeats step 1-2 on half-subsamples (stability selection) and keeps features selected in at least
   ``stability`` of them, so one lucky split does not decide;
4. fits a group-balanced logistic regression on the kept features (each environment weighs the same,
   so a big domain cannot buy the decision boundary).

Calibration, the hyper-parameter search and the environment folds are scikit-learn's own
(``CalibratedClassifierCV``, ``GridSearchCV``, the :class:`EnvironmentKFold` splitter), put
together in :mod:`routescan.detector.train`; the estimator passes ``check_estimator``.

Measured alternatives (plain and group-balanced LR, gradient boosting) are in docs/results.md.
"""

from __future__ import annotations

from numbers import Integral, Real
from typing import Any, ClassVar

import numpy as np
from scipy.special import expit
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import BaseCrossValidator
from sklearn.preprocessing import LabelEncoder
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval
from sklearn.utils.multiclass import type_of_target
from sklearn.utils.validation import check_is_fitted, validate_data


def group_effects(
    X: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    min_positives: int = 5,
    weights: np.ndarray | None = None,
    X2: np.ndarray | None = None,
) -> tuple[np.ndarray, list[str]]:
    """Standardised harmful-minus-benign effect per (environment, feature): ``[G, d]``, names.

    Environments are the groups holding at least ``min_positives`` harmful rows. Each is compared
    with its own benign rows when it has as many, else with the benign rows of groups that hold no
    harmful row at all (the plain benign pool). ``weights`` (0/1 per row) selects a subsample without
    copying ``X``; all moments come from one weighted matrix product, which keeps stability selection
    cheap on thousands of rows and features.
    """
    groups = np.asarray(groups).astype(str)
    w = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=np.float64)
    names = list(np.unique(groups))
    onehot = (groups[:, None] == np.array(names)[None, :]).astype(np.float64) * w[:, None]
    pos_counts = onehot[y == 1].sum(axis=0)
    env = [k for k, n in enumerate(pos_counts) if n >= min_positives]
    if not env:
        raise ValueError(f"no group has {min_positives} or more harmful rows; cannot measure invariance")
    pure = ~np.isin(groups, [names[k] for k in env]) & (y == 0)
    if not (pure * w).sum():
        pure = y == 0
    # columns: each environment's positives, each environment's own negatives, the pure negatives
    cols = np.concatenate(
        [onehot[:, env] * (y == 1)[:, None], onehot[:, env] * (y == 0)[:, None], (pure * w)[:, None]], axis=1
    )
    X2 = X * X if X2 is None else X2
    n = cols.sum(axis=0)[:, None]
    mean = (cols.T @ X) / np.maximum(n, 1)
    var = np.maximum((cols.T @ X2) / np.maximum(n, 1) - mean**2, 0.0)
    k = len(env)
    pos_m, pos_v = mean[:k], var[:k]
    own = n[k : 2 * k, 0] >= min_positives
    neg_m = np.where(own[:, None], mean[k : 2 * k], mean[2 * k])
    neg_v = np.where(own[:, None], var[k : 2 * k], var[2 * k])
    pooled = np.sqrt(0.5 * (pos_v + neg_v)) + 1e-6
    return (pos_m - neg_m) / pooled, [names[e] for e in env]


class EnvironmentKFold(BaseCrossValidator):
    """K folds that keep each environment holding harmful rows whole, so out-of-fold scores are
    scores on unseen environments; rows of benign-only groups are spread over all folds (one benign
    pool would otherwise leave a fold without negatives). A scikit-learn splitter: hand it to
    ``GridSearchCV`` / ``CalibratedClassifierCV`` / ``cross_val_predict`` with ``groups``."""

    # under metadata routing, ask for ``groups`` by default, as scikit-learn's group splitters do
    __metadata_request__split: ClassVar[dict[str, bool]] = {"groups": True}

    def __init__(self, n_splits: int = 5, *, random_state: int | np.random.RandomState | None = 0) -> None:
        self.n_splits = n_splits
        self.random_state = random_state

    @staticmethod
    def _harmful_groups(y, groups) -> np.ndarray:
        """The environments holding rows of the harmful class (the larger label, as in the estimator)."""
        y = np.asarray(y)
        return np.unique(np.asarray(groups).astype(str)[y == np.max(y)])

    def get_n_splits(self, X=None, y=None, groups=None) -> int:
        if y is None or groups is None:
            return self.n_splits
        return max(2, min(self.n_splits, len(self._harmful_groups(y, groups))))

    def split(self, X, y=None, groups=None):
        if y is None or groups is None:
            raise ValueError("EnvironmentKFold needs y and groups (the environment of every row)")
        y = np.asarray(y)
        groups = np.asarray(groups).astype(str)
        rng = np.random.default_rng(check_random_state(self.random_state).randint(2**31))
        with_pos = rng.permutation(self._harmful_groups(y, groups))
        k = max(2, min(self.n_splits, len(with_pos)))
        fold = np.empty(len(y), dtype=int)
        for i, g in enumerate(with_pos):
            fold[groups == g] = i % k
        rest = np.flatnonzero(~np.isin(groups, with_pos))
        fold[rest] = rng.permutation(np.arange(len(rest)) % k)
        for f in range(k):
            te = np.flatnonzero(fold == f)
            tr = np.flatnonzero(fold != f)
            if len(np.unique(y[tr])) < 2 or not te.size:
                raise ValueError("too few environments to build folds with both classes; give more groups")
            yield tr, te


def invariance_scores(effects: np.ndarray, quantile: float) -> tuple[np.ndarray, np.ndarray]:
    """Per feature: (score, sign). The score is the ``quantile`` of the effects aligned with the
    feature's median sign; it is high only when every (or nearly every) environment agrees."""
    sign = np.sign(np.median(effects, axis=0))
    sign[sign == 0] = 1.0
    aligned = effects * sign
    return np.quantile(aligned, quantile, axis=0), sign


class InvariantRiskClassifier(ClassifierMixin, BaseEstimator):
    """Harm classifier that keeps only risk indicators stable across training environments.

    Binary: the larger of the two labels is the harmful class (``classes_[1]``). Probabilities are a
    logistic link on the decision function, uncalibrated: wrap the estimator in
    ``CalibratedClassifierCV`` (with :class:`EnvironmentKFold` folds) for probabilities to trust, as
    :func:`routescan.detector.train.fit_detector` does.

    Parameters
    ----------
    min_effect : keep features whose low-quantile aligned effect is at least this (Cohen's d units);
        None keeps every feature (a group-balanced logistic regression) and skips the subsamples.
    quantile : which quantile of the per-environment aligned effects scores a feature (0 = worst).
    stability : share of half-subsamples in which a feature must be kept.
    n_subsamples : number of half-subsamples for stability selection.
    max_features : keep at most this many (highest score) features; None = no cap.
    C : inverse L2 strength of the logistic regression.
    balance_groups : weigh every environment (and class) equally in the regression.
    random_state : seed of the subsamples (int, RandomState or None).
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "min_effect": [Interval(Real, 0, None, closed="left"), None],
        "quantile": [Interval(Real, 0, 1, closed="both")],
        "stability": [Interval(Real, 0, 1, closed="both")],
        "n_subsamples": [Interval(Integral, 1, None, closed="left")],
        "max_features": [Interval(Integral, 1, None, closed="left"), None],
        "C": [Interval(Real, 0, None, closed="neither")],
        "balance_groups": ["boolean"],
        "random_state": ["random_state"],
    }

    def __init__(
        self,
        min_effect: float | None = 0.2,
        quantile: float = 0.1,
        stability: float = 0.6,
        n_subsamples: int = 20,
        max_features: int | None = None,
        C: float = 0.1,
        balance_groups: bool = True,
        random_state: int | np.random.RandomState | None = 0,
    ) -> None:
        self.min_effect = min_effect
        self.quantile = quantile
        self.stability = stability
        self.n_subsamples = n_subsamples
        self.max_features = max_features
        self.C = C
        self.balance_groups = balance_groups
        self.random_state = random_state

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = False
        return tags

    # -- selection ---------------------------------------------------------------------------
    def _select(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray, rng: np.random.Generator):
        X2 = X * X
        effects, envs = group_effects(X, y, groups, min_positives=self._min_positives(y), X2=X2)
        score, sign = invariance_scores(effects, self.quantile)
        if self.min_effect is None:
            # no selection: stability votes could not change the outcome, so they are not paid for
            freq = np.ones(X.shape[1])
            keep = np.ones(X.shape[1], dtype=bool)
        else:
            freq = self._stability(X, X2, y, groups, rng)
            keep = (score >= self.min_effect) & (freq >= self.stability)
        if not keep.any():
            # nothing clears the bar: fall back to the single most invariant feature rather than fail
            keep[np.argmax(score)] = True
        idx = np.flatnonzero(keep)
        if self.max_features is not None and idx.size > self.max_features:
            idx = idx[np.argsort(-score[idx])[: self.max_features]]
        return np.sort(idx), score, freq, sign, envs

    @staticmethod
    def _min_positives(y: np.ndarray) -> int:
        # an environment needs a few harmful rows to measure an effect; tiny inputs (one group of a
        # handful of rows) still get one environment
        return int(min(5, max(1, np.sum(y == 1))))

    def _stability(self, X, X2, y, groups, rng: np.random.Generator) -> np.ndarray:
        """Share of stratified half-subsamples in which each feature clears ``min_effect``."""
        votes = np.zeros(X.shape[1])
        members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
        for _ in range(self.n_subsamples):
            half = np.zeros(len(y))
            for rows in members:
                half[rng.choice(rows, size=max(1, len(rows) // 2), replace=False)] = 1.0
            try:
                sub, _ = group_effects(
                    X, y, groups, min_positives=self._min_positives(y), weights=half, X2=X2
                )
            except ValueError:
                continue
            s, _ = invariance_scores(sub, self.quantile)
            votes += s >= self.min_effect
        return votes / max(self.n_subsamples, 1)

    def _weights(self, y: np.ndarray, groups: np.ndarray) -> np.ndarray:
        w = np.ones(len(y))
        if not self.balance_groups:
            for c in (0, 1):
                w[y == c] = len(y) / (2.0 * max(np.sum(y == c), 1))
        else:
            # every (group, class) cell gets the same total weight within its class
            for c in (0, 1):
                cells = list(np.unique(groups[y == c]))
                for g in cells:
                    m = (groups == g) & (y == c)
                    w[m] = len(y) / (2.0 * len(cells) * m.sum())
        return w

    def fit(self, X, y, groups=None) -> InvariantRiskClassifier:
        """Fit on ``X``, binary ``y`` (any two labels) and the environment of every row (``groups``;
        without it, one environment per class, which makes selection a plain effect-size filter)."""
        self._validate_params()
        X, y = validate_data(self, X, y, dtype=np.float64, reset=True)
        y_type = type_of_target(y, input_name="y", raise_unknown=True)
        if y_type != "binary":
            raise ValueError(
                f"Only binary classification is supported. The type of the target is {y_type}: "
                "give labels of two classes (benign, harmful), both present."
            )
        encoder = LabelEncoder().fit(y)
        if len(encoder.classes_) < 2:
            raise ValueError("training needs two classes (benign and harmful); got 1 class")
        self.classes_ = encoder.classes_
        y01 = encoder.transform(y)
        if groups is None:
            groups = np.where(y01 == 1, "harmful", "benign")
        groups = np.asarray(groups).astype(str)
        if groups.shape[0] != y01.shape[0]:
            raise ValueError(f"groups has {groups.shape[0]} entries for {y01.shape[0]} rows")
        seed = check_random_state(self.random_state).randint(2**31)
        idx, score, freq, sign, envs = self._select(X, y01, groups, np.random.default_rng(seed))
        Z = X[:, idx]
        mean, scale = Z.mean(axis=0), Z.std(axis=0) + 1e-9
        clf = LogisticRegression(C=self.C, max_iter=5000)
        clf.fit((Z - mean) / scale, y01, sample_weight=self._weights(y01, groups))
        w = np.zeros(X.shape[1])
        w[idx] = clf.coef_[0] / scale
        self.coef_ = w
        self.intercept_ = float(clf.intercept_[0] - (mean / scale) @ clf.coef_[0])
        self.selected_ = idx
        self.invariance_score_, self.selection_frequency_, self.effect_sign_ = score, freq, sign
        self.environments_ = envs
        return self

    # -- prediction --------------------------------------------------------------------------
    def decision_function(self, X) -> np.ndarray:
        """Higher = more harmful (``classes_[1]``)."""
        check_is_fitted(self, "coef_")
        X = validate_data(self, X, dtype=np.float64, reset=False)
        return X @ self.coef_ + self.intercept_

    def predict_proba(self, X) -> np.ndarray:
        p = expit(self.decision_function(X))
        return np.column_stack([1.0 - p, p])

    def predict(self, X) -> np.ndarray:
        harmful = self.decision_function(X) > 0
        return self.classes_[harmful.astype(int)]

    def linear_form(self) -> tuple[np.ndarray, float]:
        """(w, b) with ``predict_proba(X)[:, 1] == expit(X @ w + b)``: the service's fast path."""
        check_is_fitted(self, "coef_")
        return self.coef_, self.intercept_
