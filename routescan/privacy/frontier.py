"""The privacy frontier: for each export level, what attackers recover from it beside the detection
it keeps, on the same traces.

For every level (:mod:`routescan.privacy.levels`):

- leakage: the attackers of ``routescan invert`` (content words by a per-word linear model, an MLP
  and k-NN; prompt retrieval among 100 and 1,000 with and without model access; length, source and
  harm domain), trained on the level's own output. The level is fitted on the attacker's training
  rows and the attacker knows it (the projection, the bins, the noise scale): the fair attacker. With
  randomised response the attacker sees the noisy record and matches it against the noiseless
  records it computes for its candidates.
- detection: leave-one-domain-out and leave-one-wrapper-family-out AUROC and TPR at 1% FPR, the
  level fitted on each fold's training rows only. Levels that export features are scored by a
  logistic regression trained on that level's records; the score level is the score (what the daemon
  reads off the record).

Text enters only as the attackers' ground truth, in memory, as in ``routescan invert``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from routescan.detector.dataset import LabelledSet
from routescan.detector.methods import logreg_pipeline
from routescan.detector.metrics import auroc, fpr_threshold, tpr_at_fpr
from routescan.detector.protocols import family_folds, lodo_folds
from routescan.features.fingerprint import FingerprintSpec
from routescan.privacy.inversion import (
    AttackData,
    content_words,
    embed_texts,
    holdout_split,
    retrieval,
    revealed,
    word_recovery,
)
from routescan.privacy.levels import (
    DEFAULT_SCORE_GRID,
    FULL,
    LAYERS,
    ExportLevel,
    ExportSpec,
    fit_harm,
    quantile_edges,
    reduce,
    score_edges,
    score_level,
)

# The goal of the privacy issue: content words no better than guessing frequent ones, the prompt
# almost never picked out of 1,000, detection within reach of the full fingerprint.
GOAL = {"word_f1": 0.10, "top1_1000": 0.01, "lodo_auroc": 0.95, "wrapper_drop": 0.02}
TARGET_FPRS = (0.01, 0.05)


@dataclass(frozen=True)
class Recipe:
    """How one level is fitted from labelled training rows."""

    name: str
    level: ExportLevel
    k: int = 4
    step: float = 0.5
    # score level: environment-balanced quantile bins of the training scores, or (bins=None) the
    # detector's thresholds beside a fixed probability grid
    bins: int | None = None
    grid: tuple[float, ...] = DEFAULT_SCORE_GRID
    epsilon: float | None = None
    # score level without bins: the float probability itself (what a full-level daemon's audit store
    # keeps); no export level sends it, it is measured to show why the score level bins
    exact: bool = False

    def fit(
        self, X: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int
    ) -> tuple[ExportSpec, Callable | None]:
        """The fitted level and, for the score level, the on-host detector's probability function
        (``groups``: the rows' environments, which weigh the score quantiles)."""
        if self.level == ExportLevel.full:
            return FULL, None
        if self.level == ExportLevel.layers:
            return LAYERS, None
        if self.level == ExportLevel.harm:
            return fit_harm(X, y, k=self.k, step=self.step), None
        model = _detector(X, y, seed)
        p = model.predict_proba(X)[:, 1]
        thresholds = [fpr_threshold(p[y == 0], f) for f in TARGET_FPRS]
        if self.bins is not None:
            edges = quantile_edges(p, groups, bins=self.bins, thresholds=thresholds)
        else:
            edges = score_edges(thresholds, self.grid)
        export = score_level(edges, self.epsilon)
        return export, lambda Z: model.predict_proba(Z)[:, 1]

    def records(
        self,
        X: np.ndarray,
        export: ExportSpec,
        spec: FingerprintSpec,
        score: Callable | None,
        rng: np.random.Generator | None,
    ) -> np.ndarray:
        """The level's records of full fingerprints ``X`` (``exact``: the probability itself)."""
        if self.exact:
            return score(X)[:, None]  # type: ignore[misc]
        return reduce(X, export, spec, score=score, rng=rng)


_DETECTORS: dict[tuple, Any] = {}


def _detector(X: np.ndarray, y: np.ndarray, seed: int):
    """The on-host detector of one training set, fitted once for every score recipe that shares it
    (they differ only in how its score is binned)."""
    key = (X.shape, float(X.sum()), float((X * np.arange(1, X.shape[1] + 1)).sum()), y.tobytes(), seed)
    if key not in _DETECTORS:
        _DETECTORS[key] = logreg_pipeline(seed).fit(X, y)
    return _DETECTORS[key]


# Names are what ``routescan frontier --levels`` takes (no commas). "score-qN": N environment-
# balanced quantile bins of the detector's training scores, its two thresholds among the edges (so up
# to N + 2 values); "score-grid": the thresholds beside a fixed probability grid.
DEFAULT_RECIPES: tuple[Recipe, ...] = (
    Recipe("full", ExportLevel.full),
    Recipe("layers", ExportLevel.layers),
    Recipe("harm-8x0.5", ExportLevel.harm, k=8, step=0.5),
    Recipe("harm-2x1", ExportLevel.harm, k=2, step=1.0),
    Recipe("score-exact", ExportLevel.score, exact=True),
    Recipe("score-grid", ExportLevel.score),
    Recipe("score-q24", ExportLevel.score, bins=24),
    Recipe("score-q16", ExportLevel.score, bins=16),
    Recipe("score-q12", ExportLevel.score, bins=12),
    Recipe("score-q8", ExportLevel.score, bins=8),
    Recipe("score-q6", ExportLevel.score, bins=6),
    Recipe("score-q4", ExportLevel.score, bins=4),
    Recipe("score-q12-eps4", ExportLevel.score, bins=12, epsilon=4.0),
    Recipe("score-q8-eps2", ExportLevel.score, bins=8, epsilon=2.0),
)


@dataclass(frozen=True)
class AttackSplit:
    """What every level's attackers share: the attacked rows, their attacker-training / held-out
    split, the text side's embedding (retrieval's target) and each prompt's content words."""

    data: LabelledSet  # the attacked rows only
    train: np.ndarray
    test: np.ndarray
    embedding: np.ndarray
    words: list[set[str]]

    @classmethod
    def of(cls, data: LabelledSet, rows: np.ndarray, texts: Sequence[str], seed: int = 0) -> AttackSplit:
        train, test = holdout_split(len(rows), seed)
        embedding, _ = embed_texts(texts, train, seed)
        return cls(data.subset(rows), train, test, embedding, [content_words(t) for t in texts])


@dataclass(frozen=True)
class DetectionFolds:
    """LODO and wrapper folds, each as its (train, test) subsets: the same for every level."""

    folds: dict[str, list[tuple[str, LabelledSet, LabelledSet]]]

    @classmethod
    def of(cls, data: LabelledSet, seed: int = 0) -> DetectionFolds:
        protocols = {"lodo": lodo_folds(data, seed=seed), "wrapper": family_folds(data)}
        return cls(
            {
                name: [(f.held_out, data.subset(f.train), data.subset(f.test)) for f in folds]
                for name, folds in protocols.items()
            }
        )


def detection(recipe: Recipe, folds: DetectionFolds, *, seed: int = 0) -> dict[str, Any]:
    """LODO and wrapper AUROC / TPR at 1% FPR of one level, fitted per fold on training rows."""
    out: dict[str, Any] = {}
    for protocol, entries in folds.folds.items():
        per_fold = {}
        for held_out, train, test in entries:
            export, score = recipe.fit(train.X, train.y, train.environments(), seed)
            rng = np.random.default_rng(seed)
            R_train = recipe.records(train.X, export, train.spec, score, rng)
            R_test = recipe.records(test.X, export, train.spec, score, rng)
            if export.level == ExportLevel.score:
                s = R_test[:, 0]  # the daemon's score is the record's value
            else:
                s = _detector(R_train, train.y, seed).decision_function(R_test)
            per_fold[held_out] = {"auroc": auroc(test.y, s), "tpr@1%fpr": tpr_at_fpr(test.y, s, 0.01)}
        out[protocol] = {
            "folds": per_fold,
            "auroc": float(np.mean([f["auroc"] for f in per_fold.values()])),
            "tpr@1%fpr": float(np.mean([f["tpr@1%fpr"] for f in per_fold.values()])),
        }
    return out


def leakage(
    recipe: Recipe,
    split: AttackSplit,
    texts: Sequence[str],
    *,
    top_n: int = 100,
    pools: Sequence[int] = (100, 1000),
    seed: int = 0,
) -> dict[str, Any]:
    """The invert attackers on one level's records of the attacked rows (aligned with ``texts``).
    The level is fitted on the attacker's training rows; with randomised response the attacker
    matches the observed records against the noiseless ones it computes itself."""
    sub, train, test = split.data, split.train, split.test
    export, score = recipe.fit(sub.X[train], sub.y[train], sub.environments()[train], seed)
    observed = recipe.records(sub.X, export, sub.spec, score, np.random.default_rng(seed))
    clean = observed
    if export.epsilon is not None:
        clean = recipe.records(sub.X, export.model_copy(update={"epsilon": None}), sub.spec, score, None)
    attack = AttackData(
        X=observed, texts=list(texts), tokens=sub.prompt_tokens, source=sub.source, domain=sub.domain
    )
    words = word_recovery({"level": observed}, split.words, train, test, top_n=top_n, seed=seed)
    return {
        "export": "score/probability (unbinned)" if recipe.exact else export.describe(),
        "privacy": export.privacy(),
        "dim": int(observed.shape[1]),
        "distinct_records": len(np.unique(observed, axis=0)),
        "word_recovery": words,
        "retrieval": retrieval(
            observed, split.embedding, train, test, seed=seed, pools=pools, candidates=clean
        ),
        "revealed": revealed(attack, train, test, seed=seed),
    }


def label_floor(split: AttackSplit, *, top_n: int = 100, seed: int = 0) -> dict[str, Any]:
    """The word attackers given only the true harm label: what any level that reveals harm (a
    verdict does, by design) gives away at the least."""
    y = split.data.y.astype(np.float64)[:, None]
    return word_recovery({"level": y}, split.words, split.train, split.test, top_n=top_n, seed=seed)


def summary(row: dict[str, Any]) -> dict[str, float]:
    """The figures the goal reads, from one level's results."""
    w = row["leakage"]["word_recovery"]
    r = row["leakage"]["retrieval"]
    f1 = max(v["f1"] for k, v in w.items() if k.startswith("level /"))
    top1 = {p: max(m["learned_top1"], m["model_access_top1"]) for p, m in r.items()}
    return {
        "word_f1": f1,
        "frequent_words_f1": w["frequent-words baseline"]["f1"],
        "top1_100": top1.get("100", float("nan")),
        "top1_1000": top1.get("1000", float("nan")),
        "lodo_auroc": row["detection"]["lodo"]["auroc"],
        "lodo_tpr1": row["detection"]["lodo"]["tpr@1%fpr"],
        "wrapper_auroc": row["detection"]["wrapper"]["auroc"],
        "wrapper_tpr1": row["detection"]["wrapper"]["tpr@1%fpr"],
    }


def meets_goal(s: dict[str, float], full: dict[str, float]) -> dict[str, bool]:
    return {
        "word_f1": s["word_f1"] <= GOAL["word_f1"],
        "top1_1000": s["top1_1000"] <= GOAL["top1_1000"],
        "lodo_auroc": s["lodo_auroc"] >= GOAL["lodo_auroc"],
        "wrapper_drop": full["wrapper_auroc"] - s["wrapper_auroc"] <= GOAL["wrapper_drop"],
    }


def frontier(
    data: LabelledSet,
    attack_rows: np.ndarray,
    texts: Sequence[str],
    *,
    recipes: Sequence[Recipe] = DEFAULT_RECIPES,
    top_n: int = 100,
    pools: Sequence[int] = (100, 1000),
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Every recipe's leakage and detection; the first recipe is the reference (``full``)."""
    split = AttackSplit.of(data, attack_rows, texts, seed)
    folds = DetectionFolds.of(data, seed)
    rows: list[dict[str, Any]] = []
    for recipe in recipes:
        if progress:
            progress(recipe.name)
        row = {
            "name": recipe.name,
            "level": recipe.level.value,
            "leakage": leakage(recipe, split, texts, top_n=top_n, pools=pools, seed=seed),
            "detection": detection(recipe, folds, seed=seed),
        }
        row["summary"] = summary(row)
        rows.append(row)
    _DETECTORS.clear()
    floor = label_floor(split, top_n=top_n, seed=seed)
    full = rows[0]["summary"]
    for row in rows:
        row["goal"] = meets_goal(row["summary"], full)
    return {
        "goal": GOAL,
        "rows": rows,
        "attack_rows": len(attack_rows),
        "detection_rows": len(data),
        "recommended": recommend(rows),
        "label_floor": {
            "word_f1": max(v["f1"] for k, v in floor.items() if k.startswith("level /")),
            "frequent_words_f1": floor["frequent-words baseline"]["f1"],
        },
    }


def recommend(rows: Sequence[dict[str, Any]]) -> str | None:
    """Of the levels whose detection stays inside the goal (and whose leakage does too, when any
    level's does), the one that leaks least by retrieval among 1,000, then by content words; None
    when no level keeps detection."""
    keeps = [r for r in rows if r["goal"]["lodo_auroc"] and r["goal"]["wrapper_drop"]]
    private = [r for r in keeps if r["goal"]["word_f1"] and r["goal"]["top1_1000"]]
    pick = private or keeps
    if not pick:
        return None
    # among those, the one that leaks least by retrieval, then by words
    return min(pick, key=lambda r: (r["summary"]["top1_1000"], r["summary"]["word_f1"]))["name"]
