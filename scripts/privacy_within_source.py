"""Does content-word recovery from fingerprints only reflect *which benchmark* a prompt came from?
Re-run the word-recovery attack of ``routescan invert`` inside each large source separately, so
source-marking words cannot help: vocabulary, attacker training and test all come from one source.

    .venv/bin/python scripts/privacy_within_source.py runs/traces/smollm2-e32k16-shared.hf-eager.jsonl \\
        --corpus configs/corpus/benchmarks.yaml --corpora ../shared/corpora

Prints one row per source with at least --min-rows plain prompts and writes docs/privacy-within-source.json.
Prompt text stays in this process; only scores are written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from routescan.corpus.builder import CorpusConfig, build_corpus  # noqa: E402
from routescan.features.fingerprint import FingerprintSpec  # noqa: E402
from routescan.privacy.inversion import content_words, embed_texts, holdout_split, word_recovery  # noqa: E402
from routescan.telemetry.io import read_traces  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("traces", type=Path)
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--corpora", type=Path, default=Path("../shared/corpora"))
    ap.add_argument("--min-rows", type=int, default=1000)
    ap.add_argument("--top-n", type=int, default=100)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "privacy-within-source.json")
    ap.add_argument("--launch-model", "-l", default=None, help="signal (default: hf-eager for routed counts)")
    args = ap.parse_args()

    examples = {e.id: e for e in build_corpus(args.corpora, CorpusConfig.from_yaml(args.corpus))}
    traces = [t for t in read_traces(args.traces) if t.trace_id in examples]
    traces = [t for t in traces if examples[t.trace_id].family == "none"]
    spec = FingerprintSpec.from_trace(traces[0], args.launch_model)
    X = spec.transform_many(traces)
    sources = np.array([examples[t.trace_id].source for t in traces])
    out = {}
    print("| source | prompts | frequent words | fingerprint (k-NN / MLP / linear) | text (same) |")
    print("|---|---|---|---|---|")
    for source in sorted(set(sources)):
        rows = np.flatnonzero(sources == source)
        if len(rows) < args.min_rows:
            continue
        texts = [examples[traces[k].trace_id].text for k in rows]
        train, test = holdout_split(len(rows), 0)
        _, T = embed_texts(texts, train, 0)
        words = [content_words(t) for t in texts]
        r = word_recovery({"fingerprint": X[rows], "text": T}, words, train, test, top_n=args.top_n, seed=0)
        f1 = {k: v["f1"] for k, v in r.items() if isinstance(v, dict)}
        out[source] = {"prompts": len(rows), "f1": f1}
        fp = " / ".join(f"{f1[f'fingerprint / {a}']:.3f}" for a in ("knn", "mlp", "linear"))
        tx = " / ".join(f"{f1[f'text / {a}']:.3f}" for a in ("knn", "mlp", "linear"))
        print(f"| {source} | {len(rows)} | {f1['frequent-words baseline']:.3f} | {fp} | {tx} |", flush=True)
    args.out.write_text(json.dumps({"traces": str(args.traces), "sources": out}, indent=1), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
