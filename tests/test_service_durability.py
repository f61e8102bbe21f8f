"""Acknowledged means durable: SIGKILL the server mid-burst, restart it, every acknowledged score is there."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
from servers import serve_process


def test_every_acknowledged_score_survives_sigkill(
    tmp_path, test_detector, synthetic_traces, monkeypatch
) -> None:
    monkeypatch.delenv("ROUTESCAN_API_TOKEN", raising=False)
    detector_file = test_detector.save(tmp_path / "det.zip")
    db = tmp_path / "audit.sqlite3"
    payload = synthetic_traces[0].model_dump(mode="json", exclude_none=True)
    acked: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    with serve_process("--db", str(db), "--detector", str(detector_file), log=tmp_path / "serve.log") as (
        base,
        proc,
    ):

        def worker(w: int) -> None:
            with httpx.Client(timeout=5) as client:
                for i in range(400):  # bounded: at most 8 x 400 requests
                    if stop.is_set():
                        return
                    trace_id = f"kill-{w}-{i}"
                    try:
                        r = client.post(f"{base}/v1/score", json={"trace": {**payload, "trace_id": trace_id}})
                    except httpx.HTTPError:
                        return
                    if r.status_code == 200:
                        with lock:
                            acked.append(trace_id)

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while len(acked) < 150 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)  # mid-burst: writers are still sending
        proc.wait(timeout=10)
        stop.set()
        for t in threads:
            t.join(timeout=10)
    assert len(acked) >= 150, f"only {len(acked)} scores were acknowledged before the deadline"

    with serve_process("--db", str(db), "--detector", str(detector_file)) as (base, _):
        stored: set[str] = set()
        offset: int | None = 0
        while offset is not None:
            page = httpx.get(f"{base}/v1/audits", params={"limit": 1000, "offset": offset}).json()
            stored.update(item["trace_id"] for item in page["items"])
            offset = page["next_offset"]
    missing = set(acked) - stored
    assert not missing, f"{len(missing)} acknowledged scores were lost"
