"""Where `routescan serve` spends its time under load: py-spy samples of the daemon while wrk posts
traces, grouped by what the code does. Loopback only, bounded in time.

    pip install py-spy && apt-get install wrk
    python scripts/profile_service.py            # writes the `service-profile` section of docs/benchmarks.md

Two loads, as in scripts/bench_service.py: one primary-shape trace per request (MessagePack,
16 connections) and 256 traces per request (MessagePack, 1 connection). Samples of every thread
that was running (not idle) are put in the first bucket whose frames they contain, in the order of
the table; percentages are of those busy samples.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from bench_service import primary_detector, wrk  # noqa: E402
from benchlib import machine, primary_shape_traces, update_section  # noqa: E402
from servers import serve_process  # noqa: E402

from routescan.telemetry.wire import MEDIA_TYPE, packb  # noqa: E402

# (bucket, frame substrings): a sample goes to the first bucket one of whose substrings is in a frame
BUCKETS = [
    ("audit store writer thread (group commit, SQLite inserts and fsync)", ("routescan-audit-writer",)),
    (
        "decode + validate the body (MessagePack, pydantic schemas)",
        ("wire.py", ";parse ("),
    ),
    ("featurise + score (launch model, fingerprint, predict)", ("Scorer.score",)),
    ("record + acknowledge (audit records, results, metrics, wait on commit)", ("ScoringService.score",)),
    ("FastAPI routing, dependencies, response validation and JSON", ("fastapi/routing.py",)),
    ("middleware (guards, metrics, trusted host) and uvicorn HTTP", ("guards.py", "uvicorn/", "starlette/")),
]


def profile(pid: int, seconds: int, out: Path) -> None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    cmd = [
        spy,
        "record",
        "-p",
        str(pid),
        "-d",
        str(seconds),
        "-r",
        "200",
        "-f",
        "raw",
        "-o",
        str(out),
        "--threads",
    ]
    subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def buckets(raw: Path) -> tuple[int, dict[str, int]]:
    counts: dict[str, int] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        leaf = stack.rsplit(";", 1)[-1]
        if leaf.startswith(("Condition.wait", "Queue.get", "Event.wait")):
            continue  # a thread waiting for work (pool workers, the audit writer): idle, though sampled
        total += int(n)
        for name, keys in BUCKETS:
            if any(k in stack for k in keys):
                counts[name] += int(n)
                break
        else:
            counts["other"] += int(n)
            OTHER[" ; ".join(f.split(" (")[0] for f in stack.split(";")[-3:])] += int(n)
    return total, counts


OTHER: collections.Counter[str] = collections.Counter()  # leaf frames of unbucketed samples, for --verbose


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--verbose", action="store_true", help="print the commonest unbucketed stacks")
    args = ap.parse_args()
    traces = primary_shape_traces(300)
    loads = {
        "one trace per request, 16 connections": (packb({"trace": traces[0]}), "/v1/score", 16),
        "256 traces per request, 1 connection": (
            packb({"items": [{"trace": t} for t in traces[:256]]}),
            "/v1/score/batch",
            1,
        ),
    }
    results = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        primary_detector(traces, tmp / "d.zip")
        env = {"ROUTESCAN_MAX_BODY_BYTES": str(64 << 20), "ROUTESCAN_MAX_BATCH": "256"}
        for name, (body, path, connections) in loads.items():
            args_ = (
                "--db",
                str(tmp / f"{path.strip('/').replace('/', '-')}.db"),
                "--detector",
                str(tmp / "d.zip"),
            )
            with serve_process(*args_, env=env) as (base, proc):
                wrk(f"{base}{path}", body, MEDIA_TYPE, 2, connections)  # warm: tables, caches
                raw = tmp / f"{len(results)}.txt"
                profile(proc.pid, args.seconds, raw)
                time.sleep(0.3)
                rate = wrk(f"{base}{path}", body, MEDIA_TYPE, args.seconds - 1, connections)
                for _ in range(100):
                    if raw.exists() and raw.stat().st_size:
                        break
                    time.sleep(0.1)
                time.sleep(0.5)
            results[name] = (rate, *buckets(raw))
            print(name, rate, results[name][1:], flush=True)

    lines = [
        "## Where the daemon's time goes",
        "",
        f"Command: `python scripts/profile_service.py --seconds {args.seconds}` (py-spy {200} Hz, all "
        f"threads, busy samples only). Machine: {machine()}. Same daemon, detector and traces as the "
        "section above.",
        "",
        "| share of busy samples | " + " | ".join(loads) + " |",
        "|---|" + "---:|" * len(loads),
    ]
    names = [b for b, _ in BUCKETS] + ["other"]
    for bucket in names:
        cells = [f"{100 * r[2].get(bucket, 0) / max(r[1], 1):.0f}%" for r in results.values()]
        lines.append(f"| {bucket} | " + " | ".join(cells) + " |")
    rates = [f"{r[0]['rps']:,.0f} req/s" for r in results.values()]
    lines += ["| (throughput while profiled) | " + " | ".join(rates) + " |"]
    if args.verbose:
        for stack, n in OTHER.most_common(15):
            print(f"{n:6d}  {stack}")
    text = "\n".join(lines)
    if not args.no_write:
        update_section(args.out, "service-profile", text)
        print(f"wrote {args.out}")
    print(text)


if __name__ == "__main__":
    main()
