"""Fingerprint tables: many fingerprints in one file, for training and offline analysis.

Parquet (wide: one column per feature, the spec in the file's metadata) or JSONL (one
:class:`Fingerprint` per line, the spec on a first header line). Both read back into
``(spec, X, meta)`` with ``X`` a float matrix and ``meta`` the ids, rows and label columns.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from routescan.features.fingerprint import Fingerprint, FingerprintSpec
from routescan.files import atomic_path

_SPEC_KEY = b"routescan.fingerprint_spec"
_META_COLUMNS = ("trace_id", "model_id", "launch_model", "row")
_LABEL_PREFIX = "label."


@dataclass
class FingerprintTable:
    spec: FingerprintSpec
    X: np.ndarray
    trace_ids: list[str]
    rows: list[int | None]
    labels: dict[str, list[Any]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.trace_ids)


def _arrow_type(values: list[Any]) -> pa.DataType:
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return pa.bool_()
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return pa.int64()
    if present and all(isinstance(v, int | float) and not isinstance(v, bool) for v in present):
        return pa.float64()
    return pa.string()


def write_table(path: str | Path, spec: FingerprintSpec, fingerprints: Iterable[Fingerprint]) -> int:
    path = Path(path)
    fps = list(fingerprints)
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as fh:
            fh.write(json.dumps({"fingerprint_spec": spec.model_dump(mode="json")}) + "\n")
            for fp in fps:
                fh.write(fp.model_dump_json(exclude_none=True) + "\n")
        return len(fps)
    if path.suffix.lower() not in (".parquet", ".pq"):
        raise ValueError(f"{path}: write fingerprints as .parquet or .jsonl")
    names = spec.feature_names()
    columns: dict[str, Any] = {
        "trace_id": pa.array([fp.trace_id for fp in fps], pa.string()),
        "model_id": pa.array([fp.model_id for fp in fps], pa.string()),
        "launch_model": pa.array([fp.launch_model for fp in fps], pa.string()),
        "row": pa.array([fp.row for fp in fps], pa.int64()),
    }
    label_keys: dict[str, None] = {}
    for fp in fps:
        label_keys.update(dict.fromkeys(fp.labels))
    for key in label_keys:
        values = [fp.labels.get(key) for fp in fps]
        kind = _arrow_type(values)
        columns[_LABEL_PREFIX + key] = pa.array(
            [None if v is None else (str(v) if kind == pa.string() else v) for v in values], kind
        )
    matrix = np.asarray([fp.values for fp in fps], dtype=np.float64).reshape(len(fps), len(names))
    for j, name in enumerate(names):
        columns[name] = pa.array(matrix[:, j], pa.float64())
    table = pa.table(columns).replace_schema_metadata({_SPEC_KEY: spec.model_dump_json().encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return len(fps)


def read_table(path: str | Path) -> FingerprintTable:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such fingerprint file")
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        with path.open("r", encoding="utf-8") as fh:
            header = json.loads(fh.readline())
            if "fingerprint_spec" not in header:
                raise ValueError(f"{path}: first line must hold the fingerprint_spec")
            spec = FingerprintSpec.model_validate(header["fingerprint_spec"])
            fps = [Fingerprint.model_validate_json(line) for line in fh if line.strip()]
        keys: dict[str, None] = {}
        for fp in fps:
            keys.update(dict.fromkeys(fp.labels))
        X = np.asarray([fp.values for fp in fps], dtype=np.float64).reshape(len(fps), spec.dim)
        return FingerprintTable(
            spec,
            X,
            [fp.trace_id for fp in fps],
            [fp.row for fp in fps],
            {k: [fp.labels.get(k) for fp in fps] for k in keys},
        )
    table = pq.read_table(path)
    meta = table.schema.metadata or {}
    if _SPEC_KEY not in meta:
        raise ValueError(f"{path}: not a RouteScan fingerprint table (no spec in its metadata)")
    spec = FingerprintSpec.model_validate_json(meta[_SPEC_KEY])
    names = spec.feature_names()
    missing = [n for n in names if n not in table.column_names]
    if missing:
        raise ValueError(
            f"{path}: {len(missing)} feature columns of the spec are missing (first: {missing[0]})"
        )
    X = (
        np.column_stack([table.column(n).to_numpy(zero_copy_only=False) for n in names])
        if len(table)
        else (np.zeros((0, spec.dim)))
    )
    labels = {
        c[len(_LABEL_PREFIX) :]: table.column(c).to_pylist()
        for c in table.column_names
        if c.startswith(_LABEL_PREFIX)
    }
    return FingerprintTable(
        spec,
        np.asarray(X, dtype=np.float64),
        table.column("trace_id").to_pylist(),
        table.column("row").to_pylist(),
        labels,
    )
