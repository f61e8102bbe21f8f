"""Evaluation protocols: which rows train and which test, so that nothing held out is ever seen.

- leave-one-domain-out (LODO): each mapped harm domain with enough prompts is held out in turn, with
  a disjoint slice of the plain benign prompts; ``regulated_advice`` and unmapped rows only ever train;
- leave-one-wrapper-family-out: each wrapper super-family (the DAN-like families are one) is held out
  with its wrapped harmful and benign requests;
- leave-one-source-out (:func:`source_folds`): every row of one dataset (ToxicChat: real users,
  both labels) is held out, and scored as unseen traffic;
- hard negatives by held-out source (:func:`hard_negative_folds`): hard negatives of some sources
  train (as benign), those of the others are held out; a control fold trains on none;
- in all of them, training also loses every row that shares a base request with the test set (the
  plain twin of a wrapped test request, or its other wrappings), and hard negatives never train
  unless the protocol says so.

A fold may carry a *calibration* slice: plain rows of the training world held out from training, on
which the 1% / 5% FPR thresholds are set the way a deployed detector's are, before it ever sees
the held-out traffic. The held-out traffic's false-positive rate at that threshold is the number an
operator lives with.

The same splitter serves the inner hyper-parameter search, on the training environments only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from routescan.detector.dataset import BENIGN_GROUP, PLAIN, LabelledSet

NEVER_HELD_OUT = ("regulated_advice", "unmapped")


@dataclass(frozen=True)
class Fold:
    protocol: str
    held_out: str
    train: np.ndarray
    test: np.ndarray
    calibration: np.ndarray | None = None


def _drop_shared_bases(candidates: np.ndarray, test: np.ndarray, base: np.ndarray) -> np.ndarray:
    return candidates[~np.isin(base[candidates], np.unique(base[test]))]


def lodo_folds(
    data: LabelledSet, *, min_size: int = 40, exclude: tuple[str, ...] = NEVER_HELD_OUT, seed: int = 0
) -> list[Fold]:
    plain = ~data.wrapped & ~data.hard_negative
    harmful_plain = plain & (data.y == 1)
    domains = [
        d
        for d in sorted(set(data.domain[harmful_plain]))
        if d not in exclude and np.sum(harmful_plain & (data.domain == d)) >= min_size
    ]
    if not domains:
        raise ValueError(f"no harm domain has {min_size} or more plain prompts to hold out")
    benign = np.flatnonzero(plain & (data.y == 0))
    parts = np.array_split(np.random.default_rng(seed).permutation(benign), len(domains))
    usable = np.flatnonzero(~data.hard_negative)
    folds = []
    for d, part in zip(domains, parts, strict=True):
        test = np.concatenate([np.flatnonzero(harmful_plain & (data.domain == d)), part])
        train = usable[(data.domain[usable] != d) & ~np.isin(usable, part)]
        folds.append(Fold("lodo", d, _drop_shared_bases(train, test, data.base), np.sort(test)))
    return folds


def family_folds(data: LabelledSet) -> list[Fold]:
    usable = np.flatnonzero(~data.hard_negative)
    folds = []
    for fam in sorted(set(data.family[data.wrapped])):
        test = usable[data.family[usable] == fam]
        if len(np.unique(data.y[test])) < 2:
            continue
        train = usable[data.family[usable] != fam]
        folds.append(Fold("wrapper", fam, _drop_shared_bases(train, test, data.base), test))
    return folds


# hard-negative sources, held out in turn: the over-refusal contrasts against the look-alike sets
HARD_NEGATIVE_SPLITS: dict[str, tuple[str, ...]] = {
    "coconot": ("coconot_contrast",),
    "xstest+jbb_benign": ("xstest", "jbb_benign"),
}


def _calibration_slice(data: LabelledSet, pool: np.ndarray, share: float, seed: int) -> np.ndarray:
    """A seeded ``share`` of the plain (unwrapped, not hard-negative) rows of ``pool``, both classes."""
    plain = pool[~data.wrapped[pool] & ~data.hard_negative[pool]]
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(plain, size=max(1, round(share * len(plain))), replace=False))


def source_folds(
    data: LabelledSet,
    sources: tuple[str, ...] = ("toxicchat",),
    *,
    calibration_share: float = 0.2,
    seed: int = 0,
) -> list[Fold]:
    """One fold per source: train on every other source (minus a calibration slice), test on all of it."""
    usable = np.flatnonzero(~data.hard_negative)
    folds = []
    for src in sources:
        test = usable[data.source[usable] == src]
        if len(np.unique(data.y[test])) < 2:
            continue
        rest = usable[data.source[usable] != src]
        calib = _calibration_slice(data, rest, calibration_share, seed)
        train = _drop_shared_bases(rest[~np.isin(rest, calib)], test, data.base)
        folds.append(Fold("source", src, train, test, calib))
    return folds


def hard_negative_folds(
    data: LabelledSet,
    splits: dict[str, tuple[str, ...]] = HARD_NEGATIVE_SPLITS,
    *,
    calibration_share: float = 0.2,
    seed: int = 0,
) -> list[Fold]:
    """Per entry of ``splits``: its sources' hard negatives are the test set and every other source's
    hard negatives train as benign; plus a control fold per entry that trains on no hard negative."""
    hard = data.hard_negative
    everything = np.arange(len(data))
    calib = _calibration_slice(data, everything, calibration_share, seed)
    folds = []
    for name, held in splits.items():
        test = np.flatnonzero(hard & np.isin(data.source, held))
        if not test.size:
            continue
        # the held-out sources train on nothing, not even their own non-contrast rows: a source
        # is held out whole; the control differs from the fold only by the hard negatives trained on
        other = ~np.isin(data.source, held) & ~np.isin(everything, calib)
        for trained, keep in (("trained", other), ("none trained", other & ~hard)):
            train = _drop_shared_bases(everything[keep], test, data.base)
            folds.append(Fold("hard_negative", f"{name} ({trained})", train, test, calib))
    return folds


def environment_splits(
    env: np.ndarray, y: np.ndarray, base: np.ndarray, *, n_splits: int, seed: int, min_positives: int = 10
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Inner leave-one-environment-out splits of a training set (for hyper-parameter choice).

    Up to ``n_splits`` environments holding harmful rows are held out in turn (seeded choice); an
    environment without benign rows of its own is tested against a slice of the plain benign pool.
    """
    rng = np.random.default_rng(seed)
    candidates = [e for e in np.unique(env) if np.sum((env == e) & (y == 1)) >= min_positives]
    if len(candidates) < 2:
        raise ValueError("fewer than two training environments with harmful rows; cannot search")
    chosen = rng.permutation(candidates)[:n_splits]
    pool = np.flatnonzero(env == BENIGN_GROUP)
    parts = np.array_split(rng.permutation(pool), len(chosen)) if pool.size else [pool] * len(chosen)
    everything = np.arange(len(y))
    splits = []
    for e, part in zip(chosen, parts, strict=True):
        own = np.flatnonzero(env == e)
        test = own if np.any(y[own] == 0) else np.concatenate([own, part])
        train = everything[~np.isin(everything, test)]
        train = _drop_shared_bases(train, test, base)
        if len(np.unique(y[train])) == 2 and len(np.unique(y[test])) == 2:
            splits.append((train, np.sort(test)))
    return splits


__all__ = [
    "HARD_NEGATIVE_SPLITS",
    "NEVER_HELD_OUT",
    "PLAIN",
    "Fold",
    "environment_splits",
    "family_folds",
    "hard_negative_folds",
    "lodo_folds",
    "source_folds",
]
