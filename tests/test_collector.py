"""The emulated collector: exact per-request aggregates, padding excluded, batch == one by one."""

from __future__ import annotations

import pytest
import torch

from routescan.telemetry.emulated import CollectionError, EmulatedCollector, Request
from routescan.telemetry.schema import Region

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
def test_batched_and_single_prefill_give_identical_traces(tiny, launch_models, model_type: str) -> None:
    loaded = tiny(model_type)
    lms = [launch_models["hf-eager"], launch_models["router"]]
    batched = list(EmulatedCollector(loaded, lms, batch_size=5).collect(requests()))
    single = list(EmulatedCollector(loaded, lms, batch_size=1).collect(requests()))
    assert [r.trace_id for r, _ in batched] == [f"r{i}" for i in range(len(PROMPTS))]
    for (_, a), (_, b) in zip(batched, single, strict=True):
        for name in ("hf-eager", "router"):
            assert a[name].model_dump() == b[name].model_dump()


def test_router_counts_cover_exactly_the_real_tokens(tiny, launch_models) -> None:
    loaded = tiny("mixtral")
    collector = EmulatedCollector(loaded, [launch_models["router"]], batch_size=5)
    for request, traces in collector.collect(requests()):
        trace = traces["router"]
        n_tokens = len(loaded.encoder.encode(request.text))
        assert trace.prompt_tokens == n_tokens
        per_layer: dict[int, int] = {}
        for launch in trace.launches:
            per_layer[launch.layer] = per_layer.get(launch.layer, 0) + launch.threads
        # every real token picks top_k experts in every MoE layer; padding adds nothing
        assert per_layer == {layer: n_tokens * 2 for layer in trace.layers}


def test_router_counts_match_an_independent_forward(tiny, launch_models) -> None:
    """Counts from the adapter hooks equal a bincount of transformers' own router outputs."""
    loaded = tiny("olmoe")
    text = PROMPTS[2]
    trace = next(iter(EmulatedCollector(loaded, [launch_models["router"]]).collect([Request("x", text)])))[1][
        "router"
    ]
    ids = torch.tensor([loaded.encoder.encode(text)])
    with torch.no_grad():
        out = loaded.model(input_ids=ids, output_router_logits=True, use_cache=False)
    for layer, logits in zip(trace.layers, out.router_logits, strict=True):
        expected = torch.bincount(
            logits.softmax(-1).topk(2, dim=-1).indices.reshape(-1), minlength=8
        ).tolist()
        got = [0] * 8
        for launch in trace.launches:
            if launch.layer == layer:
                got[launch.expert] = launch.threads
        assert got == expected


def test_trace_shape_and_no_per_token_order(tiny, launch_models) -> None:
    loaded = tiny("qwen2_moe")
    trace = next(iter(EmulatedCollector(loaded, [launch_models["hf-eager"]]).collect(requests()[:1])))[1][
        "hf-eager"
    ]
    assert trace.collector == "emulated" and trace.experts_implementation == "eager"
    assert trace.labels == {"label": 0} and trace.row == 0
    assert {x.region for x in trace.launches} == {Region.expert, Region.layer, Region.shared}
    # aggregates only: at most one launch per (kernel, layer, expert)
    keys = [(x.kernel, x.layer, x.expert) for x in trace.launches]
    assert len(keys) == len(set(keys))


def test_too_long_and_empty_requests_are_refused(tiny, launch_models) -> None:
    loaded = tiny("mixtral")
    collector = EmulatedCollector(loaded, [launch_models["router"]], max_tokens=10)
    with pytest.raises(CollectionError, match=r"r-long: .* exceed max_tokens=10"):
        collector.route([Request("r-long", "x" * 50)])
