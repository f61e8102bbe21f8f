"""Fingerprints: fixed length, named, order-free, and the same for the same routing whatever collected it."""

from __future__ import annotations

import random

import numpy as np
import pytest

from routescan.features.fingerprint import Fingerprint, FingerprintMismatch, FingerprintSpec, fingerprint
from routescan.features.table import read_table, write_table
from routescan.telemetry.emulated import EmulatedCollector, Request
from routescan.telemetry.schema import CountMatrix, KernelLaunch, RequestTrace, sum_launches


def collect(tiny, launch_models, texts, model_type="mixtral", attach=None):
    collector = EmulatedCollector(tiny(model_type), batch_size=4, attach=attach)
    reqs = [Request(f"r{i}", t, row=i, labels={"label": i % 2}) for i, t in enumerate(texts)]
    return [trace for _, trace in collector.collect(reqs)]


def measured(trace: RequestTrace, records: list[KernelLaunch], source: str = "cupti") -> RequestTrace:
    """The trace a kernel collector makes of these records (what CuptiCollector does)."""
    counts, regions = sum_launches(records, trace.layers, trace.experts_per_layer)
    return RequestTrace(
        **{
            **trace.model_dump(exclude={"counts", "collector", "source", "unit", "launches"}),
            "collector": "cupti",
            "source": source,
            "unit": "threads",
            "counts": CountMatrix.of(counts),
            "region_threads": regions,
            "launches": records,
        }
    )


TEXTS = [
    "Tell me a story about a brave mouse.",
    "What is the capital of France?",
    "Sort these numbers: 5 3 9 1",
]


def test_spec_names_and_values(tiny, launch_models) -> None:
    trace = collect(tiny, launch_models, TEXTS[:1], attach=launch_models["hf-eager"])[0]
    spec = FingerprintSpec.from_trace(trace)
    assert spec.launch_model == "hf-eager"  # the default signal of routed counts
    names = spec.feature_names()
    assert len(names) == spec.dim == 3 * 8 + 3 * 3 and len(set(names)) == spec.dim
    vec = spec.transform(trace)
    for i, where in enumerate(spec.layer_slices()):
        assert where.shares == slice(i * 11, i * 11 + 8) and where.entropy == i * 11 + 10
        block = vec[where.shares]
        assert block.sum() == pytest.approx(1.0)
        assert vec[where.active] == np.count_nonzero(block)
        nz = block[block > 0]
        assert vec[where.entropy] == pytest.approx(-(nz * np.log(nz)).sum())
        # against the attached per-kernel launches, not the derivation under test
        expert_total = sum(
            x.threads for x in trace.launches if x.layer == trace.layers[i] and x.expert is not None
        )
        assert vec[where.total_per_token] == pytest.approx(expert_total / trace.prompt_tokens)


def test_same_routing_same_fingerprint_whichever_collector(tiny, launch_models) -> None:
    """A GPU collector reports the same threads per (layer, expert) in different records (other kernel
    names, split launches, any order, timestamps, extra non-expert kernels): its measured trace must
    give the fingerprint the routed counts give under the launch model it measured."""
    trace = collect(tiny, launch_models, TEXTS[:1], attach=launch_models["hf-eager"])[0]
    records = []
    for launch in trace.launches:
        threads = launch.threads
        half = threads // 2 - (threads // 2) % 32
        for part, t in (("a", half), ("b", threads - half)):
            if t:
                records.append(
                    launch.model_copy(
                        update={
                            "kernel": f"void cutlass_kernel_{part}<float>()",
                            "grid": (t // 32, 1, 1) if t % 32 == 0 else (t, 1, 1),
                            "block": (32, 1, 1) if t % 32 == 0 else (1, 1, 1),
                            "threads": t,
                            "start_ns": 100,
                            "end_ns": 200,
                        }
                    )
                )
    records.append(
        KernelLaunch(kernel="attention", region="other", grid=(9, 1, 1), block=(128, 1, 1), threads=1152)
    )
    random.Random(1).shuffle(records)
    gpu = measured(trace, records)
    assert FingerprintSpec.from_trace(gpu).launch_model == "cupti"
    assert np.array_equal(fingerprint(trace).values, fingerprint(gpu).values)
    # every prefill thread, per-layer kernels included, measured as the launch model derives them
    assert FingerprintSpec.from_trace(gpu).launched([gpu]) == FingerprintSpec.from_trace(trace).launched(
        [trace]
    )


def test_different_prompts_differ_and_mismatch_is_refused(tiny, launch_models) -> None:
    a, b, _ = collect(tiny, launch_models, TEXTS)
    spec = FingerprintSpec.from_trace(a)
    assert not np.array_equal(spec.transform(a), spec.transform(b))
    other_model = collect(tiny, launch_models, TEXTS[:1], model_type="olmoe")[0]
    with pytest.raises(FingerprintMismatch, match="model"):
        spec.transform(other_model)
    gpu = measured(a, [])
    with pytest.raises(FingerprintMismatch, match="cannot give the spec's signal 'hf-eager'"):
        spec.transform(gpu)
    cupti_spec = FingerprintSpec.from_trace(gpu)  # a detector trained on CUPTI measurements
    with pytest.raises(FingerprintMismatch, match="'cupti' is no launch model RouteScan has"):
        cupti_spec.transform(a)  # routed counts cannot be turned into measured threads
    no_dims = a.model_copy(update={"dims": None})
    from routescan.telemetry.launch import LaunchModelError

    with pytest.raises(LaunchModelError, match="carries no layer widths"):
        spec.transform(no_dims)


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


def test_mixed_batches_featurise_as_their_traces_alone(tiny, launch_models) -> None:
    """One batch holding routed and measured traces, of layers of different widths and dims, gives
    each trace the row it gets alone (the batched paths gather and scatter correctly)."""
    from routescan.telemetry.collector import LayerShape, routing_trace
    from routescan.telemetry.schema import LayerDims

    routed = collect(tiny, launch_models, TEXTS, attach=launch_models["hf-eager"])
    spec = FingerprintSpec.from_trace(routed[0], "hf-eager")
    gpu = [measured(t, list(t.launches), source="hf-eager") for t in routed[:2]]
    batch = [routed[0], gpu[0], routed[1], gpu[1], routed[2]]
    alone = np.stack([spec.transform(t) for t in batch])
    assert np.array_equal(spec.transform_many(batch), alone)
    assert np.array_equal(spec.launched(batch), np.array([spec.launched([t])[0] for t in batch]))
    # ragged layers (6 and 4 experts), two layer shapes, and a second trace with other widths
    rng = np.random.default_rng(0)
    shapes = [LayerShape(0, 6, 2, LayerDims(H=64, I=32)), LayerShape(2, 4, 2, LayerDims(H=64, I=48, SI=16))]
    other = [LayerShape(0, 6, 2, LayerDims(H=128, I=32)), LayerShape(2, 4, 2, LayerDims(H=64, I=48, SI=16))]
    traces = []
    for i, layout in enumerate([shapes, other, shapes]):
        counts = np.concatenate(
            [np.bincount(rng.choice(s.num_experts, 2 * 5), minlength=s.num_experts) for s in layout]
        )
        traces.append(
            routing_trace("m", layout, counts.clip(0, 5), 5, trace_id=f"t{i}", collector="emulated")
        )
    ragged = FingerprintSpec.from_trace(traces[0], "hf-eager")
    assert np.array_equal(ragged.transform_many(traces), np.stack([ragged.transform(t) for t in traces]))
    same_counts = routing_trace("m", other, traces[0].counts.flat, 5, trace_id="t3", collector="emulated")
    assert not np.array_equal(ragged.transform(traces[0]), ragged.transform(same_counts))  # widths matter
