"""Detector artifacts: a fitted scikit-learn estimator plus the card that says what it reads.

One zip file holds ``card.json`` (pydantic, versioned) and ``estimator.skops`` (skops, never
pickle). A detector file may come from elsewhere, so loading it must not run code:

- sizes are read from the zip directories and capped before anything is decompressed (a zip bomb
  is refused, not inflated);
- the types skops does not trust by itself must each be on :data:`TRUSTED_TYPES`, an exact list of
  the few estimator internals RouteScan's detectors use (a prefix such as ``builtins.`` once let a
  file call ``builtins.eval``);
- the loaded object must be of one of :data:`ESTIMATOR_TYPES`, the type the card names.

The card pins the model, launch model and fingerprint spec the detector was trained on; scoring a
trace of anything else is refused with a clear message.
"""

from __future__ import annotations

import io
import zipfile
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy.special import expit

from routescan.features.fingerprint import Fingerprint, FingerprintMismatch, FingerprintSpec
from routescan.files import atomic_path
from routescan.privacy.levels import DEFAULT_SCORE_GRID, ExportSpec, score_edges, score_level
from routescan.telemetry.schema import ExportLevel, RequestTrace

CARD_SCHEMA: Literal["routescan.detector/1"] = "routescan.detector/1"
# Types skops reports as untrusted in RouteScan's own detectors (checked by a test that saves one
# of each); anything else in a file is refused by exact name.
TRUSTED_TYPES = frozenset(
    {
        "routescan.detector.invariant.InvariantRiskClassifier",
        "sklearn.calibration._CalibratedClassifier",
        "sklearn.calibration._SigmoidCalibration",
        # the calibration folds of routescan train's detectors: one fold number per training row
        "sklearn.model_selection._split.PredefinedSplit",
        "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    }
)
# What a loaded estimator may be (the card's ``estimator_type`` names one).
ESTIMATOR_TYPES = frozenset(
    {
        "sklearn.pipeline.Pipeline",
        "sklearn.linear_model._logistic.LogisticRegression",
        "sklearn.calibration.CalibratedClassifierCV",
        "sklearn.ensemble._hist_gradient_boosting.gradient_boosting.HistGradientBoostingClassifier",
        "routescan.detector.invariant.InvariantRiskClassifier",
    }
)
MAX_CARD_BYTES = 1 << 20
MAX_ESTIMATOR_BYTES = 256 << 20  # uncompressed, all members of the skops archive together


def type_name(obj: object) -> str:
    kind = type(obj)
    return f"{kind.__module__}.{kind.__qualname__}"


def default_detector_path() -> Path:
    """The demo detector shipped inside the package (see routescan/detector/default/MODEL_CARD.md)."""
    return Path(str(resources.files("routescan.detector") / "default" / "demo-detector.zip"))


def shipped_detectors() -> dict[str, Path]:
    """The reference detectors shipped in the package (routescan/detector/reference/), by name."""
    folder = Path(str(resources.files("routescan.detector") / "reference"))
    return {p.stem: p for p in sorted(folder.glob("*.zip"))} if folder.is_dir() else {}


def detector_path(value: str | Path | None) -> Path:
    """Where a ``--detector`` value points: nothing is the demo detector; the name of a shipped
    reference detector (a file stem in routescan/detector/reference/, when no such path exists) is
    its file; anything else is a path."""
    if value is None:
        return default_detector_path()
    path = Path(value)
    if not path.exists() and str(value) in (shipped := shipped_detectors()):
        return shipped[str(value)]
    return path


class DetectorError(ValueError):
    """The detector file is missing, unreadable or untrusted."""


class DetectorMismatch(FingerprintMismatch):
    """Input produced by another model, launch model or fingerprint spec than the detector's."""


class OperatingPoint(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    threshold: Annotated[float, Field(ge=0.0, le=1.0)]
    target_fpr: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    measured_fpr: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    measured_tpr: Annotated[float, Field(ge=0.0, le=1.0)] | None = None


class DetectorCard(BaseModel):
    """What a detector is, what it reads, how it was trained and how it did."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal["routescan.detector/1"] = CARD_SCHEMA
    detector_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9._:\-]{1,128}$")]
    version: Annotated[str, Field(pattern=r"^[A-Za-z0-9._+\-]{1,64}$")]
    created: datetime = Field(default_factory=lambda: datetime.now(UTC))
    demo: bool = False
    spec: FingerprintSpec
    operating_points: list[OperatingPoint]
    default_operating_point: str
    estimator: str
    # The loaded object's exact type; files written before this field load if their type is one of
    # ESTIMATOR_TYPES.
    estimator_type: str | None = None
    training_command: str = ""
    corpus: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    notes: str = ""
    # the export level of the records it scores (routescan.privacy.levels); a card written before
    # export levels reads full fingerprints
    export: ExportSpec = Field(default_factory=ExportSpec)
    # the score level's bin edges, fitted on training scores (routescan.privacy.levels.quantile_edges)
    score_bins: list[Annotated[float, Field(gt=0.0, le=1.0)]] | None = None

    def operating_point(self, name: str | None = None) -> OperatingPoint:
        wanted = name or self.default_operating_point
        for point in self.operating_points:
            if point.name == wanted:
                return point
        raise DetectorError(
            f"operating point '{wanted}' is not in this detector; it has "
            f"{', '.join(p.name for p in self.operating_points)}"
        )


def _linear_form(estimator: Any) -> tuple[np.ndarray, float] | None:
    """(w, b) when the estimator is StandardScaler + binary LogisticRegression (or an estimator with
    ``linear_form``), alone or inside a one-model sigmoid ``CalibratedClassifierCV``, so scoring one
    request is a dot product instead of a trip through sklearn's validation (~50x faster; the
    same numbers, checked by a test)."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    if isinstance(estimator, CalibratedClassifierCV):
        # one refit model + one sigmoid on its decision function (ensemble=False): still a dot product
        fitted = getattr(estimator, "calibrated_classifiers_", None)
        if estimator.method != "sigmoid" or not fitted or len(fitted) != 1:
            return None
        inner = _linear_form(fitted[0].estimator)
        calibrator = fitted[0].calibrators[0]
        if inner is None or len(fitted[0].calibrators) != 1:
            return None
        # _SigmoidCalibration: p = expit(-(a * f + b))
        a, b = float(calibrator.a_), float(calibrator.b_)
        return -a * inner[0], -(a * inner[1] + b)
    if callable(getattr(estimator, "linear_form", None)):
        weights, bias = estimator.linear_form()
        return np.asarray(weights, dtype=np.float64), float(bias)
    if not isinstance(estimator, Pipeline) or len(estimator.steps) != 2:
        return None
    scaler, clf = estimator.steps[0][1], estimator.steps[1][1]
    if not (isinstance(scaler, StandardScaler) and isinstance(clf, LogisticRegression)):
        return None
    if getattr(clf, "coef_", None) is None or clf.coef_.shape[0] != 1 or list(clf.classes_) != [0, 1]:
        return None
    mean = scaler.mean_ if scaler.with_mean else np.zeros(clf.coef_.shape[1])
    scale = scaler.scale_ if scaler.with_std else np.ones(clf.coef_.shape[1])
    weights = clf.coef_[0] / scale
    return weights, float(clf.intercept_[0] - mean @ weights)


class Detector:
    """A loaded detector: check inputs against its card, then score them."""

    def __init__(self, estimator: Any, card: DetectorCard) -> None:
        self.estimator = estimator
        self.card = card
        self._linear = _linear_form(estimator)

    @property
    def spec(self) -> FingerprintSpec:
        return self.card.spec

    @property
    def export(self) -> ExportSpec:
        return self.card.export

    def at_level(
        self,
        level: ExportLevel,
        *,
        grid: tuple[float, ...] = DEFAULT_SCORE_GRID,
        epsilon: float | None = None,
    ) -> Detector:
        """This detector for records of ``level``. A full detector gives its own score level: the
        card's fitted ``score_bins`` (its operating-point thresholds among the edges, so flagging is
        unchanged), or for a card without them its thresholds beside ``grid``; ``epsilon`` adds
        randomised response on the serving host. Other levels need a detector trained on them."""
        level = ExportLevel(level)
        if level == self.export.level and (level != ExportLevel.score or epsilon == self.export.epsilon):
            return self
        if self.export.level != ExportLevel.full or level != ExportLevel.score:
            raise DetectorError(
                f"{self.card.detector_id} reads '{self.export.level.value}' records and cannot give the "
                f"'{level.value}' level: the score level comes from a full detector; other levels need "
                f"a detector trained on them"
            )
        thresholds = [p.threshold for p in self.card.operating_points]
        edges = score_edges(thresholds, self.card.score_bins or grid)
        export = score_level(edges, epsilon)
        return Detector(self.estimator, self.card.model_copy(update={"export": export}))

    def check_trace(self, trace: RequestTrace) -> None:
        if self.export.level != ExportLevel.full:
            raise DetectorMismatch(
                f"trace {trace.trace_id} is a full-level record, but this detector "
                f"({self.card.detector_id}) takes '{self.export.level.value}' records only: have the "
                f"agent export at that level (ROUTESCAN_EXPORT_LEVEL={self.export.level.value})"
            )
        try:
            self.spec.check(trace)
        except FingerprintMismatch as exc:
            raise DetectorMismatch(
                f"{exc}; this detector ({self.card.detector_id}) cannot score it"
            ) from None

    def check_fingerprint(self, fp: Fingerprint) -> None:
        problems = []
        if fp.model_id != self.spec.model_id:
            problems.append(f"model {fp.model_id!r} (detector reads {self.spec.model_id!r})")
        if fp.launch_model != self.spec.launch_model:
            problems.append(f"launch model {fp.launch_model!r} (detector reads {self.spec.launch_model!r})")
        if fp.export_level != self.export.level:
            problems.append(
                f"export level '{fp.export_level.value}' (detector reads '{self.export.level.value}')"
            )
        elif len(fp.values) != (dim := self.export.dim(self.spec)):
            problems.append(f"{len(fp.values)} values (its level has {dim})")
        elif (allowed := self.export.values()) is not None and not np.isin(fp.values, allowed).all():
            problems.append("a value that is not one of this detector's score bins")
        if problems:
            raise DetectorMismatch(
                f"fingerprint {fp.trace_id} has {'; '.join(problems)}; this detector "
                f"({self.card.detector_id}) cannot score it"
            )

    def features(self, trace: RequestTrace) -> np.ndarray:
        self.check_trace(trace)
        return self.spec.transform(trace)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Harm probability per row of records of the card's export level: the estimator's, or, for
        the score level, the record's own value (the on-host detector's binned score)."""
        if self.export.level == ExportLevel.score:
            return np.atleast_2d(np.asarray(X, dtype=np.float64))[:, 0]
        return self.full_proba(X)

    def full_proba(self, X: np.ndarray) -> np.ndarray:
        """Harm probability of the estimator itself (column 1 of its predict_proba), on the records it
        was trained on: full fingerprints for a full or score-level detector."""
        X = np.asarray(X, dtype=np.float64)
        if X.ndim == 1:
            X = X[None, :]
        if self._linear is not None:
            weights, bias = self._linear
            return expit(X @ weights + bias)
        return self.estimator.predict_proba(X)[:, 1]

    def threshold(self, operating_point: str | None = None) -> float:
        return self.card.operating_point(operating_point).threshold

    # -- persistence -------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        import skops.io as sio

        path = Path(path)
        card = self.card.model_copy(update={"estimator_type": type_name(self.estimator)})
        with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("card.json", card.model_dump_json(indent=2))
            zf.writestr("estimator.skops", sio.dumps(self.estimator))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Detector:
        """Load a detector file, refusing anything that could run code or exhaust memory."""
        import skops.io as sio

        path = Path(path)
        if not path.is_file():
            raise DetectorError(f"{path}: no such detector file")
        try:
            with zipfile.ZipFile(path) as zf:
                card_raw = _read_capped(zf, "card.json", MAX_CARD_BYTES)
                blob = _read_capped(zf, "estimator.skops", MAX_ESTIMATOR_BYTES)
            card = DetectorCard.model_validate_json(card_raw)
            with zipfile.ZipFile(io.BytesIO(blob)) as inner:
                inflated = sum(info.file_size for info in inner.infolist())
            if inflated > MAX_ESTIMATOR_BYTES:
                raise DetectorError(
                    f"estimator.skops inflates to {inflated} bytes, over the {MAX_ESTIMATOR_BYTES}-byte cap"
                )
            untrusted = sio.get_untrusted_types(data=blob)
        except DetectorError as exc:
            raise DetectorError(f"{path}: {exc}") from None
        except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError) as exc:
            raise DetectorError(f"{path}: not a RouteScan detector file ({_first_line(exc)})") from None
        refused = sorted(t for t in untrusted if t not in TRUSTED_TYPES)
        if refused:
            raise DetectorError(
                f"{path}: refusing to load a detector that names types outside the allowlist: "
                f"{refused[:5]}; a detector file can only hold scikit-learn estimators RouteScan trains"
            )
        try:
            estimator = sio.loads(blob, trusted=sorted(untrusted))
        except Exception as exc:  # a malformed archive can fail anywhere inside skops
            raise DetectorError(f"{path}: the estimator could not be read ({_first_line(exc)})") from None
        loaded = type_name(estimator)
        expected = card.estimator_type
        if loaded not in ESTIMATOR_TYPES or (expected is not None and loaded != expected):
            wanted = expected or "one of RouteScan's estimator types"
            raise DetectorError(f"{path}: the estimator is a {loaded}, but the card names {wanted}")
        if not callable(getattr(estimator, "predict_proba", None)):
            raise DetectorError(f"{path}: the estimator has no predict_proba")
        return cls(estimator, card)


def _read_capped(zf: zipfile.ZipFile, name: str, cap: int) -> bytes:
    info = zf.getinfo(name)  # KeyError names a missing member
    if info.file_size > cap:
        raise DetectorError(f"{name} is {info.file_size} bytes, over the {cap}-byte cap")
    return zf.read(info)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0][:200] if text else type(exc).__name__) or type(exc).__name__
