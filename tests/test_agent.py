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
import numpy as np
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


def test_vllm_wrapper_wraps_once_and_never_breaks_the_step() -> None:
    from routescan.agent import vllm_plugin

    class Runner:
        calls = 0

        def load_model(self):
            self.model = None

        def _model_forward(self, x):
            Runner.calls += 1
            return x * 2

    vllm_plugin.wrap_runner(Runner)
    wrapped = Runner._model_forward, Runner.load_model
    vllm_plugin.wrap_runner(Runner)  # vLLM may load the plugin more than once per process
    assert (Runner._model_forward, Runner.load_model) == wrapped
    runner = Runner()
    # no vLLM in this venv: attaching fails once, is logged, and the model still runs every step
    assert runner._model_forward(3) == 6 and runner._model_forward(4) == 8
    assert Runner.calls == 2 and runner.__dict__[vllm_plugin._AGENT_ATTR] is None

    class Failing:
        def before_forward(self, runner):
            pass

        def after_forward(self, runner):
            raise RuntimeError("a telemetry bug")

    other = Runner()
    other.__dict__[vllm_plugin._AGENT_ATTR] = Failing()
    assert other._model_forward(5) == 10  # the step's output is returned; tracing turns itself off
    assert other.__dict__[vllm_plugin._AGENT_ATTR] is None
    loaded = Runner()
    loaded.load_model()  # attaching at load time (before CUDA graphs would be recorded) fails alike
    assert loaded.__dict__[vllm_plugin._AGENT_ATTR] is None and loaded._model_forward(1) == 2


def test_prefill_chunks_are_summed_into_one_trace_per_request(tmp_path) -> None:
    from routescan.agent.agent import PrefillTraces, Span
    from routescan.telemetry.collector import LayerShape
    from routescan.telemetry.schema import LayerDims

    class Sink:
        def __init__(self):
            self.items = []

        def submit(self, item):
            self.items.append(item)

    shapes = [LayerShape(layer, 4, 2, LayerDims(H=8, I=4)) for layer in (1, 3)]
    sink = Sink()
    traces = PrefillTraces(sink, shapes, model_id="m", collector="vllm-agent")  # type: ignore[arg-type]
    row = np.array([1, 1, 0, 0, 0, 1, 1, 0])  # one token's two slots in each of two layers
    # step 1: a's first chunk (3 tokens) and b whole (1 token); step 2: a's last chunk (2 tokens)
    traces.add([Span("a", 0, 3, last=False), Span("b", 3, 1)], [row * 3, row])
    assert len(sink.items) == 1
    traces.add([Span("a", 0, 2, first=False)], [row * 2])
    # a chunk of a prompt whose start was never seen (a prefix-cache hit) gives no trace
    traces.add([Span("c", 0, 2, first=False)], [row * 2])
    built = {t.trace_id: t for t in (item() for item in sink.items)}
    assert set(built) == {"a", "b"} and traces.incomplete == 1
    assert built["a"].prompt_tokens == 5 and built["a"].counts.flat.tolist() == (row * 5).tolist()
    assert built["a"].layers == [1, 3] and built["b"].prompt_tokens == 1
