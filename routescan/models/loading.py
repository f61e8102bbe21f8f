"""Load a transformers MoE for collection: from a local directory, or a seeded tiny one.

Weights are read from disk only (``local_files_only``): the collection hosts have no model hub.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from routescan.models.adapters import MoEAdapter, get_adapter, is_moefied
from routescan.models.tiny import build_tiny_moe, tiny_model_types
from routescan.models.tokenizer import ByteTokenizer, HFPromptEncoder, PromptEncoder


class ModelLoadError(ValueError):
    """The model could not be loaded; the message says what to do."""


@dataclass
class LoadedMoE:
    model: PreTrainedModel
    encoder: PromptEncoder
    adapter: MoEAdapter
    model_id: str


def load_tiny(model_type: str, *, seed: int = 0, experts_implementation: str = "eager") -> LoadedMoE:
    try:
        model = build_tiny_moe(model_type, seed=seed, experts_implementation=experts_implementation)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from exc
    return LoadedMoE(model, ByteTokenizer(), get_adapter(model), model.config.name_or_path)


def load_pretrained(
    path: str | Path,
    *,
    experts_implementation: str = "eager",
    chat_template: bool | None = None,
    system_prompt: str | None = None,
    model_id: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> LoadedMoE:
    """Load a model saved with ``save_pretrained`` (config + weights + tokenizer) from ``path``.

    ``experts_implementation="eager"`` is the default because only transformers' per-expert loop
    launches kernels whose sizes follow per-expert token counts; transformers 5 otherwise picks
    ``grouped_mm`` (one kernel per projection, offsets kept on the device).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(
            f"{path}: not a directory. Pass a model saved with save_pretrained(), or --tiny ARCH"
        )
    if not (path / "config.json").exists():
        raise ModelLoadError(f"{path}: no config.json here; is this a transformers model directory?")
    try:
        if is_moefied(AutoConfig.from_pretrained(path, local_files_only=True)):
            # a reference MoE built by `routescan moefy`: its MoE blocks are not a transformers class
            from routescan.models.moefy.store import load_moefied

            model = load_moefied(path, dtype=dtype, experts_implementation=experts_implementation)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                path, local_files_only=True, experts_implementation=experts_implementation, dtype=dtype
            )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"{path}: could not load the model: {exc}") from exc
    model.eval()
    adapter = get_adapter(
        model
    )  # before the tokenizer: a dense model is named as such, not as a tokenizer error
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"{path}: could not load the tokenizer saved with the model: {exc}") from exc
    encoder = HFPromptEncoder(tokenizer, chat_template=chat_template, system_prompt=system_prompt)
    return LoadedMoE(model, encoder, adapter, model_id or model_id_of(model.config, path))


def model_id_of(config: Any, path: str | Path) -> str:
    """The model id traces of this model carry: the one rule every collector and the vLLM plugin use.

    A MoEfied model, and a stock checkpoint exported from one, are named by their recipe (the export
    routes exactly as its source, so a detector of one serves both); any other model by its path.
    """
    path = Path(path)
    if is_moefied(config):
        return str(config.moefication["name"])  # the recipe's name, validated as an identifier
    exported = getattr(config, "routescan_export", None)
    if isinstance(exported, dict) and isinstance(exported.get("name"), str):
        return exported["name"]
    name = getattr(config, "name_or_path", "") or path.name
    # A local path is not an identity; keep its last two components, which usually name the model.
    parts = [p for p in Path(str(name)).parts if p not in ("/", "")]
    ident = "/".join(parts[-2:]) if len(parts) > 1 else (parts[0] if parts else path.name)
    return "".join(c if c.isalnum() or c in "._:/@+-" else "-" for c in ident)[:200]


__all__ = ["LoadedMoE", "ModelLoadError", "load_pretrained", "load_tiny", "model_id_of", "tiny_model_types"]
