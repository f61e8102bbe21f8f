"""Records of one export level, built on the serving host: what the agent sends and what
``routescan featurize --export-level`` writes (levels: :mod:`routescan.privacy.levels`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from routescan.detector.artifact import Detector, DetectorError
from routescan.features.fingerprint import Fingerprint, FingerprintSpec, fingerprints
from routescan.files import atomic_path
from routescan.privacy.levels import FULL, LAYERS, ExportSpec, reduce
from routescan.telemetry.schema import ExportLevel, RequestTrace


class Exporter:
    """Traces -> fingerprints of ``level``.

    ``full`` and ``layers`` need no detector (the spec comes from the first trace under
    ``launch_model``, or from the detector when one is given). ``score`` needs the full detector the
    daemon also loads: it scores on the host and sends the bin. ``harm`` needs a detector trained on
    that level (its card holds the projection)."""

    def __init__(
        self,
        level: ExportLevel | str,
        detector: Detector | None = None,
        *,
        epsilon: float | None = None,
        launch_model: str | None = None,
    ) -> None:
        self.level = ExportLevel(level)
        self.launch_model = launch_model
        if epsilon is not None and self.level != ExportLevel.score:
            raise ValueError("epsilon (randomised response) applies to the score export level only")
        if self.level in (ExportLevel.score, ExportLevel.harm) and detector is None:
            raise DetectorError(
                f"the '{self.level.value}' export level is computed from a detector on the serving host: "
                "give it the detector file the daemon loads (ROUTESCAN_DETECTOR / --detector)"
            )
        if detector is not None:
            if self.level == ExportLevel.score:
                detector = detector.at_level(self.level, epsilon=epsilon)
            elif detector.export.level != self.level and self.level != ExportLevel.full:
                raise DetectorError(
                    f"{detector.card.detector_id} reads '{detector.export.level.value}' records, not "
                    f"'{self.level.value}' ones: give a detector trained on the '{self.level.value}' level"
                )
        self.detector = detector
        self._spec: FingerprintSpec | None = detector.spec if detector is not None else None

    @property
    def export(self) -> ExportSpec:
        """The level and its parameters (the detector's, for score and harm)."""
        if self.level == ExportLevel.full:
            return FULL
        return self.detector.export if self.detector is not None else LAYERS

    def spec_or_none(self) -> FingerprintSpec | None:
        return self._spec

    def spec(self, trace: RequestTrace) -> FingerprintSpec:
        if self._spec is None:
            self._spec = FingerprintSpec.from_trace(trace, self.launch_model)
        return self._spec

    def records(self, traces: Sequence[RequestTrace]) -> list[Fingerprint]:
        """One fingerprint of the level per trace (featurised as one batch)."""
        if not traces:
            return []
        spec = self.spec(traces[0])
        X = spec.transform_many(traces)  # refuses (FingerprintMismatch) a trace the spec cannot read
        score = self.detector.full_proba if self.detector is not None else None
        R = reduce(X, self.export, spec, score=score)
        return fingerprints(traces, spec, values=R, export_level=self.level)


def write_records(path: str | Path, exporter: Exporter, records: Sequence[Fingerprint]) -> int:
    """A reduced level's records as JSONL: a header line naming the fingerprint spec and the export
    level (with its parameters: bins, projection), then one fingerprint per line. Written to a
    temporary file and renamed, so a failure never leaves half a file."""
    path = Path(path)
    if path.suffix.lower() not in (".jsonl", ".ndjson"):
        raise ValueError(
            f"{path}: write a reduced export level as .jsonl (its records are not the spec's columns)"
        )
    if not records:
        raise ValueError("no records to write")
    spec = exporter.spec_or_none()
    export = exporter.export
    header = {
        "fingerprint_spec": spec.model_dump(mode="json") if spec else None,
        "export": export.model_dump(mode="json"),
    }
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as fh:
        fh.write(json.dumps(header) + "\n")
        for record in records:
            fh.write(record.model_dump_json(exclude_none=True) + "\n")
    return len(records)
