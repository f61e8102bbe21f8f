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
import statistics
import sys
import time
from pathlib import Path

import numpy as np
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
from routescan.telemetry.launch import signal_threads  # noqa: E402
from routescan.telemetry.nvml import device_report  # noqa: E402
from routescan.telemetry.registry import load_launch_model  # noqa: E402
from routescan.telemetry.schema import Region  # noqa: E402
from routescan.telemetry.tiles import fitted_launch_model, gemm_observations  # noqa: E402


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
        collector = CuptiCollector(loaded, attach=True)
    except GpuUnavailable as exc:
        sys.exit(str(exc))
    routed = {req.trace_id: t for req, t in EmulatedCollector(loaded, batch_size=1).collect(requests)}
    measured = dict((req.trace_id, trace) for req, trace in collector.collect(requests))

    exact, rel_err, attributed = 0, [], 0
    for rid, trace in measured.items():
        got = trace.counts.flat.astype(float)  # CUPTI threads per (layer, expert)
        want = signal_threads([routed[rid]], hf).expert[0]  # what the emulator derives from routing
        exact += bool(np.array_equal(got, want))
        rel_err.append(float(np.abs(got - want).sum() / max(want.sum(), 1)))
        attributed += sum(1 for x in trace.launches or [] if x.region == Region.expert)

    # fitted tile table where the GPU chose other GEMM tiles than the emulator assumes
    obs = gemm_observations((measured[rid], routed[rid]) for rid in measured)
    fitted_path = None
    if obs:
        layer = loaded.adapter.layers[0]
        dims = {"H": layer.hidden, "I": layer.intermediate, "G": 2 if layer.gated else 1}
        base_doc = yaml.safe_load((ROOT / "configs" / "launch" / "hf-eager.yaml").read_text())
        name = f"hf-eager-{gpu.name.lower().replace(' ', '-')}"
        fitted = fitted_launch_model(base_doc, obs, dims, name=name)
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
