"""Save and load MoEfied models: ``config.json`` (with its ``moefication`` entry) + safetensors + tokenizer.

``from_pretrained`` cannot rebuild the MoE blocks (the config still names the dense architecture), so
loading builds the dense skeleton from the config, swaps in the MoE blocks the ``moefication`` entry
describes, then loads the weights strictly: a missing or extra tensor is an error, never a silent
random init.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from routescan.models.adapters import is_moefied
from routescan.models.moefy.convert import MOEFY_VERSION, MoefyReport, install_moe
from routescan.models.moefy.modules import MoEfiedExperts

WEIGHTS = "model.safetensors"
REPORT = "moefy-report.json"


def save_moefied(
    model: nn.Module, tokenizer: Any, out: str | Path, report: MoefyReport | None = None
) -> Path:
    """Write the model to ``out`` (created); files are written to a temporary name first, then moved,
    so an interrupted save never leaves a half-written model that looks complete."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config
    # A GGUF-loaded config remembers its quantisation; the saved weights are plain float tensors.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if report is not None:
        (out / REPORT).write_text(report.model_dump_json(indent=2), encoding="utf-8")
    tmp = out / (WEIGHTS + ".partial")
    save_model(model, str(tmp))
    tmp.replace(out / WEIGHTS)
    return out


IMPLEMENTATIONS = ("eager", "masked_dense")


def load_moefied(
    path: str | Path, *, dtype: torch.dtype = torch.float32, experts_implementation: str = "eager"
):
    """The saved MoEfied model at ``path`` (eval mode, on CPU).

    ``experts_implementation``: "eager" (per-expert kernels: what GPU collection needs) or
    "masked_dense" (same routing and output, faster on CPU; see MoEfiedExperts).
    """
    if experts_implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"a MoEfied model computes its experts with one of {IMPLEMENTATIONS}, "
            f"not {experts_implementation!r}"
        )
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if not is_moefied(config):
        raise ValueError(f"{path}: not a RouteScan MoEfied model (no config.moefication entry)")
    meta = config.moefication
    if meta["version"] != MOEFY_VERSION:
        raise ValueError(f"{path}: written by {meta['version']}; this RouteScan reads {MOEFY_VERSION}")
    weights = path / WEIGHTS
    if not weights.exists():
        raise ValueError(f"{path}: {WEIGHTS} is missing (an interrupted save?); rerun routescan moefy")
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    install_moe(model, meta)
    try:
        load_model(model, str(weights), strict=True)
    except RuntimeError as exc:  # safetensors reports missing / unexpected tensors this way
        raise ValueError(f"{path}: weights do not match the model: {exc}") from None
    for module in model.modules():
        if isinstance(module, MoEfiedExperts):
            module.implementation = experts_implementation
    model.eval()
    return model


def read_report(path: str | Path) -> MoefyReport:
    return MoefyReport.model_validate(json.loads((Path(path) / REPORT).read_text(encoding="utf-8")))
