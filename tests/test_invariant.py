"""The invariant selection on constructed data: one feature is the true harm signal in every domain,
one a shortcut that only some training domains carry (and a new domain reverses)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.utils.estimator_checks import check_estimators_unfitted, check_get_params_invariance

from routescan.detector.invariant import (
    EnvironmentKFold,
    InvariantRiskClassifier,
    group_effects,
    invariance_scores,
)
from routescan.detector.metrics import auroc, summarize_scores, tpr_at_fpr

SIGNAL, SHORTCUT = 0, 1


def domains(shortcut_shift: dict[str, float], n_harm: dict[str, int], n_benign: int, seed: int):
    """Rows of harmful prompts from each domain plus a benign pool; 10 noise features."""
    rng = np.random.default_rng(seed)
    X, y, g = [], [], []
    for d, shift in shortcut_shift.items():
        h = rng.normal(size=(n_harm[d], 12))
        h[:, SIGNAL] += 1.0
        h[:, SHORTCUT] += shift
        X.append(h)
        y += [1] * n_harm[d]
        g += [d] * n_harm[d]
    X.append(rng.normal(size=(n_benign, 12)))
    y += [0] * n_benign
    g += ["benign"] * n_benign
    return np.vstack(X), np.array(y), np.array(g)


TRAIN = {"big1": 4.0, "big2": 4.0, "small1": 0.0, "small2": 0.0, "small3": 0.0}
SIZES = {"big1": 300, "big2": 300, "small1": 60, "small2": 60, "small3": 60}


def test_keeps_the_invariant_signal_and_drops_the_shortcut() -> None:
    X, y, g = domains(TRAIN, SIZES, 800, seed=0)
    clf = InvariantRiskClassifier().fit(X, y, groups=g)
    assert list(clf.selected_) == [SIGNAL]
    effects, names = group_effects(X, y, g)
    assert sorted(names) == sorted(TRAIN)
    score, sign = invariance_scores(effects, 0.0)
    assert score[SIGNAL] > 0.5 and score[SHORTCUT] < 0.3 and sign[SIGNAL] == 1


def test_generalises_to_a_domain_that_reverses_the_shortcut_where_plain_lr_fails() -> None:
    X, y, g = domains(TRAIN, SIZES, 800, seed=0)
    Xt, yt, _ = domains({"new": -2.0}, {"new": 200}, 400, seed=1)
    ours = InvariantRiskClassifier().fit(X, y, groups=g)
    plain = LogisticRegression(class_weight="balanced").fit(X, y)
    ours_auc = auroc(yt, ours.decision_function(Xt))
    plain_auc = auroc(yt, plain.decision_function(Xt))
    assert ours_auc > 0.7
    assert ours_auc > plain_auc + 0.2


def test_no_selection_keeps_every_feature_and_loses_the_invariance() -> None:
    # min_effect=None is the grid's "no selection" point: a group-balanced regression on everything,
    # which the inner search must be able to pick and which falls for the shortcut like plain LR
    X, y, g = domains(TRAIN, SIZES, 800, seed=0)
    Xt, yt, _ = domains({"new": -2.0}, {"new": 200}, 400, seed=1)
    every = InvariantRiskClassifier(min_effect=None).fit(X, y, groups=g)
    chosen = InvariantRiskClassifier().fit(X, y, groups=g)
    assert list(every.selected_) == list(range(X.shape[1]))
    assert np.all(every.selection_frequency_ == 1.0)
    assert auroc(yt, every.decision_function(Xt)) < auroc(yt, chosen.decision_function(Xt)) - 0.2


def test_calibrated_by_sklearn_on_environment_folds_and_scored_as_a_dot_product() -> None:
    from sklearn import config_context
    from sklearn.calibration import CalibratedClassifierCV

    from routescan.detector.artifact import _linear_form

    X, y, g = domains(TRAIN, SIZES, 800, seed=0)
    folds = list(EnvironmentKFold(5, random_state=0).split(X, y, g))
    # every environment holding harmful rows lands in exactly one test fold, whole
    for env in TRAIN:
        rows = np.flatnonzero(g == env)
        assert sum(np.isin(rows, te).all() for _, te in folds) == 1
    with config_context(enable_metadata_routing=True):
        est = InvariantRiskClassifier().set_fit_request(groups=True)
        cal = CalibratedClassifierCV(est, method="sigmoid", cv=folds, ensemble=False).fit(X, y, groups=g)
    p = cal.predict_proba(X)[:, 1]
    # calibrated: mean predicted probability tracks the harmful rate
    assert abs(p.mean() - y.mean()) < 0.05
    w, b = _linear_form(cal)
    np.testing.assert_allclose(1 / (1 + np.exp(-(X @ w + b))), p, rtol=1e-8)
    raw = InvariantRiskClassifier().fit(X, y, groups=g)
    w, b = raw.linear_form()
    np.testing.assert_allclose(1 / (1 + np.exp(-(X @ w + b))), raw.predict_proba(X)[:, 1], rtol=1e-10)


def test_passes_check_estimator() -> None:
    from sklearn.utils.estimator_checks import check_estimator

    results = check_estimator(InvariantRiskClassifier(n_subsamples=3), on_fail=None)
    failed = [(r["check_name"], str(r["exception"])[:200]) for r in results if r["status"] == "failed"]
    assert not failed, failed
    assert len([r for r in results if r["status"] == "passed"]) > 40


def test_any_two_labels_and_clear_errors() -> None:
    check_get_params_invariance("InvariantRiskClassifier", InvariantRiskClassifier())
    check_estimators_unfitted("InvariantRiskClassifier", InvariantRiskClassifier())
    X, y, g = domains(TRAIN, SIZES, 200, seed=0)
    with pytest.raises(ValueError, match="groups has"):
        InvariantRiskClassifier().fit(X, y, groups=g[:-1])
    with pytest.raises(ValueError, match="Only binary"):
        InvariantRiskClassifier().fit(X, np.where(g == "big1", 2, y), groups=g)
    with pytest.raises(ValueError, match="parameter of InvariantRiskClassifier"):
        InvariantRiskClassifier(C=0).fit(X, y, groups=g)
    words = np.where(y == 1, "harmful", "benign")
    named = InvariantRiskClassifier().fit(X, words, groups=g)
    numbered = InvariantRiskClassifier().fit(X, y, groups=g)
    assert list(named.classes_) == ["benign", "harmful"]
    np.testing.assert_allclose(named.decision_function(X), numbered.decision_function(X))
    assert set(named.predict(X)) <= {"benign", "harmful"}


def test_metrics() -> None:
    y = np.array([0] * 100 + [1] * 50)
    s = np.concatenate([np.linspace(0, 1, 100), np.linspace(0.5, 1.5, 50)])
    from sklearn.metrics import roc_auc_score

    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s))
    assert tpr_at_fpr(y, s, 0.05) == pytest.approx(
        np.mean(s[y == 1] > np.quantile(s[:100], 0.95, method="higher"))
    )
    m = summarize_scores(y, s, n_boot=200)
    lo, hi = m["auroc_ci95"]
    assert lo <= m["auroc"] <= hi and m["n_harmful"] == 50
