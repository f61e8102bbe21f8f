"""Launch models: a safe formula language, and the launch sizes each backend really depends on."""

from __future__ import annotations

import copy

import pytest
import yaml

from routescan.config import config_dir
from routescan.telemetry.launch import Formula, LaunchModel, LaunchModelError
from routescan.telemetry.registry import available_launch_models, load_launch_model
from routescan.telemetry.schema import Region

DIMS = {"E": 8, "K": 2, "H": 64, "I": 32, "SI": 0, "G": 2}


def expert_threads(launches) -> dict[int, int]:
    out: dict[int, int] = {}
    for launch in launches:
        if launch.region == Region.expert:
            out[launch.expert] = out.get(launch.expert, 0) + launch.threads
    return out


@pytest.mark.parametrize(
    "source",
    ["__import__('os')", "M.__class__", "open('x')", "[1, 2]", "M / 2", "1.5 * M", "lambda: 1", "M if"],
)
def test_formula_language_rejects_anything_but_integer_arithmetic(source: str) -> None:
    with pytest.raises(LaunchModelError):
        Formula.parse(source)


def test_formula_evaluation() -> None:
    assert Formula.parse("cdiv(M * H, 512)")({"M": 3, "H": 100}) == 1
    assert Formula.parse("cdiv(M * H, 512)")({"M": 6, "H": 100}) == 2
    assert Formula.parse("pow2ceil(E)")({"E": 9}) == 16
    assert Formula.parse("max(1, M) if M > 4 else 0")({"M": 3}) == 0
    with pytest.raises(LaunchModelError, match="unknown variables"):
        Formula.parse("M + Q")({"M": 1})


def test_builtin_launch_models_load() -> None:
    assert {"hf-eager", "router", "vllm-fused-moe", "grouped-mm"} <= set(available_launch_models())
    with pytest.raises(LaunchModelError, match="unknown launch model"):
        load_launch_model("no-such-backend")


def test_hf_eager_follows_per_expert_counts(launch_models) -> None:
    eager = launch_models["hf-eager"]
    counts = [0, 1, 5, 40, 300, 0, 2, 0]
    launches = eager.layer_launches(0, DIMS, counts, tokens=sum(counts) // 2)
    per_expert = expert_threads(launches)
    assert set(per_expert) == {1, 2, 3, 4, 6}, "experts with no tokens launch nothing"
    ordered = [per_expert[e] for e in (1, 2, 3, 4)]
    assert ordered == sorted(ordered) and ordered[0] < ordered[-1], "more tokens, more threads"
    assert eager.per_expert
    # the same count gives the same launches whichever expert it lands on
    swapped = eager.layer_launches(0, DIMS, [0, 5, 1, 40, 300, 0, 2, 0], tokens=sum(counts) // 2)
    assert expert_threads(swapped)[1] == per_expert[2]


def test_router_source_counts_tokens(launch_models) -> None:
    counts = [3, 0, 7, 1, 0, 0, 4, 1]
    launches = launch_models["router"].layer_launches(2, DIMS, counts, tokens=8)
    assert expert_threads(launches) == {0: 3, 2: 7, 3: 1, 6: 4, 7: 1}
    assert launch_models["router"].unit.value == "tokens"


@pytest.mark.parametrize("name", ["vllm-fused-moe", "grouped-mm"])
def test_fused_backends_do_not_depend_on_routing(launch_models, name: str) -> None:
    model = launch_models[name]
    assert not model.per_expert
    a = model.layer_launches(0, DIMS, [16, 0, 0, 0, 0, 0, 0, 0], tokens=8)
    b = model.layer_launches(0, DIMS, [2, 2, 2, 2, 2, 2, 2, 2], tokens=8)
    assert [x.model_dump() for x in a] == [x.model_dump() for x in b]
    more = model.layer_launches(0, DIMS, [200] + [0] * 7, tokens=100)
    assert sum(x.threads for x in more) > sum(x.threads for x in a), "but they do grow with the token count"


def test_vllm_worked_example_from_the_source() -> None:
    """Qwen3-30B-A3B (E=128, top-8, N=1536), M=4096, BLOCK_M=64, BLOCK_N=128, 4 warps -> 979,968 threads
    in the w13 launch, for any routing (vLLM fused_moe.py / moe_align_block_size.py)."""
    data = yaml.safe_load((config_dir() / "launch" / "vllm-fused-moe.yaml").read_text())
    data = copy.deepcopy(data)
    for kernel in data["kernels"]:
        if "choose" in kernel:
            kernel["choose"] = [{"set": {"BM": 64, "BN": 128}}]
    model = LaunchModel.from_dict(data)
    dims = {"E": 128, "K": 8, "H": 2048, "I": 768, "SI": 0, "G": 2}
    launches = model.layer_launches(0, dims, [4096 * 8 // 128] * 128, tokens=4096)
    w13 = next(x for x in launches if x.kernel == "fused_moe_kernel_w13")
    assert w13.threads == 979_968
    skewed = model.layer_launches(0, dims, [4096 * 8] + [0] * 127, tokens=4096)
    assert next(x for x in skewed if x.kernel == "fused_moe_kernel_w13").threads == 979_968


def test_shared_expert_kernels_only_when_the_layer_has_one(launch_models) -> None:
    eager = launch_models["hf-eager"]
    plain = eager.layer_launches(0, DIMS, [1] * 8, tokens=4)
    shared = eager.layer_launches(0, {**DIMS, "SI": 64}, [1] * 8, tokens=4)
    assert not [x for x in plain if x.region == Region.shared]
    assert {x.kernel for x in shared if x.region == Region.shared} >= {"shared_gemm_gate", "shared_gemm_down"}


def test_params_override_and_bad_files(launch_models, tmp_path) -> None:
    eager = launch_models["hf-eager"]
    wider = eager.with_params(EW_THREADS=256)
    a = expert_threads(eager.layer_launches(0, DIMS, [50] + [0] * 7, tokens=25))
    b = expert_threads(wider.layer_launches(0, DIMS, [50] + [0] * 7, tokens=25))
    assert a != b
    with pytest.raises(LaunchModelError, match="unknown params"):
        eager.with_params(NOPE=1)
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: bad\nkernels:\n  - name: k\n    scope: expert\n    grid: ['M.real']\n    block: [1]\n"
    )
    with pytest.raises(LaunchModelError, match="not allowed"):
        load_launch_model(str(bad))
    with pytest.raises(LaunchModelError, match="counts for 8 experts"):
        eager.layer_launches(0, DIMS, [1, 2], tokens=2)


def test_expert_threads_is_the_per_kernel_sum_for_a_whole_count_matrix(launch_models) -> None:
    """The vectorised function (one formula evaluation per distinct count, looked up for the whole
    matrix) equals summing the per-kernel launches expert by expert, for every launch model."""
    import numpy as np

    rng = np.random.default_rng(0)
    matrix = rng.integers(0, 90, size=(16, 8))
    matrix[0] = 0  # a request that hit nothing in this layer
    dims = {**DIMS, "SI": 64}
    for name, model in launch_models.items():
        got = model.expert_threads(dims, matrix)
        for row, counts in zip(got, matrix.tolist(), strict=True):
            launches = model.layer_launches(0, dims, counts, tokens=max(1, sum(counts) // 2))
            per_expert = [0] * 8
            for x in launches:
                if x.region == Region.expert:
                    per_expert[x.expert] += x.threads
            assert row.tolist() == per_expert, name
        tokens = 44
        region = sum(
            x.threads for x in model.layer_launches(0, dims, [0] * 8, tokens) if x.region != Region.expert
        )
        assert model.region_threads(dims, tokens) == region, name


def test_expert_kernels_may_not_depend_on_prompt_length(tmp_path) -> None:
    bad = tmp_path / "t.yaml"
    bad.write_text("name: t\nkernels:\n  - name: k\n    scope: expert\n    grid: ['M + T']\n    block: [1]\n")
    with pytest.raises(LaunchModelError, match="not on the prompt length T"):
        load_launch_model(str(bad))


def test_geometry_cache_is_per_model_and_exact(launch_models) -> None:
    eager = launch_models["hf-eager"]
    first = eager.layer_launches(0, DIMS, [3, 0, 0, 0, 0, 0, 0, 1], tokens=2)
    wide = eager.layer_launches(0, {**DIMS, "H": 4096}, [3, 0, 0, 0, 0, 0, 0, 1], tokens=2)
    assert [x.threads for x in first] != [x.threads for x in wide], "dims are part of the cache key"
    assert [x.model_dump() for x in eager.layer_launches(0, DIMS, [3, 0, 0, 0, 0, 0, 0, 1], tokens=2)] == [
        x.model_dump() for x in first
    ]
    narrow = eager.expert_threads(DIMS, [3, 0, 0, 0, 0, 0, 0, 1])
    assert (eager.expert_threads({**DIMS, "H": 4096}, [3, 0, 0, 0, 0, 0, 0, 1]) != narrow).any()
    assert (eager.expert_threads(DIMS, [3, 0, 0, 0, 0, 0, 0, 1]) == narrow).all()


def test_tiles_fitted_to_observed_launches_reproduce_them(tiny, launch_models) -> None:
    """scripts/validate_cupti.py's fit, on CPU: kernel launches of a launch model with other GEMM
    tiles stand in for what a GPU chose; the fitted table reproduces their per-expert threads."""
    import numpy as np
    import yaml

    from routescan.config import config_dir
    from routescan.telemetry.emulated import EmulatedCollector, Request
    from routescan.telemetry.launch import LaunchModel, signal_threads
    from routescan.telemetry.schema import Unit, sum_launches
    from routescan.telemetry.tiles import fitted_launch_model, gemm_observations

    doc = yaml.safe_load((config_dir() / "launch" / "hf-eager.yaml").read_text())
    gpu_doc = fitted_launch_model(doc, {}, {}, name="other-gpu")
    for kernel in gpu_doc["kernels"]:
        if kernel["name"] in ("gemm_gate_up", "gemm_down"):
            kernel["choose"] = [{"when": "GN <= 8", "set": {"TM": 32, "TN": 8, "CTA": 64, "SPLITK": 1}},
                                {"set": {"TM": 64, "TN": 32, "CTA": 128, "SPLITK": 1}}]  # fmt: skip
    gpu = LaunchModel.from_dict(gpu_doc)
    loaded = tiny("mixtral")
    requests = [Request(f"r{i}", f"request {i} " * (1 + 3 * i)) for i in range(6)]
    pairs = []
    for _, routed in EmulatedCollector(loaded, attach=gpu).collect(requests):
        measured = routed.model_copy(update={"source": "cupti", "unit": Unit.threads})
        pairs.append((measured, routed))
    obs = gemm_observations(pairs)
    assert set(obs) == {"gemm_gate_up", "gemm_down"}
    layer = loaded.adapter.layers[0]
    dims = {"H": layer.hidden, "I": layer.intermediate, "G": 2}
    fitted = LaunchModel.from_dict(fitted_launch_model(doc, obs, dims, name="fitted"))
    for measured, routed in pairs:
        got = signal_threads([routed], fitted).expert[0]
        want = np.concatenate(sum_launches(measured.launches, routed.layers, routed.experts_per_layer)[0])
        assert np.array_equal(got, want)
    with pytest.raises(ValueError, match="attach"):
        gemm_observations([(pairs[0][1].model_copy(update={"launches": None}), pairs[0][1])])
