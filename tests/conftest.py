"""Shared fixtures: tiny seeded MoE models (no download) and the embedded launch models."""

from __future__ import annotations

import functools

import pytest

from routescan.models.loading import LoadedMoE, load_tiny
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
