"""MoE model adapters, loaders and tiny seeded models.

The adapters import torch and transformers (seconds to load), so they are imported on first use:
commands that never touch a model, such as ``routescan serve``, start without them.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "MoEAdapter",
    "MoEArchitecture",
    "MoELayer",
    "UnsupportedModelError",
    "get_adapter",
    "register_architecture",
    "supported_model_types",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from routescan.models import adapters

        return getattr(adapters, name)
    raise AttributeError(f"module 'routescan.models' has no attribute {name!r}")
