"""Find launch models by name (``configs/launch/<name>.yaml``) or by path."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from routescan.config import config_dir
from routescan.telemetry.launch import LaunchModel, LaunchModelError


def available_launch_models() -> list[str]:
    folder = config_dir() / "launch"
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


@lru_cache(maxsize=32)
def _load(path: str) -> LaunchModel:
    return LaunchModel.from_yaml(path)


def load_launch_model(name_or_path: str) -> LaunchModel:
    """A built-in launch model by name, or a YAML file by path."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") and candidate.exists():
        return _load(str(candidate.resolve()))
    path = config_dir() / "launch" / f"{name_or_path}.yaml"
    if not path.exists():
        raise LaunchModelError(
            f"unknown launch model '{name_or_path}'; built-in: {', '.join(available_launch_models())} "
            "(or give the path of a launch-model YAML file)"
        )
    return _load(str(path))
