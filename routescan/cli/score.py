"""`routescan score`: score stored traces offline with a detector file."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from routescan.cli.common import console, friendly_errors
from routescan.detector.artifact import Detector, DetectorMismatch, default_detector_path
from routescan.telemetry.io import TraceFileError, iter_trace_rows

_CHUNK = 512


def score(
    traces: Annotated[Path, typer.Argument(help="Trace file (.jsonl or .parquet).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Scores, .jsonl or .csv (one row per trace).")],
    detector: Annotated[
        Path | None, typer.Option(help="Detector file (default: the demo detector).", show_default=False)
    ] = None,
    threshold: Annotated[
        float | None, typer.Option(help="Flag at or above this score.", show_default=False)
    ] = None,
    fpr: Annotated[
        float | None,
        typer.Option(
            help="Use the detector's operating point for this false-positive rate (e.g. 0.01).",
            show_default=False,
        ),
    ] = None,
    label_column: Annotated[
        str | None, typer.Option(help="Trace label to break the summary down by.", show_default=False)
    ] = None,
    on_bad: Annotated[
        str, typer.Option(help="Invalid or mismatched rows: 'skip' (reported) or 'fail'.")
    ] = "skip",
    fail_on_flag: Annotated[
        bool, typer.Option(help="Exit with code 3 if any trace is flagged (for pipelines).")
    ] = False,
) -> None:
    """Score every trace of a file, write one result per trace, and print a summary.

    Bad rows are reported with their row number and skipped (or stop the run with --on-bad fail);
    none is dropped silently. The output holds ids, scores and labels only.
    """
    flagged = friendly_errors(_score)(traces, out, detector, threshold, fpr, label_column, on_bad)
    if fail_on_flag and flagged:
        raise typer.Exit(code=3)


def _score(
    traces: Path,
    out: Path,
    detector_path: Path | None,
    threshold: float | None,
    fpr: float | None,
    label_column: str | None,
    on_bad: str,
) -> int:
    if on_bad not in ("skip", "fail"):
        raise ValueError("--on-bad must be 'skip' or 'fail'")
    if threshold is not None and fpr is not None:
        raise ValueError("give --threshold or --fpr, not both")
    det = Detector.load(detector_path or default_detector_path())
    card = det.card
    if fpr is not None:
        matches = [
            p for p in card.operating_points if p.target_fpr is not None and abs(p.target_fpr - fpr) < 1e-9
        ]
        if not matches:
            known = ", ".join(f"{p.target_fpr:g}" for p in card.operating_points if p.target_fpr is not None)
            raise ValueError(f"the detector has no operating point at FPR {fpr:g}; it has {known}")
        point_name, cut = matches[0].name, matches[0].threshold
    elif threshold is not None:
        point_name, cut = "custom", threshold
    else:
        point = card.operating_point()
        point_name, cut = point.name, point.threshold
    if out.suffix.lower() not in (".jsonl", ".csv"):
        raise ValueError(f"{out}: write scores as .jsonl or .csv")

    rows: list[dict] = []
    bad: list[str] = []
    pending: list = []

    def flush() -> None:
        if not pending:
            return
        X = det.spec.transform_many(t for _, t in pending)  # each was checked when queued
        for (number, trace), s in zip(pending, det.predict_proba(X), strict=True):
            rows.append(
                {
                    "row": number,
                    "trace_id": trace.trace_id,
                    "model_id": trace.model_id,
                    "score": float(s),
                    "label": "flagged" if s >= cut else "ok",
                    "group": str(trace.labels.get(label_column)) if label_column else None,
                }
            )
        pending.clear()

    with Progress(
        TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), console=console, transient=True
    ) as bar:
        task = bar.add_task("s", total=None)
        for number, item in iter_trace_rows(traces):
            try:
                if isinstance(item, TraceFileError):
                    raise item
                det.check_trace(item)
                pending.append((number, item))
            except (TraceFileError, DetectorMismatch) as exc:
                if on_bad == "fail":
                    raise ValueError(f"row {number}: {exc}") from None
                bad.append(f"row {number}: {exc}")
            if len(pending) >= _CHUNK:
                flush()
            bar.advance(task)
        flush()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        if out.suffix.lower() == ".csv":
            fh.write("row,trace_id,model_id,score,label\n")
            for r in rows:
                fh.write(f"{r['row']},{r['trace_id']},{r['model_id']},{r['score']:.6f},{r['label']}\n")
        else:
            for r in rows:
                fh.write(json.dumps({k: v for k, v in r.items() if k != "group"}) + "\n")
    tmp.replace(out)

    for line in bad:
        console.print(f"[yellow]skipped[/] {line}", highlight=False)
    table = Table(
        title=f"{traces.name}: {card.detector_id} {card.version}{' (DEMO)' if card.demo else ''}, "
        f"operating point {point_name} (threshold {cut:.4f})"
    )
    by = "model_id" if label_column is None else "group"
    table.add_column(by if by == "model_id" else label_column)
    table.add_column("scored", justify="right")
    table.add_column("flagged", justify="right")
    table.add_column("flagged %", justify="right")
    totals, flags = Counter(r[by] for r in rows), Counter(r[by] for r in rows if r["label"] == "flagged")
    for key in sorted(totals):
        table.add_row(str(key), str(totals[key]), str(flags[key]), f"{100 * flags[key] / totals[key]:.1f}")
    console.print(table)
    n_flagged = sum(flags.values())
    typer.echo(
        json.dumps(
            {
                "scored": len(rows),
                "flagged": n_flagged,
                "skipped": len(bad),
                "out": str(out),
                "operating_point": point_name,
                "threshold": cut,
            }
        )
    )
    return n_flagged
