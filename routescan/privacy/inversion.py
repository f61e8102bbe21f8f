"""Inversion attacks on routing fingerprints, beside the same attacks on the text (the upper reference).

RouteScan's promise is that a fingerprint tells whether a request is harmful without telling what it
said. These attackers try to break that with held-out evaluation and fixed seeds:

- content-word recovery: which of the N most frequent content words occur in the prompt (multi-label;
  k-nearest neighbours and an MLP), against predicting the most frequent words for every prompt;
- prompt retrieval without model access: a map learned from fingerprints to a text embedding (ridge
  regression onto TF-IDF + SVD), then ranking a pool of candidate prompts by that embedding (top-1 /
  top-10 among 100 and 1000, against chance);
- prompt retrieval *with* model access (a dictionary attack): the attacker computes candidates'
  fingerprints itself and matches them. Fingerprints are a deterministic function of the prompt, so an
  exact candidate is always found; this row is there to say so, not to hide it;
- what the fingerprint does reveal: prompt length (regression), source benchmark and harm domain
  (classification, gradient boosting), against the majority / mean baselines.

Text is used here only as the attack's ground truth, in memory, in a research run; nothing text-derived
is written except aggregate metrics.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.decomposition import TruncatedSVD
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS, TfidfVectorizer
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import f1_score, mean_absolute_error, precision_score, r2_score, recall_score
from sklearn.multiclass import OneVsRestClassifier
from sklearn.neighbors import NearestNeighbors
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import StandardScaler

_WORD = re.compile(r"[a-z]{3,}")


def content_words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in ENGLISH_STOP_WORDS}


@dataclass
class AttackData:
    """Aligned rows: a representation the attacker sees, and the ground truth it tries to recover."""

    X: np.ndarray  # fingerprints
    texts: list[str]
    tokens: np.ndarray
    source: np.ndarray
    domain: np.ndarray  # harm domain, "benign" for benign rows


def holdout_split(n: int, seed: int, test_fraction: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train / test row indices (sorted), ``test_fraction`` held out."""
    perm = np.random.default_rng(seed).permutation(n)
    cut = int(n * (1 - test_fraction))
    return np.sort(perm[:cut]), np.sort(perm[cut:])


def _best_threshold(prob: np.ndarray, Y: np.ndarray) -> float:
    grid = np.linspace(0.05, 0.95, 19)
    return float(max(grid, key=lambda t: f1_score(Y, prob >= t, average="micro", zero_division=0)))


def _multilabel_scores(Y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    return {
        "precision": float(precision_score(Y, pred, average="micro", zero_division=0)),
        "recall": float(recall_score(Y, pred, average="micro", zero_division=0)),
        "f1": float(f1_score(Y, pred, average="micro", zero_division=0)),
    }


class _Knn:
    """Label averaging over the k nearest training rows (cosine on standardised inputs)."""

    def __init__(self, k: int = 15) -> None:
        self.k = k

    def fit(self, X, Y):
        self.scaler = StandardScaler(with_mean=not _sparse(X)).fit(X)
        self.nn = NearestNeighbors(n_neighbors=self.k, metric="cosine").fit(self.scaler.transform(X))
        self.Y = Y
        return self

    def predict_proba(self, X) -> np.ndarray:
        idx = self.nn.kneighbors(self.scaler.transform(X), return_distance=False)
        return self.Y[idx].mean(axis=1)


def _sparse(X: Any) -> bool:
    return hasattr(X, "tocsr")


class _Mlp:
    def __init__(self, seed: int) -> None:
        self.seed = seed

    def fit(self, X, Y):
        self.scaler = StandardScaler(with_mean=not _sparse(X)).fit(X)
        self.clf = MLPClassifier(
            hidden_layer_sizes=(256,), max_iter=200, early_stopping=True, random_state=self.seed
        ).fit(self.scaler.transform(X), Y)
        return self

    def predict_proba(self, X) -> np.ndarray:
        return np.asarray(self.clf.predict_proba(self.scaler.transform(X)))


class _Linear:
    """One logistic regression per word. On TF-IDF it reads the answer off its own features (a word
    present is a non-zero column), so it is the real upper reference the text rows stand for; the
    k-NN and MLP attackers are weak on 20,000 sparse columns."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def fit(self, X, Y):
        self.scaler = StandardScaler(with_mean=not _sparse(X), with_std=not _sparse(X)).fit(X)
        base = LogisticRegression(C=10.0 if _sparse(X) else 0.1, max_iter=2000, random_state=self.seed)
        self.clf = OneVsRestClassifier(base).fit(self.scaler.transform(X), Y)
        return self

    def predict_proba(self, X) -> np.ndarray:
        return np.asarray(self.clf.predict_proba(self.scaler.transform(X)))


def word_recovery(
    reps: dict[str, Any],
    words_of: Sequence[set[str]],
    train: np.ndarray,
    test: np.ndarray,
    *,
    top_n: int,
    seed: int,
) -> dict[str, Any]:
    """Micro precision / recall / F1 of recovering which top-N content words a prompt holds."""
    counts = Counter(w for i in train for w in words_of[i])
    vocab = [w for w, _ in counts.most_common(top_n)]
    Y = np.array([[w in words_of[i] for w in vocab] for i in range(len(words_of))], dtype=int)
    fit, val = train[: int(len(train) * 0.8)], train[int(len(train) * 0.8) :]
    out: dict[str, Any] = {"vocabulary": len(vocab), "test_rows": len(test)}
    # baseline: the m most frequent words for every prompt, m chosen on the training rows
    freq = Y[fit].mean(axis=0)
    best_m = max(
        range(0, min(top_n, 30) + 1),
        key=lambda m: f1_score(
            Y[val], np.tile(np.arange(len(vocab)) < m, (len(val), 1)), average="micro", zero_division=0
        ),
    )
    out["frequent-words baseline"] = _multilabel_scores(
        Y[test], np.tile(np.argsort(-freq).argsort() < best_m, (len(test), 1))
    )
    for rep_name, X in reps.items():
        for attacker_name, attacker in (("knn", _Knn()), ("mlp", _Mlp(seed)), ("linear", _Linear(seed))):
            model = attacker.fit(X[fit], Y[fit])
            t = _best_threshold(model.predict_proba(X[val]), Y[val])
            model = attacker.fit(X[train], Y[train])
            out[f"{rep_name} / {attacker_name}"] = _multilabel_scores(
                Y[test], model.predict_proba(X[test]) >= t
            )
    return out


def embed_texts(texts: Sequence[str], train: np.ndarray, seed: int, dim: int = 128):
    """The text side's features, fitted on the train rows only: the L2-normalised SVD embedding of
    the TF-IDF matrix, and the TF-IDF matrix itself."""
    tfidf = TfidfVectorizer(min_df=2, sublinear_tf=True, ngram_range=(1, 2), max_features=20_000)
    T = tfidf.fit(np.asarray(texts, dtype=object)[train]).transform(texts)
    svd = TruncatedSVD(n_components=min(dim, T.shape[1] - 1), random_state=seed).fit(T[train])
    E = svd.transform(T)
    return E / np.maximum(np.linalg.norm(E, axis=1, keepdims=True), 1e-12), T


def _hits(scores: np.ndarray, k: int) -> float:
    """Probability that candidate 0 (the truth) is among the top ``k`` when ties are broken at
    random: an attacker that must name ``k`` candidates and faces ``t`` equally likely ones names the
    truth with probability (places left) / t. A coarse representation ties many candidates, and this
    counts what an attacker really gets from them."""
    greater = int((scores > scores[0]).sum())
    tied = int((scores == scores[0]).sum())  # the truth included
    return float(np.clip((k - greater) / tied, 0.0, 1.0))


def retrieval(
    X: np.ndarray,
    E: np.ndarray,
    train: np.ndarray,
    test: np.ndarray,
    *,
    seed: int,
    pools: Sequence[int] = (100, 1000),
    candidates: np.ndarray | None = None,
) -> dict[str, Any]:
    """Top-1 / top-10 retrieval of the true prompt among ``pool`` test candidates.

    ``candidates``: what the model-access attacker computes for each candidate itself (default
    ``X``); differs from ``X`` only where the observed record carries noise the attacker cannot
    reproduce (randomised response), so it matches its own noiseless values against the observed one.
    """
    rng = np.random.default_rng(seed)
    scaler = StandardScaler().fit(X[train])
    Z = scaler.transform(X)
    C = Z if candidates is None else scaler.transform(candidates)
    ridge = Ridge(alpha=10.0).fit(Z[train], E[train])
    pred = ridge.predict(Z[test])
    pred /= np.maximum(np.linalg.norm(pred, axis=1, keepdims=True), 1e-12)
    out: dict[str, Any] = {}
    for pool in pools:
        if pool > len(test):
            continue
        hits = np.zeros((len(test), 4))
        for q in range(len(test)):
            others = rng.choice(np.delete(np.arange(len(test)), q), size=pool - 1, replace=False)
            cand = np.concatenate([[q], others])
            learned = E[test][cand] @ pred[q]
            # model access: the attacker computes each candidate's record and matches (negative distance)
            matched = -np.linalg.norm(C[test][cand] - Z[test][q], axis=1)
            hits[q] = [_hits(learned, 1), _hits(learned, 10), _hits(matched, 1), _hits(matched, 10)]
        rates = hits.mean(axis=0)
        out[str(pool)] = {
            "chance_top1": 1 / pool,
            "chance_top10": min(1.0, 10 / pool),
            "learned_top1": float(rates[0]),
            "learned_top10": float(rates[1]),
            "model_access_top1": float(rates[2]),
            "model_access_top10": float(rates[3]),
        }
    return out


def revealed(data: AttackData, train: np.ndarray, test: np.ndarray, *, seed: int) -> dict[str, Any]:
    """Prompt length, source benchmark and harm domain from the fingerprint."""
    out: dict[str, Any] = {}
    y = np.log(data.tokens)
    scaler = StandardScaler().fit(data.X[train])
    Z = scaler.transform(data.X)
    ridge = Ridge(alpha=1.0).fit(Z[train], y[train])
    pred_tokens = np.exp(ridge.predict(Z[test]))
    out["length"] = {
        "r2_log_tokens": float(r2_score(y[test], np.log(pred_tokens))),
        "mae_tokens": float(mean_absolute_error(data.tokens[test], pred_tokens)),
        "baseline_mae_tokens": float(
            mean_absolute_error(data.tokens[test], np.full(len(test), np.exp(y[train].mean())))
        ),
    }
    for name, labels, rows in (
        ("source", data.source, np.arange(len(data.source))),
        ("harm_domain", data.domain, np.flatnonzero(data.domain != "benign")),
    ):
        tr, te = np.intersect1d(train, rows), np.intersect1d(test, rows)
        if len(np.unique(labels[tr])) < 2 or not len(te):
            continue
        clf = HistGradientBoostingClassifier(max_iter=150, random_state=seed).fit(data.X[tr], labels[tr])
        majority = Counter(labels[tr]).most_common(1)[0][0]
        out[name] = {
            "classes": len(np.unique(labels[tr])),
            "accuracy": float((clf.predict(data.X[te]) == labels[te]).mean()),
            "majority_baseline": float((labels[te] == majority).mean()),
        }
    return out


def run_attacks(
    data: AttackData, *, top_n: int = 100, seed: int = 0, pools: Sequence[int] = (100, 1000)
) -> dict[str, Any]:
    train, test = holdout_split(len(data.texts), seed)
    E, T = embed_texts(data.texts, train, seed)  # one TF-IDF fit serves word recovery and retrieval
    words_of = [content_words(t) for t in data.texts]
    reps = {"fingerprint": data.X, "text (tf-idf)": T}
    return {
        "rows": len(data.texts),
        "train_rows": len(train),
        "test_rows": len(test),
        "word_recovery": word_recovery(reps, words_of, train, test, top_n=top_n, seed=seed),
        "retrieval": retrieval(data.X, E, train, test, seed=seed, pools=pools),
        "revealed": revealed(data, train, test, seed=seed),
    }
