"""MoE model adapters, loaders and tiny seeded models."""

from routescan.models.adapters import (
    MoEAdapter,
    MoEArchitecture,
    MoELayer,
    UnsupportedModelError,
    get_adapter,
    register_architecture,
    supported_model_types,
)

__all__ = [
    "MoEAdapter",
    "MoEArchitecture",
    "MoELayer",
    "UnsupportedModelError",
    "get_adapter",
    "register_architecture",
    "supported_model_types",
]
