"""The real-vLLM end-to-end check (tests/test_vllm_e2e.py) on an exported reference model.

    python scripts/vllm_e2e.py --model runs/models/smollm2-e32k16-shared-qwen2moe --corpora ../shared/corpora

Build the model first (README, "Reference models"):

    routescan moefy -c configs/models/smollm2-e32k16-shared-linear.yaml \
        -o runs/models/smollm2-e32k16-shared-linear
    routescan export runs/models/smollm2-e32k16-shared-linear -o runs/models/smollm2-e32k16-shared-qwen2moe

and the vLLM venv (scripts/vllm_venv.sh). Prompts are benign Alpaca test prompts read through the
corpus loaders (never printed); the long request joins several of them so that chunked prefill splits
it. The daemon scores with a plumbing detector (routescan.agent.vllm_e2e.plumbing_detector): this
checks delivery and counts, not detection. Writes docs/vllm-e2e.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

from routescan.agent.vllm_e2e import VLLM_VERSION, E2EConfig, ensure_vllm_venv, plumbing_detector, run_e2e
from routescan.corpus.unified import load_benign, sample

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--corpora", type=Path, default=Path("../shared/corpora"))
    parser.add_argument("--requests", type=int, default=12, help="Concurrent requests per wave")
    parser.add_argument("--long-parts", type=int, default=12, help="Prompts joined into the long request")
    parser.add_argument("--max-num-batched-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "vllm-e2e.json")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    python = ensure_vllm_venv()
    rows = sample(
        [r for r in load_benign(args.corpora) if not r.hard_negative],
        args.requests + args.long_parts,
        args.seed,
    )
    prompts = [r.text for r in rows[: args.requests]]
    long_prompt = "\n\n".join(r.text for r in rows[args.requests :])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        detector = plumbing_detector(args.model, work / "detector.zip")
        report = run_e2e(
            E2EConfig(
                model=args.model,
                detector=detector,
                workdir=work / "run",
                prompts=prompts,
                long_prompt=long_prompt,
                vllm_python=python,
                max_num_batched_tokens=args.max_num_batched_tokens,
            )
        )
    command = "python scripts/vllm_e2e.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    result = {
        "command": command,
        "model": args.model.name,
        "vllm": VLLM_VERSION,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        **report.as_dict(),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
