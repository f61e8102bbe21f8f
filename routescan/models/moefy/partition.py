"""Split one FFN's neurons into equal-sized experts (MoEfication's expert construction step).

Two neuron descriptions, as in Zhang et al. (2022):

- ``coactivation``: each neuron is described by its activation magnitudes over calibration tokens, so
  neurons that fire together land in the same expert and a token needs few experts;
- ``parameters``: each neuron is described by its own input weights (gate and up rows), which needs
  no data but groups neurons only by what they look at.

Both are clustered with balanced k-means: experts must have equal sizes to be stacked into one
``[E, I, H]`` tensor, so the assignment step fills clusters greedily by similarity under a capacity.
"""

from __future__ import annotations

import numpy as np
import torch

PARTITIONS = ("coactivation", "parameters")


def _normalize(rows: np.ndarray) -> np.ndarray:
    rows = rows - rows.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.maximum(norms, 1e-12)


def _balanced_assign(similarity: np.ndarray, capacity: int) -> np.ndarray:
    """Each row to a column, at most ``capacity`` rows per column, best pairs first."""
    n, k = similarity.shape
    order = np.argsort(-similarity, axis=None, kind="stable")
    assignment = np.full(n, -1, dtype=np.int64)
    filled = np.zeros(k, dtype=np.int64)
    remaining = n
    for flat in order:
        row, col = divmod(int(flat), k)
        if assignment[row] >= 0 or filled[col] >= capacity:
            continue
        assignment[row] = col
        filled[col] += 1
        remaining -= 1
        if remaining == 0:
            break
    return assignment


def balanced_kmeans(
    features: np.ndarray, num_clusters: int, *, iterations: int = 20, seed: int = 0
) -> np.ndarray:
    """Cluster the rows of ``features`` (cosine similarity) into ``num_clusters`` equal-size groups.

    Returns the cluster of each row. ``len(features)`` must be a multiple of ``num_clusters``.
    """
    n = features.shape[0]
    if n % num_clusters:
        raise ValueError(f"{n} neurons cannot be split into {num_clusters} equal experts")
    capacity = n // num_clusters
    x = _normalize(np.asarray(features, dtype=np.float64))
    rng = np.random.default_rng(seed)
    # k-means++ seeding on cosine distance: spread-out starting centres converge to better partitions
    centres = [int(rng.integers(n))]
    dist = 1.0 - x @ x[centres[0]]
    for _ in range(1, num_clusters):
        prob = np.clip(dist, 0, None) ** 2
        total = prob.sum()
        pick = int(rng.choice(n, p=prob / total)) if total > 0 else int(rng.integers(n))
        centres.append(pick)
        dist = np.minimum(dist, 1.0 - x @ x[pick])
    c = x[centres]
    assignment = np.full(n, -1, dtype=np.int64)
    for _ in range(iterations):
        new = _balanced_assign(x @ c.T, capacity)
        if np.array_equal(new, assignment):
            break
        assignment = new
        for j in range(num_clusters):
            mean = x[assignment == j].mean(axis=0)
            c[j] = mean / max(np.linalg.norm(mean), 1e-12)
    return assignment


def neuron_features(
    kind: str,
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    activations: torch.Tensor | None,
) -> np.ndarray:
    """Per-neuron description ``[I, d]`` for :func:`balanced_kmeans`.

    ``activations`` is ``[tokens, I]`` (activation x up, the value multiplied into down_proj), needed
    for ``coactivation`` only.
    """
    if kind == "coactivation":
        if activations is None:
            raise ValueError("the coactivation partition needs calibration activations")
        return activations.abs().T.double().numpy()
    if kind == "parameters":
        return torch.cat([gate_weight, up_weight], dim=1).double().numpy()
    raise ValueError(f"unknown partition '{kind}'; choose one of {', '.join(PARTITIONS)}")


def shared_neurons(importance: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` neurons every token leans on most (the always-on shared expert)."""
    if count <= 0:
        return torch.empty(0, dtype=torch.long)
    return torch.sort(torch.topk(importance, count).indices).values


def partition_neurons(
    kind: str,
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    activations: torch.Tensor | None,
    *,
    num_experts: int,
    shared: torch.Tensor,
    seed: int = 0,
) -> list[torch.Tensor]:
    """The neuron indices of each routed expert (sorted), excluding the ``shared`` ones."""
    intermediate = gate_weight.shape[0]
    keep = torch.ones(intermediate, dtype=torch.bool)
    keep[shared] = False
    routed = torch.nonzero(keep).flatten()
    if routed.numel() % num_experts:
        raise ValueError(
            f"{routed.numel()} routed neurons (FFN width {intermediate} minus {shared.numel()} shared) "
            f"cannot be split into {num_experts} equal experts; choose num_experts / shared_neurons so "
            "that the remainder divides evenly"
        )
    acts = activations[:, routed] if activations is not None else None
    feats = neuron_features(kind, gate_weight[routed], up_weight[routed], acts)
    assignment = torch.from_numpy(balanced_kmeans(feats, num_experts, seed=seed))
    return [torch.sort(routed[assignment == e]).values for e in range(num_experts)]
