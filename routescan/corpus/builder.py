"""Build a labelled detector corpus from the shared benchmarks, as a recipe (``configs/corpus/*.yaml``).

Rules the detector's honesty depends on:

- harmful prompts are de-duplicated before anything else (JBB reuses HarmBench / AdvBench items), so
  one request never sits on both sides of a fold;
- benign prompts come from the Alpaca *val / test* splits only (the reference MoEs' routers were
  calibrated on the train split); hard negatives (XSTest safe, JBB benign) are kept and flagged, to
  be reported apart;
- jailbreak wrappers are applied to harmful AND benign requests, so "wrapped" never means "harmful";
  wrapped benign requests are drawn from a benign pool disjoint from the plain benign set;
- every example carries its label, harm domain, wrapper family / super-family, source and the id of
  the request it wraps (``base``), as short label tokens that travel inside traces. The prompt text
  exists only in memory, on its way to the collector.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from routescan.config import load_yaml
from routescan.corpus.raw import load_raw
from routescan.corpus.unified import CorpusRow, load_benign, load_harmful
from routescan.telemetry.schema import trace_id_problem

# The DAN-like families share ancestors (AutoDAN mutates DAN prompts, GPTFuzzer seeds come from the
# same forums): holding one out while training on another would leak, so they are one super-family.
DAN_LIKE = frozenset({"in_the_wild", "autodan", "persona_dan", "gptfuzzer_seed"})
PLAIN = "none"


def super_family(family: str) -> str:
    return "dan_like" if family in DAN_LIKE else family


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HarmfulConfig(_Strict):
    deduplicate: bool = True
    per_domain_cap: int | None = Field(None, ge=1, description="Keep at most this many per domain")
    unmapped_group: str = Field("unmapped", description="Group name of rows without a mapped domain")


class BenignConfig(_Strict):
    count: int = Field(4000, ge=1, description="Plain benign prompts (Alpaca val/test), seeded sample")
    splits: tuple[str, ...] = ("val", "test")
    hard_negatives: bool = True


class WrappingConfig(_Strict):
    harmful_per_family: int = Field(40, ge=0, description="Wrapped harmful requests per super-family")
    benign_per_family: int = Field(40, ge=0, description="Wrapped benign requests per super-family")
    families: list[str] | None = Field(None, description="Super-families to use (default: all)")
    max_template_chars: int = Field(8000, ge=100, description="Skip longer templates")


class ExtraSource(_Strict):
    """A benchmark file in its published format (see routescan.corpus.raw), added to the corpus."""

    format: str
    path: str = Field(description="The file, relative to the corpora folder unless absolute")
    domain: str | None = Field(
        None,
        description="Harm domain of harmful rows the loader does not map to one (default: its own "
        "group, extra_<format>); 'unmapped' makes them a training group that is never held out",
    )
    count: int | None = Field(None, ge=1, description="Keep a seeded sample of at most this many rows")


class CorpusConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")
    harmful: HarmfulConfig = HarmfulConfig()
    benign: BenignConfig = BenignConfig()
    wrapping: WrappingConfig = WrappingConfig()
    extra_sources: list[ExtraSource] = Field(default_factory=list)
    seed: int = 0

    @classmethod
    def from_yaml(cls, path: str | Path) -> CorpusConfig:
        return cls.model_validate(load_yaml(path))


@dataclass(frozen=True)
class Wrapper:
    id: str
    family: str
    template: str = field(repr=False)

    @property
    def super_family(self) -> str:
        return super_family(self.family)

    def wrap(self, text: str) -> str:
        # a plain replace: templates hold other braces, so str.format would break or inject
        return self.template.replace("{query}", text)


def load_wrappers(corpora: str | Path) -> list[Wrapper]:
    path = Path(corpora) / "wrappers.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; point --corpora at the folder holding wrappers.jsonl")
    out = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            item = json.loads(line)
            template = item.get("template", "")
            if "{query}" not in template:
                raise ValueError(f"{path}:{number}: template has no {{query}} slot")
            out.append(Wrapper(str(item["id"]), str(item["family"]), template))
    return out


_TOKEN = re.compile(r"[^A-Za-z0-9._:/+\-]")


def token(value: str) -> str:
    """A free-form name as a label token (what traces may carry)."""
    return _TOKEN.sub("_", value)[:64]


@dataclass(frozen=True)
class Example:
    """One request of the corpus. ``text`` stays in memory: it is handed to the collector only."""

    id: str
    text: str = field(repr=False)
    label: int
    domain: str  # harm domain, the unmapped group, or "benign"
    family: str  # wrapper family, or "none"
    base: str  # id of the unwrapped request
    source: str
    hard_negative: bool = False
    wrapper: str = PLAIN
    # where the request's text came from: file (relative to the corpora folder) and 0-based data row
    file: str = ""
    row: int | None = None

    @property
    def super_family(self) -> str:
        return super_family(self.family) if self.family != PLAIN else PLAIN

    def labels(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "domain": token(self.domain),
            "family": token(self.super_family),
            "wrapper": token(self.wrapper),
            "base": self.base,
            "source": token(self.source),
            "hard_negative": int(self.hard_negative),
        }


def _plain(row: CorpusRow, config: CorpusConfig) -> Example:
    if row.label:
        return Example(
            f"h-{row.row:05d}",
            row.text,
            1,
            row.domain or config.harmful.unmapped_group,
            PLAIN,
            f"h-{row.row:05d}",
            row.source,
            file="harmful.csv",
            row=row.row,
        )
    prefix = "n" if row.hard_negative else "b"
    return Example(
        f"{prefix}-{row.row:05d}",
        row.text,
        0,
        "benign",
        PLAIN,
        f"{prefix}-{row.row:05d}",
        row.source,
        hard_negative=row.hard_negative,
        file="benign.csv",
        row=row.row,
    )


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _extras(corpora: Path, config: CorpusConfig, seen: set[str]) -> list[Example]:
    """Rows of ``extra_sources``, minus any request already in the corpus (same text, any case);
    each source's ``count`` is a sample seeded by the recipe's seed and the source's position."""
    out = []
    for n, extra in enumerate(config.extra_sources):
        path = Path(extra.path) if Path(extra.path).is_absolute() else corpora / extra.path
        rows = list(enumerate(load_raw(extra.format, path)))
        if extra.count is not None and extra.count < len(rows):
            rows = sorted(random.Random(f"{config.seed}:{n}").sample(rows, extra.count), key=lambda r: r[0])
        for i, p in rows:
            if _norm(p.text) in seen:
                continue
            seen.add(_norm(p.text))
            ident = f"x{n}-{token(extra.format)}-{i:05d}"
            domain = (p.domain or extra.domain or f"extra_{extra.format}") if p.label else "benign"
            out.append(
                Example(
                    ident,
                    p.text,
                    p.label,
                    domain,
                    PLAIN,
                    ident,
                    p.source,
                    hard_negative=p.hard_negative,
                    file=extra.path,
                    row=i,
                )
            )
    return out


def build_corpus(corpora: str | Path, config: CorpusConfig) -> list[Example]:
    """The corpus the recipe describes, deterministic for a given seed and corpora folder."""
    rng = random.Random(config.seed)
    harmful_rows = load_harmful(corpora, keep_duplicates=not config.harmful.deduplicate)
    if config.harmful.per_domain_cap:
        by_domain: dict[str, list[CorpusRow]] = defaultdict(list)
        for row in harmful_rows:
            by_domain[row.domain or config.harmful.unmapped_group].append(row)
        harmful_rows = sorted(
            (
                r
                for rows in by_domain.values()
                for r in rng.sample(rows, min(len(rows), config.harmful.per_domain_cap))
            ),
            key=lambda r: r.row,
        )
    benign_all = load_benign(corpora, splits=config.benign.splits)
    hard = [r for r in benign_all if r.hard_negative] if config.benign.hard_negatives else []
    pool = [r for r in benign_all if not r.hard_negative]
    rng.shuffle(pool)
    if len(pool) < config.benign.count:
        raise ValueError(
            f"only {len(pool)} benign prompts in splits {config.benign.splits}; lower benign.count"
        )
    plain_benign, spare_benign = pool[: config.benign.count], pool[config.benign.count :]

    examples = [_plain(r, config) for r in harmful_rows]
    examples += [_plain(r, config) for r in sorted(plain_benign, key=lambda r: r.row)]
    examples += [_plain(r, config) for r in hard]
    examples += _extras(Path(corpora), config, {_norm(e.text) for e in examples})

    wrap = config.wrapping
    wrappers = [w for w in load_wrappers(corpora) if len(w.template) <= wrap.max_template_chars]
    families: dict[str, list[Wrapper]] = defaultdict(list)
    for w in wrappers:
        families[w.super_family].append(w)
    chosen = wrap.families if wrap.families is not None else sorted(families)
    unknown = sorted(set(chosen) - set(families))
    if unknown:
        raise ValueError(f"unknown wrapper families {unknown}; known: {', '.join(sorted(families))}")
    # wrapped harmful requests come from the benchmark set only, so the wrapper protocol keeps one
    # meaning across recipes (extra sources add plain rows)
    harmful_plain = [e for e in examples if e.label == 1 and e.file == "harmful.csv"]
    spare = [_plain(r, config) for r in spare_benign]
    needed = wrap.benign_per_family * len(chosen)
    if len(spare) < needed:
        raise ValueError(f"{len(spare)} spare benign prompts for wrapping, {needed} needed; lower the counts")
    spare_iter = iter(spare)
    for fam in chosen:
        templates = families[fam]
        bases = rng.sample(harmful_plain, min(wrap.harmful_per_family, len(harmful_plain)))
        bases += [next(spare_iter) for _ in range(wrap.benign_per_family)]
        for i, base in enumerate(bases):
            w = templates[i % len(templates)] if len(templates) <= len(bases) else rng.choice(templates)
            examples.append(
                Example(
                    # family and template are labels already; the id only needs to be unique
                    f"w-{base.id}-{hashlib.blake2b(w.id.encode(), digest_size=4).hexdigest()}",
                    w.wrap(base.text),
                    base.label,
                    base.domain,
                    w.family,
                    base.id,
                    base.source,
                    wrapper=w.id,
                    file=base.file,
                    row=base.row,
                )
            )
    bad = [e.id for e in examples if trace_id_problem(e.id)]
    if bad:  # caught here, not after an hour of collection
        raise ValueError(f"corpus ids that traces cannot carry: {bad[:3]}; report this as a bug")
    ids = Counter(e.id for e in examples)
    dupes = [i for i, n in ids.items() if n > 1]
    if dupes:
        raise ValueError(f"corpus ids are not unique (e.g. {dupes[:3]}); report this as a bug")
    return examples


def manifest(config: CorpusConfig, examples: list[Example]) -> dict[str, Any]:
    """Which source rows a corpus used, per request id (never text): so a fresh test set can be
    drawn from rows no corpus touched, without rebuilding the corpus in memory."""
    return {
        "schema": "routescan.corpus-manifest/1",
        "recipe": config.name,
        "seed": config.seed,
        "examples": [
            {
                "id": e.id,
                "label": e.label,
                "source": e.source,
                "file": e.file,
                "row": e.row,
                "domain": e.domain,
                "family": e.super_family,
                "wrapper": e.wrapper,
                "base": e.base,
                "hard_negative": e.hard_negative,
            }
            for e in examples
        ],
    }


def summarize(examples: list[Example]) -> dict[str, Any]:
    """Counts only (never text): what the corpus holds, for reports and cards."""
    plain = [e for e in examples if e.family == PLAIN]
    return {
        "examples": len(examples),
        "harmful_plain": sum(e.label == 1 for e in plain),
        "benign_plain": sum(e.label == 0 and not e.hard_negative for e in plain),
        "hard_negatives": sum(e.hard_negative for e in plain),
        "harmful_by_domain": dict(sorted(Counter(e.domain for e in plain if e.label == 1).items())),
        "wrapped_by_family": {
            fam: {
                "harmful": sum(e.label for e in examples if e.super_family == fam),
                "benign": sum(1 - e.label for e in examples if e.super_family == fam),
            }
            for fam in sorted({e.super_family for e in examples} - {PLAIN})
        },
    }
