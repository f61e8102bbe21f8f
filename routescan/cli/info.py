"""`routescan info`: what this host offers the collectors (GPU facts from NVML, or why there are none)."""

from __future__ import annotations

from typing import Annotated

import typer

from routescan.cli.common import console


def info(
    json_out: Annotated[bool, typer.Option("--json", help="Print the versioned JSON report.")] = False,
) -> None:
    """Show the GPUs NVML sees (name, UUID, driver and CUDA versions, memory, compute capability, the
    processes using each), or say plainly that there is none and which collector still works."""
    import torch

    from routescan.telemetry.nvml import device_report

    report = device_report()
    if json_out:
        typer.echo(report.model_dump_json(indent=2))
        return
    console.print(f"torch {torch.__version__}, CUDA available to torch: {torch.cuda.is_available()}")
    if not report.available:
        typer.echo(f"no GPU: {report.reason}")
        return
    typer.echo(f"NVIDIA driver {report.driver_version}, CUDA driver API {report.cuda_driver_version}")
    for g in report.gpus:
        typer.echo(
            f"GPU {g.index}: {g.name} ({g.uuid}), compute capability {g.compute_capability}, "
            f"memory {g.memory_used_mib:.0f} / {g.memory_total_mib:.0f} MiB used, "
            f"{len(g.processes)} process(es): {', '.join(str(p.pid) for p in g.processes) or '-'}"
        )
