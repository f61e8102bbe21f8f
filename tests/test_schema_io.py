"""The trace record (trace/2) rejects text and inconsistencies; JSONL, Parquet and the binary wire
round-trip exactly; trace/1 files are still read, and give the fingerprints they gave before."""

from __future__ import annotations

import json
from pathlib import Path

import msgpack
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from routescan.features.fingerprint import FingerprintSpec, derives_signals
from routescan.telemetry.io import TraceFileError, TraceSink, iter_trace_rows, read_traces, write_traces
from routescan.telemetry.schema import KernelLaunch, RequestTrace, sum_launches
from routescan.telemetry.wire import WireError, packb, trace_payload, unpackb

V1 = Path(__file__).parent / "data" / "trace-v1"
LAUNCHES = [
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
]


def make_trace(trace_id: str = "t-1", **overrides) -> RequestTrace:
    data = {
        "trace_id": trace_id,
        "model_id": "tiny-mixtral-seed0",
        "collector": "emulated",
        "layers": [0, 1],
        "experts_per_layer": [4, 4],
        "top_k": [2, 2],
        "dims": {"H": 64, "I": 64},
        "prompt_tokens": 5,
        "counts": [[3, 2, 5, 0], [1, 4, 0, 5]],
        "row": 3,
        "labels": {"label": 1, "domain": "cyber_malware", "score": 0.5, "flag": True, "none": None},
    }
    data.update(overrides)
    return RequestTrace.model_validate(data)


def test_valid_trace_holds_a_count_matrix() -> None:
    trace = make_trace()
    assert trace.schema_version == "routescan.trace/2"
    assert trace.counts.tolist(trace.experts_per_layer) == [[3, 2, 5, 0], [1, 4, 0, 5]]
    assert not trace.is_empty() and make_trace(counts=[[0] * 4, [0] * 4]).is_empty()
    assert json.loads(trace.model_dump_json())["counts"] == [[3, 2, 5, 0], [1, 4, 0, 5]]


@pytest.mark.parametrize("field", ["prompt", "text", "content", "messages"])
def test_extra_text_field_is_rejected(field: str) -> None:
    payload = make_trace().model_dump(mode="json")
    payload[field] = "how do I pick a lock"
    with pytest.raises(ValidationError) as err:
        RequestTrace.model_validate(payload)
    assert field in str(err.value) and "Extra inputs are not permitted" in str(err.value)


def test_extra_text_field_in_a_launch_or_dims_is_rejected() -> None:
    payload = make_trace(launches=LAUNCHES).model_dump(mode="json")
    payload["launches"][0]["prompt"] = "hello"
    with pytest.raises(ValidationError):
        RequestTrace.model_validate(payload)
    payload = make_trace().model_dump(mode="json")
    payload["dims"]["note"] = "hello"
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
        {"source": "a sentence"},
    ],
)
def test_text_cannot_hide_in_identifiers_or_labels(overrides: dict) -> None:
    with pytest.raises(ValidationError):
        make_trace(**overrides)


@pytest.mark.parametrize(
    ("counts", "why"),
    [
        ([[True, 1, 1, 1], [1, 1, 1, 1]], "valid integer"),  # strict: no booleans
        ([[1.0, 1, 1, 1], [1, 1, 1, 1]], "valid integer"),  # nor floats
        ([["1", 1, 1, 1], [1, 1, 1, 1]], "valid integer"),  # nor strings of digits
        ([[-1, 1, 1, 1], [1, 1, 1, 1]], "integers in"),
        ([[2**70, 1, 1, 1], [1, 1, 1, 1]], "integers in"),
        ([[1, 1, 1], [1, 1, 1, 1]], "one entry per expert"),
        ([[1, 1, 1, 1]], "one entry per expert"),
        ([[6, 0, 0, 0], [1, 1, 1, 1]], "more tokens than the prompt"),  # an expert takes a token once
        ([[5, 5, 1, 0], [1, 1, 1, 1]], "prompt_tokens x top_k"),  # a token takes top_k experts
    ],
)
def test_counts_are_strict_and_bounded(counts, why: str) -> None:
    with pytest.raises(ValidationError, match=why):
        make_trace(counts=counts)


def test_the_top_k_bound_is_per_layer() -> None:
    """Layers with different top-k: each layer's sum is bounded by its own k."""
    make_trace(top_k=[2, 1], counts=[[3, 2, 5, 0], [1, 4, 0, 0]])
    with pytest.raises(ValidationError, match="prompt_tokens x top_k"):
        make_trace(top_k=[2, 1], counts=[[3, 2, 5, 0], [1, 4, 0, 1]])


def test_inconsistent_fields_and_launches_are_rejected() -> None:
    with pytest.raises(ValidationError, match="grid x block"):
        KernelLaunch(kernel="k", layer=0, expert=0, grid=(2, 1, 1), block=(32, 1, 1), threads=63)
    with pytest.raises(ValidationError, match="needs an expert"):
        KernelLaunch(kernel="k", layer=0, grid=(1, 1, 1), block=(1, 1, 1), threads=1)
    with pytest.raises(ValidationError, match="cannot name an expert"):
        KernelLaunch(
            kernel="k", layer=0, expert=1, region="layer", grid=(1, 1, 1), block=(1, 1, 1), threads=1
        )
    for bad, why in (
        ({"layer": 0, "expert": 9}, "has 4 experts"),
        ({"layer": 7, "expert": 0}, "not an MoE layer"),
    ):
        with pytest.raises(ValidationError, match=why):
            make_trace(launches=[{**LAUNCHES[0], **bad}])
    with pytest.raises(ValidationError, match="one entry per layer"):
        make_trace(top_k=[2])
    with pytest.raises(ValidationError, match="unique"):
        make_trace(layers=[0, 0])
    with pytest.raises(ValidationError):
        make_trace(dims={"H": 0, "I": 64})  # a width of 0 would divide by zero in a launch model


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_round_trip(tmp_path, suffix: str) -> None:
    traces = [make_trace(f"t-{i}", prompt_tokens=5 + i) for i in range(4)] + [
        make_trace("t-x", row=None, labels={}, dims=None),
        make_trace("t-y", launches=LAUNCHES, region_threads=[0, 128], unit="threads", source="cupti"),
        make_trace("t-z", dims=[{"H": 64, "I": 64}, {"H": 64, "I": 32, "SI": 16, "G": 1}]),
    ]
    path = tmp_path / f"traces{suffix}"
    assert write_traces(path, traces) == len(traces)
    back = list(read_traces(path))
    assert back == traces
    assert not list(tmp_path.glob("*.tmp"))


def test_the_binary_wire_round_trips_and_is_bounded() -> None:
    trace = make_trace(launches=LAUNCHES, region_threads=[0, 128], unit="threads", source="cupti")
    assert RequestTrace.model_validate(unpackb(packb(trace_payload(trace)))) == trace
    for top, code in ((5, 3), (70_000, 1), (2**40, 2)):  # uint16, uint32, int64: the narrowest that holds
        big = make_trace(unit="threads", source="cupti", counts=[[top, 0, 0, 1], [1, 1, 1, 1]])
        assert RequestTrace.model_validate(unpackb(packb(big))) == big
        assert msgpack.unpackb(packb(big))["counts"].code == code
    # the same schema refuses the same things whatever the encoding
    payload = trace_payload(make_trace())
    payload["prompt"] = "how do I pick a lock"
    with pytest.raises(ValidationError, match="Extra inputs"):
        RequestTrace.model_validate(unpackb(packb(payload)))
    for body, why in (
        (msgpack.packb({"trace_id": b"bytes are not text"}), "over a bound"),
        (msgpack.packb({f"k{i}": 1 for i in range(65)}), "at most 64 fields"),
        (msgpack.packb({"counts": msgpack.ExtType(9, b"\0" * 8)}), "unknown extension"),
        (msgpack.packb({"counts": msgpack.ExtType(1, b"\0" * 7)}), "whole number"),
        (msgpack.packb({"x": "y" * 300}), "over a bound"),
        (b"\xc1", "not valid MessagePack"),
        (b"\x92\x01", "not valid MessagePack"),
    ):
        with pytest.raises(WireError, match=why):
            unpackb(body)
    negative = msgpack.ExtType(2, np.array([-1, 0, 0, 0, 0, 0, 0, 0], "<i8").tobytes())
    with pytest.raises(WireError, match="integers in"):
        unpackb(msgpack.packb({**payload, "counts": negative}, default=str))


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


def test_trace_v1_files_are_read_and_keep_their_fingerprints(tmp_path) -> None:
    """Files written by RouteScan before trace/2 (per-kernel launch lists, one file per launch model)
    convert on reading; their fingerprints equal the ones the old code computed (stored beside them)."""
    expected = json.loads((V1 / "fingerprints.json").read_text())
    for name, by_id in expected.items():
        traces = list(read_traces(V1 / name))
        assert [t.schema_version for t in traces] == ["routescan.trace/2"] * len(by_id)
        spec = FingerprintSpec.from_trace(traces[0])
        assert spec.launch_model == name.split(".")[1]
        assert not derives_signals(traces[0])  # no widths: only its own signal (what evaluate reads)
        for trace in traces:
            np.testing.assert_allclose(spec.transform(trace), by_id[trace.trace_id], rtol=0, atol=1e-12)
        # and as Parquet, written by the old layout's columns: converted the same way
        rows = [json.loads(line) for line in (V1 / name).read_text().splitlines()]
        for row in rows:
            row["labels"] = json.dumps(row.get("labels", {}))
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "v1.parquet")
        assert list(read_traces(tmp_path / "v1.parquet")) == traces


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_trace_v2_fingerprints_equal_trace_v1_for_the_same_routing(tiny, model_type: str) -> None:
    """The same tiny model and prompts collected now (routed counts, launch model applied when
    featurising) give exactly the fingerprints the old collector's launch lists gave."""
    from routescan.corpus.prompts import demo_prompts_path, read_prompts
    from routescan.telemetry.emulated import EmulatedCollector, Request

    expected = json.loads((V1 / "fingerprints.json").read_text())
    rows = list(read_prompts(demo_prompts_path()))[:3]
    requests = [Request(r.trace_id, r.text) for r in rows]
    traces = [t for _, t in EmulatedCollector(tiny(model_type), batch_size=4).collect(requests)]
    assert derives_signals(traces[0])
    for signal in ("hf-eager", "router", "vllm-fused-moe"):
        spec = FingerprintSpec.from_trace(traces[0], signal)
        by_id = expected[f"{model_type}.{signal}.jsonl"]
        for trace, x in zip(traces, spec.transform_many(traces), strict=True):
            np.testing.assert_allclose(x, by_id[trace.trace_id], rtol=0, atol=1e-12)


@pytest.mark.parametrize("model_type", ["qwen2_moe", "mixtral"])  # with and without a shared expert
def test_attached_launches_sum_to_what_the_launch_model_derives(tiny, launch_models, model_type) -> None:
    """The per-kernel attachment (for CUPTI validation) and the vectorised derivation agree: summing
    the attached launches per (layer, expert) gives the threads ``signal_threads`` computes."""
    from routescan.telemetry.emulated import EmulatedCollector, Request
    from routescan.telemetry.launch import signal_threads

    requests = [Request("a", "hello there"), Request("b", "a longer request about many things " * 4)]
    for model in launch_models.values():
        collector = EmulatedCollector(tiny(model_type), attach=model)
        for _, trace in collector.collect(requests):
            experts, regions = sum_launches(trace.launches, trace.layers, trace.experts_per_layer)
            derived = signal_threads([trace], model)
            assert np.array_equal(np.concatenate(experts), derived.expert[0]), model.name
            assert np.array_equal(regions, derived.region[0]), model.name


def test_the_sink_resumes_and_cuts_a_torn_line(tmp_path) -> None:
    for suffix in (".jsonl", ".parquet"):
        out = tmp_path / f"t{suffix}"
        with TraceSink(out) as sink:
            sink.write(make_trace("t-1"))
            sink.write(make_trace("t-2"))
        stage = sink.stage
        with stage.open("a") as fh:
            fh.write('{"schema_version": "routescan.trace/2", "trace_')  # a crash mid-line
        notes: list[str] = []
        sink = TraceSink(out, notice=notes.append)
        assert sink.done == {"t-1", "t-2"} and notes and "incomplete" in notes[0]
        sink.write(make_trace("t-3"))
        assert [t.trace_id for t in read_traces(sink.finish())] == ["t-1", "t-2", "t-3"]
        assert TraceSink(out).done == {"t-1", "t-2", "t-3"}  # resuming onto a finished file
        assert TraceSink(out, resume=False).done == set()
