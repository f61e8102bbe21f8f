"""CUPTI activity records -> per-request, per-(layer, expert) kernel launches. Pure logic, no GPU.

How a kernel is attributed. The collector pushes an external correlation id (kind CUSTOM2; PyTorch's
profiler uses CUSTOM0/1) around each MoE region of a request's prefill and remembers what the id
means (request, layer, expert or whole layer). CUPTI then delivers, in buffers that may arrive in any
order and interleaved:

- kernel records (``CONCURRENT_KERNEL``): name, grid, block, times and the ``correlation_id`` of the
  runtime API call that launched it;
- external-correlation records: ``(external_kind, external_id, correlation_id)``, one per API call
  made while an external id was pushed.

Joining the two on ``correlation_id`` gives each kernel its region. Kernels outside every region
(attention, norms, decode if any) are kept apart as ``other``; zero-size launches are dropped and
counted. When a region covers a whole eager experts loop rather than one expert, the loop's kernels
are split per expert in launch order: every hit expert runs two matrix multiplies, preceded by a fixed
number of kernels (``lead``: transformers' loop finds the expert's rows with ``torch.where`` and gathers
them), and the loop visits the hit experts in ascending order, known from the router hook. The lead
is an assumption about the eager loop's code that scripts/validate_cupti.py checks on a GPU; models
whose experts module offers per-expert scopes (the MoEfied reference models) are tagged per expert
and need no split.
"""

from __future__ import annotations

import itertools
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from routescan.telemetry.schema import KernelLaunch, Phase, Region, clean_kernel_name

EXTERNAL_KIND = "CUSTOM2"
_GEMM = re.compile(r"gemm|gemv|cutlass|matmul|sm\d+_xmma|cublas|ampere_|hopper_|volta_|turing_", re.I)


def _kind_name(value: Any) -> str:
    return str(getattr(value, "name", value)).rsplit(".", 1)[-1].upper()


@dataclass(frozen=True)
class KernelRecord:
    name: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    correlation_id: int
    start: int
    end: int
    stream_id: int = 0
    device_id: int = 0

    @property
    def threads(self) -> int:
        gx, gy, gz = self.grid
        bx, by, bz = self.block
        return gx * gy * gz * bx * by * bz


@dataclass(frozen=True)
class CorrelationRecord:
    correlation_id: int
    external_id: int
    external_kind: str


def normalize(record: Any) -> KernelRecord | CorrelationRecord | None:
    """One cupti-python activity record (or anything with the same fields) -> our record, or None for
    kinds we do not use (runtime API records, markers...)."""
    kind = _kind_name(getattr(record, "kind", ""))
    if kind in ("CONCURRENT_KERNEL", "KERNEL"):
        return KernelRecord(
            name=str(record.name),
            grid=(int(record.grid_x), int(record.grid_y), int(record.grid_z)),
            block=(int(record.block_x), int(record.block_y), int(record.block_z)),
            correlation_id=int(record.correlation_id),
            start=int(record.start),
            end=int(record.end),
            stream_id=int(getattr(record, "stream_id", 0)),
            device_id=int(getattr(record, "device_id", 0)),
        )
    if kind == "EXTERNAL_CORRELATION":
        return CorrelationRecord(
            int(record.correlation_id), int(record.external_id), _kind_name(record.external_kind)
        )
    return None


@dataclass(frozen=True)
class RegionTag:
    """What one pushed external id means."""

    request: str
    layer: int | None
    expert: int | None = None  # set: the region is one expert's work
    region: Region = Region.expert
    hit_experts: tuple[int, ...] = ()  # whole-loop regions: the experts the loop visited, ascending
    lead: int = 2  # whole-loop regions: kernels each expert launches before its first GEMM


@dataclass
class AttributionStats:
    kernels: int = 0
    attributed: int = 0
    other: int = 0
    empty: int = 0  # zero-size launches, dropped
    split_mismatch: int = 0  # whole-loop regions whose GEMM count did not match the hit experts

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class KernelAttributor:
    """Collects records from any number of buffers, in any order; joins them per request on demand."""

    external_kind: str = EXTERNAL_KIND
    kernels: list[KernelRecord] = field(default_factory=list)
    correlation: dict[int, int] = field(default_factory=dict)  # API correlation id -> external id
    regions: dict[int, RegionTag] = field(default_factory=dict)
    stats: AttributionStats = field(default_factory=AttributionStats)

    def tag(self, external_id: int, tag: RegionTag) -> None:
        self.regions[external_id] = tag

    def ingest(self, records: Iterable[Any]) -> None:
        """Keep the records we need. Cheap on purpose: CUPTI calls this on its own thread."""
        for raw in records:
            rec = raw if isinstance(raw, KernelRecord | CorrelationRecord) else normalize(raw)
            if isinstance(rec, KernelRecord):
                self.kernels.append(rec)
            elif isinstance(rec, CorrelationRecord) and rec.external_kind == self.external_kind:
                self.correlation[rec.correlation_id] = rec.external_id

    def take(self, request: str) -> tuple[list[KernelLaunch], AttributionStats]:
        """Launches of ``request`` (removed from the buffer), and what happened to its kernels."""
        stats = AttributionStats()
        mine: dict[int, list[KernelRecord]] = defaultdict(list)
        keep: list[KernelRecord] = []
        other: list[KernelRecord] = []
        request_ids = {ext for ext, tag in self.regions.items() if tag.request == request}
        for k in self.kernels:
            ext = self.correlation.get(k.correlation_id)
            if ext in request_ids:
                mine[ext].append(k)
            elif ext is None:
                other.append(k)
            else:
                keep.append(k)
        # kernels outside every region stay behind for the caller's own accounting (see take_other)
        self.kernels = keep + other
        launches: list[KernelLaunch] = []
        for ext, kernels in sorted(mine.items()):
            tag = self.regions.pop(ext)
            kernels.sort(key=lambda k: k.correlation_id)  # launch order on the host
            stats.kernels += len(kernels)
            for k, expert, region in self._assign(tag, kernels, stats):
                if k.threads == 0:
                    stats.empty += 1
                    continue
                stats.attributed += 1
                launches.append(
                    KernelLaunch(
                        kernel=_kernel_name(k.name),
                        layer=tag.layer,
                        expert=expert,
                        region=region,
                        grid=k.grid,
                        block=k.block,
                        threads=k.threads,
                        phase=Phase.prefill,
                        start_ns=k.start,
                        end_ns=max(k.end, k.start),
                    )
                )
        for ext in request_ids & set(self.regions):
            self.regions.pop(ext, None)  # a region that launched nothing
        return launches, stats

    def take_other(self) -> list[KernelRecord]:
        """Kernels no region claimed (attention, norms, ...): drained, for counting only."""
        out = [k for k in self.kernels if k.correlation_id not in self.correlation]
        self.kernels = [k for k in self.kernels if k.correlation_id in self.correlation]
        return out

    @staticmethod
    def _assign(tag: RegionTag, kernels: Sequence[KernelRecord], stats: AttributionStats):
        if tag.region != Region.expert or tag.expert is not None:
            for k in kernels:
                yield k, tag.expert, tag.region
            return
        yield from _split_loop(tag, kernels, stats)


def _split_loop(tag: RegionTag, kernels: Sequence[KernelRecord], stats: AttributionStats):
    """A whole eager loop -> per expert, by GEMM boundaries (two matrix multiplies per expert)."""
    gemms = [i for i, k in enumerate(kernels) if _GEMM.search(k.name)]
    hit = list(tag.hit_experts)
    starts = [g - tag.lead for g in gemms[0::2]]
    ordered = all(a < b for a, b in itertools.pairwise(starts)) and bool(starts) and starts[0] >= 0
    if not hit or len(gemms) != 2 * len(hit) or not ordered:
        stats.split_mismatch += 1
        for k in kernels:
            yield k, None, Region.layer
        return
    for i, k in enumerate(kernels):
        if i < starts[0]:
            yield k, None, Region.layer  # routing bookkeeping before the first expert
            continue
        slot = max(j for j, s in enumerate(starts) if s <= i)
        yield k, hit[slot], Region.expert


def _kernel_name(name: str) -> str:
    return clean_kernel_name(name)
