"""Scoring with a loaded detector at one operating point: what the daemon and `routescan score` share.

An input is refused, never scored, when it carries no evidence (a trace without a single expert
launch in prefill, an all-zero fingerprint: a score there would be the intercept alone, and that
once flagged empty traces at 0.99999) or when its features or score are not finite numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from routescan.detector.artifact import (
    Detector,
    DetectorCard,
    DetectorError,
    DetectorMismatch,
    OperatingPoint,
)
from routescan.features.fingerprint import Fingerprint
from routescan.telemetry.schema import RequestTrace

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
            if not any(item.expert_threads().values()):
                raise InputRejected(
                    f"trace {item.trace_id} has no expert launches in prefill: there is nothing to score"
                )
        else:
            self.detector.check_fingerprint(item)
            if not any(item.values):
                raise InputRejected(f"fingerprint {item.trace_id} is all zeros: there is nothing to score")

    def features(self, items: Sequence[Item]) -> np.ndarray:
        """Feature rows of checked items (traces featurised with the detector's spec)."""
        X = np.empty((len(items), self.detector.spec.dim), dtype=np.float64)
        for i, item in enumerate(items):
            if isinstance(item, RequestTrace):
                X[i] = self.detector.spec.transform(item)
            else:
                X[i] = item.values
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
