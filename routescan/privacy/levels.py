"""Export levels: how much of a request's routing leaves the serving host.

A full fingerprint is, in practice, nearly the prompt (docs/privacy.md: content words at F1 0.87,
the prompt top-1 among 1,000 candidates 90% of the time). An export level is what RouteScan sends
instead, chosen by one setting in the agent, the collector and the daemon, and written into every
fingerprint (``export_level``) and every detector card (``export``), so a daemon refuses a record of
another level with a 409 as it refuses another model's.

- ``full``: the fingerprint (or the trace) itself. For a daemon on the same host only.
- ``layers``: per-layer summaries (each MoE layer's routed tokens per prompt token, active experts,
  routing entropy); no per-expert shares.
- ``harm``: the standardised fingerprint projected onto ``k`` directions of largest covariance with
  the harm label (partial least squares), each quantised to ``step`` standard deviations and clipped.
- ``score``: the on-host detector's harm probability, reduced to the bin it falls in among a few
  edges: quantiles of its training scores (:func:`quantile_edges`), the operating-point thresholds
  among them, so flagging is exactly the full detector's; optionally passed through k-ary
  randomised response, which makes each exported value (epsilon, 0)-differentially private with
  respect to the whole request.

Why bins and not the probability itself: a float64 score is a perfect hash of the prompt for an
attacker who can run the detector on guesses (it matches the exact candidate), and among N
candidates an attacker who knows the bins picks the truth with chance about (bins / N). The
frontier (:mod:`routescan.privacy.frontier`) measures every level with the attackers of
``routescan invert`` trained on the level's own output.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from routescan.features.fingerprint import FingerprintSpec
from routescan.telemetry.schema import ExportLevel

EXPORT_SCHEMA: Literal["routescan.export/1"] = "routescan.export/1"


# The level a daemon reached over the network takes unless configured otherwise: the strongest level
# whose detection stayed inside the goal in docs/privacy.md's frontier.
NETWORK_DEFAULT = ExportLevel.score
# Bins of the score level: quantiles of the detector's training scores, environments weighted alike
# (docs/privacy.md's frontier: more bins keep more wrapper AUROC and give retrieval more).
DEFAULT_SCORE_BINS = 24
# Edges for a detector whose card has no fitted bins (trained before export levels): a probability
# grid beside its thresholds. Wrapped requests crowd above 0.9, so it costs wrapper AUROC.
DEFAULT_SCORE_GRID = (0.1, 0.3, 0.5, 0.7, 0.9)

Prob = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Finite = Annotated[float, Field(allow_inf_nan=False)]


class ExportSpec(BaseModel):
    """One export level and the parameters that compute it (``routescan.export/1``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal["routescan.export/1"] = EXPORT_SCHEMA
    level: ExportLevel = ExportLevel.full
    # harm: standardisation, k directions (rows, in standard units of each component), quantiser
    mean: list[Finite] | None = None
    scale: list[Finite] | None = None
    directions: list[list[Finite]] | None = None
    step: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    clip: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    # score: sorted probability edges; bin b is [edges[b-1], edges[b]) and exports edges[b-1] (0 for
    # the bottom bin), so "score >= threshold" holds exactly when it does for the full detector
    edges: list[Prob] | None = None
    # score: k-ary randomised response over the bins, epsilon per request (delta is 0)
    epsilon: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None

    @model_validator(mode="after")
    def _parameters(self) -> ExportSpec:
        need = {
            ExportLevel.harm: ("mean", "scale", "directions", "step", "clip"),
            ExportLevel.score: ("edges",),
        }.get(self.level, ())
        missing = [name for name in need if getattr(self, name) is None]
        if missing:
            raise ValueError(f"the '{self.level.value}' export level needs {', '.join(missing)}")
        if self.level == ExportLevel.score:
            edges = self.edges or []
            if not edges or any(b <= a for a, b in itertools.pairwise(edges)) or edges[0] <= 0:
                raise ValueError("score edges are increasing probabilities above 0")
        elif self.epsilon is not None:
            raise ValueError("epsilon (randomised response) applies to the score level only")
        if self.level == ExportLevel.harm:
            d = len(self.mean or [])
            if len(self.scale or []) != d or any(len(r) != d for r in self.directions or []):
                raise ValueError("harm: mean, scale and every direction have one entry per feature")
        return self

    def dim(self, spec: FingerprintSpec) -> int:
        """Values per exported record."""
        if self.level == ExportLevel.full:
            return spec.dim
        if self.level == ExportLevel.layers:
            return 3 * len(spec.layers)
        if self.level == ExportLevel.harm:
            return len(self.directions or [])
        return 1

    def values(self) -> np.ndarray | None:
        """The values a score-level record may hold (0 and the edges); None for other levels."""
        return None if self.edges is None else np.array([0.0, *self.edges])

    def privacy(self) -> dict[str, float | None]:
        """The stated differential-privacy guarantee per request (None: no formal guarantee)."""
        return {"epsilon": self.epsilon, "delta": 0.0 if self.epsilon is not None else None}

    def describe(self) -> str:
        if self.level == ExportLevel.harm:
            return f"harm/{len(self.directions or [])}x{self.step:g}"
        if self.level == ExportLevel.score:
            dp = f", eps={self.epsilon:g}" if self.epsilon is not None else ""
            return f"score/{len(self.edges or []) + 1} bins{dp}"
        return self.level.value


FULL = ExportSpec()
LAYERS = ExportSpec(level=ExportLevel.layers)


def layer_columns(spec: FingerprintSpec) -> np.ndarray:
    """The fingerprint columns of the per-layer summaries (total per token, active, entropy)."""
    return np.array([c for s in spec.layer_slices() for c in (s.total_per_token, s.active, s.entropy)])


def fit_harm(X: np.ndarray, y: np.ndarray, *, k: int = 4, step: float = 0.5, clip: float = 3.0) -> ExportSpec:
    """The ``harm`` level fitted on labelled fingerprints: PLS directions of the standardised
    features against the harm label, each rescaled to unit variance on these rows."""
    from sklearn.cross_decomposition import PLSRegression

    X = np.asarray(X, dtype=np.float64)
    mean, scale = X.mean(axis=0), X.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    Z = (X - mean) / scale
    k = max(1, min(k, Z.shape[1], len(Z) - 1))
    pls = PLSRegression(n_components=k, scale=False).fit(Z, np.asarray(y, dtype=np.float64))
    directions = pls.x_rotations_.T  # (k, d): the projection PLS applies to centred rows
    spread = (Z @ directions.T).std(axis=0)
    directions = directions / np.where(spread > 0, spread, 1.0)[:, None]
    return ExportSpec(
        level=ExportLevel.harm,
        mean=mean.tolist(),
        scale=scale.tolist(),
        directions=directions.tolist(),
        step=step,
        clip=clip,
    )


def score_edges(thresholds: Sequence[float], grid: Sequence[float] = DEFAULT_SCORE_GRID) -> list[float]:
    """Edges from the detector's operating-point thresholds and a probability grid."""
    return sorted({float(t) for t in (*thresholds, *grid) if 0.0 < float(t) <= 1.0})


def quantile_edges(
    scores: np.ndarray,
    groups: np.ndarray | None = None,
    *,
    bins: int = DEFAULT_SCORE_BINS,
    thresholds: Sequence[float] = (),
) -> list[float]:
    """Score-level edges fitted on training scores: the ``bins``-quantiles of the scores, each group
    (environment: harm domain, wrapper family, benign pool) weighted alike so a small family still
    gets edges where its scores lie, plus the operating-point thresholds (flagging stays exact).

    Why quantiles: an attacker who knows the bins picks a prompt among N candidates with chance
    about (bins / N) when every bin holds a share of the traffic, and wrapped requests crowd in a
    narrow band of high scores that a fixed probability grid lumps into one bin."""
    scores = np.asarray(scores, dtype=np.float64)
    if groups is None:
        weights = np.ones(len(scores))
    else:
        _, inverse, sizes = np.unique(np.asarray(groups), return_inverse=True, return_counts=True)
        weights = 1.0 / sizes[inverse]
    order = np.argsort(scores, kind="stable")
    mass = np.cumsum(weights[order])
    mass /= mass[-1]
    cuts = np.linspace(0.0, 1.0, bins + 1)[1:-1]
    quantiles = scores[order][np.minimum(np.searchsorted(mass, cuts), len(scores) - 1)]
    return score_edges(thresholds, [float(q) for q in quantiles])


def score_level(edges: Sequence[float], epsilon: float | None = None) -> ExportSpec:
    return ExportSpec(
        level=ExportLevel.score, edges=sorted({float(e) for e in edges if 0.0 < e <= 1.0}), epsilon=epsilon
    )


def randomised_response(bins: np.ndarray, k: int, epsilon: float, rng: np.random.Generator) -> np.ndarray:
    """k-ary randomised response: keep the true bin with probability e^eps / (e^eps + k - 1), else
    report one of the other k - 1 uniformly. Any two inputs give any output with probabilities within
    a factor e^eps of each other: (epsilon, 0)-local differential privacy per request."""
    keep = math.exp(epsilon) / (math.exp(epsilon) + k - 1)
    out = bins.copy()
    flip = rng.random(len(bins)) >= keep
    if flip.any():
        # a uniform draw among the k - 1 other bins: shift past the true one
        other = rng.integers(0, k - 1, size=int(flip.sum()))
        out[flip] = other + (other >= bins[flip])
    return out


def reduce(
    X: np.ndarray,
    export: ExportSpec,
    spec: FingerprintSpec,
    *,
    score: Callable[[np.ndarray], np.ndarray] | None = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Full fingerprints ``(n, spec.dim)`` -> what the level exports ``(n, export.dim(spec))``.

    ``score``: the on-host detector's harm probability of full fingerprints (the score level needs
    it). ``rng``: randomised response's randomness; default fresh OS entropy, as a deployment must
    (a seeded generator is for reproducible evaluation only).
    """
    X = np.asarray(X, dtype=np.float64)
    if export.level == ExportLevel.full:
        return X
    if export.level == ExportLevel.layers:
        return X[:, layer_columns(spec)]
    if export.level == ExportLevel.harm:
        Z = (X - np.asarray(export.mean)) / np.asarray(export.scale)
        P = Z @ np.asarray(export.directions).T
        return np.clip(np.round(P / export.step) * export.step, -export.clip, export.clip)  # type: ignore[operator]
    if score is None:
        raise ValueError("the score export level needs the on-host detector's scores")
    return bin_scores(score(X), export, rng=rng)[:, None]


def bin_scores(p: np.ndarray, export: ExportSpec, *, rng: np.random.Generator | None = None) -> np.ndarray:
    """Harm probabilities -> the score level's exported values (a bin's lower edge)."""
    edges = np.asarray(export.edges)
    bins = np.searchsorted(edges, np.asarray(p, dtype=np.float64), side="right")
    if export.epsilon is not None:
        bins = randomised_response(bins, len(edges) + 1, export.epsilon, rng or np.random.default_rng())
    return np.concatenate(([0.0], edges))[bins]
