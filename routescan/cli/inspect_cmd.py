"""`routescan inspect`: what a trace holds, and a layer x expert heatmap of where its threads went."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.table import Table

from routescan.cli.common import SignalOption, console, friendly_errors
from routescan.features.fingerprint import FingerprintSpec
from routescan.telemetry.io import read_traces
from routescan.telemetry.schema import RequestTrace


def share_matrices(traces: list[RequestTrace], spec: FingerprintSpec) -> np.ndarray:
    """Per trace, a layers x max-experts matrix of each expert's share of its layer's expert threads."""
    vectors = spec.transform_many(traces)
    matrix = np.full((len(traces), len(spec.layers), max(spec.experts_per_layer)), np.nan)
    for i, layer in enumerate(spec.layer_slices()):
        shares = vectors[:, layer.shares]
        matrix[:, i, : shares.shape[1]] = shares
    return matrix


def save_heatmap(matrix: np.ndarray, layers: list[int], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(
        figsize=(max(4.0, 0.35 * matrix.shape[1] + 2), max(3.0, 0.3 * matrix.shape[0] + 1.5))
    )
    image = ax.imshow(matrix, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="share of layer's expert threads")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def inspect(
    trace_file: Annotated[Path, typer.Argument(help="Trace file (.jsonl or .parquet).")],
    trace_id: Annotated[
        str | None,
        typer.Option(help="Which trace (default: the first; with --mean, all).", show_default=False),
    ] = None,
    mean: Annotated[
        bool, typer.Option(help="Summarise and plot the mean over all traces of the file.")
    ] = False,
    png: Annotated[
        Path | None, typer.Option(help="Heatmap path (default: <file>.<id>.heatmap.png).", show_default=False)
    ] = None,
    launch_model: SignalOption = None,
) -> None:
    """Summarise a trace (model, collector, what its counts measure, tokens, threads under a signal)
    and write a layer x expert heatmap PNG of each expert's share of its layer's threads."""
    friendly_errors(_inspect)(trace_file, trace_id, mean, png, launch_model)


def _inspect(
    trace_file: Path, trace_id: str | None, mean: bool, png: Path | None, launch_model: str | None
) -> None:
    traces = list(read_traces(trace_file))
    if not traces:
        raise ValueError(f"{trace_file}: no traces")
    if trace_id is not None:
        traces = [t for t in traces if t.trace_id == trace_id]
        if not traces:
            raise ValueError(f"{trace_file}: no trace with id {trace_id}")
    chosen = traces if mean else traces[:1]
    first = chosen[0]
    spec = FingerprintSpec.from_trace(first, launch_model)
    matrix = np.nanmean(share_matrices(chosen, spec), axis=0)
    label = f"mean of {len(chosen)}" if mean else first.trace_id
    each = " (mean)" if mean else ""

    table = Table(title=f"{trace_file.name}: {label}", show_header=False)
    table.add_row("model", first.model_id)
    table.add_row("collector / counts", f"{first.collector} / {first.source} {first.unit.value}")
    table.add_row("signal", f"{spec.launch_model} ({spec.unit.value})")
    table.add_row("MoE layers x experts", f"{len(first.layers)} x {max(first.experts_per_layer)}")
    table.add_row("prompt tokens" + each, f"{np.mean([t.prompt_tokens for t in chosen]):.1f}")
    table.add_row(
        f"{first.unit.value} counted" + each, f"{np.mean([t.counts.flat.sum() for t in chosen]):,.0f}"
    )
    table.add_row(
        f"{spec.unit.value} launched under the signal" + each, f"{spec.launched(chosen).mean():,.0f}"
    )
    attached = [len(t.launches) for t in chosen if t.launches is not None]
    if attached:
        table.add_row("attached kernel launches" + each, f"{np.mean(attached):.1f}")
    busiest = [
        f"L{layer}:E{int(np.nanargmax(row))} ({np.nanmax(row):.2f})"
        for layer, row in zip(first.layers, matrix, strict=True)
        if np.nansum(row) > 0
    ]
    table.add_row("busiest expert per layer", ", ".join(busiest[:8]) + (" ..." if len(busiest) > 8 else ""))
    console.print(table)

    png = png or trace_file.with_name(f"{trace_file.stem}.{'mean' if mean else first.trace_id}.heatmap.png")
    save_heatmap(matrix, first.layers, f"{first.model_id} / {spec.launch_model}: {label}", png)
    console.print(f"heatmap: {png}")
