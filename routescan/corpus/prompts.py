"""Read request files for collection: CSV / TSV, JSONL, JSON arrays, or plain text lines.

The prompt text is handed to the collector's encoder and nowhere else. Label columns are carried
into the trace, so they are checked here: short tokens or numbers only. Error messages name the
file, row and column, never the text itself.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from routescan.telemetry.schema import LABEL_KEY_PATTERN, LABEL_TOKEN_PATTERN, MAX_LABELS, trace_id_problem

# The trace schema's own patterns: a file is refused here, with its row, before any model runs.
_TOKEN = re.compile(LABEL_TOKEN_PATTERN)
_INT = re.compile(r"^-?\d{1,18}$")
_FLOAT = re.compile(r"^-?\d+\.\d*(e-?\d+)?$")

PROMPT_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson", ".json", ".txt")


def demo_prompts_path() -> Path:
    """The twelve benign demo prompts shipped with the package (the embedded default of `collect`)."""
    from importlib import resources

    return Path(str(resources.files("routescan.corpus") / "demo_prompts.jsonl"))


class PromptFileError(ValueError):
    """The prompt file cannot be used as asked; the message says where and what to change."""


@dataclass
class PromptRow:
    row: int  # 0-based data row (header excluded), the key back into the source file
    text: str = field(repr=False)
    trace_id: str
    labels: dict[str, Any]


def _label_value(raw: Any, column: str, where: str) -> Any:
    if raw is None or isinstance(raw, bool | int | float):
        return raw
    text = str(raw).strip()
    if text == "":
        return None
    if _INT.match(text):
        return int(text)
    if _FLOAT.match(text):
        return float(text)
    if not _TOKEN.match(text):
        raise PromptFileError(
            f"{where}: label column '{column}' holds a value that is not a short token "
            "(at most 64 letters, digits or ._:/+-). Labels travel with traces, so they may never be "
            "text; drop this column from --label-column or map it to codes first."
        )
    return text


def _records(path: Path, text_column: str) -> tuple[Iterator[dict[str, Any]], list[str] | None]:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        csv.field_size_limit(sys.maxsize)
        fh = path.open("r", encoding="utf-8", newline="")
        reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")
        columns = list(reader.fieldnames or [])

        def rows() -> Iterator[dict[str, Any]]:
            with fh:
                yield from reader

        return rows(), columns
    if suffix in (".jsonl", ".ndjson"):

        def rows() -> Iterator[dict[str, Any]]:
            with path.open("r", encoding="utf-8") as fh:
                for number, line in enumerate(fh, start=1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise PromptFileError(f"{path}, line {number}: not valid JSON ({exc.msg})") from exc
                    yield obj if isinstance(obj, dict) else {text_column: obj}

        return rows(), None
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise PromptFileError(f"{path}: not valid JSON ({exc.msg})") from exc
        if not isinstance(data, list):
            raise PromptFileError(f"{path}: expected a JSON array of objects or strings")
        return (d if isinstance(d, dict) else {text_column: d} for d in data), None
    if suffix == ".txt":

        def rows() -> Iterator[dict[str, Any]]:
            with path.open("r", encoding="utf-8") as fh:
                for line in fh:
                    if line.strip():
                        yield {text_column: line.rstrip("\n")}

        return rows(), None
    raise PromptFileError(
        f"{path}: unsupported prompt file type '{suffix}'; use one of {', '.join(PROMPT_SUFFIXES)}"
    )


def read_prompts(
    path: str | Path,
    *,
    text_column: str = "prompt",
    id_column: str | None = None,
    label_columns: Sequence[str] = (),
    skip_empty: bool = False,
    id_prefix: str = "row-",
) -> Iterator[PromptRow]:
    """Yield the prompts of ``path`` in file order. Raises :class:`PromptFileError` on the first
    problem (missing column, empty prompt unless ``skip_empty``, text-like label)."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"{path}: no such file")
    if text_column in label_columns or (id_column and id_column == text_column):
        raise PromptFileError(f"the text column '{text_column}' cannot also be a label or id column")
    bad_keys = [c for c in label_columns if not re.match(LABEL_KEY_PATTERN, c) or len(c) > 32]
    if bad_keys:
        raise PromptFileError(
            f"label columns {bad_keys[:3]} cannot be trace label keys: use an identifier of up to 32 "
            "characters and three words (e.g. label, domain, hard_negative)"
        )
    if len(label_columns) > MAX_LABELS:
        raise PromptFileError(f"{len(label_columns)} label columns; a trace carries at most {MAX_LABELS}")
    records, columns = _records(path, text_column)
    wanted = [text_column, *label_columns, *([id_column] if id_column else [])]
    if columns is not None:
        missing = [c for c in wanted if c not in columns]
        if missing:
            raise PromptFileError(
                f"{path}: no column {', '.join(repr(c) for c in missing)}; the file has {', '.join(columns)}"
            )
    seen_ids: set[str] = set()
    for row, record in enumerate(records):
        where = f"{path}, row {row}"
        missing = [c for c in wanted if c not in record]
        if missing:
            raise PromptFileError(
                f"{where}: no field {', '.join(repr(c) for c in missing)}; "
                f"it has {', '.join(map(str, record))}"
            )
        text = record[text_column]
        if text is None or not str(text).strip():
            if skip_empty:
                continue
            raise PromptFileError(
                f"{where}: empty prompt in column '{text_column}' (use --skip-empty to skip it)"
            )
        if id_column:
            trace_id = str(record[id_column]).strip()
            problem = trace_id_problem(trace_id)
            if problem:
                raise PromptFileError(f"{where}: id column '{id_column}' must hold opaque ids: {problem}")
        else:
            trace_id = f"{id_prefix}{row:07d}"
        if trace_id in seen_ids:
            raise PromptFileError(f"{where}: duplicate id in column '{id_column}'")
        seen_ids.add(trace_id)
        labels = {c: _label_value(record[c], c, where) for c in label_columns}
        yield PromptRow(row=row, text=str(text), trace_id=trace_id, labels=labels)
