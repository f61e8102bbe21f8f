"""Scoring with a loaded detector at one operating point: what the daemon and `routescan score` share.

An input is refused, never scored, when it carries no evidence (a trace without a single expert
launch in prefill, an all-zero fingerprint: a score there would be the intercept alone, and that
once flagged empty traces at 0.99999) or when its features or score are not finite numbers.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from routescan.detector.artifact import (
    Detector,
    DetectorCard,
    DetectorError,
    DetectorMismatch,
    OperatingPoint,
)
from routescan.features.fingerprint import Fingerprint
from routescan.files import atomic_path
from routescan.telemetry.launch import LaunchModelError
from routescan.telemetry.schema import ExportLevel, RequestTrace

Label = Literal["flagged", "ok"]
Item = RequestTrace | Fingerprint


class InputRejected(ValueError):
    """An input that cannot be scored (empty or out of range); the message names why, never values."""


def resolve_operating_point(
    card: DetectorCard,
    *,
    name: str | None = None,
    fpr: float | None = None,
    threshold: float | None = None,
) -> OperatingPoint:
    """The operating point asked for: by name, by the target FPR it was chosen for, or a custom
    threshold in [0, 1]; the card's default when none is given."""
    if sum(x is not None for x in (name, fpr, threshold)) > 1:
        raise ValueError("give one of an operating point name, a target FPR or a threshold, not several")
    if threshold is not None:
        if not math.isfinite(threshold) or not 0.0 <= threshold <= 1.0:
            raise ValueError("a threshold is a harm probability between 0 and 1 (e.g. 0.5)")
        return OperatingPoint(name="custom", threshold=threshold)
    if fpr is not None:
        if not math.isfinite(fpr) or not 0.0 < fpr < 1.0:
            raise ValueError("a target false-positive rate is a fraction between 0 and 1 (e.g. 0.01)")
        for point in card.operating_points:
            if point.target_fpr is not None and abs(point.target_fpr - fpr) < 1e-9:
                return point
        known = ", ".join(f"{p.target_fpr:g}" for p in card.operating_points if p.target_fpr is not None)
        raise DetectorError(f"the detector has no operating point at FPR {fpr:g}; it has {known or 'none'}")
    return card.operating_point(name)


def label_of(score: float, point: OperatingPoint) -> Label:
    return "flagged" if score >= point.threshold else "ok"


@dataclass(frozen=True)
class Scored:
    trace_id: str
    model_id: str
    score: float
    label: Label


class Scorer:
    """One detector at one operating point."""

    def __init__(self, detector: Detector, point: OperatingPoint) -> None:
        self.detector = detector
        self.point = point

    @property
    def card(self) -> DetectorCard:
        return self.detector.card

    def check(self, item: Item) -> None:
        """Raise :class:`DetectorMismatch` or :class:`InputRejected` for an input it cannot score."""
        if isinstance(item, RequestTrace):
            self.detector.check_trace(item)
            if item.is_empty():
                raise InputRejected(
                    f"trace {item.trace_id} routed nothing to any expert in prefill: nothing to score"
                )
        else:
            self.detector.check_fingerprint(item)
            # the score level's bottom bin is 0: a value, not an empty record
            if not any(item.values) and item.export_level != ExportLevel.score:
                raise InputRejected(f"fingerprint {item.trace_id} is all zeros: there is nothing to score")

    def features(self, items: Sequence[Item]) -> np.ndarray:
        """Feature rows of checked items, each its export level's record (a checked trace means a
        full-level detector); the traces are featurised with the detector's spec as one batch (the
        launch model applied once per distinct count)."""
        X = np.empty((len(items), self.detector.export.dim(self.detector.spec)), dtype=np.float64)
        traces = [i for i, item in enumerate(items) if isinstance(item, RequestTrace)]
        for i, item in enumerate(items):
            if not isinstance(item, RequestTrace):
                X[i] = item.values
        if traces:
            try:
                X[traces] = self.detector.spec.transform_many([items[i] for i in traces])
            except LaunchModelError as exc:
                raise InputRejected(str(exc)) from None
        return X

    def score(self, items: Sequence[Item], *, check: bool = True) -> list[Scored]:
        """Score items; the first that cannot be scored raises, naming its index in a batch."""
        for index, item in enumerate(items):
            try:
                if check:
                    self.check(item)
            except (DetectorMismatch, InputRejected) as exc:
                raise type(exc)(f"item {index}: {exc}" if len(items) > 1 else str(exc)) from None
        X = self.features(items)
        with np.errstate(over="ignore", invalid="ignore"):  # a non-finite score is refused below, not warned
            scores = self.detector.predict_proba(X)
        bad = np.flatnonzero(~np.isfinite(X).all(axis=1) | ~np.isfinite(scores))
        if bad.size:
            where = f"item {bad[0]}: " if len(items) > 1 else ""
            raise InputRejected(
                f"{where}{_item_id(items[bad[0]])}'s values are out of range: its features or score are "
                "not finite numbers"
            )
        return [
            Scored(item.trace_id, item.model_id, float(s), label_of(float(s), self.point))
            for item, s in zip(items, scores, strict=True)
        ]


def _item_id(item: Item) -> str:
    kind = "trace" if isinstance(item, RequestTrace) else "fingerprint"
    return f"{kind} {item.trace_id}"


SCORE_COLUMNS = ("row", "trace_id", "model_id", "score", "verdict")


def write_scores(out: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Scores as JSONL (each row's trace labels under ``labels``) or CSV (``labels.<key>`` columns),
    written to a temporary file and renamed, so a crash never leaves half a file. ``verdict`` is
    flagged / ok: a trace label named ``label`` keeps its own column."""
    with atomic_path(out) as tmp, tmp.open("w", encoding="utf-8", newline="") as fh:
        if out.suffix.lower() == ".csv":
            keys = list(dict.fromkeys(k for r in rows for k in r["labels"]))
            writer = csv.writer(fh)
            writer.writerow([*SCORE_COLUMNS, *(f"labels.{k}" for k in keys)])
            for r in rows:
                writer.writerow([*(r[c] for c in SCORE_COLUMNS), *(r["labels"].get(k, "") for k in keys)])
        else:
            for r in rows:
                fh.write(
                    json.dumps({**{c: r[c] for c in SCORE_COLUMNS}, "labels": r["labels"]}, allow_nan=False)
                )
                fh.write("\n")


def binary_labels(values: Sequence[Any]) -> np.ndarray | None:
    """0/1 ground truth from label values (0, 1, True, False, "0", "1"); None when they are not
    binary or only one class is present."""
    mapping = {0: 0, 1: 1, "0": 0, "1": 1}  # True / False hash as 1 / 0
    try:
        y = np.array([mapping[v] for v in values], dtype=int)
    except (KeyError, TypeError):
        return None
    return y if 0 < y.sum() < len(y) else None


def detection_report(y: np.ndarray, scores: np.ndarray, point: OperatingPoint) -> dict[str, Any]:
    """How a detector does on a labelled trace file: AUROC (95% bootstrap CI), AUPRC, TPR at 1% and
    5% FPR of this file's benign rows, and TPR / FPR at the operating point in use."""
    from routescan.detector.metrics import summarize_scores

    report: dict[str, Any] = summarize_scores(y, scores)
    flagged = scores >= point.threshold
    report["operating_point"] = point.name
    report["tpr_at_operating_point"] = float(flagged[y == 1].mean())
    report["fpr_at_operating_point"] = float(flagged[y == 0].mean())
    return report
