"""MoEfication: real-weights reference MoEs built on CPU from pretrained dense LMs.

``routescan moefy --config configs/models/<name>.yaml --out DIR`` runs :func:`build_reference_moe`.
"""

from routescan.models.moefy.convert import (
    ConversionError,
    MoefyReport,
    build_moe_mlp,
    moefy_model,
)
from routescan.models.moefy.modules import MoEfiedMLP
from routescan.models.moefy.spec import MoefySpec
from routescan.models.moefy.store import load_moefied, save_moefied

__all__ = [
    "ConversionError",
    "MoEfiedMLP",
    "MoefyReport",
    "MoefySpec",
    "build_moe_mlp",
    "load_moefied",
    "moefy_model",
    "save_moefied",
]
