"""Find and load the dense base model of a recipe, from a local path or a GGUF file shipped on PyPI.

GGUF loading needs ``gguf`` and ``accelerate``, which only the converter uses: they live in the
``moefy`` extra so the core install stays light, and a missing one is named with its install command.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from routescan.models.moefy.spec import BaseModelSource


class BaseModelError(ValueError):
    """The base model could not be found or loaded; the message says what to do."""


@dataclass(frozen=True)
class ResolvedBase:
    directory: Path
    gguf_file: str | None  # None: a transformers model directory

    def describe(self) -> str:
        return str(self.directory / self.gguf_file) if self.gguf_file else str(self.directory)


def _require_gguf_support() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise BaseModelError(
            f"loading a GGUF base model needs {' and '.join(missing)}: "
            "pip install -c constraints.txt -e '.[moefy]'  (or: pip install 'routescan[moefy]')"
        )


def _from_path(path: Path) -> ResolvedBase:
    if path.is_file() and path.suffix == ".gguf":
        return ResolvedBase(path.parent, path.name)
    if path.is_dir() and (path / "config.json").exists():
        return ResolvedBase(path, None)
    raise BaseModelError(f"{path}: neither a .gguf file nor a transformers model directory (config.json)")


def resolve_base(source: BaseModelSource, override: str | Path | None = None) -> ResolvedBase:
    """Where the base model's files are, without loading them."""
    if override is not None:
        return _from_path(Path(override))
    if source.path:
        return _from_path(Path(source.path).expanduser())
    hint = f" Install it with: {source.install}" if source.install else ""
    module = source.package or source.assemble or ""
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise BaseModelError(f"the base model package '{module}' is not installed.{hint}")
    if source.package:
        assert spec.submodule_search_locations is not None and source.file is not None
        for folder in spec.submodule_search_locations:
            candidate = Path(folder) / source.file
            if candidate.exists():
                return ResolvedBase(candidate.parent, candidate.name)
        raise BaseModelError(f"'{source.file}' is not inside the installed package '{module}'.{hint}")
    try:
        path = Path(importlib.import_module(module).assemble())
    except Exception as exc:  # the assembler is third-party code; any failure is a setup problem
        raise BaseModelError(f"{module}.assemble() failed: {exc}.{hint}") from exc
    return _from_path(path)


def load_base(resolved: ResolvedBase, *, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of the dense base model, dequantised to ``dtype`` when it is a GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict = {"local_files_only": True}
    if resolved.gguf_file:
        _require_gguf_support()
        kwargs["gguf_file"] = resolved.gguf_file
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved.directory, dtype=dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(resolved.directory, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise BaseModelError(f"{resolved.describe()}: could not load the base model: {exc}") from exc
    model.eval()
    return model, tokenizer
