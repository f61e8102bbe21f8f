"""Export levels: what each computes, the guarantees they state, and the attack metric's tie rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from routescan.features.fingerprint import FingerprintSpec
from routescan.privacy.inversion import _hits
from routescan.privacy.levels import (
    FULL,
    LAYERS,
    ExportLevel,
    ExportSpec,
    bin_scores,
    fit_harm,
    layer_columns,
    randomised_response,
    reduce,
    score_level,
)

SPEC = FingerprintSpec(
    model_id="m", launch_model="router", unit="tokens", layers=[0, 1, 2], experts_per_layer=[4, 4, 4]
)


def _data(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    X = rng.normal(size=(n, SPEC.dim))
    X[:, 0] += 2.0 * y  # one harm direction among noise
    return X, y


def test_full_and_layers_select_what_they_say() -> None:
    X, _ = _data()
    assert reduce(X, FULL, SPEC) is not None and np.array_equal(reduce(X, FULL, SPEC), X)
    names = SPEC.feature_names()
    kept = [names[c] for c in layer_columns(SPEC)]
    assert len(kept) == LAYERS.dim(SPEC) == 9
    assert all(not n.endswith(".share") for n in kept)  # no per-expert share survives
    assert np.array_equal(reduce(X, LAYERS, SPEC), X[:, layer_columns(SPEC)])


def test_harm_projection_is_quantised_clipped_and_keeps_the_harm_direction() -> None:
    X, y = _data()
    export = fit_harm(X, y, k=2, step=0.5, clip=2.0)
    R = reduce(X, export, SPEC)
    assert R.shape == (len(X), 2) == (len(X), export.dim(SPEC))
    assert np.allclose(R / 0.5, np.round(R / 0.5)) and np.abs(R).max() <= 2.0
    # the first component carries the label (it was fitted for harm)
    assert abs(np.corrcoef(R[:, 0], y)[0, 1]) > 0.5
    # it round-trips through its JSON form (the detector card carries it)
    again = ExportSpec.model_validate_json(export.model_dump_json())
    assert np.array_equal(reduce(X, again, SPEC), R)


def test_score_level_flags_exactly_as_the_full_detector() -> None:
    thresholds = [0.87, 0.62]
    export = score_level(thresholds)
    assert export.edges == sorted(export.edges) and {0.87, 0.62} <= set(export.edges)
    p = np.random.default_rng(1).random(5000)
    values = bin_scores(p, export)
    assert set(np.unique(values)) <= set(export.values())
    for t in thresholds:
        assert np.array_equal(values >= t, p >= t)
    # more bins, more distinct values; never more than edges + 1
    assert len(np.unique(values)) == len(export.edges) + 1


def test_randomised_response_keeps_its_stated_epsilon() -> None:
    k, eps = 4, 1.0
    rng = np.random.default_rng(0)
    n = 40_000
    out_a = randomised_response(np.zeros(n, dtype=int), k, eps, rng)
    out_b = randomised_response(np.full(n, 3), k, eps, rng)
    pa = np.bincount(out_a, minlength=k) / n
    pb = np.bincount(out_b, minlength=k) / n
    keep = math.exp(eps) / (math.exp(eps) + k - 1)
    assert pa[0] == pytest.approx(keep, abs=0.01)
    # any output is at most e^eps times likelier under one input than another (sampling slack)
    assert (np.maximum(pa / pb, pb / pa) <= math.exp(eps) * 1.1).all()
    assert score_level([0.9], epsilon=eps).privacy() == {"epsilon": eps, "delta": 0.0}
    assert FULL.privacy() == {"epsilon": None, "delta": None}


def test_invalid_levels_say_what_is_missing() -> None:
    with pytest.raises(ValidationError, match="needs mean, scale, directions, step, clip"):
        ExportSpec(level=ExportLevel.harm)
    with pytest.raises(ValidationError, match="needs edges"):
        ExportSpec(level=ExportLevel.score)
    with pytest.raises(ValidationError, match="increasing"):
        ExportSpec(level=ExportLevel.score, edges=[0.5, 0.3])
    with pytest.raises(ValidationError, match="score level only"):
        ExportSpec(level=ExportLevel.layers, epsilon=1.0)
    with pytest.raises(ValueError, match="on-host detector"):
        reduce(np.zeros((1, SPEC.dim)), score_level([0.5]), SPEC)


def test_retrieval_breaks_ties_at_random() -> None:
    # truth alone on top: found; tied with 9 others: found one time in ten; below one: not top-1
    assert _hits(np.array([1.0, 0.0, 0.0]), 1) == 1.0
    assert _hits(np.array([1.0] * 10 + [0.0] * 90), 1) == pytest.approx(0.1)
    assert _hits(np.array([1.0] * 10 + [0.0] * 90), 10) == 1.0
    assert _hits(np.array([0.5, 1.0, 0.0]), 1) == 0.0


def test_a_rerun_of_invert_keeps_the_frontier_and_hand_written_parts(tmp_path) -> None:
    from routescan.privacy.report import FRONTIER_END, FRONTIER_START, HAND_WRITTEN, kept_sections, splice

    doc = tmp_path / "privacy.md"
    doc.write_text(f"# generated\n\nold tables\n\n{HAND_WRITTEN}\n\nmy notes\n")
    doc.write_text(splice(doc.read_text(), f"{FRONTIER_START}\nfrontier v1\n{FRONTIER_END}"))
    kept = kept_sections(doc)
    assert "old tables" not in kept and kept.count("frontier v1") == 1 and "my notes" in kept
    # a frontier above the marker is kept too, once
    doc.write_text(f"# generated\n{FRONTIER_START}\nfrontier v2\n{FRONTIER_END}\n{HAND_WRITTEN}\nnotes\n")
    assert kept_sections(doc).count("frontier v2") == 1
    assert kept_sections(tmp_path / "missing.md") == ""


def test_the_network_default_is_the_measured_frontier_recommendation() -> None:
    """The daemon's default beyond loopback is the level docs/privacy.md's frontier recommends, and
    the shipped reference detector carries its fitted bins."""
    import json
    from pathlib import Path

    from routescan.detector.artifact import Detector, detector_path
    from routescan.privacy.frontier import DEFAULT_RECIPES
    from routescan.privacy.levels import DEFAULT_SCORE_BINS, NETWORK_DEFAULT

    results = json.loads((Path(__file__).parents[1] / "docs" / "privacy-frontier.json").read_text())
    recommended = {r.name: r for r in DEFAULT_RECIPES}[results["recommended"]]
    assert recommended.level == NETWORK_DEFAULT and recommended.bins == DEFAULT_SCORE_BINS
    assert recommended.epsilon is None and not recommended.exact
    reference = Detector.load(detector_path("smollm2-e32k16-shared-router"))
    edges = reference.card.score_bins
    assert edges and {p.threshold for p in reference.card.operating_points} <= set(edges)
    assert reference.at_level(NETWORK_DEFAULT).export.edges == edges
