"""Loaders for the public benchmarks in their published formats, for users with their own copies.

Each loader reads one file by path and yields :class:`RawPrompt` records; nothing is copied or cached.
The unified ``harmful.csv`` / ``benign.csv`` are built from these sources; the raw loaders let an
operator add a newer release, or another split, to a corpus recipe (``extra_sources``).
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class RawPrompt:
    text: str = field(repr=False)
    label: int  # 1 harmful, 0 benign
    source: str
    category: str = ""
    hard_negative: bool = False  # benign but looks unsafe (XSTest safe, JBB benign)


def _csv(path: Path, required: tuple[str, ...]) -> Iterator[dict[str, str]]:
    csv.field_size_limit(sys.maxsize)
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; is this the right format?")
        yield from reader


def harmbench(path: Path) -> Iterator[RawPrompt]:
    """harmbench_behaviors_text_*.csv (Behavior, SemanticCategory, ContextString)."""
    for r in _csv(path, ("Behavior", "SemanticCategory")):
        # contextual behaviours need their context string to be a complete request
        text = f"{r['ContextString']}\n\n{r['Behavior']}" if r.get("ContextString") else r["Behavior"]
        yield RawPrompt(text, 1, "harmbench", r["SemanticCategory"])


def jbb(path: Path) -> Iterator[RawPrompt]:
    """JailbreakBench harmful-behaviors.csv or benign-behaviors.csv (goal, category)."""
    benign = "benign" in path.name
    for r in _csv(path, ("goal", "category")):
        yield RawPrompt(r["goal"], 0 if benign else 1, "jbb", r["category"], hard_negative=benign)


def strongreject(path: Path) -> Iterator[RawPrompt]:
    for r in _csv(path, ("forbidden_prompt", "category")):
        yield RawPrompt(r["forbidden_prompt"], 1, "strongreject", r["category"])


def xstest(path: Path) -> Iterator[RawPrompt]:
    """xstest_prompts.csv: 250 safe prompts that look unsafe (hard negatives), 200 unsafe contrasts."""
    for r in _csv(path, ("prompt", "type", "label")):
        safe = r["label"].strip() == "safe"
        yield RawPrompt(r["prompt"], 0 if safe else 1, "xstest", r["type"], hard_negative=safe)


def advbench(path: Path) -> Iterator[RawPrompt]:
    """AdvBench behaviours; the HarmBench-format CSV (Behavior) or the original (goal)."""
    for r in _csv(path, ()):
        text = r.get("Behavior") or r.get("goal")
        if text is None:
            raise ValueError(f"{path}: neither a Behavior nor a goal column")
        yield RawPrompt(text, 1, "advbench")


def donotanswer(path: Path) -> Iterator[RawPrompt]:
    """Do-Not-Answer: one JSONL per risk area ({"prompt": ...}), or a folder of them."""
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    for file in files:
        with file.open(encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if line.strip():
                    item = json.loads(line)
                    if "prompt" not in item:
                        raise ValueError(f"{file}:{number}: no 'prompt' field")
                    yield RawPrompt(item["prompt"], 1, "donotanswer", file.stem)


RAW_FORMATS: dict[str, Callable[[Path], Iterator[RawPrompt]]] = {
    "harmbench": harmbench,
    "jbb": jbb,
    "strongreject": strongreject,
    "xstest": xstest,
    "advbench": advbench,
    "donotanswer": donotanswer,
}


def load_raw(fmt: str, path: str | Path) -> list[RawPrompt]:
    if fmt not in RAW_FORMATS:
        raise ValueError(f"unknown source format '{fmt}'; known: {', '.join(RAW_FORMATS)}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found")
    return [p for p in RAW_FORMATS[fmt](path) if p.text.strip()]
