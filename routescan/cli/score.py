"""`routescan score`: score stored traces offline with a detector file."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.table import Table

from routescan.cli.common import ProgressLines, console, friendly_errors
from routescan.detector.artifact import Detector, DetectorMismatch
from routescan.detector.artifact import detector_path as resolve_detector
from routescan.detector.scoring import (
    InputRejected,
    Scorer,
    binary_labels,
    detection_report,
    resolve_operating_point,
    write_scores,
)
from routescan.telemetry.io import TraceFileError, iter_trace_rows
from routescan.telemetry.schema import RequestTrace

_CHUNK = 512


def score(
    traces: Annotated[Path, typer.Argument(help="Trace file (.jsonl or .parquet).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Scores, .jsonl or .csv (one row per trace).")],
    detector: Annotated[
        Path | None,
        typer.Option(
            help="Detector file, or a shipped reference detector's name (e.g. smollm2-e32k16-shared-router). "
            "Default: the demo detector.",
            show_default=False,
        ),
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
        str | None,
        typer.Option(
            help="Trace label to break the summary down by. When its values are 0 / 1 (harmful = 1), "
            "also report AUROC, AUPRC and TPR / FPR at the operating point: how the detector does "
            "on this labelled file.",
            show_default=False,
        ),
    ] = None,
    on_bad: Annotated[
        str, typer.Option(help="Invalid or mismatched rows: 'skip' (reported) or 'fail'.")
    ] = "skip",
    fail_on_flag: Annotated[
        bool, typer.Option(help="Exit with code 3 if any trace is flagged (for pipelines).")
    ] = False,
) -> None:
    """Score every trace of a file, write one result per trace, and print a summary.

    Bad rows (invalid, another model's, empty, out of range, not UTF-8) are reported with their row
    number and skipped (or stop the run with --on-bad fail); none is dropped silently. Exit codes:
    0 scored, 2 bad input or nothing could be scored, 3 something flagged with --fail-on-flag. The
    output holds ids, scores, the verdict (flagged / ok) and the traces' own labels; never text.
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
    if out.suffix.lower() not in (".jsonl", ".csv"):
        raise ValueError(f"{out}: write scores as .jsonl or .csv")
    det = Detector.load(resolve_detector(detector_path))
    card = det.card
    point = resolve_operating_point(card, fpr=fpr, threshold=threshold)
    scorer = Scorer(det, point)

    rows: list[dict] = []
    bad: list[str] = []
    pending: list[tuple[int, RequestTrace]] = []

    def skip(number: int, exc: Exception) -> None:
        if on_bad == "fail":
            raise ValueError(f"row {number}: {exc}") from None
        bad.append(f"row {number}: {exc}")

    def flush() -> None:
        if not pending:
            return
        try:
            scored = scorer.score([t for _, t in pending], check=False)  # each was checked when queued
            results = list(zip(pending, scored, strict=True))
        except InputRejected:  # one row out of range: score the chunk row by row to name it
            results = []
            for number, trace in pending:
                try:
                    results.append(((number, trace), scorer.score([trace], check=False)[0]))
                except InputRejected as exc:
                    skip(number, exc)
        for (number, trace), s in results:
            rows.append(
                {
                    "row": number,
                    "trace_id": s.trace_id,
                    "model_id": s.model_id,
                    "score": s.score,
                    "verdict": s.label,
                    "labels": dict(trace.labels),
                    "group": str(trace.labels.get(label_column)) if label_column else None,
                }
            )
        pending.clear()

    with ProgressLines("scoring", None) as bar:
        for number, item in iter_trace_rows(traces):
            try:
                if isinstance(item, TraceFileError):
                    raise item
                scorer.check(item)
                pending.append((number, item))
            except (TraceFileError, DetectorMismatch, InputRejected) as exc:
                skip(number, exc)
            if len(pending) >= _CHUNK:
                flush()
            bar.advance()
        flush()

    for line in bad:
        console.print(f"[yellow]skipped[/] {line}", highlight=False)
    if not rows:
        raise NothingScored(
            f"{traces}: no trace could be scored ({len(bad)} row(s) skipped, see above)"
            if bad
            else f"{traces}: the file holds no traces"
        )
    write_scores(out, rows)

    table = Table(
        title=f"{traces.name}: {card.detector_id} {card.version}{' (DEMO)' if card.demo else ''}, "
        f"operating point {point.name} (threshold {point.threshold:.4f})"
    )
    by = "model_id" if label_column is None else "group"
    table.add_column(by if by == "model_id" else label_column)
    table.add_column("scored", justify="right")
    table.add_column("flagged", justify="right")
    table.add_column("flagged %", justify="right")
    totals, flags = Counter(r[by] for r in rows), Counter(r[by] for r in rows if r["verdict"] == "flagged")
    for key in sorted(totals):
        table.add_row(str(key), str(totals[key]), str(flags[key]), f"{100 * flags[key] / totals[key]:.1f}")
    console.print(table)
    evaluation = None
    if label_column is not None:
        y = binary_labels([r["labels"].get(label_column) for r in rows])
        if y is None:
            console.print(f"(no detection report: '{label_column}' is not 0 / 1 with both classes present)")
        else:
            evaluation = ev = detection_report(y, np.array([r["score"] for r in rows]), point)
            console.print(
                f"detection on this file ({ev['n_harmful']} harmful, {ev['n_benign']} benign by "
                f"'{label_column}'): AUROC {ev['auroc']:.3f}, AUPRC {ev['auprc']:.3f}, "
                f"TPR {ev['tpr_at_operating_point']:.3f} / FPR {ev['fpr_at_operating_point']:.3f} "
                f"at {point.name}",
                highlight=False,
            )
    n_flagged = sum(flags.values())
    typer.echo(
        json.dumps(
            {
                "scored": len(rows),
                "flagged": n_flagged,
                "skipped": len(bad),
                "out": str(out),
                "operating_point": point.name,
                "threshold": point.threshold,
                **({"evaluation": evaluation} if evaluation is not None else {}),
            },
            allow_nan=False,
        )
    )
    return n_flagged


class NothingScored(ValueError):
    """Every row was skipped, or there were none: a pipeline must not read that as 'nothing flagged'."""
