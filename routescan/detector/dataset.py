"""Labelled fingerprints: what the detector trains and is evaluated on, read from corpus traces.

Traces collected with ``routescan collect --corpus`` carry their example's metadata as labels
(label, domain, wrapper family, base request id, hard-negative flag); nothing else is needed, and no
text is involved.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields

import numpy as np

from routescan.features.fingerprint import FingerprintSpec
from routescan.telemetry.launch import LaunchModel
from routescan.telemetry.schema import RequestTrace

PLAIN = "none"
BENIGN_GROUP = "benign"


@dataclass
class LabelledSet:
    spec: FingerprintSpec
    ids: np.ndarray
    X: np.ndarray
    y: np.ndarray
    domain: np.ndarray
    family: np.ndarray
    base: np.ndarray
    # the dataset a request came from (toxicchat, xstest, ...): the unit of leave-one-source-out
    source: np.ndarray
    hard_negative: np.ndarray
    prompt_tokens: np.ndarray
    # every prefill thread the trace launched, per-layer launches included: what an observer who
    # cannot attribute launches to experts still sees (for vLLM's fused MoE, a function of length)
    launched: np.ndarray
    # per request, the fingerprints of its windows of W prompt tokens (``collect --window``), an
    # object array of ``(n_windows, dim)`` matrices; ``(0, dim)`` for a request without windows
    windows: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    @property
    def wrapped(self) -> np.ndarray:
        return self.family != PLAIN

    def environments(self) -> np.ndarray:
        """Training environments for invariance: a wrapper family for wrapped requests (both classes
        inside), the harm domain for plain harmful ones, and one plain-benign pool."""
        env = np.where(self.y == 1, self.domain, BENIGN_GROUP).astype(object)
        env[self.wrapped] = np.char.add("wrap:", self.family[self.wrapped].astype(str))
        return env.astype(str)

    def subset(self, idx: np.ndarray) -> LabelledSet:
        rows = {f.name: getattr(self, f.name)[idx] for f in fields(self) if f.name != "spec"}
        return LabelledSet(spec=self.spec, **rows)

    @classmethod
    def from_traces(
        cls,
        traces: Iterable[RequestTrace],
        spec: FingerprintSpec | None = None,
        *,
        launch_model: LaunchModel | str | None = None,
    ) -> LabelledSet:
        """Labelled fingerprints of corpus traces, under ``spec`` or, without one, under
        ``launch_model`` (the signal: default, the traces' counts as they are)."""
        traces = list(traces)
        if not traces:
            raise ValueError("no traces")
        spec = spec or FingerprintSpec.from_trace(traces[0], launch_model)
        missing = [t.trace_id for t in traces if "label" not in t.labels][:3]
        if missing:
            raise ValueError(
                f"traces without a 'label' (e.g. {missing}); collect them with `routescan collect --corpus` "
                "or --label-column label"
            )

        def col(key: str, default: object) -> np.ndarray:
            return np.array([str(t.labels.get(key, default)) for t in traces])

        y = np.array([int(float(t.labels["label"])) for t in traces])
        windowed = [t.window_traces() if t.windows is not None else [] for t in traces]
        flat = spec.transform_many([w for ws in windowed for w in ws]) if any(windowed) else None
        windows = np.empty(len(traces), dtype=object)
        start = 0
        for i, ws in enumerate(windowed):
            windows[i] = (flat[start : start + len(ws)] if ws else np.empty((0, spec.dim))).astype(np.float32)
            start += len(ws)
        if set(np.unique(y)) - {0, 1}:
            raise ValueError("labels must be 0 (benign) or 1 (harmful)")
        return cls(
            spec=spec,
            ids=np.array([t.trace_id for t in traces]),
            X=spec.transform_many(traces),
            y=y,
            domain=np.where(y == 1, col("domain", "unmapped"), BENIGN_GROUP),
            family=col("family", PLAIN),
            base=np.array([str(t.labels.get("base", t.trace_id)) for t in traces]),
            source=col("source", "unknown"),
            hard_negative=col("hard_negative", 0) == "1",
            prompt_tokens=np.array([t.prompt_tokens for t in traces], dtype=np.float64),
            launched=spec.launched(traces),
            windows=windows,
        )

    def window_max(self) -> np.ndarray:
        """Per request, the feature-wise maximum over its windows (its own fingerprint when it has
        none): a fixed-length record that keeps a short request inside a long template visible."""
        return np.stack(
            [w.max(axis=0) if len(w) else x for w, x in zip(self.windows, self.X, strict=True)]
        ).astype(np.float64)
