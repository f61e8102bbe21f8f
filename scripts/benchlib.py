"""Helpers for benchmark scripts: timing and writing one named section of docs/benchmarks.md."""

from __future__ import annotations

import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

_HEADER = (
    "# Benchmarks\n\nFigures written by scripts/bench_*.py; each section names the command that wrote it.\n"
)


def machine() -> str:
    import torch

    return (
        f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def update_section(path: Path, name: str, body: str) -> None:
    """Replace (or append) the block between `<!-- bench:NAME -->` markers, keeping other sections."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else _HEADER
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


PRIMARY_SHAPE = {"layers": 30, "experts": 32, "top_k": 16, "dims": {"H": 576, "I": 40, "SI": 256, "G": 2}}


def primary_shape_traces(n: int, seed: int = 0, model_id: str = "bench-primary-shape"):
    """Routed-count traces of the primary reference MoE's shape (SmolLM2-135M MoEfied: 30 MoE layers,
    32 experts, top-16, a shared expert), each token choosing top_k distinct experts at random, with
    prompt lengths of 20-300 tokens: the size of record the agent sends for that model."""
    import numpy as np

    from routescan.telemetry.collector import LayerShape, routing_trace
    from routescan.telemetry.schema import LayerDims

    rng = np.random.default_rng(seed)
    s = PRIMARY_SHAPE
    shapes = [LayerShape(i, s["experts"], s["top_k"], LayerDims(**s["dims"])) for i in range(s["layers"])]
    out = []
    for i in range(n):
        tokens = int(rng.integers(20, 300))
        picks = rng.random((s["layers"], tokens, s["experts"])).argsort(axis=2)[:, :, : s["top_k"]]
        counts = np.stack([np.bincount(p.reshape(-1), minlength=s["experts"]) for p in picks]).reshape(-1)
        out.append(routing_trace(model_id, shapes, counts, tokens, trace_id=f"bench-{i}", collector="agent"))
    return out
