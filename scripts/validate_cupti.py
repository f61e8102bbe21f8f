"""GPU proof of the telemetry: CUPTI-collected vs emulated per-(layer, expert) threads, a fitted tile
table, and the collector's prefill overhead. Needs one NVIDIA GPU and `pip install -e '.[gpu]'`.

    .venv/bin/python scripts/validate_cupti.py --tiny mixtral              # seeded tiny model
    .venv/bin/python scripts/validate_cupti.py --model runs/models/smollm2-e32k16-shared

Writes docs/gpu-validation.md (a section per run) and, when the GEMM tiles the GPU chose differ from
the emulator's table, configs/launch/<gpu>.yaml: the hf-eager launch model with the observed tiles.
On a machine without a GPU it stops with the collector's one-line explanation.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from benchlib import update_section  # noqa: E402

from routescan.corpus.prompts import demo_prompts_path, read_prompts  # noqa: E402
from routescan.models.loading import load_pretrained, load_tiny  # noqa: E402
from routescan.telemetry.cupti import CuptiCollector, GpuUnavailable  # noqa: E402
from routescan.telemetry.emulated import EmulatedCollector, Request  # noqa: E402
from routescan.telemetry.nvml import device_report  # noqa: E402
from routescan.telemetry.registry import load_launch_model  # noqa: E402
from routescan.telemetry.schema import Region  # noqa: E402


def gemm_observations(traces) -> dict[str, list[tuple[int, tuple, tuple]]]:
    """kernel slot (gate_up / down) -> [(M, grid, block)] from CUPTI expert launches, M from routing."""
    out: dict[str, list] = defaultdict(list)
    for trace, counts in traces:
        per = defaultdict(list)
        for launch in trace.launches:
            if launch.region == Region.expert and "gemm" in launch.kernel.lower():
                per[(launch.layer, launch.expert)].append(launch)
        for (layer, expert), launches in per.items():
            m = counts[layer][expert]
            for slot, launch in zip(("gemm_gate_up", "gemm_down"), launches, strict=False):
                out[slot].append((m, tuple(launch.grid), tuple(launch.block)))
    return out


def fit_tiles(obs: list[tuple[int, tuple, tuple]], gm: int) -> list[dict]:
    """`choose` rows (when GN <= m: TM, TN, CTA, SPLITK) reproducing the observed grids."""
    rows: list[dict] = []
    for m, grid, block in sorted(obs):
        cta = block[0] * block[1] * block[2]
        tm = -(-gm // max(grid[0], 1))
        tn = -(-m // max(grid[1], 1))
        tm, tn = 1 << (tm - 1).bit_length(), 1 << (tn - 1).bit_length()
        row = {"TM": tm, "TN": tn, "CTA": cta, "SPLITK": grid[2]}
        if rows and rows[-1]["set"] == row:
            rows[-1]["max"] = m
        else:
            rows.append({"max": m, "set": row})
    return [{"when": f"GN <= {r['max']}", "set": r["set"]} for r in rows[:-1]] + (
        [{"set": rows[-1]["set"]}] if rows else []
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", type=Path)
    src.add_argument("--tiny", default="mixtral")
    ap.add_argument("--prompts", type=Path, default=None, help="Prompt file (default: the demo prompts)")
    ap.add_argument("--repeats", type=int, default=20, help="Prefills per prompt for the overhead figure")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "gpu-validation.md")
    args = ap.parse_args()

    report = device_report()
    if not report.available:
        sys.exit(f"no GPU: {report.reason}")
    gpu = report.gpus[0]
    loaded = load_pretrained(args.model) if args.model else load_tiny(args.tiny)
    loaded.model.to("cuda")
    rows = list(read_prompts(args.prompts or demo_prompts_path()))
    requests = [Request(r.trace_id, r.text) for r in rows]
    hf = load_launch_model("hf-eager")

    try:
        collector = CuptiCollector(loaded)
    except GpuUnavailable as exc:
        sys.exit(str(exc))
    emulated = {
        req.trace_id: t["hf-eager"]
        for req, t in EmulatedCollector(loaded, [hf], batch_size=1).collect(requests)
    }
    router = {
        req.trace_id: t["router"]
        for req, t in EmulatedCollector(loaded, [load_launch_model("router")], batch_size=1).collect(requests)
    }
    measured = dict((req.trace_id, trace) for req, trace in collector.collect(requests))

    exact, rel_err, attributed = 0, [], 0
    pairs = []
    for rid, trace in measured.items():
        got, want = trace.expert_threads(), emulated[rid].expert_threads()
        exact += got == want
        keys = set(got) | set(want)
        rel_err.append(sum(abs(got.get(k, 0) - want.get(k, 0)) for k in keys) / max(sum(want.values()), 1))
        attributed += sum(1 for x in trace.launches if x.region == Region.expert)
        counts = defaultdict(dict)
        for x in router[rid].launches:
            counts[x.layer][x.expert] = x.threads
        pairs.append((trace, counts))

    # fitted tile table where the GPU chose other GEMM tiles than the emulator assumes
    obs = gemm_observations(pairs)
    fitted_path = None
    if obs:
        dims = loaded.adapter.layers[0].dims()
        doc = yaml.safe_load((ROOT / "configs" / "launch" / "hf-eager.yaml").read_text())
        fitted = copy.deepcopy(doc)
        fitted["name"] = f"hf-eager-{gpu.name.lower().replace(' ', '-')}"[:64]
        fitted["description"] = f"hf-eager with GEMM tiles fitted on {gpu.name} by scripts/validate_cupti.py"
        for k in fitted["kernels"]:
            if k["name"] in obs:
                gm = dims["G"] * dims["I"] if k["name"] == "gemm_gate_up" else dims["H"]
                k["choose"] = fit_tiles(obs[k["name"]], gm)
        fitted_path = ROOT / "configs" / "launch" / f"{fitted['name']}.yaml"
        fitted_path.write_text(yaml.safe_dump(fitted, sort_keys=False))

    # overhead: prefill latency with and without the collector's tagging and flush
    def timed(fn) -> float:
        times = []
        for _ in range(args.repeats):
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    ids = torch.tensor([loaded.encoder.encode(rows[0].text)], device="cuda")
    with torch.inference_mode():
        base = timed(lambda: loaded.model(input_ids=ids, use_cache=False, logits_to_keep=1))
    probe = [requests[0]] * args.repeats
    start = time.perf_counter()
    list(CuptiCollector(loaded).collect(probe))
    with_collector = (time.perf_counter() - start) / len(probe)
    overhead = with_collector / base - 1

    body = "\n".join(
        [
            f"## {loaded.model_id} on {gpu.name} "
            f"(driver {report.driver_version}, CUDA {report.cuda_driver_version})",
            "",
            f"Command: `python scripts/validate_cupti.py {' '.join(sys.argv[1:])}`",
            "",
            f"- requests: {len(measured)}; per-(layer, expert) threads identical to the emulator: {exact}",
            f"- mean relative L1 difference of per-(layer, expert) threads: {statistics.mean(rel_err):.4f}",
            f"- expert-attributed kernel launches: {attributed}",
            f"- fitted launch model: {fitted_path.relative_to(ROOT) if fitted_path else 'none (no GEMMs)'}",
            f"- prefill latency: {base * 1e3:.2f} ms without, {with_collector * 1e3:.2f} ms with "
            f"the collector ({overhead:+.1%}; goal < 3%)",
        ]
    )
    update_section(args.out, f"cupti-{loaded.model_id}", body)
    print(body)


if __name__ == "__main__":
    main()
