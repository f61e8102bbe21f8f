"""Read and write traces as JSONL (streamable, appendable) or Parquet (columnar, compact), and the
resumable sink collections write through.

Every row read back is re-validated against the schema, so a file edited by hand or by another
tool cannot smuggle a text field into the pipeline. Errors carry the file and the row number.
``routescan.trace/1`` files (launch lists) are read too, converted to trace/2 as they are read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError

from routescan.files import atomic_path
from routescan.telemetry.collector import Collector, Request
from routescan.telemetry.schema import CountMatrix, LayerDims, RequestTrace, TraceV1

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
        ("source", pa.string()),
        ("unit", pa.string()),
        ("layers", pa.list_(pa.int64())),
        ("experts_per_layer", pa.list_(pa.int64())),
        ("top_k", pa.list_(pa.int64())),
        # one object or one per layer: JSON keeps either exact in one small column
        ("dims", pa.string()),
        ("prompt_tokens", pa.int64()),
        # the count matrix flat in layer order (row widths are experts_per_layer)
        ("counts", pa.list_(pa.int64())),
        ("region_threads", pa.list_(pa.int64())),
        ("launches", pa.list_(_LAUNCH)),
        ("row", pa.int64()),
        # Labels mix types (str / int / float / bool); JSON keeps them exact in one column.
        ("labels", pa.string()),
        ("experts_implementation", pa.string()),
        # optional per-window counts (collect --window): the window length, then each window's
        # counts flat in layer order
        ("window_tokens", pa.int64()),
        ("windows", pa.list_(pa.list_(pa.int64()))),
    ]
)
# trace/1 Parquet files (launch lists) are still read, through TraceV1.to_v2
_V1_COLUMNS = frozenset({"launch_model", "launches"})
_REQUIRED_COLUMNS = frozenset(
    {"trace_id", "model_id", "collector", "layers", "experts_per_layer", "prompt_tokens", "counts"}
)
_V1_MARK = b'"routescan.trace/1"'


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


def trace_json(trace: RequestTrace) -> str:
    """One trace as a JSONL line's text (no newline): the form files and the spool hold."""
    return trace.model_dump_json(exclude_none=True)


def parse_trace_json(data: str | bytes) -> RequestTrace:
    """A trace from JSON text, trace/2 or trace/1 (converted); raises pydantic's ValidationError."""
    raw = data.encode() if isinstance(data, str) else data
    if _V1_MARK in raw:
        return TraceV1.model_validate_json(raw).to_v2()
    return RequestTrace.model_validate_json(raw)


def _to_row(trace: RequestTrace) -> dict:
    row = trace.model_dump(mode="json", exclude={"counts", "dims", "labels", "windows"})
    row["counts"] = trace.counts.flat.tolist()
    w = trace.windows
    row["window_tokens"] = None if w is None else w.tokens
    row["windows"] = None if w is None else [m.flat.tolist() for m in w.counts]
    row["dims"] = (
        None
        if trace.dims is None
        else json.dumps(
            trace.dims.model_dump()
            if isinstance(trace.dims, LayerDims)
            else [d.model_dump() for d in trace.dims]
        )
    )
    row["labels"] = json.dumps(trace.labels, sort_keys=True)
    return row


def _from_row(row: dict, counts: np.ndarray | None) -> dict:
    """A Parquet row as the dict its trace model validates: trace/2 with its count slice, or trace/1
    (``counts`` None). Nulls are absent fields; labels and dims come back from their JSON."""
    row = {k: v for k, v in row.items() if v is not None}
    row["labels"] = json.loads(row["labels"]) if row.get("labels") else {}
    if "dims" in row:
        row["dims"] = json.loads(row["dims"])
    if counts is not None:
        row["counts"] = CountMatrix(counts)
    if "windows" in row:
        row["windows"] = {
            "tokens": row.pop("window_tokens", None),
            "counts": [CountMatrix(np.asarray(w, dtype=np.int64)) for w in row["windows"]],
        }
    else:
        row.pop("window_tokens", None)
    if "launches" in row:
        row["launches"] = [{k: v for k, v in launch.items() if v is not None} for launch in row["launches"]]
    return row


def write_traces(path: str | os.PathLike[str], traces: Iterable[RequestTrace]) -> int:
    """Write traces to a new file, atomically (a temporary file renamed into place)."""
    fmt = trace_format(path)
    count = 0
    with atomic_path(path) as tmp:
        if fmt == "jsonl":
            with tmp.open("w", encoding="utf-8") as fh:
                for trace in traces:
                    fh.write(trace_json(trace) + "\n")
                    count += 1
        else:
            rows = [_to_row(t) for t in traces]
            count = len(rows)
            pq.write_table(pa.Table.from_pylist(rows, schema=PARQUET_SCHEMA), tmp, compression="zstd")
    return count


def append_jsonl(fh: IO[str], trace: RequestTrace) -> None:
    """Append one trace to an open JSONL file and flush, so a crash loses at most this line."""
    fh.write(trace_json(trace) + "\n")
    fh.flush()


def iter_trace_rows(path: str | os.PathLike[str]) -> Iterator[tuple[int, RequestTrace | TraceFileError]]:
    """Yield ``(row_number, trace_or_error)`` for every row, so callers decide skip or fail."""
    path = Path(path)
    if not path.exists():
        raise TraceFileError(path, None, "no such file")
    if trace_format(path) == "jsonl":
        yield from _jsonl_rows(path)
    else:
        yield from _parquet_rows(path)


def _jsonl_rows(path: Path) -> Iterator[tuple[int, RequestTrace | TraceFileError]]:
    # bytes, decoded per line: one Latin-1 or binary row is that row's error, not the file's
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield number, TraceFileError(path, number, f"not UTF-8 text (byte {exc.start + 1})")
                continue
            if not raw.strip():
                continue
            try:
                yield number, parse_trace_json(raw)
            except ValidationError as exc:
                yield number, TraceFileError(path, number, _short(exc))


def _parquet_rows(path: Path) -> Iterator[tuple[int, RequestTrace | TraceFileError]]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise TraceFileError(path, None, f"not a readable Parquet file ({exc})") from exc
    names = set(table.column_names)
    if "counts" not in names and names >= _V1_COLUMNS:
        yield from _parquet_v1_rows(path, table)
        return
    extra = names - set(PARQUET_SCHEMA.names)
    missing = sorted(_REQUIRED_COLUMNS - names)
    if missing:
        raise TraceFileError(
            path,
            None,
            f"not a RouteScan trace file: columns {missing} are missing (write it with "
            "`routescan collect` or routescan.telemetry.io.write_traces)",
        )
    if extra:
        for number in range(1, table.num_rows + 1):
            yield number, TraceFileError(path, number, f"unknown columns {sorted(extra)} are not allowed")
        return
    # the count matrices as one column of integers, sliced per row (no Python int per count)
    counts = table.column("counts").combine_chunks()
    missing_counts = counts.is_null().to_numpy(zero_copy_only=False)
    try:
        offsets = counts.offsets.to_numpy()
        values = counts.values.to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, AttributeError):
        offsets = values = None  # nulls inside: each row's own error below
    rest = table.drop_columns(["counts"])
    for number, row in enumerate(rest.to_pylist(), start=1):
        try:
            if offsets is None or missing_counts[number - 1]:
                raise ValueError("counts are missing")
            flat = values[offsets[number - 1] : offsets[number]]
            yield number, RequestTrace.model_validate(_from_row(row, flat))
        except (ValidationError, ValueError, TypeError) as exc:
            yield number, TraceFileError(path, number, _short(exc))


def _parquet_v1_rows(path: Path, table: pa.Table) -> Iterator[tuple[int, RequestTrace | TraceFileError]]:
    for number, row in enumerate(table.to_pylist(), start=1):
        try:
            yield number, TraceV1.model_validate(_from_row(row, None)).to_v2()
        except (ValidationError, ValueError, TypeError) as exc:
            yield number, TraceFileError(path, number, _short(exc))


def read_traces(path: str | os.PathLike[str]) -> Iterator[RequestTrace]:
    """Yield validated traces; the first bad row raises :class:`TraceFileError`."""
    for _, item in iter_trace_rows(path):
        if isinstance(item, TraceFileError):
            raise item
        yield item


class TraceSink:
    """Where a collection writes: resumable, crash-safe, JSONL or Parquet.

    Traces stream to JSONL as they come (the file itself, or ``<out>.partial.jsonl`` beside a
    Parquet target), one flushed line each, so a crash loses at most the line being written and a
    torn last line is cut off on the next start. ``done`` holds the ids already collected, so a rerun
    skips them; ``resume=False`` starts over. :meth:`finish` turns a staged Parquet target into its
    final file (atomically) and removes the staging file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        resume: bool = True,
        notice: Callable[[str], object] | None = None,
    ) -> None:
        self.path = Path(path)
        self.stage = (
            self.path
            if trace_format(self.path) == "jsonl"
            else self.path.with_name(self.path.name + ".partial.jsonl")
        )
        self._notice = notice or (lambda message: None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not resume:
            for p in {self.stage, self.path}:
                p.unlink(missing_ok=True)
        elif self.stage != self.path and self.path.exists() and not self.stage.exists():
            # resuming onto a finished Parquet file: its traces go back to staging to be appended to
            write_traces(self.stage, read_traces(self.path))
        self.done = self._recover()
        self._fh: IO[str] | None = None

    def _recover(self) -> set[str]:
        if not self.stage.exists():
            return set()
        data = self.stage.read_bytes()
        keep = len(data) if data.endswith(b"\n") or not data else data.rfind(b"\n") + 1
        if keep != len(data):
            with self.stage.open("r+b") as fh:
                fh.truncate(keep)
            self._notice(f"dropped an incomplete last line of {self.stage} (interrupted write)")
        return {t.trace_id for t in read_traces(self.stage)}

    def write(self, trace: RequestTrace) -> None:
        if self._fh is None:
            self._fh = self.stage.open("a", encoding="utf-8")
        append_jsonl(self._fh, trace)
        self.done.add(trace.trace_id)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def finish(self) -> Path:
        """Close, and write the final file when it is not the staging file itself."""
        self.close()
        if self.stage != self.path:
            write_traces(self.path, read_traces(self.stage))
            os.remove(self.stage)
        return self.path

    def collect(
        self, collector: Collector, requests: Iterable[Request], progress: Callable[[], object] | None = None
    ) -> int:
        """Run ``collector`` over the requests not yet ``done``, writing each trace as it comes;
        ``progress()`` is called once per trace. Returns how many were written."""
        written = 0
        todo = (r for r in requests if r.trace_id not in self.done)
        for _request, trace in collector.collect(todo):
            self.write(trace)
            written += 1
            if progress is not None:
                progress()
        return written

    def __enter__(self) -> TraceSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _short(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        parts = []
        for err in exc.errors()[:3]:
            loc = ".".join(str(p) for p in err["loc"]) or "<root>"
            parts.append(f"{loc}: {err['msg']}")
        more = "" if exc.error_count() <= 3 else f" (+{exc.error_count() - 3} more)"
        return "; ".join(parts) + more
    return str(exc)
