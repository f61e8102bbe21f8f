"""Fingerprints: fixed length, named, order-free, and the same for the same routing whatever collected it."""

from __future__ import annotations

import random

import numpy as np
import pytest

from routescan.features.fingerprint import Fingerprint, FingerprintMismatch, FingerprintSpec, fingerprint
from routescan.features.table import read_table, write_table
from routescan.telemetry.emulated import EmulatedCollector, Request
from routescan.telemetry.schema import KernelLaunch, RequestTrace


def collect(tiny, launch_models, texts, model_type="mixtral", lm="hf-eager"):
    collector = EmulatedCollector(tiny(model_type), [launch_models[lm]], batch_size=4)
    reqs = [Request(f"r{i}", t, row=i, labels={"label": i % 2}) for i, t in enumerate(texts)]
    return [traces[lm] for _, traces in collector.collect(reqs)]


TEXTS = [
    "Tell me a story about a brave mouse.",
    "What is the capital of France?",
    "Sort these numbers: 5 3 9 1",
]


def test_spec_names_and_values(tiny, launch_models) -> None:
    trace = collect(tiny, launch_models, TEXTS[:1])[0]
    spec = FingerprintSpec.from_trace(trace)
    names = spec.feature_names()
    assert len(names) == spec.dim == 3 * 8 + 3 * 3 and len(set(names)) == spec.dim
    vec = spec.transform(trace)
    for i in range(3):
        block = vec[i * 11 : i * 11 + 8]
        assert block.sum() == pytest.approx(1.0)
        assert vec[i * 11 + 9] == np.count_nonzero(block)
        nz = block[block > 0]
        assert vec[i * 11 + 10] == pytest.approx(-(nz * np.log(nz)).sum())
        expert_total = sum(
            x.threads for x in trace.launches if x.layer == trace.layers[i] and x.expert is not None
        )
        assert vec[i * 11 + 8] == pytest.approx(expert_total / trace.prompt_tokens)


def test_independent_of_kernel_order(tiny, launch_models) -> None:
    trace = collect(tiny, launch_models, TEXTS[:1])[0]
    shuffled = list(trace.launches)
    random.Random(1).shuffle(shuffled)
    other = trace.model_copy(update={"launches": shuffled})
    assert np.array_equal(fingerprint(trace).values, fingerprint(other).values)


def test_same_routing_same_fingerprint_whichever_collector(tiny, launch_models) -> None:
    """A GPU collector reports the same threads per (layer, expert) in different records (other kernel
    names, split launches, timestamps, extra non-expert kernels): the fingerprint must not move."""
    trace = collect(tiny, launch_models, TEXTS[:1])[0]
    records = []
    for (layer, expert), threads in trace.expert_threads().items():
        half = threads // 2 - (threads // 2) % 32
        for part, t in (("a", half), ("b", threads - half)):
            if t:
                records.append(
                    KernelLaunch(
                        kernel=f"void cutlass_kernel_{part}<float>()",
                        layer=layer,
                        expert=expert,
                        grid=(t // 32, 1, 1) if t % 32 == 0 else (t, 1, 1),
                        block=(32, 1, 1) if t % 32 == 0 else (1, 1, 1),
                        threads=t,
                        start_ns=100,
                        end_ns=200,
                    )
                )
    records.append(
        KernelLaunch(kernel="attention", region="other", grid=(9, 1, 1), block=(128, 1, 1), threads=1152)
    )
    gpu = RequestTrace(
        **{**trace.model_dump(exclude={"launches", "collector"}), "collector": "cupti", "launches": records}
    )
    assert np.array_equal(fingerprint(trace).values, fingerprint(gpu).values)


def test_different_prompts_differ_and_mismatch_is_refused(tiny, launch_models) -> None:
    a, b, _ = collect(tiny, launch_models, TEXTS)
    spec = FingerprintSpec.from_trace(a)
    assert not np.array_equal(spec.transform(a), spec.transform(b))
    other_model = collect(tiny, launch_models, TEXTS[:1], model_type="olmoe")[0]
    with pytest.raises(FingerprintMismatch, match="model"):
        spec.transform(other_model)
    router = collect(tiny, launch_models, TEXTS[:1], lm="router")[0]
    with pytest.raises(FingerprintMismatch, match="launch model"):
        spec.transform(router)


def test_fingerprint_schema_rejects_text_and_nan() -> None:
    with pytest.raises(ValueError):
        Fingerprint(trace_id="a", model_id="m", launch_model="hf-eager", values=[float("nan")])
    with pytest.raises(ValueError):
        Fingerprint.model_validate(
            {"trace_id": "a", "model_id": "m", "launch_model": "hf-eager", "values": [0.1], "prompt": "hello"}
        )


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_table_round_trip(tmp_path, tiny, launch_models, suffix: str) -> None:
    traces = collect(tiny, launch_models, TEXTS)
    spec = FingerprintSpec.from_trace(traces[0])
    fps = [fingerprint(t, spec) for t in traces]
    path = tmp_path / f"fp{suffix}"
    write_table(path, spec, fps)
    table = read_table(path)
    assert table.spec == spec
    assert table.trace_ids == ["r0", "r1", "r2"] and table.rows == [0, 1, 2]
    assert table.labels == {"label": [0, 1, 0]}
    assert np.array_equal(table.X, np.array([fp.values for fp in fps]))
