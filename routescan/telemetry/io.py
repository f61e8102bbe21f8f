"""Read and write traces as JSONL (streamable, appendable) or Parquet (columnar, compact).

Every row read back is re-validated against the schema, so a file edited by hand or by another
tool cannot smuggle a text field into the pipeline. Errors carry the file and the row number.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError

from routescan.files import atomic_path
from routescan.telemetry.schema import RequestTrace

_DIM3 = pa.list_(pa.int64(), 3)
_LAUNCH = pa.struct(
    [
        ("kernel", pa.string()),
        ("layer", pa.int64()),
        ("expert", pa.int64()),
        ("region", pa.string()),
        ("grid", _DIM3),
        ("block", _DIM3),
        ("threads", pa.int64()),
        ("phase", pa.string()),
        ("start_ns", pa.int64()),
        ("end_ns", pa.int64()),
    ]
)
PARQUET_SCHEMA = pa.schema(
    [
        ("schema_version", pa.string()),
        ("trace_id", pa.string()),
        ("model_id", pa.string()),
        ("collector", pa.string()),
        ("launch_model", pa.string()),
        ("unit", pa.string()),
        ("layers", pa.list_(pa.int64())),
        ("experts_per_layer", pa.list_(pa.int64())),
        ("top_k", pa.list_(pa.int64())),
        ("prompt_tokens", pa.int64()),
        ("launches", pa.list_(_LAUNCH)),
        ("row", pa.int64()),
        # Labels mix types (str / int / float / bool); JSON keeps them exact in one column.
        ("labels", pa.string()),
        ("experts_implementation", pa.string()),
    ]
)


# Columns a trace cannot do without (the rest are optional in the schema).
_REQUIRED_COLUMNS = frozenset(
    {
        "trace_id",
        "model_id",
        "collector",
        "launch_model",
        "layers",
        "experts_per_layer",
        "prompt_tokens",
        "launches",
    }
)


class TraceFileError(ValueError):
    """A trace file could not be read: names the file and the 1-based row."""

    def __init__(self, path: Path, row: int | None, message: str) -> None:
        where = f"{path}" + (f", row {row}" if row is not None else "")
        super().__init__(f"{where}: {message}")
        self.path = path
        self.row = row


def trace_format(path: str | os.PathLike[str]) -> str:
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise ValueError(f"{path}: unknown trace file type '{suffix}'; use .jsonl or .parquet")


def _to_row(trace: RequestTrace) -> dict:
    row = trace.model_dump(mode="json")
    row["labels"] = json.dumps(row["labels"], sort_keys=True)
    return row


def _from_row(row: dict) -> dict:
    row = dict(row)
    row["labels"] = json.loads(row["labels"]) if row.get("labels") else {}
    row["launches"] = [{k: v for k, v in launch.items() if v is not None} for launch in row["launches"]]
    for key in ("top_k", "row", "experts_implementation"):
        if row.get(key) is None:
            row.pop(key, None)
    return row


def write_traces(path: str | os.PathLike[str], traces: Iterable[RequestTrace]) -> int:
    """Write traces to a new file, atomically (a temporary file renamed into place)."""
    fmt = trace_format(path)
    count = 0
    with atomic_path(path) as tmp:
        if fmt == "jsonl":
            with tmp.open("w", encoding="utf-8") as fh:
                for trace in traces:
                    fh.write(trace.model_dump_json(exclude_none=True) + "\n")
                    count += 1
        else:
            rows = [_to_row(t) for t in traces]
            count = len(rows)
            pq.write_table(pa.Table.from_pylist(rows, schema=PARQUET_SCHEMA), tmp, compression="zstd")
    return count


def append_jsonl(fh, trace: RequestTrace) -> None:
    """Append one trace to an open JSONL file and flush, so a crash loses at most this line."""
    fh.write(trace.model_dump_json(exclude_none=True) + "\n")
    fh.flush()


def iter_trace_rows(path: str | os.PathLike[str]) -> Iterator[tuple[int, RequestTrace | TraceFileError]]:
    """Yield ``(row_number, trace_or_error)`` for every row, so callers decide skip or fail."""
    path = Path(path)
    if not path.exists():
        raise TraceFileError(path, None, "no such file")
    fmt = trace_format(path)
    if fmt == "jsonl":
        # bytes, decoded per line: one Latin-1 or binary row is that row's error, not the file's
        with path.open("rb") as fh:
            for number, raw in enumerate(fh, start=1):
                if number == 1:
                    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    yield number, TraceFileError(path, number, f"not UTF-8 text (byte {exc.start + 1})")
                    continue
                if not line.strip():
                    continue
                try:
                    yield number, RequestTrace.model_validate_json(line)
                except ValidationError as exc:
                    yield number, TraceFileError(path, number, _short(exc))
    else:
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise TraceFileError(path, None, f"not a readable Parquet file ({exc})") from exc
        extra = set(table.column_names) - set(PARQUET_SCHEMA.names)
        missing = sorted(_REQUIRED_COLUMNS - set(table.column_names))
        if missing:
            raise TraceFileError(
                path,
                None,
                f"not a RouteScan trace file: columns {missing} are missing (write it with "
                "`routescan collect` or routescan.telemetry.io.write_traces)",
            )
        for number, row in enumerate(table.to_pylist(), start=1):
            if extra:
                yield number, TraceFileError(path, number, f"unknown columns {sorted(extra)} are not allowed")
                continue
            try:
                yield number, RequestTrace.model_validate(_from_row(row))
            except (ValidationError, ValueError, TypeError) as exc:
                yield number, TraceFileError(path, number, _short(exc))


def read_traces(path: str | os.PathLike[str]) -> Iterator[RequestTrace]:
    """Yield validated traces; the first bad row raises :class:`TraceFileError`."""
    for _, item in iter_trace_rows(path):
        if isinstance(item, TraceFileError):
            raise item
        yield item


def _short(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        parts = []
        for err in exc.errors()[:3]:
            loc = ".".join(str(p) for p in err["loc"]) or "<root>"
            parts.append(f"{loc}: {err['msg']}")
        more = "" if exc.error_count() <= 3 else f" (+{exc.error_count() - 3} more)"
        return "; ".join(parts) + more
    return str(exc)
