"""The sidecar path end to end on CPU: a model server process with the agent inside, the real
`routescan serve` daemon on a Unix socket, concurrent requests, a daemon crash and restart."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from servers import free_port

from routescan.agent import RouteScanAgent, TraceSender, packed_spans, padded_spans
from routescan.models.batching import pad_batch
from routescan.telemetry.emulated import EmulatedCollector, Request
from routescan.telemetry.io import read_traces

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [f"request number {i} about topic {i % 5} " * (1 + i % 3) for i in range(64)]


def test_batched_step_attribution_is_exact_and_spooled_when_no_daemon(tiny, launch_models, tmp_path) -> None:
    """Per-request traces from one batched step equal each request collected alone; with no daemon
    the traces wait in the spool."""
    import torch

    loaded = tiny("mixtral")
    sender = TraceSender(
        f"unix://{tmp_path}/nobody.sock", spool=tmp_path / "spool.jsonl", retry_interval_s=60
    )
    agent = RouteScanAgent(loaded.model, sender, model_id=loaded.model_id)
    ids = [loaded.encoder.encode(p) for p in PROMPTS[:6]]
    x, att = pad_batch(ids, loaded.encoder.pad_id)
    width = x.shape[1]
    names = [f"r{i}" for i in range(len(ids))]
    with torch.inference_mode(), agent.step(padded_spans(names, [len(s) for s in ids], width)):
        loaded.model(input_ids=x, attention_mask=att, use_cache=False)
    with torch.inference_mode():
        loaded.model(input_ids=x[:1])  # outside a step (a decode, say): ignored
    sender.close()
    agent.close()
    assert sender.counters.spooled == 6 and sender.counters.sent == 0
    spooled = {t.trace_id: t for t in read_traces(tmp_path / "spool.jsonl")}
    alone = EmulatedCollector(loaded, batch_size=1)
    for req, traces in alone.collect([Request(n, p) for n, p in zip(names, PROMPTS, strict=False)]):
        assert spooled[req.trace_id].counts == traces.counts


def test_a_down_daemon_costs_a_probe_not_a_spool_rewrite(tiny, launch_models, tmp_path) -> None:
    """While the daemon is away the backlog is neither read nor rewritten on every retry (that stalled
    the serving thread for ~200 ms per retry once the spool held a few thousand traces), and nothing
    is lost or reordered: the interrupted backlog stays ahead of what is spooled later."""
    import torch

    loaded = tiny("mixtral")
    spool = tmp_path / "spool.jsonl"
    first = TraceSender(f"unix://{tmp_path}/nobody.sock", spool=spool, retry_interval_s=60)
    agent = RouteScanAgent(loaded.model, first, model_id=loaded.model_id)
    ids = [loaded.encoder.encode(p) for p in PROMPTS[:4]]
    x, att = pad_batch(ids, loaded.encoder.pad_id)

    def step(names: list[str]) -> None:
        with torch.inference_mode(), agent.step(padded_spans(names, [len(s) for s in ids], x.shape[1])):
            loaded.model(input_ids=x, attention_mask=att, use_cache=False)

    step(["a0", "a1", "a2", "a3"])
    first.close()
    agent.close()
    backlog = spool.read_bytes()

    second = TraceSender(f"unix://{tmp_path}/nobody.sock", spool=spool, retry_interval_s=0.01)
    agent = RouteScanAgent(loaded.model, second, model_id=loaded.model_id)
    deadline = time.monotonic() + 10
    replaying = tmp_path / "spool.replaying.jsonl"
    while not replaying.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    step(["b0", "b1", "b2", "b3"])
    time.sleep(0.3)  # dozens of retry intervals
    second.close()
    agent.close()
    assert replaying.read_bytes() == backlog  # untouched by the failed retries
    assert second.pending_spool() == 8
    order = [t.trace_id for t in read_traces(replaying)] + [t.trace_id for t in read_traces(spool)]
    assert order == ["a0", "a1", "a2", "a3", "b0", "b1", "b2", "b3"]


def test_packed_spans() -> None:
    spans = packed_spans(["a", "b", "c"], [3, 0, 5])
    assert [(s.start, s.length) for s in spans] == [(0, 3), (3, 0), (3, 5)]


def _wait(fn, timeout: float = 90.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not fn():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@contextlib.contextmanager
def daemon(sock: Path, db: Path, log: Path):
    env = {**os.environ, "ROUTESCAN_NO_PROGRESS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "routescan.cli.main", "serve", "--uds", str(sock), "--db", str(db)],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    client = httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), timeout=5)

    def ready() -> bool:
        try:
            return client.get("http://d/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    try:
        _wait(ready, 60, "the daemon")
        yield proc, client
    finally:
        client.close()
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)


def _audit_ids(client: httpx.Client) -> set[str]:
    ids, offset = set(), 0
    while offset is not None:
        page = client.get("http://d/v1/audits", params={"limit": 500, "offset": offset}).json()
        ids |= {row["trace_id"] for row in page["items"]}
        offset = page["next_offset"]
    return ids


@pytest.mark.timeout(300)
def test_sidecar_end_to_end_with_a_daemon_restart(tmp_path: Path) -> None:
    sock, db = tmp_path / "run" / "routescan.sock", tmp_path / "audit.sqlite3"
    port = free_port()
    env = {
        **os.environ,
        "ROUTESCAN_DAEMON": f"unix://{sock}",
        "ROUTESCAN_SPOOL": str(tmp_path / "spool.jsonl"),
    }
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "model_server.py"), str(port)],
        env=env,
        stdout=(tmp_path / "server.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    http = httpx.Client(timeout=30)

    def up() -> bool:
        try:
            return http.get(f"{base}/stats").status_code == 200
        except httpx.HTTPError:
            return False

    def send(ids: list[str]) -> list[int]:
        with ThreadPoolExecutor(8) as pool:
            res = list(
                pool.map(
                    lambda i: http.post(
                        f"{base}/generate",
                        json={"request_id": i, "prompt": PROMPTS[int(i.split("-")[1]) % len(PROMPTS)]},
                    ),
                    ids,
                )
            )
        return [r.status_code for r in res]

    try:
        _wait(up, 120, "the model server")
        first = [f"req-{i:03d}" for i in range(24)]
        second = [f"req-{i:03d}" for i in range(24, 40)]
        with daemon(sock, db, tmp_path / "daemon.log") as (proc, client):
            assert send(first) == [200] * len(first)
            _wait(lambda: set(first) <= _audit_ids(client), what="the first audits")
            proc.send_signal(signal.SIGKILL)  # the daemon dies; serving goes on
            proc.wait()
        assert send(second) == [200] * len(second)
        _wait(lambda: http.get(f"{base}/stats").json()["spooled"] >= len(second), what="spooling")
        with (tmp_path / "spool.jsonl").open("a", encoding="utf-8") as fh:
            fh.write('{"schema_version":"routescan.trace/1","trace_id":"torn-by-a-cr\n')  # a crash mid-append
        with daemon(sock, db, tmp_path / "daemon.log") as (_, client):
            _wait(lambda: set(first + second) <= _audit_ids(client), what="the replayed audits")
            _wait(lambda: http.get(f"{base}/stats").json()["spool"] == 0, what="the torn line")
            metrics = client.get("http://d/metrics").text
            # the agent's own counters reach the daemon's metrics: the spooling it did while it was down
            assert any(
                line.startswith("routescan_agent_traces_total{")
                and 'outcome="spooled"' in line
                and float(line.split()[-1]) >= len(second)
                for line in metrics.splitlines()
            ), "the agent's spooled count is not in the daemon's metrics"
        stats = http.get(f"{base}/stats").json()
        # the torn line is refused alone; every real trace in its batch still reaches the audit log
        assert stats["dropped"] == 0 and stats["rejected"] == 1 and stats["spool"] == 0
        assert stats["replayed"] >= len(second)
    finally:
        http.close()
        server.terminate()
        server.wait(timeout=10)


def test_vllm_plugin_is_idempotent_and_inert_without_vllm(monkeypatch) -> None:
    from routescan.agent import vllm_plugin

    monkeypatch.setattr(vllm_plugin, "_REGISTERED", False)
    vllm_plugin.register()
    vllm_plugin.register()  # vLLM may call it in every process, more than once
    assert vllm_plugin._REGISTERED


def test_vllm_plugin_imports_where_vllm_is_installed() -> None:
    pytest.importorskip("vllm")
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "routescan"]
    assert ep.load() is __import__("routescan.agent.vllm_plugin", fromlist=["register"]).register
