"""Scoring service benchmarks, on loopback only, bounded in count and time.

    python scripts/bench_service.py            # writes the `service` section of docs/benchmarks.md

1. in-process score latency (detector on one trace: featurize + predict; and on one fingerprint);
2. REST single-trace requests/s against `routescan serve` (1 uvicorn worker, SQLite audit store with
   durable group commits) — with wrk when it is installed (`apt-get install wrk`), else a Python client;
3. batch throughput: traces/s and fingerprints/s through POST /v1/score/batch.

The server and the load generator share the same 2 cores, as they would on a small sidecar host.
The traces are the demo detector's (tiny Mixtral, 180 launches each).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from benchlib import machine, update_section
from servers import serve_process

from routescan.corpus.prompts import demo_prompts_path, read_prompts
from routescan.detector.artifact import Detector, default_detector_path
from routescan.features.fingerprint import fingerprint
from routescan.models.loading import load_tiny
from routescan.telemetry.emulated import EmulatedCollector, Request
from routescan.telemetry.registry import load_launch_model


def demo_traces(n: int):
    prompts = list(read_prompts(demo_prompts_path()))
    loaded = load_tiny("mixtral")
    collector = EmulatedCollector(loaded, [load_launch_model("hf-eager")], batch_size=12)
    base = [t["hf-eager"] for _, t in collector.collect(Request(p.trace_id, p.text) for p in prompts)]
    return [base[i % len(base)].model_copy(update={"trace_id": f"bench-{i}"}) for i in range(n)]


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def in_process(det: Detector, traces, n: int) -> dict[str, float]:
    fps = [fingerprint(t, det.spec) for t in traces[:n]]
    for t in traces[:50]:
        det.predict_proba(det.features(t))
    trace_lat, fp_lat = [], []
    for t, fp in zip(traces[:n], fps, strict=True):
        start = time.perf_counter()
        det.predict_proba(det.features(t))
        trace_lat.append(time.perf_counter() - start)
        start = time.perf_counter()
        det.check_fingerprint(fp)
        det.predict_proba(np.asarray(fp.values))
        fp_lat.append(time.perf_counter() - start)
    return {
        "trace_p50_ms": percentile(trace_lat, 50) * 1e3,
        "trace_p99_ms": percentile(trace_lat, 99) * 1e3,
        "fp_p50_ms": percentile(fp_lat, 50) * 1e3,
        "fp_p99_ms": percentile(fp_lat, 99) * 1e3,
    }


def rest_wrk(base: str, payload: bytes, seconds: int, connections: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        body = Path(tmp) / "body.json"
        body.write_bytes(payload)
        script = Path(tmp) / "post.lua"
        script.write_text(
            f'local f = io.open("{body}", "rb")\nwrk.body = f:read("*all")\nf:close()\n'
            'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
            "response = function(status, headers, body)\n  if status ~= 200 then\n"
            '    io.stderr:write("status " .. status .. "\\n")\n  end\nend\n'
        )
        out = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{connections}",
                f"-d{seconds}s",
                "--latency",
                "-s",
                str(script),
                f"{base}/v1/score",
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=seconds + 30,
        )
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out.stdout).group(1))
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out.stdout)
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[p99.group(2)] if p99 else float("nan")
    errors = out.stderr.count("status ")
    return {
        "rps": rps,
        "p99_ms": float(p99.group(1)) * scale if p99 else float("nan"),
        "non_200": errors,
        "tool": f"wrk -t1 -c{connections} -d{seconds}s",
    }


def rest_python(base: str, payload: bytes, seconds: int, connections: int) -> dict[str, float]:
    stop = time.monotonic() + seconds
    counts, lat, errors = [0] * connections, [], [0]
    lock = threading.Lock()

    def worker(i: int) -> None:
        with httpx.Client(timeout=10, headers={"content-type": "application/json"}) as client:
            while time.monotonic() < stop and counts[i] < 200_000:
                start = time.perf_counter()
                r = client.post(f"{base}/v1/score", content=payload)
                with lock:
                    lat.append(time.perf_counter() - start)
                    errors[0] += r.status_code != 200
                counts[i] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(connections)]
    begin = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {
        "rps": sum(counts) / (time.perf_counter() - begin),
        "p99_ms": percentile(lat, 99) * 1e3,
        "non_200": errors[0],
        "tool": f"Python httpx client, {connections} threads, {seconds}s",
    }


def batch(base: str, items: list[dict], rounds: int) -> float:
    with httpx.Client(timeout=60) as client:
        client.post(f"{base}/v1/score/batch", json={"items": items})
        start = time.perf_counter()
        for _ in range(rounds):
            r = client.post(f"{base}/v1/score/batch", json={"items": items})
            r.raise_for_status()
        return rounds * len(items) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    det = Detector.load(default_detector_path())
    traces = demo_traces(max(2000, args.batch_size))
    inproc = in_process(det, traces, 2000)
    print("in-process:", json.dumps({k: round(v, 4) for k, v in inproc.items()}), flush=True)

    payload = json.dumps({"trace": traces[0].model_dump(mode="json", exclude_none=True)}).encode()
    trace_items = [{"trace": t.model_dump(mode="json", exclude_none=True)} for t in traces[: args.batch_size]]
    fp_items = [
        {"fingerprint": fingerprint(t, det.spec).model_dump(mode="json")} for t in traces[: args.batch_size]
    ]
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "audit.sqlite3"
        env = {"ROUTESCAN_MAX_BODY_BYTES": str(64 * 1024 * 1024), "ROUTESCAN_MAX_BATCH": str(args.batch_size)}
        with serve_process("--db", str(db), env=env) as (base, _):
            single = (rest_wrk if shutil.which("wrk") else rest_python)(
                base, payload, args.seconds, args.connections
            )
            print("REST single trace:", single, flush=True)
            fp_payload = json.dumps(fp_items[0]).encode()
            single_fp = (rest_wrk if shutil.which("wrk") else rest_python)(
                base, fp_payload, args.seconds, args.connections
            )
            print("REST single fingerprint:", single_fp, flush=True)
            batch_traces = batch(base, trace_items, args.rounds)
            batch_fps = batch(base, fp_items, args.rounds)
            print(f"batch: {batch_traces:.0f} traces/s, {batch_fps:.0f} fingerprints/s", flush=True)
        rows = sqlite3.connect(db).execute("SELECT COUNT(*) FROM audits").fetchone()[0]
    print(f"audit rows written: {rows}")

    def verdict(value: float, goal: float, higher: bool = True) -> str:
        return "met" if (value > goal if higher else value < goal) else "NOT met"

    ip = inproc
    command = (
        f"python scripts/bench_service.py --seconds {args.seconds} --connections {args.connections} "
        f"--batch-size {args.batch_size} --rounds {args.rounds}"
    )
    setup = (
        f"Machine: {machine()}; server (`routescan serve`, 1 uvicorn worker with uvloop/httptools, "
        "SQLite WAL + "
        "synchronous=FULL, group commit) and load generator share the same cores, on 127.0.0.1. Detector: "
        f"the shipped demo detector ({det.spec.dim} features); traces: tiny Mixtral, "
        f"{len(traces[0].launches)} launches, {len(payload) / 1024:.1f} KiB per request body."
    )
    lines = [
        "## Scoring service",
        "",
        f"Command: `{command}`",
        "",
        setup,
        "",
        "| measure | result | goal |",
        "|---|---:|---|",
        f"| in-process score, one trace (featurize + predict), p50 / p99 | {ip['trace_p50_ms']:.3f} / "
        f"{ip['trace_p99_ms']:.3f} ms | p99 < 1 ms: {verdict(ip['trace_p99_ms'], 1.0, higher=False)} |",
        f"| in-process score, one fingerprint, p50 / p99 | {ip['fp_p50_ms']:.3f} / {ip['fp_p99_ms']:.3f} ms "
        f"| p99 < 1 ms: {verdict(ip['fp_p99_ms'], 1.0, higher=False)} |",
        f"| REST `POST /v1/score`, one trace per request ({single['tool']}) | {single['rps']:.0f} req/s, "
        f"p99 {single['p99_ms']:.1f} ms, {single['non_200']} non-200 | > 2,000 req/s: "
        f"{verdict(single['rps'], 2000)} |",
        f"| REST `POST /v1/score`, one fingerprint per request (same tool) | {single_fp['rps']:.0f} req/s, "
        f"p99 {single_fp['p99_ms']:.1f} ms, {single_fp['non_200']} non-200 | > 2,000 req/s: "
        f"{verdict(single_fp['rps'], 2000)} |",
        f"| REST `POST /v1/score/batch`, {args.batch_size} traces per request | {batch_traces:,.0f} traces/s "
        f"| > 50,000 traces/s: {verdict(batch_traces, 50000)} |",
        f"| REST `POST /v1/score/batch`, {args.batch_size} fingerprints per request | {batch_fps:,.0f} "
        f"fingerprints/s | > 50,000/s: {verdict(batch_fps, 50000)} |",
        "",
        f"Every scored request was durably recorded ({rows} audit rows written during the run).",
    ]
    text = "\n".join(lines)
    if not args.no_write:
        update_section(args.out, "service", text)
        print(f"wrote {args.out}")
    print(text)


if __name__ == "__main__":
    main()
