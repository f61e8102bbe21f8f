"""The plugin's cost on real vLLM: requests/s and prompt tokens/s with the plugin off and on.

    python scripts/bench_vllm.py --model runs/models/smollm2-e32k16-shared-qwen2moe \
        --corpora ../shared/corpora

Two vLLM servers run side by side with the same engine settings, one with ``ROUTESCAN_AGENT=0``
(the plugin loads and returns at once) and one tracing every request to a live daemon. Load rounds
alternate between them (off, on, on, off, ...), so slow drifts of a shared 2-core machine hit both
alike; only one server is busy at a time. Each round sends the same benign Alpaca prompts
(corpus loaders; never printed) at a fixed concurrency. Prints a JSON summary; the figures go to
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from routescan.agent.vllm_e2e import (
    E2EConfig,
    chat,
    ensure_vllm_venv,
    plumbing_detector,
    start_daemon,
    start_vllm,
)
from routescan.corpus.unified import load_benign, sample

ROOT = Path(__file__).resolve().parents[1]


def load_round(port: int, model: str, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(lambda p: chat(port, model, p, max_tokens), prompts))
    seconds = time.perf_counter() - t0
    tokens = sum(n for _, n in results)
    return {
        "seconds": seconds,
        "requests_per_s": len(results) / seconds,
        "prompt_tokens_per_s": tokens / seconds,
    }


def agent_seconds(sock: Path) -> dict[str, float]:
    """The traced server's own account of its plugin (routescan_agent_seconds, from the daemon)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), timeout=10) as client:
        text = client.get("http://routescan/metrics").text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "routescan_agent_seconds":
            for sample in family.samples:
                out[sample.labels["part"]] = out.get(sample.labels["part"], 0.0) + sample.value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--corpora", type=Path, default=Path("../shared/corpora"))
    parser.add_argument("--requests", type=int, default=24, help="Requests per round")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=4, help="Generated tokens per request")
    parser.add_argument("--rounds", type=int, default=8, help="Rounds per server")
    parser.add_argument("--max-num-batched-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    python = ensure_vllm_venv()
    rows = sample([r for r in load_benign(args.corpora) if not r.hard_negative], args.requests, args.seed)
    prompts = [r.text for r in rows]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cfg = E2EConfig(
            model=args.model,
            detector=plumbing_detector(args.model, work / "detector.zip"),
            workdir=work,
            prompts=prompts,
            long_prompt="",
            vllm_python=python,
            max_num_batched_tokens=args.max_num_batched_tokens,
        )
        sock = work / "routescan.sock"
        daemon = start_daemon(cfg, sock, work / "audit.db")
        servers = {}
        try:
            servers["off"] = start_vllm(cfg, sock, port=8031, agent=False, name="off")
            # no trace-file copy: a deployment sends to the daemon only
            servers["on"] = start_vllm(cfg, sock, port=8032, agent=True, name="on", trace_file=False)
            ports = {"off": 8031, "on": 8032}
            for name in ("off", "on"):  # warm-up round each, not counted
                load_round(ports[name], str(args.model), prompts, args.concurrency, args.max_tokens)
            rounds: dict[str, list[dict]] = {"off": [], "on": []}
            for i in range(args.rounds):
                order = ("off", "on") if i % 2 == 0 else ("on", "off")
                for name in order:
                    r = load_round(ports[name], str(args.model), prompts, args.concurrency, args.max_tokens)
                    rounds[name].append(r)
                    print(f"round {i} {name}: {r['requests_per_s']:.2f} req/s", file=sys.stderr)
            from routescan.service.store import open_audit_store

            traced = len(open_audit_store(work / "audit.db", read_only=True).query(limit=100_000))
            parts = agent_seconds(sock)
        finally:
            for server in servers.values():
                server.stop()
            daemon.stop()

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in rounds[name])

    summary = {
        "command": "python scripts/bench_vllm.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "model": args.model.name,
        "requests_per_round": args.requests,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "traced": traced,
        # what the plugin reported of itself over all rounds (warm-up included)
        "plugin_seconds": parts,
        "plugin_step_share_of_forward": parts.get("step", 0.0) / max(parts.get("forward", 0.0), 1e-9),
        "sender_cpu_share_of_forward": parts.get("sender", 0.0) / max(parts.get("forward", 0.0), 1e-9),
        "off": {k: median("off", k) for k in ("requests_per_s", "prompt_tokens_per_s")},
        "on": {k: median("on", k) for k in ("requests_per_s", "prompt_tokens_per_s")},
        "per_round_requests_per_s": {n: [round(r["requests_per_s"], 3) for r in rounds[n]] for n in rounds},
    }
    summary["overhead"] = 1 - summary["on"]["requests_per_s"] / summary["off"]["requests_per_s"]
    # the pair of rounds run back to back shares the machine's state: their ratio is the steadier figure
    ratios = [
        b["requests_per_s"] / a["requests_per_s"] for a, b in zip(rounds["off"], rounds["on"], strict=True)
    ]
    summary["overhead_paired_median"] = 1 - statistics.median(ratios)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
