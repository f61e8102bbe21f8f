"""Where configuration lives: ``configs/`` in a checkout, a packaged copy in a wheel.

``ROUTESCAN_CONFIG_DIR`` overrides both, so an operator can ship a fitted launch table (for
example one written by scripts/validate_cupti.py) without rebuilding the package.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

_PACKAGE = Path(__file__).resolve().parent


def config_dir() -> Path:
    env = os.environ.get("ROUTESCAN_CONFIG_DIR")
    if env:
        return Path(env)
    for candidate in (_PACKAGE / "_configs", _PACKAGE.parent / "configs"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        "RouteScan's configs/ folder was not found; set ROUTESCAN_CONFIG_DIR to a copy of it"
    )


def load_yaml(path: str | Path) -> dict[str, Any]:
    with Path(path).open("r", encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a YAML mapping at the top level")
    return data


def section_defaults(file: str, section: str | None = None) -> dict[str, Any]:
    """Defaults of one CLI command from ``configs/<file>`` (empty if the file is absent)."""
    path = config_dir() / file
    if not path.exists():
        return {}
    data = load_yaml(path)
    return dict(data.get(section, {}) if section else data)
