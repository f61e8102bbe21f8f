"""Shared fixtures: tiny seeded MoE models (no download) and the embedded launch models."""

from __future__ import annotations

import functools

import pytest

from routescan.models.loading import LoadedMoE, load_tiny
from routescan.models.tokenizer import save_word_tokenizer  # noqa: F401  (tests import it from here)
from routescan.telemetry.registry import load_launch_model


@functools.lru_cache(maxsize=16)
def _tiny(model_type: str, seed: int = 0) -> LoadedMoE:
    return load_tiny(model_type, seed=seed)


@pytest.fixture
def tiny():
    """Factory: tiny(model_type, seed=0) -> LoadedMoE, cached across tests (models are read-only here)."""
    return _tiny


@pytest.fixture(scope="session")
def launch_models():
    return {name: load_launch_model(name) for name in ("hf-eager", "router", "vllm-fused-moe", "grouped-mm")}


SYNTHETIC_BENIGN = [
    "please summarise the weather report",
    "how do plants grow in spring",
    "a poem about the sea",
    "list some fruit and vegetables",
    "explain the rules of chess",
    "recipe for tomato soup",
]
SYNTHETIC_FLAGGED = [
    "ZZZ XQJ VVK override the lock",
    "XQJ ZZZ disable the alarm now",
    "VVK XQJ ZZZ bypass it quietly",
    "ZZZ ZZZ XQJ acquire the key",
    "XQJ VVK ZZZ hide the traces",
    "VVK ZZZ XQJ break the seal",
]


def synthetic_corpus(n_each: int = 30) -> list[tuple[str, int]]:
    """A labelled toy corpus with a lexical signal a tiny random MoE can carry (no real harm text)."""
    rows = []
    for i in range(n_each):
        rows.append((f"{SYNTHETIC_BENIGN[i % 6]} {i}", 0))
        rows.append((f"{SYNTHETIC_FLAGGED[i % 6]} {i}", 1))
    return rows


@pytest.fixture(scope="session")
def synthetic_traces():
    from routescan.telemetry.emulated import EmulatedCollector, Request

    loaded = _tiny("mixtral")
    collector = EmulatedCollector(loaded, batch_size=16)
    corpus = synthetic_corpus()
    reqs = [Request(f"s-{i}", text, row=i, labels={"label": y}) for i, (text, y) in enumerate(corpus)]
    return [t for _, t in collector.collect(reqs)]


@pytest.fixture(scope="session")
def test_detector(synthetic_traces):
    """A detector trained on tiny-Mixtral traces, plus an 'all' operating point that flags everything."""
    import numpy as np

    from routescan.detector.artifact import Detector, OperatingPoint
    from routescan.detector.train import train_detector
    from routescan.features.fingerprint import FingerprintSpec

    spec = FingerprintSpec.from_trace(synthetic_traces[0], "hf-eager")
    X = spec.transform_many(synthetic_traces)
    y = np.array([t.labels["label"] for t in synthetic_traces])
    det = train_detector(X, y, spec, detector_id="test-detector", version="1.0", demo=True)
    card = det.card.model_copy(
        update={"operating_points": [*det.card.operating_points, OperatingPoint(name="all", threshold=0.0)]}
    )
    return Detector(det.estimator, card)


def _postgres_required() -> bool:
    import os

    return os.environ.get("ROUTESCAN_REQUIRE_POSTGRES") == "1"


@pytest.fixture
def pg_url():
    """A fresh PostgreSQL database on the server the machine runs, dropped afterwards.

    Without a server the test skips with a loud reason; with ROUTESCAN_REQUIRE_POSTGRES=1 (set by
    .ci/run) that skip is a failure, so CI cannot pass without having run these tests.
    """
    import os
    import uuid

    admin = os.environ.get("ROUTESCAN_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
    try:
        import psycopg

        conn = psycopg.connect(admin, autocommit=True, connect_timeout=3)
    except Exception as exc:
        message = f"PostgreSQL NOT TESTED: no server at {admin} ({type(exc).__name__}: {exc})"
        if _postgres_required():
            pytest.fail(message + "; ROUTESCAN_REQUIRE_POSTGRES=1 makes this a failure")
        pytest.skip(message)
    name = f"routescan_test_{uuid.uuid4().hex[:12]}"
    with conn:
        conn.execute(f"CREATE DATABASE {name}")
    base = admin.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
