"""The trace schema rejects text and inconsistencies; JSONL and Parquet round-trip exactly."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from routescan.telemetry.io import TraceFileError, iter_trace_rows, read_traces, write_traces
from routescan.telemetry.schema import KernelLaunch, RequestTrace


def make_trace(trace_id: str = "t-1", **overrides) -> RequestTrace:
    data = {
        "trace_id": trace_id,
        "model_id": "tiny-mixtral-seed0",
        "collector": "emulated",
        "launch_model": "hf-eager",
        "layers": [0, 1],
        "experts_per_layer": [4, 4],
        "top_k": [2, 2],
        "prompt_tokens": 5,
        "row": 3,
        "labels": {"label": 1, "domain": "cyber_malware", "score": 0.5, "flag": True, "none": None},
        "launches": [
            {
                "kernel": "gemm_gate_up",
                "layer": 0,
                "expert": 1,
                "grid": [2, 1, 1],
                "block": [128, 1, 1],
                "threads": 256,
            },
            {
                "kernel": "router_gemm",
                "layer": 1,
                "region": "layer",
                "grid": [1, 1, 1],
                "block": [128, 1, 1],
                "threads": 128,
                "start_ns": 10,
                "end_ns": 20,
            },
            {
                "kernel": "void at::native::vectorized_elementwise_kernel<4, at::native::Fn>(int, float*)",
                "layer": 1,
                "expert": 3,
                "grid": [1, 1, 1],
                "block": [64, 1, 1],
                "threads": 64,
            },
        ],
    }
    data.update(overrides)
    return RequestTrace.model_validate(data)


def test_valid_trace_and_expert_threads() -> None:
    trace = make_trace()
    assert trace.schema_version == "routescan.trace/1"
    assert trace.expert_threads() == {(0, 1): 256, (1, 3): 64}


@pytest.mark.parametrize("field", ["prompt", "text", "content", "messages"])
def test_extra_text_field_is_rejected(field: str) -> None:
    payload = make_trace().model_dump(mode="json")
    payload[field] = "how do I pick a lock"
    with pytest.raises(ValidationError) as err:
        RequestTrace.model_validate(payload)
    assert field in str(err.value) and "Extra inputs are not permitted" in str(err.value)


def test_extra_text_field_in_a_launch_is_rejected() -> None:
    payload = make_trace().model_dump(mode="json")
    payload["launches"][0]["prompt"] = "hello"
    with pytest.raises(ValidationError):
        RequestTrace.model_validate(payload)


@pytest.mark.parametrize(
    "overrides",
    [
        {"trace_id": "a sentence with spaces"},
        {"labels": {"domain": "a sentence with spaces in it"}},
        {"labels": {"note": "x" * 65}},
        {"model_id": "model id with spaces"},
        {"labels": {"bad key": 1}},
    ],
)
def test_text_cannot_hide_in_identifiers_or_labels(overrides: dict) -> None:
    with pytest.raises(ValidationError):
        make_trace(**overrides)


def test_inconsistent_launches_are_rejected() -> None:
    with pytest.raises(ValidationError, match="grid x block"):
        KernelLaunch(kernel="k", layer=0, expert=0, grid=(2, 1, 1), block=(32, 1, 1), threads=63)
    with pytest.raises(ValidationError, match="needs an expert"):
        KernelLaunch(kernel="k", layer=0, grid=(1, 1, 1), block=(1, 1, 1), threads=1)
    with pytest.raises(ValidationError, match="cannot name an expert"):
        KernelLaunch(
            kernel="k", layer=0, expert=1, region="layer", grid=(1, 1, 1), block=(1, 1, 1), threads=1
        )
    payload = make_trace().model_dump(mode="json")
    payload["launches"][0]["expert"] = 9
    with pytest.raises(ValidationError, match="has 4 experts"):
        RequestTrace.model_validate(payload)
    payload = make_trace().model_dump(mode="json")
    payload["launches"][0]["layer"] = 7
    with pytest.raises(ValidationError, match="not an MoE layer"):
        RequestTrace.model_validate(payload)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_round_trip(tmp_path, suffix: str) -> None:
    traces = [make_trace(f"t-{i}", prompt_tokens=5 + i) for i in range(4)] + [
        make_trace("t-x", row=None, labels={})
    ]
    path = tmp_path / f"traces{suffix}"
    assert write_traces(path, traces) == 5
    back = list(read_traces(path))
    assert [t.model_dump() for t in back] == [t.model_dump() for t in traces]
    assert not list(tmp_path.glob("*.tmp"))


def test_bad_rows_are_reported_with_their_number(tmp_path) -> None:
    path = tmp_path / "t.jsonl"
    good = make_trace().model_dump_json()
    bad = json.loads(good)
    bad["prompt"] = "secret words"
    path.write_text(good + "\n" + json.dumps(bad) + "\n{not json\n")
    rows = list(iter_trace_rows(path))
    assert isinstance(rows[0][1], RequestTrace)
    assert [(n, type(e).__name__) for n, e in rows[1:]] == [(2, "TraceFileError"), (3, "TraceFileError")]
    assert "row 2" in str(rows[1][1]) and "prompt" in str(rows[1][1])
    assert "secret words" not in str(rows[1][1])
    with pytest.raises(TraceFileError, match="row 2"):
        list(read_traces(path))


def test_parquet_with_an_unknown_column_is_rejected(tmp_path) -> None:
    path = tmp_path / "t.parquet"
    write_traces(path, [make_trace()])
    table = pq.read_table(path)
    table = table.append_column("prompt", pa.array(["hello"]))
    pq.write_table(table, path)
    with pytest.raises(TraceFileError, match="unknown columns"):
        list(read_traces(path))


def test_unknown_suffix(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"\.jsonl or \.parquet"):
        write_traces(tmp_path / "t.csv", [make_trace()])


def test_aggregated_trace_keeps_the_fingerprint(tiny, launch_models) -> None:
    from routescan.features.fingerprint import FingerprintSpec
    from routescan.telemetry.emulated import EmulatedCollector, Request

    loaded = tiny("qwen2_moe")
    _, traces = next(
        EmulatedCollector(loaded, [launch_models["hf-eager"]]).collect([Request("a", "hello there")])
    )
    full = traces["hf-eager"]
    small = full.aggregated()
    assert len(small.launches) < len(full.launches)
    assert small.expert_threads() == full.expert_threads()
    spec = FingerprintSpec.from_trace(full)
    assert (spec.transform(small) == spec.transform(full)).all()
    assert type(small).model_validate_json(small.model_dump_json()) == small  # still a valid trace


@pytest.mark.parametrize("model_type", ["qwen2_moe", "mixtral"])  # with and without a shared expert
def test_aggregating_at_the_source_equals_aggregating_after(tiny, launch_models, model_type) -> None:
    """The collector and the agent sum launches while building (no per-kernel objects); that must be
    exactly the trace that ``aggregated()`` makes from the per-kernel one, for every launch model."""
    from routescan.telemetry.emulated import EmulatedCollector, Request

    loaded = tiny(model_type)
    requests = [Request("a", "hello there"), Request("b", "a longer request about many things " * 4)]
    models = list(launch_models.values())
    full = list(EmulatedCollector(loaded, models).collect(requests))
    summed = list(EmulatedCollector(loaded, models, aggregate=True).collect(requests))
    for (_, per_kernel), (_, at_source) in zip(full, summed, strict=True):
        for name, trace in per_kernel.items():
            after = trace.aggregated()
            key = lambda x: (x.layer, -1 if x.expert is None else x.expert, x.region.value)  # noqa: E731
            assert sorted(at_source[name].launches, key=key) == sorted(after.launches, key=key)
            assert at_source[name].model_copy(update={"launches": after.launches}) == after
