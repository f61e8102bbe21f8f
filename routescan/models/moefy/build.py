"""Build one reference MoE from its recipe: resolve + load the dense base, calibrate, convert, save."""

from __future__ import annotations

from pathlib import Path

from routescan.models.moefy.convert import (
    ConversionError,
    MoefyReport,
    Progress,
    calibration_prompts,
    moefy_model,
)
from routescan.models.moefy.sources import load_base, resolve_base
from routescan.models.moefy.spec import MoefySpec
from routescan.models.moefy.store import save_moefied
from routescan.models.tokenizer import HFPromptEncoder


def build_reference_moe(
    spec: MoefySpec,
    *,
    corpora: str | Path,
    out: str | Path,
    base: str | Path | None = None,
    progress: Progress | None = None,
) -> MoefyReport:
    """Convert the recipe's base model and save the MoE under ``out``; returns the conversion report.

    The calibration prompts are tokenised exactly as served requests will be (chat template when the
    recipe says so) so the routers learn the inputs they will see; prompts are cut at
    ``calibration.max_tokens`` for calibration only.
    """
    out = Path(out)
    if (out / "model.safetensors").exists():
        raise ConversionError(f"{out} already holds a model; choose another --out or delete it first")
    prompts = calibration_prompts(Path(corpora), spec)  # fail on a bad corpus before the slow load
    resolved = resolve_base(spec.base, base)
    model, tokenizer = load_base(resolved)
    encoder = HFPromptEncoder(tokenizer, chat_template=spec.base.chat_template)
    sequences = [encoder.encode(p)[: spec.calibration.max_tokens] for p in prompts]
    report = moefy_model(
        model, sequences, spec, pad_id=encoder.pad_id, base=resolved.describe(), progress=progress
    )
    save_moefied(model, tokenizer, out, report)
    return report
