"""Audit store benchmarks: SQLite vs PostgreSQL on the same machine in the same run, 1 to 3 daemons.

    python scripts/bench_audit_store.py            # writes the `audit-store` section of docs/benchmarks.md

1. the store alone (in process, no HTTP): rows/s that concurrent writers get acknowledged, with one
   row per request (the REST single-score shape) and 256 rows per request (a batch);
2. through daemons: `routescan serve` processes on loopback, scored by POST /v1/score/batch with 256
   fingerprints per request from client threads; rows/s acknowledged, for SQLite with one daemon and
   PostgreSQL with 1, 2 and 3 daemons writing one database.

Bounded in count and time; only 127.0.0.1. PostgreSQL is the server this machine runs
(ROUTESCAN_BENCH_POSTGRES, default postgresql://postgres@127.0.0.1:5432/postgres); a scratch
database is created and dropped.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bench_service import demo_traces
from benchlib import machine, update_section
from servers import serve_process

from routescan.detector.artifact import Detector, default_detector_path
from routescan.features.fingerprint import fingerprint
from routescan.service.store import AuditRecord, open_audit_store


@contextlib.contextmanager
def scratch_database(admin: str) -> Iterator[str]:
    name = f"routescan_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield f"{admin.rsplit('/', 1)[0]}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def store_alone(target: str, rows_per_request: int, writers: int, seconds: float) -> float:
    store = open_audit_store(target)
    stop = time.monotonic() + seconds
    done = [0] * writers

    def writer(i: int) -> None:
        n = 0
        while time.monotonic() < stop and n < 10_000_000:
            now = time.time()
            records = [
                AuditRecord(f"b-{i}-{n}-{k}", "bench", 0.5, "ok", "d", "1", "fpr5", now)
                for k in range(rows_per_request)
            ]
            done[i] += store.write(records)
            n += 1

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(writers)]
    begin = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - begin
    store.close()
    return sum(done) / elapsed


def through_daemons(args: list[list[str]], items: list[dict], clients: int, seconds: float) -> float:
    with contextlib.ExitStack() as stack:
        bases = [stack.enter_context(serve_process(*a))[0] for a in args]
        body = {"items": items}
        with httpx.Client(timeout=60) as warm:
            for base in bases:
                warm.post(f"{base}/v1/score/batch", json=body).raise_for_status()
        stop = time.monotonic() + seconds
        acked = [0] * clients

        def client(i: int) -> None:
            base = bases[i % len(bases)]
            with httpx.Client(timeout=60) as c:
                for _ in range(100_000):
                    if time.monotonic() >= stop:
                        return
                    r = c.post(f"{base}/v1/score/batch", json=body)
                    if r.status_code == 200:
                        acked[i] += len(items)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        begin = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(acked) / (time.perf_counter() - begin)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--writers", type=int, default=16)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--postgres",
        default=__import__("os").environ.get(
            "ROUTESCAN_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
    )
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    det = Detector.load(default_detector_path())
    items = [
        {"fingerprint": fingerprint(t, det.spec).model_dump(mode="json")}
        for t in demo_traces(args.batch_size)
    ]
    alone: dict[tuple[str, int], float] = {}
    daemons: dict[tuple[str, int], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rows in (1, args.batch_size):
            with scratch_database(args.postgres) as pg:
                alone[("postgresql", rows)] = store_alone(pg, rows, args.writers, args.seconds)
            alone[("sqlite", rows)] = store_alone(
                str(Path(tmp) / f"alone-{rows}.db"), rows, args.writers, args.seconds
            )
            print(
                f"store alone, {rows} row(s) per request: sqlite {alone[('sqlite', rows)]:,.0f} rows/s, "
                f"postgresql {alone[('postgresql', rows)]:,.0f} rows/s",
                flush=True,
            )
        daemons[("sqlite", 1)] = through_daemons(
            [["--db", str(Path(tmp) / "daemon.db")]], items, args.clients, args.seconds
        )
        print(f"1 daemon, sqlite: {daemons[('sqlite', 1)]:,.0f} rows/s", flush=True)
        for n in (1, 2, 3):
            with scratch_database(args.postgres) as pg:
                daemons[("postgresql", n)] = through_daemons(
                    [["--audit-store", pg, "--db", str(Path(tmp) / f"unused-{i}.db")] for i in range(n)],
                    items,
                    args.clients,
                    args.seconds,
                )
            print(f"{n} daemon(s), postgresql: {daemons[('postgresql', n)]:,.0f} rows/s", flush=True)

    b = args.batch_size
    lines = [
        "## Audit store: SQLite vs PostgreSQL, 1 to 3 daemons",
        "",
        f"Command: `python scripts/bench_audit_store.py --seconds {args.seconds:g} --writers {args.writers} "
        f"--clients {args.clients} --batch-size {b}`",
        "",
        f"Machine: {machine()}; PostgreSQL {_server_version(args.postgres)} on the same host "
        "(synchronous_commit on, fsync on), SQLite WAL + synchronous=FULL; every client, daemon and "
        "database shares the same cores, on 127.0.0.1.",
        "",
        "| path | SQLite | PostgreSQL |",
        "|---|---:|---:|",
        f"| store alone, {args.writers} writers, 1 row per request (rows/s acknowledged) | "
        f"{alone[('sqlite', 1)]:,.0f} | {alone[('postgresql', 1)]:,.0f} |",
        f"| store alone, {args.writers} writers, {b} rows per request | "
        f"{alone[('sqlite', b)]:,.0f} | {alone[('postgresql', b)]:,.0f} |",
        f"| 1 daemon, POST /v1/score/batch of {b} fingerprints, {args.clients} clients | "
        f"{daemons[('sqlite', 1)]:,.0f} | {daemons[('postgresql', 1)]:,.0f} |",
        f"| 2 daemons, one database | | {daemons[('postgresql', 2)]:,.0f} |",
        f"| 3 daemons, one database | | {daemons[('postgresql', 3)]:,.0f} |",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        update_section(args.out, "audit-store", text)


def _server_version(admin: str) -> str:
    with psycopg.connect(admin) as conn:
        return str(conn.execute("SHOW server_version").fetchone()[0]).split()[0]


if __name__ == "__main__":
    main()
