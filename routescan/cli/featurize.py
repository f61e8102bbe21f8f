"""`routescan featurize`: traces -> a fingerprint table (Parquet or JSONL)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from routescan.cli.common import ProgressLines, SignalOption, console, friendly_errors
from routescan.features.fingerprint import FingerprintMismatch, FingerprintSpec, fingerprint
from routescan.features.table import write_table
from routescan.telemetry.io import TraceFileError, iter_trace_rows
from routescan.telemetry.launch import LaunchModelError
from routescan.telemetry.schema import ExportLevel, RequestTrace


def featurize(
    traces: Annotated[Path, typer.Argument(help="Trace file (.jsonl or .parquet) from `routescan collect`.")],
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", help="Fingerprint table, .parquet (wide, one column per feature) or .jsonl."
        ),
    ],
    skip_bad: Annotated[
        bool,
        typer.Option(help="Report and skip invalid or mismatched rows instead of stopping at the first."),
    ] = False,
    launch_model: SignalOption = None,
    export_level: Annotated[
        ExportLevel,
        typer.Option(
            help="What to write: full fingerprints (default), or a reduced level for files that leave "
            "the serving host (docs/privacy.md): layers, harm, or score (the detector's binned score). "
            "Reduced levels are written as JSONL.",
        ),
    ] = ExportLevel.full,
    detector: Annotated[
        str | None,
        typer.Option(
            help="Detector file or shipped name the score and harm levels are computed with (the one "
            "the daemon loads); it also fixes the signal.",
            show_default=False,
        ),
    ] = None,
    export_epsilon: Annotated[
        float | None,
        typer.Option(help="Score level: randomised response, epsilon per request.", show_default=False),
    ] = None,
) -> None:
    """Turn each trace into its fixed-length routing fingerprint (spec routescan.fp/1).

    Features per MoE layer: each expert's share of the layer's expert threads under the signal
    (--launch-model), the layer's threads per prompt token, the active-expert count and the routing
    entropy. All traces of one file must share a model and layer layout (taken from the first valid
    trace).
    """
    friendly_errors(_featurize)(traces, out, skip_bad, launch_model, export_level, detector, export_epsilon)


def _featurize(
    traces: Path,
    out: Path,
    skip_bad: bool,
    launch_model: str | None,
    export_level: ExportLevel = ExportLevel.full,
    detector: str | None = None,
    export_epsilon: float | None = None,
) -> None:
    if export_level != ExportLevel.full or detector is not None:
        _export(traces, out, skip_bad, launch_model, export_level, detector, export_epsilon)
        return
    spec: FingerprintSpec | None = None
    fps = []

    def add(item: RequestTrace) -> None:
        nonlocal spec
        spec = spec or FingerprintSpec.from_trace(item, launch_model)
        fps.append(fingerprint(item, spec))

    bad = _each_valid(traces, skip_bad, "featurizing", add)
    if spec is None:
        raise ValueError(f"{traces}: no valid trace to featurize")
    write_table(out, spec, fps)
    console.print(
        f"wrote {len(fps)} fingerprints of {spec.dim} features to {out}"
        + (f" ({bad} skipped)" if bad else "")
    )
    typer.echo(json.dumps({"fingerprints": len(fps), "skipped": bad, "features": spec.dim, "out": str(out)}))


def _each_valid(traces: Path, skip_bad: bool, label: str, handle: Callable[[RequestTrace], None]) -> int:
    """``handle`` each valid trace of the file; a bad row stops the run, or with ``skip_bad`` is
    reported and skipped. Returns the rows skipped."""
    bad = 0
    with ProgressLines(label, None) as bar:
        for number, item in iter_trace_rows(traces):
            try:
                if isinstance(item, TraceFileError):
                    raise item
                handle(item)
            except (TraceFileError, FingerprintMismatch, LaunchModelError) as exc:
                if not skip_bad:
                    raise ValueError(f"row {number}: {exc} (use --skip-bad to skip such rows)") from None
                bad += 1
                console.print(f"[yellow]skipped[/] row {number}: {exc}", highlight=False)
            bar.advance()
    return bad


def _export(traces, out, skip_bad, launch_model, level, detector, epsilon) -> None:
    """Records of an export level, featurised a batch of valid traces at a time."""
    from routescan.detector.artifact import Detector, detector_path
    from routescan.detector.exporter import Exporter, write_records

    det = (
        Detector.load(detector_path(detector)) if detector is not None or level in ("score", "harm") else None
    )
    exporter = Exporter(level, det, epsilon=epsilon, launch_model=launch_model)
    records, batch = [], []

    def add(item: RequestTrace) -> None:
        exporter.spec(item).check(item)  # refused here, row by row, not in the batch below
        batch.append(item)
        if len(batch) >= 256:
            records.extend(exporter.records(batch))
            batch.clear()

    bad = _each_valid(traces, skip_bad, f"exporting ({level.value})", add)
    records.extend(exporter.records(batch))
    if not records:
        raise ValueError(f"{traces}: no valid trace to export")
    write_records(out, exporter, records)
    console.print(
        f"wrote {len(records)} '{exporter.export.describe()}' records to {out}"
        + (f" ({bad} skipped)" if bad else "")
    )
    typer.echo(
        json.dumps({"records": len(records), "skipped": bad, "export_level": level.value, "out": str(out)})
    )
