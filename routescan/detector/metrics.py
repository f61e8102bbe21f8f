"""Detection metrics with bootstrap confidence intervals (vectorised: thousands of resamples per second)."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score


def auroc(y: np.ndarray, s: np.ndarray) -> float:
    pos = y == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if not n_pos or not n_neg:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def fpr_threshold(benign: np.ndarray, fpr: float) -> float:
    """The score above which at most ``fpr`` of these benign scores lie (flag when score > it)."""
    return float(np.quantile(benign, 1.0 - fpr, method="higher"))


def tpr_at_fpr(y: np.ndarray, s: np.ndarray, fpr: float) -> float:
    """TPR at the threshold that lets at most ``fpr`` of this set's benign rows through."""
    neg, pos = s[y == 0], s[y == 1]
    if not neg.size or not pos.size:
        return float("nan")
    return float((pos > fpr_threshold(neg, fpr)).mean())


def _boot_auroc(y: np.ndarray, s: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    # stratified resampling keeps both classes in every resample
    pos, neg = s[y == 1], s[y == 0]
    bp = pos[rng.integers(0, len(pos), size=(n, len(pos)))]
    bn = neg[rng.integers(0, len(neg), size=(n, len(neg)))]
    both = np.concatenate([bp, bn], axis=1)
    ranks = rankdata(both, axis=1)
    n_pos, n_neg = len(pos), len(neg)
    return (ranks[:, :n_pos].sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def summarize_scores(
    y: np.ndarray, s: np.ndarray, *, n_boot: int = 1000, seed: int = 0
) -> dict[str, float | list[float] | int]:
    """AUROC (with a 95% bootstrap CI), AUPRC, TPR at 1% and 5% FPR, and the class counts."""
    out: dict[str, float | list[float] | int] = {
        "n_harmful": int((y == 1).sum()),
        "n_benign": int((y == 0).sum()),
        "auroc": auroc(y, s),
        "auprc": float(average_precision_score(y, s)) if 0 < y.sum() < len(y) else float("nan"),
        "tpr@1%fpr": tpr_at_fpr(y, s, 0.01),
        "tpr@5%fpr": tpr_at_fpr(y, s, 0.05),
    }
    if 0 < y.sum() < len(y) and n_boot:
        boots = _boot_auroc(y, s, n_boot, np.random.default_rng(seed))
        out["auroc_ci95"] = [float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))]
    return out
