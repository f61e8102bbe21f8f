"""CUPTI record conversion and attribution, with activity records built in cupti-python's documented
field layout (no GPU needed), and the real no-driver error paths."""

from __future__ import annotations

import random
from enum import Enum
from types import SimpleNamespace

import pytest

from routescan.features.fingerprint import FingerprintSpec
from routescan.telemetry.cupti_records import KernelAttributor, RegionTag, normalize
from routescan.telemetry.emulated import EmulatedCollector, Request
from routescan.telemetry.schema import Region, RequestTrace, sum_launches


class Kind(Enum):  # stands for cupti.ActivityKind: the attributor reads .name
    CONCURRENT_KERNEL = 10
    EXTERNAL_CORRELATION = 39
    RUNTIME = 5


class ExtKind(Enum):
    CUSTOM0 = 5
    CUSTOM2 = 7


class Builder:
    """Emits records the way CUPTI would: an API correlation id per launch, an external-correlation
    record for launches made while a tag was pushed, a kernel record per launch."""

    def __init__(self) -> None:
        self.corr = 1000
        self.records: list[SimpleNamespace] = []
        self.clock = 0

    def launch(self, name: str, grid, block, external: int | None = None, kind: ExtKind = ExtKind.CUSTOM2):
        self.corr += 1
        self.clock += 10
        self.records.append(SimpleNamespace(kind=Kind.RUNTIME, correlation_id=self.corr, start=0, end=1))
        if external is not None:
            self.records.append(
                SimpleNamespace(
                    kind=Kind.EXTERNAL_CORRELATION,
                    correlation_id=self.corr,
                    external_id=external,
                    external_kind=kind,
                )
            )
        gx, gy, gz = grid
        bx, by, bz = block
        self.records.append(
            SimpleNamespace(
                kind=Kind.CONCURRENT_KERNEL,
                name=name,
                grid_x=gx,
                grid_y=gy,
                grid_z=gz,
                block_x=bx,
                block_y=by,
                block_z=bz,
                correlation_id=self.corr,
                start=self.clock,
                end=self.clock + 5,
                stream_id=7,
                device_id=0,
            )
        )

    def buffers(self, n: int, seed: int) -> list[list[SimpleNamespace]]:
        """The records cut into ``n`` buffers delivered in a shuffled order."""
        cuts = sorted(random.Random(seed).sample(range(1, len(self.records)), n - 1))
        parts = [self.records[a:b] for a, b in zip([0, *cuts], [*cuts, len(self.records)], strict=True)]
        random.Random(seed + 1).shuffle(parts)
        return parts


def test_normalize_reads_the_documented_fields() -> None:
    b = Builder()
    b.launch("void cutlass::Kernel<sm90_gemm>(Params)", (4, 2, 1), (128, 1, 1), external=3)
    recs = [normalize(r) for r in b.records]
    assert recs[0] is None  # runtime API record: not needed
    assert recs[1].external_id == 3 and recs[1].external_kind == "CUSTOM2"
    assert recs[2].threads == 4 * 2 * 128 and recs[2].grid == (4, 2, 1)


def test_per_expert_regions_interleaved_out_of_order_with_empty_and_foreign_launches() -> None:
    b = Builder()
    att = KernelAttributor()
    ext = 0
    expected: dict[tuple[str, int, int], int] = {}
    for request in ("r1", "r2"):
        b.launch("attention_kernel", (8, 1, 1), (256, 1, 1))  # outside any region: kept apart
        for layer in (0, 3):
            for expert in (1, 4):
                ext += 1
                att.tag(ext, RegionTag(request, layer, expert, Region.expert))
                m = 3 + expert + layer + (request == "r2")
                b.launch("gemm_gate_up", (m, 1, 1), (128, 1, 1), external=ext)
                b.launch("act_fn", (m, 2, 1), (128, 1, 1), external=ext)
                b.launch("empty_fill", (0, 1, 1), (128, 1, 1), external=ext)  # zero-size: dropped
                expected[(request, layer, expert)] = m * 128 + m * 2 * 128
            ext += 1
            att.tag(ext, RegionTag(request, layer, None, Region.shared))
            b.launch("shared_gemm", (5, 1, 1), (64, 1, 1), external=ext)
        b.launch("profiler_kernel", (1, 1, 1), (32, 1, 1), external=999, kind=ExtKind.CUSTOM0)  # kineto's id
    for buf in b.buffers(5, seed=3):
        att.ingest(buf)
    for request in ("r2", "r1"):  # requests taken in any order
        launches, stats = att.take(request)
        got: dict[tuple[int, int], int] = {}
        for launch in launches:
            if launch.region == Region.expert:
                got[(launch.layer, launch.expert)] = (
                    got.get((launch.layer, launch.expert), 0) + launch.threads
                )
        assert got == {(layer, e): t for (r, layer, e), t in expected.items() if r == request}
        assert sum(1 for x in launches if x.region == Region.shared) == 2
        assert stats.empty == 4 and stats.attributed == 4 * 2 + 2
    other = att.take_other()
    assert sorted(k.name for k in other) == [
        "attention_kernel",
        "attention_kernel",
        "profiler_kernel",
        "profiler_kernel",
    ]
    assert not att.kernels and not att.regions


def test_whole_loop_region_is_split_per_expert_by_gemm_boundaries(tiny, launch_models) -> None:
    """Emulated hf-eager launches replayed as kernel records of whole-layer regions: attribution
    must give back exactly the emulator's per-(layer, expert) threads."""
    loaded = tiny("mixtral")
    emulated = next(
        EmulatedCollector(loaded, attach=launch_models["hf-eager"]).collect(
            [Request("q", "some text to route through the tiny model")]
        )
    )[1]
    b, att = Builder(), KernelAttributor()
    for ext, layer in enumerate(emulated.layers, start=1):
        mine = [x for x in emulated.launches if x.layer == layer and x.region == Region.expert]
        hit = tuple(sorted({x.expert for x in mine}))
        att.tag(ext, RegionTag("q", layer, None, Region.expert, hit, lead=1))
        b.launch("one_hot_mask", (2, 1, 1), (128, 1, 1), external=ext)  # loop prelude
        kinds = list(dict.fromkeys(x.kernel for x in mine))  # the launch model lists kernel-major
        for x in sorted(mine, key=lambda x: (x.expert, kinds.index(x.kernel))):  # the GPU runs loop order
            b.launch(x.kernel, x.grid, x.block, external=ext)
    for buf in b.buffers(4, seed=0):
        att.ingest(buf)
    launches, stats = att.take("q")
    assert stats.split_mismatch == 0
    counts, regions = sum_launches(launches, emulated.layers, emulated.experts_per_layer)
    trace = RequestTrace.model_validate(
        {
            **emulated.model_dump(exclude={"counts", "launches"}),
            "collector": "cupti",
            "source": "cupti",
            "unit": "threads",
            "counts": counts,
            "region_threads": regions,
        }
    )
    expected, _ = sum_launches(emulated.launches, emulated.layers, emulated.experts_per_layer)
    assert counts == expected
    spec = FingerprintSpec.from_trace(emulated, "hf-eager")
    assert (FingerprintSpec.from_trace(trace).transform(trace) == spec.transform(emulated)).all()


def test_a_loop_that_does_not_match_its_hit_experts_is_kept_whole() -> None:
    b, att = Builder(), KernelAttributor()
    att.tag(1, RegionTag("q", 0, None, Region.expert, (0, 2)))
    b.launch("gemm_a", (1, 1, 1), (32, 1, 1), external=1)  # one GEMM for two experts: inconsistent
    att.ingest(b.records)
    launches, stats = att.take("q")
    assert stats.split_mismatch == 1 and [x.region for x in launches] == [Region.layer]


def test_no_driver_gives_one_clear_message() -> None:
    pytest.importorskip("cupti")
    from routescan.telemetry.cupti import CuptiSession, GpuUnavailable

    with pytest.raises(GpuUnavailable, match=r"no NVIDIA driver.*--collector emulated"):
        CuptiSession().start()


def test_error_translation() -> None:
    from routescan.telemetry.cupti import explain_cupti_error

    class cuptiError(RuntimeError):
        status = "Result.ERROR_MULTIPLE_SUBSCRIBERS_NOT_SUPPORTED"

    assert "one per process" in str(explain_cupti_error(cuptiError("x")))


def test_info_without_a_driver() -> None:
    from typer.testing import CliRunner

    from routescan.cli.main import app

    pytest.importorskip("pynvml")
    result = CliRunner().invoke(app, ["info", "--json"])
    assert result.exit_code == 0
    assert '"available": false' in result.stdout and "no NVIDIA driver" in result.stdout
