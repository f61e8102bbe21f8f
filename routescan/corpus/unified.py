"""Loaders for the unified corpus files (``harmful.csv``, ``benign.csv``) of a corpora folder.

Users point these at their own copy by path (for example ``../shared/corpora``); nothing is copied
into the repository. Rows keep their text only for the collection step; everything else is
metadata (label, domain, source, split) that may travel with traces.
"""

from __future__ import annotations

import csv
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class CorpusRow:
    row: int  # 0-based data row in its source file
    text: str = field(repr=False)
    label: int  # 1 harmful, 0 benign
    source: str
    domain: str | None = None
    hard_negative: bool = False
    split: str | None = None


def _rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: not found; point --corpora at a folder holding harmful.csv / benign.csv"
        )
    csv.field_size_limit(sys.maxsize)
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def load_harmful(corpora: str | Path, *, keep_duplicates: bool = False) -> list[CorpusRow]:
    out = []
    for i, r in enumerate(_rows(Path(corpora) / "harmful.csv")):
        if not keep_duplicates and r.get("duplicate_of_earlier") == "1":
            continue
        out.append(CorpusRow(i, r["prompt"], 1, r.get("source", ""), domain=r.get("domain") or None))
    return out


def load_benign(
    corpora: str | Path, *, splits: tuple[str, ...] = ("val", "test"), keep_duplicates: bool = False
) -> list[CorpusRow]:
    """Benign rows: Alpaca rows of the given splits, plus hard negatives (flagged)."""
    out = []
    for i, r in enumerate(_rows(Path(corpora) / "benign.csv")):
        if not keep_duplicates and r.get("duplicate_of_earlier") == "1":
            continue
        hard = r.get("hard_negative") == "1"
        source_file = r.get("source_file", "")
        split = next((s for s in ("train", "val", "test") if f"_{s}." in source_file), None)
        if not hard and split not in splits:
            continue
        out.append(CorpusRow(i, r["prompt"], 0, r.get("source", ""), hard_negative=hard, split=split))
    return out


def sample(rows: list[CorpusRow], n: int | None, seed: int) -> list[CorpusRow]:
    if n is None or n >= len(rows):
        return list(rows)
    return sorted(random.Random(seed).sample(rows, n), key=lambda r: r.row)
