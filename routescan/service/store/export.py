"""Export the audit trail for reviewers: CSV, JSONL or Parquet, written atomically."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from routescan.files import atomic_path
from routescan.service.store.base import COLUMNS, AuditStore

EXPORT_COLUMNS = ("id", *COLUMNS)
FORMATS = (".csv", ".jsonl", ".parquet")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def export_audits(
    store: AuditStore,
    out: str | Path,
    *,
    on_row: Callable[[int], None] | None = None,
    **filters: Any,
) -> int:
    """Write every row matching ``filters`` (since / until / label / model_id) to ``out``; the
    format follows the suffix. The file appears only when complete. Returns the row count."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"{out}: export as {', '.join(FORMATS)}")
    rows: Iterable[dict[str, Any]] = store.iter_all(**filters)
    count = 0

    def counted() -> Iterable[dict[str, Any]]:
        nonlocal count
        for row in rows:
            count += 1
            if on_row is not None:
                on_row(count)
            yield {**row, "created": _iso(row["created"])}

    with atomic_path(out) as tmp:
        if suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pylist(list(counted()))
            if not table.num_columns:
                table = pa.table({c: pa.array([], pa.string()) for c in EXPORT_COLUMNS})
            pq.write_table(table, tmp, compression="zstd")
        else:
            with tmp.open("w", encoding="utf-8", newline="") as fh:
                if suffix == ".csv":
                    writer = csv.DictWriter(fh, fieldnames=EXPORT_COLUMNS)
                    writer.writeheader()
                    writer.writerows(counted())
                else:
                    for row in counted():
                        fh.write(json.dumps(row) + "\n")
    return count
