"""Device facts from NVML (``nvidia-ml-py``), for `routescan info` and for trace provenance."""

from __future__ import annotations

import importlib
from typing import Any

from pydantic import BaseModel, ConfigDict


class GpuProcess(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pid: int
    used_memory_mib: float | None


class GpuFacts(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index: int
    name: str
    uuid: str
    memory_total_mib: float
    memory_used_mib: float
    compute_capability: str
    processes: list[GpuProcess]


class DeviceReport(BaseModel):
    """What `routescan info --json` prints: versioned, so scripts can rely on it."""

    model_config = ConfigDict(extra="forbid")

    schema_version: str = "routescan.info/1"
    available: bool
    reason: str = ""
    driver_version: str | None = None
    cuda_driver_version: str | None = None
    gpus: list[GpuFacts] = []


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def device_report() -> DeviceReport:
    """NVML facts, or ``available=False`` with the reason (no package, no driver, no GPU)."""
    try:
        nv = importlib.import_module("pynvml")
    except ImportError:
        return DeviceReport(
            available=False,
            reason="nvidia-ml-py is not installed (pip install 'routescan[gpu]'); cannot query GPUs",
        )
    try:
        nv.nvmlInit()
    except nv.NVMLError as exc:
        missing = isinstance(exc, getattr(nv, "NVMLError_LibraryNotFound", ())) or "Not Found" in str(exc)
        reason = "no NVIDIA driver on this machine (NVML library not found)" if missing else f"NVML: {exc}"
        return DeviceReport(available=False, reason=reason + "; the emulated collector works without one")
    try:
        cuda = int(nv.nvmlSystemGetCudaDriverVersion())
        report = DeviceReport(
            available=True,
            driver_version=_text(nv.nvmlSystemGetDriverVersion()),
            cuda_driver_version=f"{cuda // 1000}.{(cuda % 1000) // 10}",
        )
        for i in range(nv.nvmlDeviceGetCount()):
            h = nv.nvmlDeviceGetHandleByIndex(i)
            mem = nv.nvmlDeviceGetMemoryInfo(h)
            major, minor = nv.nvmlDeviceGetCudaComputeCapability(h)
            procs = [
                GpuProcess(
                    pid=int(p.pid),
                    used_memory_mib=(p.usedGpuMemory / 2**20) if isinstance(p.usedGpuMemory, int) else None,
                )
                for p in nv.nvmlDeviceGetComputeRunningProcesses(h)
            ]
            report.gpus.append(
                GpuFacts(
                    index=i,
                    name=_text(nv.nvmlDeviceGetName(h)),
                    uuid=_text(nv.nvmlDeviceGetUUID(h)),
                    memory_total_mib=mem.total / 2**20,
                    memory_used_mib=mem.used / 2**20,
                    compute_capability=f"{major}.{minor}",
                    processes=procs,
                )
            )
        if not report.gpus:
            report.available = False
            report.reason = "the NVIDIA driver is loaded but reports no GPU"
        return report
    finally:
        nv.nvmlShutdown()
