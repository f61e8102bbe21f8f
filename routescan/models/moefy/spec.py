"""The recipe of one reference MoE (``configs/models/*.yaml``): base model, routing design, calibration.

A recipe is data, not code, so a reviewer can read what a reference model is without reading the
converter, and the converter stores the recipe inside the model it writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from routescan.config import load_yaml


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BaseModelSource(_Strict):
    """Where the dense pretrained model comes from. Exactly one of ``path``, ``package`` or
    ``assemble``; ``--base`` on the command line overrides it with a local path."""

    path: str | None = Field(None, description="A transformers model directory or a .gguf file")
    package: str | None = Field(None, description="Importable package that ships the GGUF file")
    file: str | None = Field(None, description="GGUF file name inside `package`")
    assemble: str | None = Field(
        None, description="Importable module whose assemble() returns the GGUF file's path"
    )
    install: str = Field("", description="The command that installs the base model, for error messages")
    chat_template: bool = Field(True, description="Send prompts through the tokenizer's chat template")

    @model_validator(mode="after")
    def _one_source(self) -> BaseModelSource:
        given = [k for k in ("path", "package", "assemble") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("give exactly one of base.path, base.package (+ base.file), base.assemble")
        if self.package and not self.file:
            raise ValueError("base.package needs base.file, the GGUF file name inside the package")
        return self


class MoEDesign(_Strict):
    num_experts: int = Field(ge=2, description="Routed experts per layer (E)")
    top_k: int = Field(ge=1, description="Experts each token is computed with (k)")
    shared_neurons: int = Field(0, ge=0, description="FFN neurons moved into one always-on shared expert")
    router_hidden: int = Field(256, ge=0, description="Hidden width of the router MLP; 0 = a linear router")
    partition: Literal["coactivation", "parameters", "auto"] = Field(
        "auto", description="Neuron clustering; auto picks per layer the one with lower error"
    )

    @model_validator(mode="after")
    def _k_le_e(self) -> MoEDesign:
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) cannot exceed num_experts ({self.num_experts})")
        return self


class Calibration(_Strict):
    corpus: str = Field(
        "alpaca/harmless_train.json",
        description="Benign generic text, relative to --corpora. Only the Alpaca *train* split: the "
        "routing must know nothing of the harmful corpora or of the evaluation splits",
    )
    prompts: int = Field(1024, ge=16)
    max_tokens: int = Field(128, ge=8, description="Calibration prompts are cut here (calibration only)")
    batch_size: int = Field(16, ge=1)
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    partition_tokens: int = Field(8192, ge=256, description="Tokens that describe each neuron")


class RouterTraining(_Strict):
    epochs: int = Field(12, ge=1)
    lr: float = Field(2e-3, gt=0)
    batch_size: int = Field(1024, ge=16)
    weight_decay: float = Field(1e-4, ge=0)


class MoefySpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9._-]{1,100}$")
    description: str = ""
    base: BaseModelSource
    moe: MoEDesign
    calibration: Calibration = Calibration()
    router_training: RouterTraining = RouterTraining()
    seed: int = 0

    @classmethod
    def from_yaml(cls, path: str | Path) -> MoefySpec:
        return cls.model_validate(load_yaml(path))
