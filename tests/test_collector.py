"""The emulated collector: exact per-request aggregates, padding excluded, batch == one by one."""

from __future__ import annotations

import pytest
import torch

from routescan.telemetry.collector import Collector
from routescan.telemetry.emulated import CollectionError, EmulatedCollector, Request
from routescan.telemetry.schema import CountMatrix, Region

PROMPTS = [
    "Give three tips for staying healthy.",
    "hi",
    "Explain the difference between TCP and UDP in networking, with an example of each protocol in use.",
    "What is 2 + 2?",
    "Write a limerick about a cat who learns to play the piano at midnight.",
]


def requests() -> list[Request]:
    return [Request(f"r{i}", text, row=i, labels={"label": i % 2}) for i, text in enumerate(PROMPTS)]


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_batched_and_single_prefill_give_identical_traces(tiny, model_type: str) -> None:
    loaded = tiny(model_type)
    batched = list(EmulatedCollector(loaded, batch_size=5).collect(requests()))
    single = list(EmulatedCollector(loaded, batch_size=1).collect(requests()))
    assert isinstance(EmulatedCollector(loaded), Collector)
    assert [r.trace_id for r, _ in batched] == [f"r{i}" for i in range(len(PROMPTS))]
    for (_, a), (_, b) in zip(batched, single, strict=True):
        assert a == b


def test_router_counts_cover_exactly_the_real_tokens(tiny) -> None:
    loaded = tiny("mixtral")
    for request, trace in EmulatedCollector(loaded, batch_size=5).collect(requests()):
        n_tokens = len(loaded.encoder.encode(request.text))
        assert trace.prompt_tokens == n_tokens
        # every real token picks top_k experts in every MoE layer; padding adds nothing
        rows = trace.counts.rows(trace.experts_per_layer)
        assert [int(row.sum()) for row in rows] == [n_tokens * 2] * len(trace.layers)


def test_router_counts_match_an_independent_forward(tiny) -> None:
    """Counts from the adapter hooks equal a bincount of transformers' own router outputs."""
    loaded = tiny("olmoe")
    text = PROMPTS[2]
    trace = next(iter(EmulatedCollector(loaded).collect([Request("x", text)])))[1]
    ids = torch.tensor([loaded.encoder.encode(text)])
    with torch.no_grad():
        out = loaded.model(input_ids=ids, output_router_logits=True, use_cache=False)
    got = trace.counts.tolist(trace.experts_per_layer)
    for i, logits in enumerate(out.router_logits):
        expected = torch.bincount(
            logits.softmax(-1).topk(2, dim=-1).indices.reshape(-1), minlength=8
        ).tolist()
        assert got[i] == expected
    # research code reads the same counts without traces
    matrix = EmulatedCollector(loaded).count_matrix([loaded.encoder.encode(text)])
    assert matrix.shape == (1, sum(trace.experts_per_layer)) and (matrix[0] == trace.counts.flat).all()


def test_trace_shape_and_no_per_token_order(tiny, launch_models) -> None:
    loaded = tiny("qwen2_moe")
    trace = next(iter(EmulatedCollector(loaded).collect(requests()[:1])))[1]
    assert trace.collector == "emulated" and trace.experts_implementation == "eager"
    assert trace.source == "router" and trace.unit == "tokens" and trace.launches is None
    assert trace.labels == {"label": 0} and trace.row == 0
    assert trace.dims is not None and trace.dims.SI > 0  # qwen2_moe's shared expert
    # aggregates only: one count per (layer, expert), never a token's experts
    assert trace.counts.flat.size == sum(trace.experts_per_layer)
    attached = next(
        iter(EmulatedCollector(loaded, attach=launch_models["hf-eager"]).collect(requests()[:1]))
    )[1]
    assert {x.region for x in attached.launches} == {Region.expert, Region.layer, Region.shared}
    assert attached.counts == trace.counts


def test_too_long_and_empty_requests_are_refused(tiny) -> None:
    collector = EmulatedCollector(tiny("mixtral"), max_tokens=10)
    with pytest.raises(CollectionError, match=r"r-long: .* exceed max_tokens=10"):
        list(collector.collect([Request("r-long", "x" * 50)]))
    # the up-front check names every over-long request before anything is collected
    batch = [Request("r-ok", "hi"), Request("r-long", "x" * 50), Request("r-longer", "x" * 80)]
    with pytest.raises(CollectionError, match=r"2 request\(s\) exceed max_tokens=10 \(the longest, r-longer"):
        collector.check_lengths(batch)
    collector.check_lengths(batch[:1])


def test_counting_all_layers_at_once_equals_layer_by_layer() -> None:
    """routed_counts' one-bincount path (layers of one width) gives each layer's own bincount, and
    an expert id past the width is refused rather than counted in the next layer."""
    import numpy as np

    from routescan.telemetry.collector import LayerShape, routed_counts
    from routescan.telemetry.schema import LayerDims

    gen = torch.Generator().manual_seed(0)
    dims = LayerDims(H=8, I=8)
    shapes = [LayerShape(layer, 6, 2, dims) for layer in (1, 3, 4)]
    selections = {s.layer: torch.randint(0, 6, (20, 2), generator=gen) for s in shapes}
    got = routed_counts(selections, 5, 9, shapes)
    want = np.concatenate(
        [torch.bincount(selections[s.layer][5:14].reshape(-1), minlength=6).numpy() for s in shapes]
    )
    assert got.tolist() == want.tolist() and got.sum() == 3 * 9 * 2
    ragged = [LayerShape(1, 6, 2, dims), LayerShape(3, 7, 2, dims)]
    assert routed_counts(selections, 0, 4, ragged).size == 13
    selections[3][6, 0] = 6
    with pytest.raises(ValueError, match=r"outside 0\.\.5"):
        routed_counts(selections, 5, 9, shapes)


def test_windows_are_the_counts_of_each_chunk_of_prompt_tokens(tiny) -> None:
    """--window: each window's counts equal a count over exactly its prompt positions (from an
    independent recording of the same forward), the windows sum to the request, and batching does
    not change them; short prompts carry no windows."""
    loaded = tiny("qwen2_moe")
    w = 5
    batched = [t for _, t in EmulatedCollector(loaded, batch_size=5, window=w).collect(requests())]
    single = [t for _, t in EmulatedCollector(loaded, batch_size=1, window=w).collect(requests())]
    assert batched == single
    for request, trace in zip(requests(), batched, strict=True):
        ids = loaded.encoder.encode(request.text)
        if len(ids) <= w:
            assert trace.windows is None
            assert trace.window_traces() == [trace]
            continue
        assert trace.windows is not None and trace.windows.tokens == w
        with torch.inference_mode(), loaded.adapter.record() as rec:
            loaded.model(input_ids=torch.tensor([ids]), use_cache=False)
            selections = rec.selections()
        parts = trace.window_traces()
        assert [p.prompt_tokens for p in parts] == trace.window_tokens()
        assert sum(trace.window_tokens()) == len(ids)
        for k, part in enumerate(parts):
            expected = torch.cat(
                [
                    torch.bincount(selections[layer][k * w : (k + 1) * w].reshape(-1), minlength=n)
                    for layer, n in zip(trace.layers, trace.experts_per_layer, strict=True)
                ]
            )
            assert part.counts.flat.tolist() == expected.tolist()
            assert part.windows is None and part.trace_id == trace.trace_id


def test_windows_that_do_not_add_up_are_refused(tiny) -> None:
    from pydantic import ValidationError

    loaded = tiny("mixtral")
    (_, trace), *_ = EmulatedCollector(loaded, window=4).collect(requests()[2:3])
    assert trace.windows is not None
    data = trace.model_dump()
    first = trace.windows.counts[0].flat.copy()
    first[0] += 1
    bad = {**data, "windows": {"tokens": 4, "counts": [CountMatrix(first), *trace.windows.counts[1:]]}}
    with pytest.raises(ValidationError, match="sum to the trace's counts"):
        type(trace).model_validate(bad)
    with pytest.raises(ValidationError, match="windows of 3 tokens"):
        type(trace).model_validate({**data, "windows": {"tokens": 3, "counts": list(trace.windows.counts)}})
