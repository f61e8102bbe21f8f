"""Requests per minute that `routescan collect` sustains on a real-weights reference MoE, by setting.

    python scripts/bench_collect_rate.py runs/models/smollm2-e32k16-shared   # writes `collect-rate`

A seeded random sample of a corpus recipe (default: compact, 192 requests: plain, hard-negative
and jailbreak-wrapped requests in their natural mix of lengths), sorted by length as `collect
--corpus` sorts it, is collected with each setting in turn (one trace/2 record of routed counts per
request, from which every signal is derived, as the detector corpus is collected). The rate is the
one `collect` itself prints at the end. The prompts go to a temporary file that is deleted; nothing
is printed of them.

"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import machine, update_section

from routescan.corpus.builder import CorpusConfig, build_corpus

SETTINGS = {
    "defaults (eager experts, batch 4)": [],
    "eager, batch 8 (the previous default)": ["--batch-size", "8"],
    "eager, batch 32": ["--batch-size", "32"],
    "masked_dense, batch 2": [
        "--experts-implementation",
        "masked_dense",
        "--batch-size",
        "2",
    ],
    "masked_dense, batch 4": [
        "--experts-implementation",
        "masked_dense",
        "--batch-size",
        "4",
    ],
    "masked_dense, batch 32": [
        "--experts-implementation",
        "masked_dense",
        "--batch-size",
        "32",
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", type=Path, help="a reference MoE built by `routescan moefy`")
    parser.add_argument("--corpus", type=Path, default=Path("configs/corpus/compact.yaml"))
    parser.add_argument("--corpora", type=Path, default=Path("../shared/corpora"))
    parser.add_argument("--requests", type=int, default=192)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    examples = build_corpus(args.corpora, CorpusConfig.from_yaml(args.corpus))
    sample = sorted(random.Random(0).sample(examples, args.requests), key=lambda e: len(e.text))
    rates: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "sample.jsonl"
        prompts.write_text("".join(json.dumps({"id": e.id, "prompt": e.text}) + "\n" for e in sample))
        for name, flags in SETTINGS.items():
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "routescan.cli.main",
                    "collect",
                    "--model",
                    str(args.model),
                    "--prompts",
                    str(prompts),
                    "--id-column",
                    "id",
                    "--out",
                    str(Path(tmp) / "t.jsonl"),
                    "--overwrite",
                    *flags,
                ],
                capture_output=True,
                text=True,
                timeout=1800,
            )
            match = re.search(r"collecting: [\d,]+/[\d,]+ \(100%\), ([\d.,]+)/min", out.stderr + out.stdout)
            if out.returncode or not match:
                raise SystemExit(f"collect failed for {name}: {(out.stderr or out.stdout)[-500:]}")
            rates[name] = float(match.group(1).replace(",", ""))
            print(f"{name}: {rates[name]:.0f} requests/min", flush=True)

    lines = [
        "## Collection speed on the primary reference MoE (`python scripts/bench_collect_rate.py`)",
        "",
        f"Command: `python scripts/bench_collect_rate.py {args.model} --corpus {args.corpus} "
        f"--requests {args.requests}`",
        "",
        f"Machine: {machine()}, nothing else running. {args.requests} requests drawn at random (seed 0) "
        f"from the `{args.corpus.stem}` corpus (plain, hard-negative and wrapped, so lengths vary from a "
        "few tokens to several hundred), sorted by length, one trace/2 record per request.",
        "",
        "| setting | requests / min |",
        "|---|---:|",
        *[f"| {name} | {rate:,.0f} |" for name, rate in rates.items()],
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        update_section(args.out, "collect-rate", text)


if __name__ == "__main__":
    main()
