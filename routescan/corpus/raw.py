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
    category: str = ""  # the source's own category name
    hard_negative: bool = False  # benign but looks unsafe (XSTest safe, JBB benign)
    domain: str | None = None  # the harm domain (of harmful.csv) the loader maps the category to


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


def unified(path: Path) -> Iterator[RawPrompt]:
    """A unified CSV with a ``label`` column (``prompt, source, subtype, label, hard_negative``): the
    layout of ``extra/toxicchat_train.csv``, ``arena_hard.csv`` and ``coconot.csv``. The row's own
    ``source`` names it, so one file can hold several sources."""
    for number, r in enumerate(_csv(path, ("prompt", "label")), 2):
        if r["label"].strip() not in ("0", "1"):
            raise ValueError(f"{path}:{number}: label must be 0 (benign) or 1 (harmful)")
        yield RawPrompt(
            r["prompt"],
            int(r["label"]),
            r.get("source") or path.stem,
            r.get("subtype", ""),
            hard_negative=r.get("hard_negative", "").strip() == "1",
        )


# CategoricalHarmfulQA's 11 categories, in the harm domains of harmful.csv; "" = no clear domain
# (economic harm and political campaigning span several): the recipe's fallback group takes them.
CATQA_DOMAINS = {
    "Illegal Activity": "drugs_illegal_goods",
    "Child Abuse": "sexual_content",
    "Hate/Harass/Violence": "hate_harassment",
    "Malware Viruses": "cyber_malware",
    "Physical Harm": "violence_weapons",
    "Economic Harm": "",
    "Fraud/Deception": "fraud_financial_crime",
    "Adult Content": "sexual_content",
    "Political Campaigning": "",
    "Privacy Violation Activity": "privacy",
    "Tailored Financial Advice": "regulated_advice",
}
_LANGUAGE_CODES = {"english": "en", "chinese": "zh", "vietnamese": "vi"}


def _nested_questions(path: Path) -> Iterator[tuple[str, str]]:
    """(category, question) of a ``{category: {subcategory: [question, ...]}}`` JSON file."""
    with path.open(encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected {{category: {{subcategory: [questions]}}}}")
    for category, subs in data.items():
        if not isinstance(subs, dict):
            raise ValueError(f"{path}: category entries must map subcategories to question lists")
        for questions in subs.values():
            for q in questions:
                if isinstance(q, str):
                    yield category, q


def catqa(path: Path) -> Iterator[RawPrompt]:
    """CategoricalHarmfulQA (``catqa_<language>.json``): 550 harmful questions per language. The
    source names the language (``catqa_zh``), the category its harm domain (``CATQA_DOMAINS``)."""
    lang = path.stem.removeprefix("catqa_")
    source = f"catqa_{_LANGUAGE_CODES.get(lang, lang)}"
    for category, question in _nested_questions(path):
        yield RawPrompt(question, 1, source, category, domain=CATQA_DOMAINS.get(category) or None)


def harmfulqa(path: Path) -> Iterator[RawPrompt]:
    """HarmfulQA (``harmfulqa.json``): LLM-written harmful questions by academic topic. The topic is
    not a harm domain, so no domain is mapped (the recipe's fallback group)."""
    for topic, question in _nested_questions(path):
        yield RawPrompt(question, 1, "harmfulqa", topic)


RAW_FORMATS: dict[str, Callable[[Path], Iterator[RawPrompt]]] = {
    "harmbench": harmbench,
    "jbb": jbb,
    "strongreject": strongreject,
    "xstest": xstest,
    "advbench": advbench,
    "donotanswer": donotanswer,
    "unified": unified,
    "catqa": catqa,
    "harmfulqa": harmfulqa,
}


def load_raw(fmt: str, path: str | Path) -> list[RawPrompt]:
    if fmt not in RAW_FORMATS:
        raise ValueError(f"unknown source format '{fmt}'; known: {', '.join(RAW_FORMATS)}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found")
    return [p for p in RAW_FORMATS[fmt](path) if p.text.strip()]
