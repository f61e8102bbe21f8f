"""Fit a launch model's GEMM tile table to the grids a GPU really launched (CUPTI records).

The emulator's ``hf-eager`` launch model assumes cuBLAS tile choices per problem size. On a given GPU
cuBLAS may choose others; this module reads them back from a CUPTI trace's attached kernel launches
joined to the same requests' routed counts, and writes ``choose`` rows that reproduce them.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from routescan.telemetry.schema import Region, RequestTrace

GEMM_SLOTS = ("gemm_gate_up", "gemm_down")  # the eager loop's two GEMMs per hit expert, in order
Observation = tuple[int, tuple[int, int, int], tuple[int, int, int]]  # (M, grid, block)


def gemm_observations(pairs: Iterable[tuple[RequestTrace, RequestTrace]]) -> dict[str, list[Observation]]:
    """GEMM slot -> [(M, grid, block)] from (CUPTI trace with launches attached, routed-count trace
    of the same request): each expert's GEMM launches, in launch order, with M its routed count."""
    out: dict[str, list[Observation]] = defaultdict(list)
    for measured, routed in pairs:
        if measured.launches is None:
            raise ValueError(
                f"trace {measured.trace_id} has no kernel launches attached: collect it with "
                "--attach-launches (CuptiCollector(attach=True))"
            )
        index = {layer: i for i, layer in enumerate(routed.layers)}
        rows = routed.counts.rows(routed.experts_per_layer)
        per: dict[tuple[int, int], list] = defaultdict(list)
        for launch in measured.launches:
            if launch.region == Region.expert and "gemm" in launch.kernel.lower():
                per[(launch.layer, launch.expert)].append(launch)  # type: ignore[arg-type]
        for (layer, expert), launches in per.items():
            m = int(rows[index[layer]][expert])
            for slot, launch in zip(GEMM_SLOTS, launches, strict=False):
                out[slot].append((m, tuple(launch.grid), tuple(launch.block)))  # type: ignore[arg-type]
    return out


def fit_tiles(obs: Iterable[Observation], gm: int) -> list[dict[str, Any]]:
    """``choose`` rows (``when: GN <= m``, then TM, TN, CTA, SPLITK) that reproduce the observed grids
    of one GEMM whose other dimension is ``gm``: tiles are read off the grid and rounded up to powers
    of two, and neighbouring sizes with the same tiles share a row."""
    rows: list[dict[str, Any]] = []
    for m, grid, block in sorted(obs):
        cta = block[0] * block[1] * block[2]
        tm = -(-gm // max(grid[0], 1))
        tn = -(-m // max(grid[1], 1))
        tm, tn = 1 << (tm - 1).bit_length(), 1 << (tn - 1).bit_length()
        row = {"TM": tm, "TN": tn, "CTA": cta, "SPLITK": grid[2]}
        if rows and rows[-1]["set"] == row:
            rows[-1]["max"] = m
        else:
            rows.append({"max": m, "set": row})
    return [{"when": f"GN <= {r['max']}", "set": r["set"]} for r in rows[:-1]] + (
        [{"set": rows[-1]["set"]}] if rows else []
    )


def fitted_launch_model(
    base: Mapping[str, Any], obs: Mapping[str, list[Observation]], dims: Mapping[str, int], *, name: str
) -> dict[str, Any]:
    """A copy of the launch-model document ``base`` (configs/launch/hf-eager.yaml as loaded) whose
    GEMM kernels choose the tiles observed in ``obs``; ``dims``: the layer's formula variables."""
    fitted = copy.deepcopy(dict(base))
    fitted["name"] = name[:64]
    fitted["description"] = f"{base.get('name', 'launch model')} with GEMM tiles fitted to CUPTI records"
    for kernel in fitted["kernels"]:
        if kernel["name"] in obs:
            gm = dims["G"] * dims["I"] if kernel["name"] == "gemm_gate_up" else dims["H"]
            kernel["choose"] = fit_tiles(obs[kernel["name"]], gm)
    return fitted
