"""Scoring service and trace wire benchmarks, on loopback only, bounded in count and time.

    python scripts/bench_service.py            # writes the `service` section of docs/benchmarks.md

Traces have the primary reference MoE's shape (30 MoE layers x 32 experts, top-16: the record the
agent sends for it), scored by a detector of that shape (a logistic regression fitted here on
random labels: scoring costs the same whatever it learned). Measured, in one run:

1. in-process: one trace scored (check + featurise + predict) p50 / p99; the agent's per-trace
   work (counts from the step's router selections; trace build + MessagePack serialisation);
2. trace file loading (JSONL and Parquet, MB/s of file read and validated);
3. the framework's ceiling: scripts/ceiling_app.py, a FastAPI endpoint that reads the body and
   answers a constant, under the same uvicorn settings, with the same bodies;
4. REST `POST /v1/score`, one trace per request, JSON and MessagePack, and one fingerprint, with
   wrk (`apt-get install wrk`); each as requests/s and as a ratio of the ceiling for that body;
5. batch scoring through `POST /v1/score/batch`, 256 traces per request, both encodings (wrk).

Server and load generator share the same 2 cores, on 127.0.0.1, as they would on a small sidecar host.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from benchlib import PRIMARY_SHAPE, machine, primary_shape_traces, update_section  # noqa: E402
from servers import free_port, serve_process  # noqa: E402

from routescan.detector.artifact import Detector  # noqa: E402
from routescan.detector.scoring import Scorer  # noqa: E402
from routescan.detector.train import train_detector  # noqa: E402
from routescan.features.fingerprint import FingerprintSpec, fingerprint  # noqa: E402
from routescan.telemetry.io import read_traces, write_traces  # noqa: E402
from routescan.telemetry.schema import RequestTrace  # noqa: E402
from routescan.telemetry.wire import MEDIA_TYPE, packb, trace_payload  # noqa: E402


def as_json(body: dict) -> bytes:
    """A request body holding traces, as a JSON client sends it."""

    def encode(value):
        if isinstance(value, RequestTrace):
            return value.model_dump(mode="json", exclude_none=True)
        if isinstance(value, dict):
            return {k: encode(v) for k, v in value.items()}
        if isinstance(value, list):
            return [encode(v) for v in value]
        return value

    return json.dumps(encode(body)).encode()


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def primary_detector(traces, out: Path) -> Detector:
    spec = FingerprintSpec.from_trace(traces[0], "hf-eager")
    X = spec.transform_many(traces)
    y = np.random.default_rng(1).integers(0, 2, len(traces))
    det = train_detector(X, y, spec, detector_id="bench-primary-shape", version="0", demo=True)
    det.save(out)
    return Detector.load(out)


def in_process(det: Detector, traces) -> dict[str, float]:
    scorer = Scorer(det, det.card.operating_point(None))
    for t in traces[:50]:
        scorer.score([t])
    lat = []
    for t in traces:
        start = time.perf_counter()
        scorer.score([t])
        lat.append(time.perf_counter() - start)
    return {"score_p50_ms": percentile(lat, 50) * 1e3, "score_p99_ms": percentile(lat, 99) * 1e3}


def agent_work(traces) -> dict[str, float]:
    """What the agent does per request: counts from the step's [tokens, top_k] router selections
    (on the forward path), then build + serialise (in the sender thread)."""
    import torch

    from routescan.telemetry.collector import LayerShape, routing_trace, step_counts
    from routescan.telemetry.schema import LayerDims

    s = PRIMARY_SHAPE
    shapes = [LayerShape(i, s["experts"], s["top_k"], LayerDims(**s["dims"])) for i in range(s["layers"])]
    tokens = 8 * 128  # a step of 8 requests of 128 tokens
    gen = torch.Generator().manual_seed(0)
    selections = {
        i: torch.rand(tokens, s["experts"], generator=gen).argsort(dim=1)[:, : s["top_k"]]
        for i in range(s["layers"])
    }
    counts_lat, build_lat, sizes = [], [], []
    spans = [(i * 128, 128) for i in range(8)]
    for rep in range(400):
        start = time.perf_counter()
        per_request = step_counts(selections, spans, shapes)
        counts_lat.append((time.perf_counter() - start) / len(spans))
        counts = per_request[rep % 8]
        start = time.perf_counter()
        trace = routing_trace("bench", shapes, counts, 128, trace_id=f"r-{rep}", collector="agent")
        wire = packb(trace_payload(trace))
        build_lat.append(time.perf_counter() - start)
        sizes.append(len(wire))
    return {
        "counts_p50_ms": percentile(counts_lat[20:], 50) * 1e3,
        "build_p50_ms": percentile(build_lat[20:], 50) * 1e3,
        "build_p99_ms": percentile(build_lat[20:], 99) * 1e3,
        "bytes": float(np.mean(sizes)),
    }


def file_loading(traces, tmp: Path) -> dict[str, float]:
    out = {}
    for suffix in (".jsonl", ".parquet"):
        path = tmp / f"load{suffix}"
        write_traces(path, traces)
        size = path.stat().st_size
        times = []
        for _ in range(3):
            start = time.perf_counter()
            n = sum(1 for _ in read_traces(path))
            times.append(time.perf_counter() - start)
        assert n == len(traces)
        out[suffix] = size / min(times) / 1e6
        out[f"{suffix}_kib_per_trace"] = size / len(traces) / 1024
    return out


@contextmanager
def ceiling_process():
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "ceiling_app:app",
            "--app-dir",
            str(HERE),
            "--port",
            str(port),
            "--no-access-log",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                httpx.post(f"{base}/v1/score", content=b"{}", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def wrk(url: str, payload: bytes, media: str, seconds: int, connections: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        body = Path(tmp) / "body.bin"
        body.write_bytes(payload)
        script = Path(tmp) / "post.lua"
        script.write_text(
            f'local f = io.open("{body}", "rb")\nwrk.body = f:read("*all")\nf:close()\n'
            f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "{media}"\n'
            "response = function(status, headers, body)\n  if status ~= 200 then\n"
            '    io.stderr:write("status " .. status .. "\\n")\n  end\nend\n'
        )
        out = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url],
            capture_output=True,
            text=True,
            check=True,
            timeout=seconds + 30,
        )
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out.stdout).group(1))
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out.stdout)
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[p99.group(2)] if p99 else float("nan")
    return {"rps": rps, "p99_ms": float(p99.group(1)) * scale if p99 else float("nan"),
            "non_200": out.stderr.count("status ")}  # fmt: skip


def batch(base: str, body: bytes, media: str, items: int, seconds: int, connections: int) -> float:
    """Traces per second through POST /v1/score/batch, wrk posting the same batch body."""
    return wrk(f"{base}/v1/score/batch", body, media, seconds, connections)["rps"] * items


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--clients", type=int, default=1, help="wrk connections posting batches")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed for the REST figures: apt-get install wrk")

    traces = primary_shape_traces(2000)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        det = primary_detector(traces, tmp / "detector.zip")
        inproc = in_process(det, traces)
        print("in-process:", inproc, flush=True)
        agent = agent_work(traces)
        print("agent:", agent, flush=True)
        loading = file_loading(traces, tmp)
        print("loading MB/s:", loading, flush=True)

        fp = fingerprint(traces[0], det.spec).model_dump(mode="json")
        bodies = {
            "trace, JSON": (as_json({"trace": traces[0]}), "application/json"),
            "trace, MessagePack": (packb({"trace": traces[0]}), MEDIA_TYPE),
            "fingerprint, JSON": (json.dumps({"fingerprint": fp}).encode(), "application/json"),
        }
        rest: dict[str, tuple[dict, dict]] = {}
        db = tmp / "audit.sqlite3"
        env = {"ROUTESCAN_MAX_BODY_BYTES": str(64 << 20), "ROUTESCAN_MAX_BATCH": str(args.batch_size)}
        # interleaved: the ceiling for a body right before RouteScan with the same body
        for name, (payload, media) in bodies.items():
            with ceiling_process() as base:
                ceiling = wrk(f"{base}/v1/score", payload, media, args.seconds, args.connections)
            with serve_process("--db", str(db), "--detector", str(tmp / "detector.zip"), env=env) as (
                base,
                _,
            ):
                ours = wrk(f"{base}/v1/score", payload, media, args.seconds, args.connections)
            rest[name] = (ours, ceiling)
            print(f"REST {name}: {ours} vs ceiling {ceiling}", flush=True)
        items = traces[: args.batch_size]
        batch_bodies = {
            "MessagePack": (packb({"items": [{"trace": t} for t in items]}), MEDIA_TYPE),
            "JSON": (as_json({"items": [{"trace": t} for t in items]}), "application/json"),
        }
        batches = {}
        with serve_process("--db", str(db), "--detector", str(tmp / "detector.zip"), env=env) as (base, _):
            for name, (body, media) in batch_bodies.items():
                batches[name] = batch(base, body, media, len(items), args.seconds, args.clients)
                print(f"batch {name}: {batches[name]:,.0f} traces/s", flush=True)
        rows = sqlite3.connect(db).execute("SELECT COUNT(*) FROM audits").fetchone()[0]

    def verdict(ok: bool) -> str:
        return "met" if ok else "**NOT met**"

    command = (
        f"python scripts/bench_service.py --seconds {args.seconds} --connections {args.connections} "
        f"--batch-size {args.batch_size} --clients {args.clients}"
    )
    s = PRIMARY_SHAPE
    lines = [
        "## Scoring service and the trace wire",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine()}, {os.cpu_count()} cores. `routescan serve` (1 uvicorn worker, uvloop + "
        "httptools, "
        "SQLite WAL + synchronous=FULL, group commit: every score is durably recorded before it is "
        "answered), the ceiling app and wrk share the same cores, on 127.0.0.1. Traces: routescan.trace/2 "
        f"of the primary reference MoE's shape ({s['layers']} MoE layers x {s['experts']} experts, "
        f"top-{s['top_k']}), "
        f"scored under hf-eager by a detector of that shape ({det.spec.dim} features). Bodies: "
        + ", ".join(f"{name} {len(p) / 1024:.1f} KiB" for name, (p, _) in bodies.items())
        + ".",
        "",
        "| measure | result | goal |",
        "|---|---:|---|",
    ]
    for name, (ours, ceiling) in rest.items():
        ratio = ours["rps"] / ceiling["rps"]
        goal = "" if name.startswith("fingerprint") else (
            f">= 5,000 req/s: {verdict(ours['rps'] >= 5000)}; >= 0.5 of the ceiling: {verdict(ratio >= 0.5)}"
        )  # fmt: skip
        lines.append(
            f"| REST `POST /v1/score`, one {name} per request "
            f"(wrk -t1 -c{args.connections} -d{args.seconds}s) "
            f"| {ours['rps']:,.0f} req/s (p99 {ours['p99_ms']:.1f} ms, {ours['non_200']} non-200); ceiling "
            f"{ceiling['rps']:,.0f} req/s; **ratio {ratio:.2f}** | {goal} |"
        )
    for name, rate in batches.items():
        lines.append(
            f"| batch scoring, `POST /v1/score/batch`, {args.batch_size} traces per request, {name} "
            f"(wrk -c{args.clients}) | {rate:,.0f} traces/s | >= 50,000 traces/s: {verdict(rate >= 50_000)} |"
        )
    lines += [
        "| agent build + serialise (trace/2 + MessagePack), per trace, p50 / p99 | "
        f"{agent['build_p50_ms']:.3f} / "
        f"{agent['build_p99_ms']:.3f} ms ({agent['bytes'] / 1024:.1f} KiB) | < 0.5 ms: "
        f"{verdict(agent['build_p99_ms'] < 0.5)} |",
        f"| agent counts from a step's router selections (forward path; 8 requests of 128 tokens, "
        "per request), p50 | "
        f"{agent['counts_p50_ms']:.3f} ms | |",
        f"| trace file loading, JSONL ({loading['.jsonl_kib_per_trace']:.1f} KiB a trace) | "
        f"{loading['.jsonl']:,.0f} MB/s | >= 100 MB/s: {verdict(loading['.jsonl'] >= 100)} |",
        f"| trace file loading, Parquet ({loading['.parquet_kib_per_trace']:.1f} KiB a trace) | "
        f"{loading['.parquet']:,.0f} MB/s | (compressed: MB/s of file understates the rate) |",
        f"| in-process score, one trace (check + featurise + predict), p50 / p99 | "
        f"{inproc['score_p50_ms']:.3f} / {inproc['score_p99_ms']:.3f} ms | p99 < 1 ms: "
        f"{verdict(inproc['score_p99_ms'] < 1.0)} |",
        "",
        f"Every scored request was durably recorded ({rows:,} audit rows written during the run).",
    ]
    text = "\n".join(lines)
    if not args.no_write:
        update_section(args.out, "service", text)
        print(f"wrote {args.out}")
    print(text)


if __name__ == "__main__":
    main()
